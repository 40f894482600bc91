#!/usr/bin/env python3
"""Subjects benchmark (issue 16): many subjects in the store, a thousand of them active.

Run it through `bash bench/subjects.sh` (which installs nginx and wrk and builds tokenproxy).
One sidecar (release build, one proxy worker thread unless WORKERS says otherwise) with two
clients on the same nginx upstream: `plain` (one client_credentials token) and `pos`
(`[subjects]`, grant refresh_token), a file store (subjects in SQLite), and a token endpoint
served by nginx that logs every token request with its time.

Phases, all in one run:
  seed        SUBJECTS subjects imported through the admin API (PUT, 8 keep-alive connections)
  startup     a fresh process with SUBJECTS subjects stored: time to /readyz 200 and to the
              first answer for a stored subject (bar: <= 2 s)
  throughput  wrk small GET, 50 connections, interleaved rounds: ACTIVE subjects named in
              rotation vs the plain client (the same sidecar, the same request size); ratio
              subjects/plain (bar: >= 0.9)
  memory      RSS growth per cached subject from ACTIVE to CACHED cached subjects
              (bar: <= 1 KiB per subject)
  sweeper     every subject imported again with refresh_every = SWEEP_EVERY; the sweeper
              renews them all within max_token_requests_per_minute = SWEEP_BUDGET: the most
              token requests in any 60 s window of the token endpoint's log (bar: <= budget)
              and the time until every subject was renewed

Results: bench/results/subjects-<timestamp>.json and bench/results/subjects-latest.md.
Environment: SUBJECTS (100000), ACTIVE (1000), CACHED (10000), ROUNDS (3), DURATION (6),
WORKERS (1), SWEEP_EVERY (120), SWEEP_BUDGET (60000), QUICK=1 (10,000 subjects, 1 round).
Everything listens on 127.0.0.1 on free ports; every process started here is stopped by PID.
"""
import datetime
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  (process, nginx and /proc helpers)

QUICK = os.environ.get("QUICK") == "1"
SUBJECTS = int(os.environ.get("SUBJECTS", "10000" if QUICK else "100000"))
ACTIVE = int(os.environ.get("ACTIVE", "1000"))
CACHED = int(os.environ.get("CACHED", "10000"))
ROUNDS = int(os.environ.get("ROUNDS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "2" if QUICK else "6"))
WORKERS = int(os.environ.get("WORKERS", "1"))
SWEEP_EVERY = int(os.environ.get("SWEEP_EVERY", "120"))
SWEEP_BUDGET = int(os.environ.get("SWEEP_BUDGET", "60000"))
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
STORE_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
LIFETIME = 3600
log = B.log


def subject(i):
    return f"s-{i:06d}"


def token_nginx_conf(prefix, port):
    """A token endpoint that answers every POST with a fresh token and logs its time."""
    return B.nginx_common(prefix) + f"""worker_processes 1;
events {{ worker_connections 4096; }}
http {{
{B.nginx_http_common(prefix).replace("access_log off;", "")}  log_format t '$msec $request_uri';
  access_log {prefix}/logs/tokens.log t buffer=64k flush=1s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location / {{ return 200 '{{"access_token":"at-$request_id","token_type":"Bearer","expires_in":{LIFETIME}}}'; }}
  }}
}}
"""


def config(tmp, admin, plain, pos, up_port, tok_port, refresh_every=None):
    every = f'refresh_every = "{refresh_every}s"' if refresh_every else ""
    return f"""[admin]
listen = "127.0.0.1:{admin}"
api_key = "{ADMIN_KEY}"

[log]
level = "info,tokenproxy::access=off"

[store]
kind = "file"
path = "{tmp}/state.json"
key = "{STORE_KEY}"

[clients.plain]
listen = "127.0.0.1:{plain}"
upstream = "http://127.0.0.1:{up_port}"

[clients.plain.token]
url = "http://127.0.0.1:{tok_port}/token/plain"
client_id = "bench-plain"
client_secret = "bench-secret"

[clients.pos]
listen = "127.0.0.1:{pos}"
upstream = "http://127.0.0.1:{up_port}"

[clients.pos.token]
url = "http://127.0.0.1:{tok_port}/token/pos"
grant = "refresh_token"
client_id = "bench-pos"
client_secret = "bench-secret"

[clients.pos.subjects]
max_cached = {max(CACHED, ACTIVE)}
max_concurrent_token_requests = 16
max_token_requests_per_minute = {SWEEP_BUDGET}
{every}
"""


class Sidecar:
    def __init__(self, tmp, name, up_port, tok_port, refresh_every=None):
        self.admin, self.plain, self.pos = B.free_ports(3)
        path = os.path.join(tmp, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config(tmp, self.admin, self.plain, self.pos, up_port, tok_port, refresh_every))
        env = dict(os.environ, TOKIO_WORKER_THREADS=str(WORKERS))
        env.pop("RUST_LOG", None)
        self.started = time.time()
        cmd = [B.TOKENPROXY, "--config", path]
        if name == "main" and os.environ.get("HEAPTRACK"):
            # Where the heap goes: `heaptrack_print FILE.zst`.
            cmd = ["heaptrack", "-o", os.environ["HEAPTRACK"]] + cmd
        self.proc = B.start(cmd, os.path.join(tmp, f"{name}.log"), env)

    def wait_ready(self):
        B.wait_http(f"http://127.0.0.1:{self.admin}/readyz", timeout=60)
        return time.time() - self.started

    def rss_kib(self):
        return B.status_kib(self.proc.pid, "VmRSS")

    def smaps(self):
        """RSS by kind (kB): Anonymous is the heap and stacks, the rest file pages."""
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("Rss", "Anonymous", "Private_Dirty", "Shared_Clean", "Private_Clean"):
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def stop(self):
        B.stop(self.proc)


def parallel(n_threads, items, work):
    """Runs work(conn_factory_state, item) over items in n_threads threads; returns failures."""
    failures = []
    lock = threading.Lock()
    chunks = [items[i::n_threads] for i in range(n_threads)]

    def run(chunk):
        state = {}
        for item in chunk:
            try:
                work(state, item)
            except Exception as e:  # noqa: BLE001  (counted and reported)
                with lock:
                    failures.append(f"{item}: {e}")
                state.clear()

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def conn(state, port):
    c = state.get(port)
    if c is None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        state[port] = c
    return c


def import_all(sc, n):
    body = json.dumps({"refresh_token": "bench-refresh-token"}).encode()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}

    def put(state, i):
        c = conn(state, sc.admin)
        c.request("PUT", f"/clients/pos/subjects/{subject(i)}", body, headers)
        r = c.getresponse()
        r.read()
        if r.status not in (200, 201):
            raise RuntimeError(f"PUT answered {r.status}")

    t0 = time.time()
    failures = parallel(8, list(range(n)), put)
    took = time.time() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} imports failed, e.g. {failures[:3]}")
    return took


def touch(sc, indices):
    """One request per subject, so each holds a token in memory."""
    def get(state, i):
        c = conn(state, sc.pos)
        c.request("GET", B.PATH, headers={"x-tokenproxy-subject": subject(i)})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"answered {r.status}")

    failures = parallel(16, list(indices), get)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[:3]}")


def wrk_subjects(port, active, duration):
    env = dict(os.environ, BENCH_SUBJECTS=str(active))
    return run_wrk_script(port, "subjects.lua", duration, env)


def wrk_plain(port, duration):
    return run_wrk_script(port, "subjects.lua", duration, dict(os.environ, BENCH_SUBJECTS="0"))


def run_wrk_script(port, script, duration, env):
    import subprocess
    cmd = ["wrk", "-t2", "-c50", f"-d{duration}s", "--timeout", "10s",
           "-s", os.path.join(HERE, "wrk", script), f"http://127.0.0.1:{port}{B.PATH}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("JSON:"):
            d = json.loads(line[5:])
            return {
                "rps": d["requests"] / (d["duration_us"] / 1e6),
                "p99_ms": d["p99_us"] / 1000,
                "errors": d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"],
                "non2xx": d["err_status"],
            }
    raise RuntimeError(f"wrk gave no result: {r.stdout}\n{r.stderr}")


def token_times(path, since, url_part):
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and url_part in parts[1]:
                    t = float(parts[0])
                    if t >= since:
                        out.append(t)
    except OSError:
        pass
    return out


def count_renewed(sc, after):
    """Subjects whose last refresh is after `after` (epoch s), through the admin list API."""
    c = http.client.HTTPConnection("127.0.0.1", sc.admin, timeout=30)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cursor, renewed = None, 0
    while True:
        q = "limit=1000" + (f"&after={cursor}" if cursor else "")
        c.request("GET", f"/clients/pos/subjects?{q}", headers=headers)
        page = json.loads(c.getresponse().read())
        for item in page["subjects"]:
            at = item.get("last_refresh_at")
            if at and datetime.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() >= after:
                renewed += 1
        cursor = page.get("next")
        if not cursor:
            return renewed


def busiest_window(times, window=60.0):
    times = sorted(times)
    best, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def main():
    tmp = tempfile.mkdtemp(prefix="tokenproxy-subjects-bench-")
    up_port, tok_port = B.free_ports(2)
    results = {"subjects": SUBJECTS, "active": ACTIVE, "cached": CACHED, "workers": WORKERS,
               "machine": B.machine(), "when": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        up_prefix = os.path.join(tmp, "upstream")
        os.makedirs(up_prefix)
        with open(os.path.join(up_prefix, "nginx.conf"), "w") as f:
            f.write(B.upstream_nginx_conf(up_prefix, up_port))
        tok_prefix = os.path.join(tmp, "tokens")
        os.makedirs(tok_prefix)
        with open(os.path.join(tok_prefix, "nginx.conf"), "w") as f:
            f.write(token_nginx_conf(tok_prefix, tok_port))
        for prefix in (up_prefix, tok_prefix):
            B.start(["nginx", "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"),
                     "-g", "daemon off;"], os.path.join(prefix, "nginx.log"))
        B.wait_port(up_port)
        B.wait_port(tok_port)
        token_log = os.path.join(tok_prefix, "logs", "tokens.log")

        log(f"seed: importing {SUBJECTS} subjects through the admin API")
        seeder = Sidecar(tmp, "seed", up_port, tok_port)
        seeder.wait_ready()
        took = import_all(seeder, SUBJECTS)
        seeder.stop()
        results["seed"] = {"seconds": took, "per_second": SUBJECTS / took}
        log(f"seed: {SUBJECTS} in {took:.1f} s ({SUBJECTS / took:.0f}/s)")

        log("startup: a fresh process with every subject stored")
        sc = Sidecar(tmp, "main", up_port, tok_port)
        ready = sc.wait_ready()
        t0 = time.time()
        touch(sc, [SUBJECTS - 1])
        first = ready + (time.time() - t0)
        results["startup"] = {"ready_s": ready, "first_subject_answer_s": first}
        log(f"startup: ready in {ready:.2f} s, first subject answered at {first:.2f} s")

        touch(sc, range(ACTIVE))
        rss_active = sc.rss_kib()
        results["throughput"] = {"plain": [], "subjects": []}
        for r in range(ROUNDS):
            for kind in (("plain", "subjects") if r % 2 == 0 else ("subjects", "plain")):
                B.wait_quiet()
                m = wrk_plain(sc.plain, DURATION) if kind == "plain" else \
                    wrk_subjects(sc.pos, ACTIVE, DURATION)
                results["throughput"][kind].append(m)
                log(f"throughput round {r + 1} {kind}: {m['rps']:.0f} req/s, p99 {m['p99_ms']:.2f} ms,"
                    f" errors {m['errors']}, non-2xx {m['non2xx']}")
        plain = sorted(m["rps"] for m in results["throughput"]["plain"])
        subj = sorted(m["rps"] for m in results["throughput"]["subjects"])
        ratio = subj[len(subj) // 2] / plain[len(plain) // 2]
        results["throughput"]["ratio_median"] = ratio
        log(f"throughput: subjects / plain = {ratio:.3f} (median of {ROUNDS})")

        log(f"memory: caching {CACHED} subjects")
        rss_before = sc.rss_kib()
        smaps_before = sc.smaps()
        touch(sc, range(ACTIVE, CACHED))
        time.sleep(1)
        rss_after = sc.rss_kib()
        log(f"memory: smaps before {smaps_before}, after {sc.smaps()}")
        per = (rss_after - rss_before) * 1024 / max(1, CACHED - ACTIVE)
        results["memory"] = {"rss_active_kib": rss_active, "rss_before_kib": rss_before,
                             "rss_after_kib": rss_after, "bytes_per_cached_subject": per,
                             "threads": B.threads_of(sc.proc.pid)}
        log(f"memory: {rss_before} -> {rss_after} KiB for {CACHED - ACTIVE} more cached subjects:"
            f" {per:.0f} bytes each; {results['memory']['threads']} threads")
        sc.stop()

        if os.environ.get("SKIP_SWEEP") == "1":
            raise SystemExit(0)
        log(f"sweeper: importing again with refresh_every = {SWEEP_EVERY}s,"
            f" budget {SWEEP_BUDGET}/min")
        sweeper = Sidecar(tmp, "sweep", up_port, tok_port, refresh_every=SWEEP_EVERY)
        sweeper.wait_ready()
        since = time.time()
        took = import_all(sweeper, SUBJECTS)
        deadline = since + took + SWEEP_EVERY + SUBJECTS * 60 / SWEEP_BUDGET * 1.5 + 60
        renewed_at = None
        while time.time() < deadline:
            time.sleep(2)
            n = len(token_times(token_log, since, "/token/pos"))
            if n >= SUBJECTS:
                renewed_at = time.time()
                break
        time.sleep(2)  # the log is flushed every second
        times = token_times(token_log, since, "/token/pos")
        renewed = count_renewed(sweeper, since + 0.95 * SWEEP_EVERY - 1)
        sweeper.stop()
        busiest = busiest_window(times)
        results["sweeper"] = {
            "import_s": took, "token_requests": len(times), "subjects_renewed": renewed,
            "all_renewed_s": None if renewed_at is None else renewed_at - since,
            "busiest_60s_window": busiest, "budget_per_minute": SWEEP_BUDGET,
            "refresh_every_s": SWEEP_EVERY,
        }
        log(f"sweeper: {len(times)} token requests, {renewed} of {SUBJECTS} subjects renewed;"
            f" busiest 60 s window {busiest} (budget {SWEEP_BUDGET}); all renewed"
            f" {'at %.0f s' % (renewed_at - since) if renewed_at else 'NOT within the deadline'}")
    finally:
        B.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(B.RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(B.RESULTS, f"subjects-{stamp}.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = report(results)
    with open(os.path.join(B.RESULTS, "subjects-latest.md"), "w") as f:
        f.write(md)
    print(md)
    ok = (results["startup"]["first_subject_answer_s"] <= 2.0
          and results["throughput"]["ratio_median"] >= 0.9
          and results["memory"]["bytes_per_cached_subject"] <= 1024
          and results["sweeper"]["busiest_60s_window"] <= SWEEP_BUDGET
          and results["sweeper"]["subjects_renewed"] == SUBJECTS)
    return 0 if ok else 1


def report(r):
    t = r["throughput"]
    s = r["sweeper"]
    rows = [
        ("subjects stored", f"{r['subjects']:,}", ""),
        ("import through the admin API", f"{r['seed']['per_second']:.0f}/s", ""),
        ("start-up: ready / first subject answered",
         f"{r['startup']['ready_s']:.2f} s / {r['startup']['first_subject_answer_s']:.2f} s", "<= 2 s"),
        (f"throughput, {r['active']:,} active subjects / one-token client (median)",
         f"{t['ratio_median']:.3f}x", ">= 0.9x"),
        ("RSS per cached subject", f"{r['memory']['bytes_per_cached_subject']:.0f} B", "<= 1,024 B"),
        ("sweeper: busiest 60 s window of token requests",
         f"{s['busiest_60s_window']:,}", f"<= {s['budget_per_minute']:,}"),
        (f"sweeper (refresh_every {s['refresh_every_s']} s): subjects renewed",
         f"{s['subjects_renewed']:,} of {r['subjects']:,}", "all"),
        ("sweeper: as many token requests as subjects after",
         "not within the deadline" if s["all_renewed_s"] is None else f"{s['all_renewed_s']:.0f} s", ""),
    ]
    out = [f"# Subjects benchmark ({r['when']}, {r['workers']} worker)", "",
           "| measure | result | bar |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out += ["", "| round | plain req/s | subjects req/s |", "|---|---|---|"]
    for i, (p, q) in enumerate(zip(t["plain"], t["subjects"])):
        out.append(f"| {i + 1} | {p['rps']:.0f} | {q['rps']:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
