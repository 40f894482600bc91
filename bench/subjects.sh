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

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    echo "installing from Debian: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/subjects.py "$@"
