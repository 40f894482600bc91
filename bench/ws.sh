#!/usr/bin/env bash
# WebSocket echo round trips: direct, nginx, tokenproxy (issue 24).
#
#   bash bench/ws.sh                # 3 rounds x 5 s per target, ~1 min
#   QUICK=1 bash bench/ws.sh        # smoke run (results not written)
#   WORKERS=2 bash bench/ws.sh       # 2 workers each
#
# See bench/ws.py for what is measured. Results: bench/results/ws-*.json and
# bench/results/ws-latest.md. All traffic is on 127.0.0.1; every load run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ((${#need[@]})); then
    echo "installing from Debian: ${need[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${TOKENPROXY_BIN:-}" ]; then
    # Apart: an example builds with the dev-dependencies' features, which would
    # change the tokenproxy binary measured.
    cargo build --release
    cargo build --release --example ws_bench
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/ws.py "$@"
