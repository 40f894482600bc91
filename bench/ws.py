#!/usr/bin/env python3
"""WebSocket echo round trips: direct, through nginx and through tokenproxy, in one run.

    bash bench/ws.sh                   # 3 rounds x 5 s per target, 1 worker, ~1 min
    QUICK=1 bash bench/ws.sh           # smoke run (1 round x 1 s; results not written)

The upstream is `ws_bench echo` (examples/ws_bench.rs, tokio-tungstenite), which answers every
data message with itself and refuses a handshake without `Authorization`. nginx proxies the
upgrade with `proxy_set_header Upgrade/Connection` and a static Bearer header; tokenproxy is
the release binary with one client (`upgrades` default: websocket), its real token flow
against bench.py's mock token endpoint. The load is `ws_bench load`: CONNS (50) connections,
each sending a 64-byte binary message and waiting for its echo, back to back, DURATION
seconds. Each round runs direct, nginx, tokenproxy (each proxy started fresh, WORKERS workers).
Reported: round trips per second, p50/p99/p99.9, the proxy's CPU per round trip and its peak
RSS, as ratios to nginx in the same round (median and range over rounds).

Environment: ROUNDS (3), DURATION (5), WORKERS (1), CONNS (50), QUICK, TOKENPROXY_BIN.
Writes bench/results/ws-<timestamp>.json and bench/results/ws-latest.md. Loopback only;
every process started here is stopped by PID; every load run is bounded.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "1" if QUICK else "5"))
WORKERS = int(os.environ.get("WORKERS", "1"))
CONNS = int(os.environ.get("CONNS", "50"))
BINARY = os.environ.get("TOKENPROXY_BIN", bench.TOKENPROXY)
WS_BENCH = os.environ.get("WS_BENCH_BIN",
                          os.path.join(bench.ROOT, "target", "release", "examples", "ws_bench"))
TARGETS = ("direct", "nginx", "tokenproxy")


def nginx_conf(prefix, port, up_port, workers):
    return bench.nginx_common(prefix) + f"""worker_processes {workers};
events {{ worker_connections 16384; }}
http {{
{bench.nginx_http_common(prefix)}  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://127.0.0.1:{up_port};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Authorization "Bearer {bench.STATIC_TOKEN}";
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def launch(name, tmp, up_port, tok_port, n):
    port, admin = bench.free_ports(2)
    tag = os.path.join(tmp, f"{name}-{n}")
    if name == "nginx":
        os.makedirs(tag)
        conf = os.path.join(tag, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(tag, port, up_port, WORKERS))
        proc = bench.start(["nginx", "-p", tag, "-c", conf, "-g", "daemon off;"], tag + ".log")
    else:
        with open(tag + ".toml", "w") as f:
            f.write(bench.tokenproxy_conf(admin, [("ws", port, up_port)], tok_port,
                                          bench.MAIN_LIFETIME))
        env = dict(os.environ, TOKIO_WORKER_THREADS=str(WORKERS))
        env.pop("RUST_LOG", None)
        proc = bench.start([BINARY, "run", "--config", tag + ".toml"], tag + ".log", env=env)
        bench.wait_http(f"http://127.0.0.1:{admin}/readyz")
    bench.wait_port(port, proc)
    return proc, port


def run_load(port, seconds, conns, credential=None):
    cmd = [WS_BENCH, "load", f"ws://127.0.0.1:{port}/ws", str(conns), str(seconds)]
    env = dict(os.environ)
    env.pop("WS_BENCH_AUTH", None)
    if credential:
        env["WS_BENCH_AUTH"] = credential
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"ws_bench load failed: {r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(pid, port, credential=None):
    pids = bench.tree(pid)
    bench.reset_hwm(pids)
    cpu0 = bench.cpu_of(pids)
    res = run_load(port, DURATION, CONNS, credential)
    pids = bench.tree(pid)
    cpu = bench.cpu_of(pids) - cpu0
    res["cpu_us_per_round_trip"] = cpu / max(1, res["round_trips"]) * 1e6
    res["peak_rss_mib"] = bench.hwm_of(pids) / 1024
    return res


def main():
    if "--report" in sys.argv:
        with open(sys.argv[-1]) as f:
            print(report(json.load(f)))
        return 0
    for path, what in ((BINARY, "cargo build --release"),
                       (WS_BENCH, "cargo build --release --example ws_bench")):
        if not os.path.exists(path):
            print(f"missing {path} ({what})", file=sys.stderr)
            return 2
    tmp = tempfile.mkdtemp(prefix="tokenproxy-ws-bench-")
    up_port, tok_port, idle_up = bench.free_ports(3)
    samples = []
    try:
        # The token endpoint comes from start_backends; its nginx upstream is not used here.
        bench.start_backends(tmp, idle_up, tok_port)
        echo = bench.start([WS_BENCH, "echo", f"127.0.0.1:{up_port}"],
                           os.path.join(tmp, "echo.log"))
        bench.wait_port(up_port, echo)
        # A handshake without a credential is refused, so the proxies below prove injection.
        refused = run_load(up_port, 0.2, 1)
        assert refused["errors"] == 1 and refused["round_trips"] == 0, refused
        accepted = run_load(up_port, 0.2, 1, f"Bearer {bench.STATIC_TOKEN}")
        assert accepted["errors"] == 0 and accepted["round_trips"] > 0, accepted
        n = 0
        for rnd in range(ROUNDS):
            for name in TARGETS:
                bench.wait_quiet(30.0)
                if name == "direct":
                    # The echo server itself, sent the credential a proxy would add; its CPU
                    # and RSS are the echo server's.
                    m = measure(echo.pid, up_port, f"Bearer {bench.STATIC_TOKEN}")
                else:
                    n += 1
                    proc, port = launch(name, tmp, up_port, tok_port, n)
                    m = measure(proc.pid, port)
                    bench.stop(proc)
                m.update(round=rnd, target=name)
                samples.append(m)
                print(f"r{rnd} {name:10} {m['rps']:9.0f} rt/s p50 {m['p50_ms']:.3f} ms "
                      f"p99 {m['p99_ms']:.3f} ms cpu {m.get('cpu_us_per_round_trip', 0):.1f} "
                      f"µs/rt peak {m.get('peak_rss_mib', 0):.1f} MiB errors {m['errors']}",
                      flush=True)
    finally:
        bench.stop_all()
    data = {"machine": bench.machine(), "binary": BINARY, "rounds": ROUNDS,
            "duration_s": DURATION, "workers": WORKERS, "conns": CONNS, "samples": samples}
    text = report(data)
    print(text)
    if QUICK:
        print("(QUICK: results not written)")
    else:
        bench.write_results("ws", data, text)
    return 1 if sum(s["errors"] for s in samples) else 0


def report(data):
    by = {}
    for s in data["samples"]:
        by.setdefault(s["round"], {})[s["target"]] = s

    def ratio(key):
        out = []
        for r in by.values():
            if "nginx" in r and "tokenproxy" in r and r["nginx"].get(key):
                out.append(r["tokenproxy"][key] / r["nginx"][key])
        return out

    def med(values, fmt="{:.2f}"):
        if not values:
            return "n/a"
        return (f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-"
                f"{fmt.format(max(values))})")

    def absolute(target, key, fmt="{:,.0f}"):
        return med([r[target][key] for r in by.values() if target in r], fmt)

    m = data["machine"]
    out = [f"# WebSocket echo round trips, tokenproxy / nginx (same run, {data['workers']} "
           f"worker(s))", "",
           f"{data['rounds']} rounds x {data['duration_s']} s per target, {data['conns']} "
           f"connections each sending 64-byte binary messages back to back (`ws_bench load`), "
           f"{m.get('cpu_model', '?')} ({m.get('nproc', '?')} cores), commit "
           f"{m.get('tokenproxy_commit', '?')}.", "",
           "| measure | nginx | tokenproxy | tokenproxy / nginx |", "|---|---|---|---|",
           f"| round trips/s | {absolute('nginx', 'rps')} | {absolute('tokenproxy', 'rps')} "
           f"| {med(ratio('rps'))} |",
           f"| (direct to the echo server, no proxy: {absolute('direct', 'rps')} round trips/s) "
           f"| | | |",
           f"| p50 ms | {absolute('nginx', 'p50_ms', '{:.3f}')} "
           f"| {absolute('tokenproxy', 'p50_ms', '{:.3f}')} | {med(ratio('p50_ms'))} |",
           f"| p99 ms | {absolute('nginx', 'p99_ms', '{:.3f}')} "
           f"| {absolute('tokenproxy', 'p99_ms', '{:.3f}')} | {med(ratio('p99_ms'))} |",
           f"| CPU µs per round trip | {absolute('nginx', 'cpu_us_per_round_trip', '{:.1f}')} "
           f"| {absolute('tokenproxy', 'cpu_us_per_round_trip', '{:.1f}')} "
           f"| {med(ratio('cpu_us_per_round_trip'))} |",
           f"| peak RSS MiB | {absolute('nginx', 'peak_rss_mib', '{:.1f}')} "
           f"| {absolute('tokenproxy', 'peak_rss_mib', '{:.1f}')} "
           f"| {med(ratio('peak_rss_mib'))} |",
           f"| errors | {sum(r['nginx']['errors'] for r in by.values() if 'nginx' in r)} "
           f"| {sum(r['tokenproxy']['errors'] for r in by.values() if 'tokenproxy' in r)} | |",
           ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
