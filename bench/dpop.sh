#!/usr/bin/env bash
# DPoP small GETs next to Bearer small GETs through one tokenproxy (issue 19).
#
#   bash bench/dpop.sh                # 3 rounds x 6 s per client, ~1 min
#   QUICK=1 bash bench/dpop.sh        # smoke run (results not written)
#   ALG=EdDSA bash bench/dpop.sh      # proofs signed with Ed25519
#
# See bench/dpop.py for what is measured. Results: bench/results/dpop-*.json and
# bench/results/dpop-latest.md. All traffic is on 127.0.0.1; every load run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/debian.sh
need nginx wrk python3
if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${TOKENPROXY_BIN:-}" ]; then
    cargo build --release
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/dpop.py "$@"
