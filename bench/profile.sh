#!/usr/bin/env bash
# Profile tokenproxy (1 worker) under the small-GET load with perf (Debian linux-perf).
#   bash bench/profile.sh            # PROFILE_SECONDS=10 PROFILE_FREQ=999 SKIP_BUILD=1
#   PROFILE_TARGET=nginx bash bench/profile.sh   # the same load on nginx, for comparison
# Writes bench/results/profile-<timestamp>.txt (flat self time, inclusive time, by DSO).
# perf here samples cpu-clock (no hardware counters in this VM); call graphs use DWARF
# unwinding from .eh_frame, since the release binary has no frame pointers.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/bench.py --profile
