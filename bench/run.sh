#!/usr/bin/env bash
# Side-by-side benchmark of tokenproxy against nginx and HAProxy (issue 7).
#
#   bash bench/run.sh                 # full run (3 rounds x 6 s per measurement, ~12 min on 2 cores)
#   QUICK=1 bash bench/run.sh         # ~1-2 minute smoke run (numbers not meaningful)
#   ROUNDS=5 DURATION=10 bash bench/run.sh
#
# Other knobs (env): WORKERS="1 2", RATE=5000 (open-loop req/s), RATE_CONNS=100,
# TOKEN_LIFETIME=3, TOKEN_LIFETIMES=5, WRK_THREADS=2, SKIP_BUILD=1.
# Results: bench/results/<timestamp>.json, bench/results/latest.{json,md}.
# All traffic is on 127.0.0.1; every load run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/debian.sh
need nginx haproxy wrk python3
# Open-loop fixed-rate latency: wrk has no fixed-rate mode (wrk2 is not in Debian), so oha
# from crates.io (-q RATE --latency-correction). The first install compiles for ~7 minutes.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
    echo "installing oha from crates.io (cargo install, once)"
    cargo install oha --version 1.16.0 --locked
fi
# The Debian packages may start system services on install; this script never uses them
# (everything runs from its own temporary prefix on free loopback ports).

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release
fi

# 1,000 connections through a proxy need ~2,000+ descriptors per process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

exec python3 bench/bench.py "$@"
