#!/usr/bin/env python3
"""DPoP small GETs next to Bearer small GETs, through one tokenproxy, in one run.

    bash bench/dpop.sh                 # 3 rounds x 6 s per measurement, ~1 min
    QUICK=1 bash bench/dpop.sh         # smoke run (1 round x 1 s; numbers not meaningful)
    TOKENPROXY_BIN=target/debug/tokenproxy QUICK=1 SKIP_BUILD=1 bash bench/dpop.sh

One tokenproxy process (TOKIO_WORKER_THREADS=WORKERS) with two clients on the same nginx
upstream (bench.py's: `return 200` with a 1 KiB body) and the same token endpoint
(token_endpoint.py, which answers `token_type` DPoP to a request carrying a proof):

  bearer  -- `Authorization: Bearer <token>`
  dpop    -- `[clients.dpop.dpop]` (alg ALG): `Authorization: DPoP <token>` and a new proof on
             every request (ES256 or EdDSA signature, a random jti, ath over the token)

Each round runs `wrk -t2 -c50` small GETs against both clients in turn (the order alternates
from round to round), DURATION seconds each, after waiting for a quiet machine. Reported:
req/s and p50/p99 of each, the ratio dpop/bearer (median and range of the rounds' ratios; the
issue's target is >= 0.7), and the CPU tokenproxy spends per request: the difference,
dpop - bearer, is the cost of one proof (signing it and sending its ~400 bytes), in µs.

Environment: ROUNDS (3), DURATION (6), WORKERS (1), CONNS (50), ALG (ES256; also EdDSA), QUICK,
TOKENPROXY_BIN (default: the release binary). Writes bench/results/dpop-<timestamp>.json and
bench/results/dpop-latest.md. Everything listens on 127.0.0.1 on free ports; every process
started here is stopped by PID.
"""
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (process, nginx, wrk and /proc helpers)

QUICK = os.environ.get("QUICK") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "1" if QUICK else "6"))
WORKERS = int(os.environ.get("WORKERS", "1"))
CONNS = int(os.environ.get("CONNS", "50"))
ALG = os.environ.get("ALG", "ES256")
BINARY = os.environ.get("TOKENPROXY_BIN", bench.TOKENPROXY)
CLIENTS = ("bearer", "dpop")


def config(admin, ports, up_port, tok_port):
    text = bench.tokenproxy_conf(
        admin, [(name, ports[name], up_port) for name in CLIENTS], tok_port, bench.MAIN_LIFETIME)
    return text + f'[clients.dpop.dpop]\nalg = "{ALG}"\n'


def launch(tmp, up_port, tok_port):
    admin, bearer, dpop = bench.free_ports(3)
    ports = {"bearer": bearer, "dpop": dpop}
    path = os.path.join(tmp, "tokenproxy.toml")
    with open(path, "w") as f:
        f.write(config(admin, ports, up_port, tok_port))
    env = dict(os.environ, TOKIO_WORKER_THREADS=str(WORKERS))
    env.pop("RUST_LOG", None)
    proc = bench.start([BINARY, "run", "--config", path], os.path.join(tmp, "tokenproxy.log"),
                       env=env)
    for port in ports.values():
        bench.wait_port(port, proc)
    bench.wait_http(f"http://127.0.0.1:{admin}/readyz")
    # Each client injects its own scheme, and both answer with the upstream's 1 KiB body.
    for name, port in ports.items():
        st, body = bench.http(f"http://127.0.0.1:{port}/echo-authorization")
        want = b"DPoP " if name == "dpop" else b"Bearer "
        assert st == 200 and body.startswith(want), (name, st, body[:12])
        st, body = bench.http(f"http://127.0.0.1:{port}{bench.PATH}")
        assert st == 200 and len(body) == 1024, (name, st, len(body))
    return proc, ports, admin


def measure(proc, url):
    pids = bench.tree(proc.pid)
    cpu0 = bench.cpu_of(pids)
    res = bench.run_wrk(url, CONNS, DURATION, "get.lua")
    cpu = bench.cpu_of(bench.tree(proc.pid)) - cpu0
    res["cpu_us_per_request"] = cpu / max(1, res["requests"]) * 1e6
    return res


def main():
    if "--report" in sys.argv:
        with open(sys.argv[-1]) as f:
            print(report(json.load(f)))
        return 0
    if not os.path.exists(BINARY):
        print(f"no tokenproxy binary at {BINARY} (cargo build --release, or TOKENPROXY_BIN=...)",
              file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="tokenproxy-dpop-bench-")
    up_port, tok_port = bench.free_ports(2)
    samples = []
    try:
        bench.start_backends(tmp, up_port, tok_port)
        proc, ports, admin = launch(tmp, up_port, tok_port)
        for rnd in range(ROUNDS):
            order = CLIENTS if rnd % 2 == 0 else tuple(reversed(CLIENTS))
            for name in order:
                bench.wait_quiet(30.0)
                m = measure(proc, f"http://127.0.0.1:{ports[name]}{bench.PATH}")
                m.update(round=rnd, client=name)
                samples.append(m)
                print(f"r{rnd} {name:6} {m['rps']:9.0f} req/s p50 {m['p50_ms']:.3f} ms "
                      f"p99 {m['p99_ms']:.3f} ms cpu {m['cpu_us_per_request']:.1f} µs/request "
                      f"errors {m['errors']} non-2xx {m['non2xx']}", flush=True)
        status, metrics = bench.http(f"http://127.0.0.1:{admin}/metrics")
        retries = [line for line in metrics.decode().splitlines()
                   if line.startswith("tokenproxy_dpop_nonce_retries_total")]
    finally:
        bench.stop_all()
    data = {"machine": bench.machine(), "binary": BINARY, "alg": ALG, "rounds": ROUNDS,
            "duration_s": DURATION, "workers": WORKERS, "conns": CONNS, "samples": samples,
            "nonce_retries": retries}
    text = report(data)
    print(text)
    if QUICK:
        print("(QUICK: results not written)")
    else:
        bench.write_results("dpop", data, text)
    failed = sum(s["errors"] + s["non2xx"] for s in samples)
    return 1 if failed else 0


def summary(data):
    """Per-round pairs, the ratios and the proof cost."""
    by = {}
    for s in data["samples"]:
        by.setdefault(s["round"], {})[s["client"]] = s
    pairs = [(r["bearer"], r["dpop"]) for _, r in sorted(by.items()) if len(r) == 2]
    ratios = [d["rps"] / b["rps"] for b, d in pairs if b["rps"]]
    proof_us = [d["cpu_us_per_request"] - b["cpu_us_per_request"] for b, d in pairs]
    return pairs, ratios, proof_us


def report(data):
    pairs, ratios, proof_us = summary(data)

    def med(values, fmt):
        if not values:
            return "n/a"
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-" \
               f"{fmt.format(max(values))})"

    out = [f"# DPoP small GETs / Bearer small GETs (same run, same process, alg {data['alg']})",
           "",
           f"{data['rounds']} rounds x {data['duration_s']} s per measurement, wrk -t2 "
           f"-c{data['conns']}, {data['workers']} worker(s), binary `{data['binary']}`, "
           f"{data['machine'].get('cpu_model', '?')} ({data['machine'].get('nproc', '?')} cores), "
           f"commit {data['machine'].get('tokenproxy_commit', '?')}.", "",
           "| measure | result | target |", "|---|---|---|",
           f"| throughput, DPoP / Bearer (median (min-max) of rounds) | {med(ratios, '{:.2f}')}x "
           f"| >= 0.7x |",
           f"| CPU per proof: tokenproxy CPU per request, DPoP - Bearer | "
           f"{med(proof_us, '{:.1f}')} µs | |",
           "", "| round | Bearer req/s | DPoP req/s | Bearer p99 | DPoP p99 "
           "| Bearer CPU/request | DPoP CPU/request |", "|---|---|---|---|---|---|---|"]
    for i, (b, d) in enumerate(pairs):
        out.append(f"| {i + 1} | {b['rps']:,.0f} | {d['rps']:,.0f} | {b['p99_ms']:.2f} ms "
                   f"| {d['p99_ms']:.2f} ms | {b['cpu_us_per_request']:.1f} µs "
                   f"| {d['cpu_us_per_request']:.1f} µs |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
