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

. bench/debian.sh
need nginx python3
if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${TOKENPROXY_BIN:-}" ]; then
    # Apart: an example builds with the dev-dependencies' features, which would
    # change the tokenproxy binary measured.
    cargo build --release
    cargo build --release --example ws_bench
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/ws.py "$@"
