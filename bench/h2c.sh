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

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
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
exec python3 bench/h2c.py "$@"
