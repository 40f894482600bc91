#!/usr/bin/env python3
"""Two or more tokenproxy builds side by side with nginx, in interleaved rounds: for tuning
decisions that instruction counts (callgrind.sh) cannot settle, such as scheduling and memory
effects.

    python3 bench/ab.py before=/tmp/tokenproxy-old after=target/release/tokenproxy
    W=2 SCENARIOS="post c1000" ROUNDS=5 python3 bench/ab.py a=BIN_A b=BIN_B

Each round runs, per scenario, nginx then every build in turn, each started fresh with W
workers (nginx worker_processes W; tokenproxy TOKIO_WORKER_THREADS=W). The upstream and the
token endpoint are bench.py's. Prints one line per measurement, then per scenario and build the
median and range over rounds of req/s and p99 as ratios to nginx in the same round.

Environment: W (1), ROUNDS (4), DURATION (seconds, 5), SCENARIOS ("get"; any of bench.py's
get post c1000 rate). Uses bench.py's wrk/oha runners, so run bench/run.sh once first (it
installs nginx, wrk and oha).
"""
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

W = int(os.environ.get("W", "1"))
ROUNDS = int(os.environ.get("ROUNDS", "4"))
DURATION = int(os.environ.get("DURATION", "5"))
SCENARIOS = os.environ.get("SCENARIOS", "get").split()


def main():
    builds = []
    for arg in sys.argv[1:]:
        name, sep, path = arg.partition("=")
        if not sep or not os.access(path, os.X_OK):
            sys.exit(f"usage: ab.py NAME=BINARY [NAME=BINARY ...] ({arg!r} is not NAME=executable)")
        builds.append((name, os.path.abspath(path)))
    if not builds:
        sys.exit("usage: ab.py NAME=BINARY [NAME=BINARY ...]")
    tmp = tempfile.mkdtemp(prefix="tokenproxy-ab-")
    up_port, tok_port = bench.free_ports(2)
    upstream, _tokep = bench.start_backends(tmp, up_port, tok_port)

    def launch(name, path):
        if path is None:
            return bench.launch_proxy("nginx", W, tmp, up_port, tok_port)[:2]
        return bench.launch_proxy("tokenproxy", W, tmp, up_port, tok_port, binary=path,
                                  label=name)[:2]

    targets = [("nginx", None)] + builds
    results = {}
    try:
        for rnd in range(ROUNDS):
            for sc in SCENARIOS:
                for name, path in targets:
                    proc, url = launch(name, path)
                    m = bench.measure(proc.pid, sc, url, DURATION, tmp, upstream.pid)
                    bench.stop(proc)
                    bench.STARTED.remove(proc)
                    results.setdefault((sc, name), []).append(m)
                    print(f"r{rnd} w{W} {sc:5} {name:12} {m['rps']:9.0f} req/s "
                          f"p99 {m['p99_ms']:8.3f} ms cpu/100k {m['cpu_s_per_100k']:.2f} s "
                          f"peak {m['peak_rss_mib']:.1f} MiB other-cpu {m['foreign_cpu_pct']:.0f}%",
                          flush=True)
        for sc in SCENARIOS:
            ref = results[(sc, "nginx")]
            for name, _ in builds:
                got = results[(sc, name)]
                rps = [a["rps"] / b["rps"] for a, b in zip(got, ref)]
                p99 = [a["p99_ms"] / b["p99_ms"] for a, b in zip(got, ref)]
                print(f"{sc} w{W} {name}: req/s x{statistics.median(rps):.3f} "
                      f"({min(rps):.2f}-{max(rps):.2f}), p99 x{statistics.median(p99):.2f} "
                      f"({min(p99):.2f}-{max(p99):.2f}) over {len(rps)} rounds")
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
