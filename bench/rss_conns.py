#!/usr/bin/env python3
"""RSS of tokenproxy holding N idle keep-alive connections, each after one request.

    python3 bench/rss_conns.py [N]        # N = 1000; TOKENPROXY=path to test another binary

Starts the benchmark's nginx upstream and mock token endpoint and the release tokenproxy
(default runtime), measures VmRSS idle (token fetched, one request served), then opens N
connections, sends one small GET on each (at most 100 in flight), keeps them all open and
measures VmRSS and VmHWM again; then runs `wrk -c N` small GETs for LOAD_SECONDS (5) and
reads the peak (VmHWM), as the benchmark's 1,000-connection scenario does. Prints KiB per
connection, and one `JSON:` line with the figures. Loopback only; bounded.
"""
import asyncio
import json
import os
import sys
import tempfile
import shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
LOAD_SECONDS = int(os.environ.get("LOAD_SECONDS", "5"))


def kib(pid, key):
    return bench.status_kib(pid, key)


async def hold(port, n):
    conns = []
    sem = asyncio.Semaphore(100)

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET {bench.PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            await r.readexactly(length)
            conns.append(w)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=120)
    return conns


def main():
    binary = os.environ.get("TOKENPROXY", bench.TOKENPROXY)
    tmp = tempfile.mkdtemp(prefix="tokenproxy-rss-")
    up_port, tok_port, admin_port, proxy_port = bench.free_ports(4)
    try:
        upstream, tok = bench.start_backends(tmp, up_port, tok_port)
        cfg = os.path.join(tmp, "tokenproxy.toml")
        with open(cfg, "w") as f:
            f.write(bench.tokenproxy_conf(admin_port, [("bench", proxy_port, up_port)],
                                          tok_port, bench.MAIN_LIFETIME))
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        proc = bench.start([binary, "run", "--config", cfg], os.path.join(tmp, "tp.log"), env=env)
        bench.wait_http(f"http://127.0.0.1:{admin_port}/readyz")
        bench.http(f"http://127.0.0.1:{proxy_port}{bench.PATH}")
        idle = kib(proc.pid, "VmRSS")

        async def run():
            conns = await hold(proxy_port, N)
            await asyncio.sleep(1.0)
            rss = kib(proc.pid, "VmRSS")
            hwm = kib(proc.pid, "VmHWM")
            for w in conns:
                w.close()
            return rss, hwm

        rss, hwm = asyncio.run(run())
        print(f"idle {idle / 1024:.1f} MiB; {N} idle connections: RSS {rss / 1024:.1f} MiB, "
              f"HWM {hwm / 1024:.1f} MiB; {(rss - idle) / N:.1f} KiB per connection")
        res = bench.run_wrk(f"http://127.0.0.1:{proxy_port}{bench.PATH}", N, LOAD_SECONDS,
                            "get.lua")
        peak = kib(proc.pid, "VmHWM")
        print(f"wrk -c{N} for {LOAD_SECONDS} s ({res['requests']} requests): "
              f"peak RSS {peak / 1024:.1f} MiB; {(peak - idle) / N:.1f} KiB per connection")
        # For bench/summary.py.
        print("JSON: " + json.dumps({
            "connections": N, "workers": os.environ.get("TOKIO_WORKER_THREADS", "auto"),
            "idle_mib": idle / 1024, "idle_conn_kib": (rss - idle) / N,
            "peak_mib": peak / 1024, "peak_conn_kib": (peak - idle) / N}))
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
