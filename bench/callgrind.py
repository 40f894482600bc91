#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: a metric that stays put when the
other core is busy, for comparing one change of the request path with the next.

Run it through `bash bench/callgrind.sh`. It starts the upstream nginx and the mock token
endpoint as bench.py does, then the release tokenproxy (TOKIO_WORKER_THREADS=1) under
`valgrind --tool=callgrind`. After a warm-up (token fetched, upstream pool filled) it zeroes
the counters, sends a fixed number of small GETs (bench/fixed_load.py) over keep-alive connections, dumps
the counters and divides the instructions (Ir) by the requests tokenproxy counted in
`tokenproxy_requests_total` over that window. Startup and warm-up are therefore excluded.

Environment: REQUESTS (20000), CONNS (50), WARMUP (2000), METHOD (GET or POST16K),
CALLGRIND_OUT (directory for the dump; default a temporary one, removed), KEEP=1 (keep it),
TOKENPROXY (another binary), DPOP (ES256 or EdDSA: the client signs a DPoP proof for every
request with that algorithm; the mock token endpoint then issues DPoP tokens).
Prints one line `Ir/request N` and, with KEEP=1, where the dump is for callgrind_annotate.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (helpers: ports, processes, configs, metrics scrape)

REQUESTS = int(os.environ.get("REQUESTS", "20000"))
CONNS = int(os.environ.get("CONNS", "50"))
WARMUP = int(os.environ.get("WARMUP", "2000"))
METHOD = os.environ.get("METHOD", "GET")
KEEP = os.environ.get("KEEP") == "1"
DPOP = os.environ.get("DPOP", "")


def load(url, total, conns):
    cmd = [sys.executable, os.path.join(bench.HERE, "fixed_load.py"), url, str(total), str(conns)]
    if METHOD == "POST16K":
        cmd += ["--post-bytes", "16384"]
    subprocess.run(cmd, check=True, timeout=660)


def requests_done(admin_port):
    return bench.metric(bench.scrape(admin_port), "tokenproxy_requests_total")


def callgrind_control(*args):
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)


def total_ir(path):
    with open(path) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def phase(name, t0=[time.time()]):
    if os.environ.get("VERBOSE") == "1":
        print(f"{time.time() - t0[0]:7.1f}s {name}", file=sys.stderr, flush=True)


def main():
    tmp = tempfile.mkdtemp(prefix="tokenproxy-callgrind-")
    out_dir = os.environ.get("CALLGRIND_OUT") or tmp
    os.makedirs(out_dir, exist_ok=True)
    up_port, tok_port, admin_port, proxy_port = bench.free_ports(4)
    try:
        upstream, tok = bench.start_backends(tmp, up_port, tok_port)
        cfg = os.path.join(tmp, "tokenproxy.toml")
        with open(cfg, "w") as f:
            f.write(bench.tokenproxy_conf(admin_port, [("bench", proxy_port, up_port)],
                                          tok_port, bench.MAIN_LIFETIME))
            if DPOP:
                f.write(f'[clients.bench.dpop]\nalg = "{DPOP}"\n')
        env = dict(os.environ, TOKIO_WORKER_THREADS="1")
        env.pop("RUST_LOG", None)
        out_file = os.path.join(out_dir, "callgrind.out.%p")
        proc = bench.start(["valgrind", "--tool=callgrind", "--vgdb=yes",
                            f"--callgrind-out-file={out_file}",
                            os.environ.get("TOKENPROXY", bench.TOKENPROXY), "run", "--config", cfg],
                           os.path.join(tmp, "tokenproxy.log"), env=env)
        phase("started")
        bench.wait_http(f"http://127.0.0.1:{admin_port}/readyz", timeout=120)
        phase("ready")
        url = f"http://127.0.0.1:{proxy_port}{bench.PATH}"
        load(url, WARMUP, CONNS)
        phase("warmed up")
        before = requests_done(admin_port)
        callgrind_control("-z", str(proc.pid))
        phase("zeroed")
        load(url, REQUESTS, CONNS)
        phase("measured")
        callgrind_control("-d", str(proc.pid))
        phase("dumped")
        after = requests_done(admin_port)
        dumps = sorted(glob.glob(os.path.join(out_dir, f"callgrind.out.{proc.pid}.*")),
                       key=os.path.getmtime)
        if not dumps:
            raise RuntimeError("callgrind wrote no dump; see " + tmp)
        ir = total_ir(dumps[-1])
        n = after - before
        print(f"requests {int(n)}  Ir {ir}  Ir/request {ir / n:.0f}")
        if KEEP:
            print(f"dump: {dumps[-1]}")
    finally:
        bench.stop_all()
        if not KEEP:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
