#!/usr/bin/env bash
# Instructions per proxied request under callgrind (see bench/callgrind.py).
#   bash bench/callgrind.sh                     # 20,000 GETs over 50 connections
#   REQUESTS=5000 KEEP=1 bash bench/callgrind.sh  # keep the dump for callgrind_annotate
#   METHOD=POST16K bash bench/callgrind.sh      # 16 KiB POSTs instead
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null 2>&1 || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/callgrind.py
