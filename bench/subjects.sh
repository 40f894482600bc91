#!/usr/bin/env bash
# Subjects benchmark (issue 16): 100,000 subjects in the store, 1,000 active.
#
#   bash bench/subjects.sh            # full run, ~10 min on 2 cores
#   QUICK=1 bash bench/subjects.sh    # 10,000 subjects, one round: a smoke run
#
# See bench/subjects.py for the phases and knobs. Results: bench/results/subjects-*.json
# and bench/results/subjects-latest.md. All traffic is on 127.0.0.1; every load run is
# bounded in time. Exit status 1 when a bar of the issue is missed.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/debian.sh
need nginx wrk python3
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/subjects.py "$@"
