#!/usr/bin/env python3
"""HTTP/2 cleartext (prior knowledge) small GETs: tokenproxy next to nginx's h2c.

    bash bench/h2c.sh                  # 3 rounds x 5 s per measurement, 1 and 2 workers
    QUICK=1 bash bench/h2c.sh          # smoke run (1 round x 1 s)

Two load shapes, each by h2load (nghttp2), against the same nginx upstream as bench.py:
  streams  -- 50 concurrent streams on 1 connection (h2load -c1 -m50), how gRPC channels and
              HTTP/2 client pools talk
  conns    -- 50 connections with 1 stream each (h2load -c50 -m1)

The reference is nginx with `listen ... http2` (cleartext HTTP/2) and
`proxy_set_header Authorization "Bearer <static>"`, HTTP/1.1 keep-alive to the upstream, as in
bench.py; tokenproxy is the release binary with its real token flow. Each round runs every
shape against nginx then tokenproxy, each started fresh. Reported: req/s, p50/p99 latency from
h2load's per-request log, CPU seconds per 100k requests, and the ratios to nginx in the same
round (median and range over rounds).

Environment: ROUNDS (3), DURATION (5), WORKERS ("1 2"), QUICK, TOKENPROXY_BIN (the release
binary). Writes
bench/results/h2c-<timestamp>.json and bench/results/h2c-latest.md.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "1" if QUICK else "5"))
WORKERS = [int(w) for w in os.environ.get("WORKERS", "1 2").split()]
SHAPES = {"streams": (1, 50), "conns": (50, 1)}  # name: (connections, streams per connection)


def nginx_h2c_conf(prefix, port, up_port, workers):
    return bench.nginx_common(prefix) + f"""worker_processes {workers};
events {{ worker_connections 16384; }}
http {{
{bench.nginx_http_common(prefix)}  http2_max_requests 100000000;
  upstream api {{
    server 127.0.0.1:{up_port};
    keepalive 1024;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} http2 backlog=4096;
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {bench.STATIC_TOKEN}";
    }}
  }}
}}
"""


def launch(name, w, tmp, up_port, tok_port):
    if name == "tokenproxy":
        binary = os.environ.get("TOKENPROXY_BIN", bench.TOKENPROXY)
        proc, url, _admin = bench.launch_proxy("tokenproxy", w, tmp, up_port, tok_port,
                                               binary=binary)
        return proc, url
    port = bench.free_ports(1)[0]
    tag = os.path.join(tmp, f"nginx-h2c-w{w}-{time.monotonic_ns()}")
    os.makedirs(tag)
    conf = os.path.join(tag, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_h2c_conf(tag, port, up_port, w))
    proc = bench.start(["nginx", "-p", tag, "-c", conf, "-g", "daemon off;"], tag + ".log")
    bench.wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}{bench.PATH}"


def h2load(url, conns, streams, duration, tmp):
    """Runs h2load with prior knowledge; returns requests, req/s and latency percentiles."""
    log_file = os.path.join(tmp, "h2load.log")
    threads = min(2, conns)
    cmd = ["h2load", "-c", str(conns), "-m", str(streams), "-t", str(threads),
           "-D", str(duration), "--warm-up-time=1s", "--log-file", log_file, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    done = failed = 0
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            parts = [p.strip() for p in line[len("requests:"):].split(",")]
            fields = {p.split()[1]: int(p.split()[0]) for p in parts}
            done, failed = fields.get("succeeded", 0), fields.get("failed", 0)
        if line.startswith("status codes:"):
            status_line = line
    if not done:
        raise RuntimeError(f"h2load gave no result: {r.stdout}\n{r.stderr}")
    lat = []
    with open(log_file) as f:
        for row in f:
            cols = row.split()
            if len(cols) >= 3 and cols[1] == "200":
                lat.append(int(cols[2]))
    os.remove(log_file)
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(len(lat) * p))] / 1000 if lat else float("nan")

    return {
        "requests": done, "rps": done / duration, "failed": failed,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "status": status_line,
    }


def measure(proc, upstream, shape, url, tmp):
    conns, streams = SHAPES[shape]
    pids, ups = bench.tree(proc.pid), bench.tree(upstream.pid)
    bench.reset_hwm(pids)
    cpu0, up0 = bench.cpu_of(pids), bench.cpu_of(ups)
    res = h2load(url, conns, streams, DURATION, tmp)
    pids = bench.tree(proc.pid)
    # h2load's warm-up is not counted in its requests; CPU over the whole run is, so CPU per
    # request is slightly pessimistic, alike for both.
    cpu = bench.cpu_of(pids) - cpu0
    res["cpu_s_per_100k"] = cpu / res["requests"] * 1e5
    res["upstream_cpu_s"] = bench.cpu_of(ups) - up0
    res["peak_rss_mib"] = bench.hwm_of(pids) / 1024
    return res


def main():
    if "--report" in sys.argv:
        with open(sys.argv[-1]) as f:
            print(report(json.load(f)))
        return
    tmp = tempfile.mkdtemp(prefix="tokenproxy-h2c-")
    up_port, tok_port = bench.free_ports(2)
    upstream, _tokep = bench.start_backends(tmp, up_port, tok_port)
    samples = []
    try:
        for rnd in range(ROUNDS):
            for w in WORKERS:
                for shape in SHAPES:
                    for name in ("nginx", "tokenproxy"):
                        bench.wait_quiet(30.0)
                        proc, url = launch(name, w, tmp, up_port, tok_port)
                        m = measure(proc, upstream, shape, url, tmp)
                        bench.stop(proc)
                        bench.STARTED.remove(proc)
                        m.update(round=rnd, workers=w, shape=shape, target=name)
                        samples.append(m)
                        print(f"r{rnd} w{w} {shape:7} {name:10} {m['rps']:9.0f} req/s "
                              f"p50 {m['p50_ms']:.3f} ms p99 {m['p99_ms']:.3f} ms "
                              f"cpu/100k {m['cpu_s_per_100k']:.2f} s failed {m['failed']}",
                              flush=True)
    finally:
        bench.stop_all()
    data = {"machine": bench.machine(), "rounds": ROUNDS, "duration_s": DURATION,
            "workers": WORKERS, "samples": samples}
    text = report(data)
    bench.write_results("h2c", data, text)
    print(text)


def report(data):
    out = ["# h2c small GETs: tokenproxy / nginx (same run)", "",
           f"{data['rounds']} rounds x {data['duration_s']} s per measurement; "
           "ratios are tokenproxy / nginx within a round: median (min-max).", "",
           "| workers | shape | nginx req/s | tokenproxy req/s | req/s ratio | p50 ratio "
           "| p99 ratio | CPU/request ratio | failed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for w in data["workers"]:
        for shape in SHAPES:
            rows = {}
            for s in data["samples"]:
                if s["workers"] == w and s["shape"] == shape:
                    rows.setdefault(s["target"], {})[s["round"]] = s
            ng, tp = rows.get("nginx", {}), rows.get("tokenproxy", {})
            rounds = sorted(set(ng) & set(tp))
            if not rounds:
                continue

            def ratio(key):
                r = [tp[i][key] / ng[i][key] for i in rounds if ng[i][key]]
                return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"

            failed = sum(tp[i]["failed"] + ng[i]["failed"] for i in rounds)
            out.append(
                f"| {w} | {shape} ({'/'.join(map(str, SHAPES[shape]))} conns/streams) "
                f"| {statistics.median(ng[i]['rps'] for i in rounds):,.0f} "
                f"| {statistics.median(tp[i]['rps'] for i in rounds):,.0f} "
                f"| {ratio('rps')} | {ratio('p50_ms')} | {ratio('p99_ms')} "
                f"| {ratio('cpu_s_per_100k')} | {failed} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
