#!/usr/bin/env bash
# HTTP/2 cleartext small GETs, tokenproxy next to nginx's h2c (issue 18).
#
#   bash bench/h2c.sh                 # 3 rounds x 5 s per measurement, 1 and 2 workers, ~3 min
#   QUICK=1 bash bench/h2c.sh         # smoke run
#
# See bench/h2c.py for what is measured. Results: bench/results/h2c-*.json and
# bench/results/h2c-latest.md. All traffic is on 127.0.0.1; every load run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/debian.sh
need nginx h2load:nghttp2-client python3
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/h2c.py "$@"
