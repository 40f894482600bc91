#!/usr/bin/env bash
# Soak run: the release binary under continuous load with 3 s tokens and faults
# on a schedule (see tests/soak.rs). Default 10 minutes.
#
#   bash scripts/soak.sh            # SOAK_SECONDS=600
#   SOAK_SECONDS=120 bash scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECONDS="${SOAK_SECONDS:-600}"
echo "soak: ${SOAK_SECONDS}s, ${SOAK_WORKERS:-16} workers (release build)"
cargo test --release --test soak -- --ignored --nocapture 2>&1 | tee /tmp/tokenproxy-soak.log | grep -E "^SOAK|test result|panicked|unexpected" || true
grep -q "test result: ok" /tmp/tokenproxy-soak.log
