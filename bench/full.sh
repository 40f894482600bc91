#!/usr/bin/env bash
# Every benchmark in one run, and one table of tokenproxy against its references (issue 24).
#
#   bash bench/full.sh                # ~30 min on 2 cores; nothing else should run meanwhile
#
# Runs, one after another on the same release build: bench/run.sh (nginx, HAProxy, 1 and 2
# workers), rss_conns.py (memory per connection, 1 and 2 workers), h2c.sh, subjects.sh,
# dpop.sh (ES256 and EdDSA) and ws.sh (1 and 2 workers), then bench/summary.py, which writes
# bench/results/full-latest.md: one table with every figure and its target. Each part also
# writes its own results as when run alone. All traffic is on 127.0.0.1; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # Apart: an example builds with the dev-dependencies' features, which would
    # change the tokenproxy binary measured.
    cargo build --release
    cargo build --release --example ws_bench
fi
export SKIP_BUILD=1
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
started=$(date +%s)
log=$(mktemp -d /tmp/tokenproxy-full-bench.XXXXXX)
echo "logs in $log"

bash bench/run.sh 2>&1 | tee "$log/run.log"
for w in 1 2; do
    TOKIO_WORKER_THREADS=$w python3 bench/rss_conns.py 1000 2>&1 | tee "$log/rss-w$w.log"
done
bash bench/h2c.sh 2>&1 | tee "$log/h2c.log"
bash bench/subjects.sh 2>&1 | tee "$log/subjects.log" || echo "subjects: a bar was missed (see above)"
ALG=ES256 bash bench/dpop.sh 2>&1 | tee "$log/dpop-es256.log"
ALG=EdDSA bash bench/dpop.sh 2>&1 | tee "$log/dpop-eddsa.log"
for w in 1 2; do
    WORKERS=$w bash bench/ws.sh 2>&1 | tee "$log/ws-w$w.log"
done
python3 bench/summary.py --since "$started" --logs "$log"
