#!/usr/bin/env python3
"""Side-by-side benchmark: direct upstream vs nginx vs HAProxy vs tokenproxy.

Run it through `bash bench/run.sh` (which installs the tools and builds tokenproxy).
Everything listens on 127.0.0.1 on ports chosen free at run time; every load run is
bounded in time (wrk -d, oha -z, plus a subprocess timeout) and stops by itself;
only processes started here are stopped, by their PID.

    python3 bench/bench.py                 # measure, write results/*.json and results/latest.md
    python3 bench/bench.py --report FILE   # regenerate the Markdown from a results JSON

Environment: ROUNDS, DURATION (s per measurement), WORKERS ("1 2"), RATE (req/s for the
open-loop run, oha), RATE_CONNS, TOKEN_LIFETIME (s), TOKEN_LIFETIMES, QUICK=1.
"""
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TOKENPROXY = os.path.join(ROOT, "target", "release", "tokenproxy")
STATIC_TOKEN = "bench-static-token-0123456789abcdef0123456789abcdef"
PATH = "/api/v1/payments"
TARGETS = ["direct", "nginx", "haproxy", "tokenproxy"]
SCENARIOS = ["get", "post", "c1000", "rate"]
SCENARIO_TITLES = {
    "get": "small GET, 50 keep-alive connections",
    "post": "POST 16 KiB body, 50 keep-alive connections",
    "c1000": "small GET, 1,000 keep-alive connections",
    "rate": "open-loop fixed rate (oha -q, latency-corrected)",
}

QUICK = os.environ.get("QUICK") == "1"
ROUNDS = int(os.environ.get("ROUNDS", "1" if QUICK else "3"))
DURATION = int(os.environ.get("DURATION", "1" if QUICK else "6"))
WORKERS = [int(w) for w in os.environ.get("WORKERS", "1 2").split()]
RATE = int(os.environ.get("RATE", "5000"))
RATE_CONNS = int(os.environ.get("RATE_CONNS", "100"))
TOKEN_LIFETIME = int(os.environ.get("TOKEN_LIFETIME", "2" if QUICK else "3"))
TOKEN_LIFETIMES = int(os.environ.get("TOKEN_LIFETIMES", "3" if QUICK else "5"))
WRK_THREADS = int(os.environ.get("WRK_THREADS", "2"))
# A measurement during which other processes used more than this share of the CPUs (a build or
# test run of someone else on the machine) is repeated, after waiting for a quiet second.
MAX_OTHER_CPU = float(os.environ.get("MAX_OTHER_CPU", "20"))
RETRIES = int(os.environ.get("RETRIES", "2"))
QUIET_BUDGET = float(os.environ.get("QUIET_BUDGET", "240"))  # s of waiting over the whole run
MAIN_LIFETIME = 60  # token lifetime for the throughput scenarios

STARTED = []  # subprocess.Popen objects we own
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # run.sh raises it as far as allowed
MAXCONN = min(20000, (NOFILE - 200) // 2)  # HAProxy needs ~2 descriptors per connection


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ---------------------------------------------------------------- processes

def write_results(prefix, data, text):
    """Writes results/<prefix>-<timestamp>.json (the samples) and results/<prefix>-latest.md."""
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(RESULTS, f"{prefix}-{stamp}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(RESULTS, f"{prefix}-latest.md"), "w") as f:
        f.write(text)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def start(cmd, logfile, env=None):
    out = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    STARTED.append(p)
    return p


def children_of(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = read_stat(int(d))
        except OSError:
            continue
        if st["ppid"] == pid:
            kids.append(int(d))
    return kids


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children_of(p))
    return out


def stop(p, grace=8.0):
    if p.poll() is not None:
        return
    kids = tree(p.pid)[1:]
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        p.kill()
        p.wait(timeout=5)
    except OSError:
        pass


def stop_all():
    for p in reversed(STARTED):
        stop(p)
    STARTED.clear()


def wait_port(port, proc=None, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_backends(tmp, up_port, tok_port):
    """Starts the nginx upstream and the mock token endpoint under TMP; waits for both."""
    up_prefix = os.path.join(tmp, "upstream")
    os.makedirs(up_prefix, exist_ok=True)
    with open(os.path.join(up_prefix, "nginx.conf"), "w") as f:
        f.write(upstream_nginx_conf(up_prefix, up_port))
    upstream = start(["nginx", "-p", up_prefix, "-c", os.path.join(up_prefix, "nginx.conf"),
                      "-g", "daemon off;"], os.path.join(tmp, "upstream.log"))
    tokep = start([sys.executable, os.path.join(HERE, "token_endpoint.py"), str(tok_port)],
                  os.path.join(tmp, "token_endpoint.log"))
    wait_port(up_port, upstream)
    wait_port(tok_port, tokep)
    return upstream, tokep


def http(url, data=None, timeout=5.0):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url, status=200, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if http(url, timeout=1.0)[0] == status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer {status} within {timeout}s")


# ---------------------------------------------------------------- /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rfind(")") + 2:].split()
    return {"ppid": int(rest[1]), "cpu": (int(rest[11]) + int(rest[12])) / CLK_TCK,
            "user": int(rest[11]) / CLK_TCK}


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_of(pids, key="cpu"):
    total = 0.0
    for p in pids:
        try:
            total += read_stat(p)[key]
        except OSError:
            pass
    return total


def hwm_of(pids):
    return sum(status_kib(p, "VmHWM") for p in pids if os.path.exists(f"/proc/{p}"))


def rss_of(pids):
    return sum(status_kib(p, "VmRSS") for p in pids if os.path.exists(f"/proc/{p}"))


def reset_hwm(pids):
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
        except OSError:
            pass


def ctxsw_of(pids):
    """Voluntary + involuntary context switches of every thread of these processes."""
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


# ---------------------------------------------------------------- configs

def json_body():
    items = [{"id": "pay_%04d" % i, "amount": 1000 + i, "currency": "EUR", "status": "settled"}
             for i in range(14)]
    doc = {"object": "list", "data": items, "note": ""}
    s = json.dumps(doc, separators=(",", ":"))
    doc["note"] = "x" * (1024 - len(s))
    s = json.dumps(doc, separators=(",", ":"))
    assert len(s) == 1024 and "'" not in s
    return s


def nginx_common(prefix):
    for d in ("logs", "tmp"):
        os.makedirs(os.path.join(prefix, d), exist_ok=True)
    return f"""pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
worker_rlimit_nofile {NOFILE};
"""


def nginx_http_common(prefix):
    return f"""  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  client_max_body_size 1m;
  client_body_buffer_size 32k;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
"""


def upstream_nginx_conf(prefix, port):
    # `return` answers GET and POST alike (nginx reads and discards a request body
    # before answering, so keep-alive survives a 16 KiB POST).
    return nginx_common(prefix) + f"""worker_processes 2;
events {{ worker_connections 16384; }}
http {{
{nginx_http_common(prefix)}  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type application/json;
    location = /echo-authorization {{ return 200 "$http_authorization"; }}
    location / {{ return 200 '{json_body()}'; }}
  }}
}}
"""


def proxy_nginx_conf(prefix, port, up_port, workers):
    return nginx_common(prefix) + f"""worker_processes {workers};
events {{ worker_connections 16384; }}
http {{
{nginx_http_common(prefix)}  upstream api {{
    server 127.0.0.1:{up_port};
    keepalive 1024;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {STATIC_TOKEN}";
    }}
  }}
}}
"""


def haproxy_conf(port, up_port, workers):
    return f"""global
  nbthread {workers}
  maxconn {MAXCONN}
defaults
  mode http
  maxconn {MAXCONN}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend fe
  bind 127.0.0.1:{port}
  http-request set-header Authorization "Bearer {STATIC_TOKEN}"
  default_backend api
backend api
  server up 127.0.0.1:{up_port}
"""


def tokenproxy_conf(admin_port, clients, tok_port, lifetime):
    """clients: list of (name, listen_port, upstream_port)."""
    s = f"""[admin]
listen = "127.0.0.1:{admin_port}"

[log]
# nginx and HAProxy run without access logs; so does tokenproxy (lifecycle lines stay).
level = "info,tokenproxy::access=off"

"""
    for name, port, up_port in clients:
        s += f"""[clients.{name}]
listen = "127.0.0.1:{port}"
upstream = "http://127.0.0.1:{up_port}"

[clients.{name}.token]
url = "http://127.0.0.1:{tok_port}/token/{lifetime}"
grant = "client_credentials"
client_id = "bench-{name}"
client_secret = "bench-secret-{name}"

"""
    return s


# ---------------------------------------------------------------- load generators

def run_wrk(url, conns, duration, script, threads=WRK_THREADS):
    threads = min(threads, conns)
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s",
           "-s", os.path.join(HERE, "wrk", script), url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in r.stdout.splitlines():
        if line.startswith("JSON:"):
            d = json.loads(line[5:])
            secs = d["duration_us"] / 1e6
            return {
                "requests": d["requests"],
                "rps": d["requests"] / secs,
                "p50_ms": d["p50_us"] / 1000, "p90_ms": d["p90_us"] / 1000,
                "p99_ms": d["p99_us"] / 1000, "p999_ms": d["p999_us"] / 1000,
                "max_ms": d["max_us"] / 1000,
                "errors": d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"],
                "non2xx": d["err_status"],
            }
    raise RuntimeError(f"wrk gave no result: {r.stdout}\n{r.stderr}")


def run_oha(url, rate, conns, duration):
    """Open loop: oha sends `rate` req/s on a fixed schedule over `conns` keep-alive
    connections; --latency-correction measures each request from its scheduled start, so a
    stall is not hidden by the requests it delayed (coordinated omission)."""
    cmd = ["oha", "--no-tui", "--output-format", "json", "-q", str(rate), "-z", f"{duration}s",
           "-c", str(conns), "--latency-correction", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    d = json.loads(r.stdout)
    codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    n = sum(codes.values())
    errs = {k: v for k, v in (d.get("errorDistribution") or {}).items()
            if "deadline" not in k}  # requests cut off by -z are not errors
    lp = d["latencyPercentiles"]

    def ms(key):
        v = lp.get(key)
        return float("nan") if v is None else v * 1000

    return {
        "requests": n,
        "rps": n / duration,
        "p50_ms": ms("p50"), "p90_ms": ms("p90"), "p99_ms": ms("p99"), "p999_ms": ms("p99.9"),
        "max_ms": (d["summary"].get("slowest") or float("nan")) * 1000,
        "errors": sum(errs.values()),
        "non2xx": sum(v for k, v in codes.items() if not 200 <= k < 300),
    }


def load(scenario, url, duration, tmp):
    if scenario == "get":
        return run_wrk(url, 50, duration, "get.lua")
    if scenario == "post":
        return run_wrk(url, 50, duration, "post.lua")
    if scenario == "c1000":
        return run_wrk(url, 1000, duration, "get.lua")
    if scenario == "rate":
        return run_oha(url, RATE, RATE_CONNS, duration)
    raise ValueError(scenario)


def busy_cpu_s():
    """(user+nice+system, steal) CPU seconds of all cores so far, from /proc/stat. irq and
    softirq time (loopback networking) is left out: the kernel may not charge it to tasks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / CLK_TCK, v[7] / CLK_TCK


def other_cpu_now(window=1.0):
    """% of all cores busy over `window` seconds (nothing of ours runs while this is called)."""
    b0, t0 = busy_cpu_s()[0], time.time()
    time.sleep(window)
    return (busy_cpu_s()[0] - b0) / ((time.time() - t0) * (os.cpu_count() or 1)) * 100


def wait_quiet(limit_s=60.0):
    """Wait (at most limit_s) for a second in which the machine is quiet; returns the wait."""
    t0 = time.time()
    while time.time() - t0 < limit_s and other_cpu_now() > MAX_OTHER_CPU:
        pass
    return time.time() - t0


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(target_pid, scenario, url, duration, tmp, upstream_pid):
    pids = tree(target_pid)
    ups = [] if target_pid == upstream_pid else tree(upstream_pid)
    reset_hwm(pids)
    cpu0, up0, cs0, usr0 = cpu_of(pids), cpu_of(ups), ctxsw_of(pids), cpu_of(pids, "user")
    (busy0, steal0), gen0, t0 = busy_cpu_s(), children_cpu_s(), time.time()
    res = load(scenario, url, duration, tmp)
    (busy1, steal1), gen1, wall = busy_cpu_s(), children_cpu_s(), time.time() - t0
    busy, steal, gen = busy1 - busy0, steal1 - steal0, gen1 - gen0
    pids = tree(target_pid)
    cpu = cpu_of(pids) - cpu0
    up = cpu_of(ups) - up0
    res["ctxsw_per_req"] = (ctxsw_of(pids) - cs0) / res["requests"] if res["requests"] else 0.0
    res["cpu_s"] = cpu
    res["cpu_s_per_100k"] = cpu / res["requests"] * 1e5 if res["requests"] else float("nan")
    res["user_cpu_s_per_100k"] = ((cpu_of(pids, "user") - usr0) / res["requests"] * 1e5
                                  if res["requests"] else float("nan"))
    res["peak_rss_mib"] = hwm_of(pids) / 1024
    res["threads"] = sum(threads_of(p) for p in pids)
    res["loadgen_cpu_s"] = gen
    res["upstream_cpu_s"] = up
    # CPU used on this machine by anything but the proxy, the upstream and the load generator
    # (e.g. a build running next to the benchmark), in % of all cores over the measurement.
    cores = os.cpu_count() or 1
    res["foreign_cpu_pct"] = max(0.0, busy - cpu - up - gen) / (wall * cores) * 100
    res["steal_pct"] = steal / (wall * cores) * 100
    return res


# ---------------------------------------------------------------- metrics

_launched = [0]


def launch_proxy(name, w, tmp, up_port, tok_port, binary=TOKENPROXY, label=None):
    """Start a fresh proxy in front of the upstream: `name` is nginx, haproxy or
    tokenproxy (`binary`, `label` naming its files), with w workers. Checks that it
    injects a bearer token and answers GET and a 16 KiB POST with the 1 KiB body.
    Returns (proc, url, admin_port or None)."""
    _launched[0] += 1
    port, admin = free_ports(2)
    tag = os.path.join(tmp, f"{label or name}-w{w}-{_launched[0]}")
    if name == "nginx":
        os.makedirs(tag)
        conf = os.path.join(tag, "nginx.conf")
        with open(conf, "w") as f:
            f.write(proxy_nginx_conf(tag, port, up_port, w))
        proc = start(["nginx", "-p", tag, "-c", conf, "-g", "daemon off;"], tag + ".log")
        admin = None
    elif name == "haproxy":
        with open(tag + ".cfg", "w") as f:
            f.write(haproxy_conf(port, up_port, w))
        proc = start(["haproxy", "-db", "-f", tag + ".cfg"], tag + ".log")
        admin = None
    else:
        with open(tag + ".toml", "w") as f:
            f.write(tokenproxy_conf(admin, [("bench", port, up_port)], tok_port, MAIN_LIFETIME))
        env = dict(os.environ, TOKIO_WORKER_THREADS=str(w))
        env.pop("RUST_LOG", None)
        proc = start([binary, "run", "--config", tag + ".toml"], tag + ".log", env=env)
    wait_port(port, proc)
    if admin:
        wait_http(f"http://127.0.0.1:{admin}/readyz")
    url = f"http://127.0.0.1:{port}{PATH}"
    st, body = http(f"http://127.0.0.1:{port}/echo-authorization")
    assert st == 200 and body.startswith(b"Bearer ") and len(body) > 20, (name, st, body)
    for data in (None, b"x" * 16384):
        st, body = http(url, data=data)
        assert st == 200 and len(body) == 1024, (name, st, len(body))
    return proc, url, admin


def scrape(admin_port):
    status, body = http(f"http://127.0.0.1:{admin_port}/metrics")
    vals = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, v = line.rpartition(" ")
        try:
            vals[key] = float(v)
        except ValueError:
            pass
    return vals


def metric(vals, name, **labels):
    total = 0.0
    for key, v in vals.items():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$", key)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v2 for k, v2 in labels.items()):
            total += v
    return total


def token_count(tok_port):
    return json.loads(http(f"http://127.0.0.1:{tok_port}/count")[1])


# ---------------------------------------------------------------- the run

def machine():
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    commit = ver(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml",
                            "Cargo.lock"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "nginx": ver(["nginx", "-v"]),
        "haproxy": ver(["haproxy", "-v"]),
        "wrk": ver(["wrk", "-v"]),
        "oha": ver(["oha", "--version"]),
        "tokenproxy_commit": commit + (" (src modified)" if dirty else ""),
    }


def main():
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tokenproxy-bench-")
    t_start = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {
        "machine": machine(),
        "settings": {"rounds": ROUNDS, "duration_s": DURATION, "workers": WORKERS, "rate": RATE,
                     "rate_conns": RATE_CONNS, "wrk_threads": WRK_THREADS,
                     "token_lifetime_s": TOKEN_LIFETIME, "token_lifetimes": TOKEN_LIFETIMES,
                     "quick": QUICK, "max_other_cpu": MAX_OTHER_CPU, "retries": RETRIES},
        "samples": [], "token_cost": [], "rss": {}, "threads": {},
    }
    log(f"settings: {out['settings']}; work dir {tmp}; open files limit {NOFILE}")
    idle_busy = other_cpu_now(2.0)
    out["machine"]["busy_before_start_pct"] = idle_busy
    if idle_busy > 10:
        log(f"WARNING: {idle_busy:.0f}% of the CPUs are busy before the benchmark starts "
            "(another build, test or fuzz run?); the numbers will be noisy")

    n_ports = 2 + 3 + 2 * 2
    ports = free_ports(n_ports)
    up_port, tok_port = ports.pop(), ports.pop()

    # upstream and token endpoint
    upstream, tokep = start_backends(tmp, up_port, tok_port)
    st, body = http(f"http://127.0.0.1:{up_port}{PATH}", data=b"x" * 16384)
    assert st == 200 and len(body) == 1024, (st, len(body))

    # Every measurement gets freshly started proxies, so the peak RSS belongs to that
    # scenario alone (allocators keep memory after a 1,000-connection run) and the rounds are
    # independent samples. The upstream and the token endpoint live for the whole run.
    direct_url = f"http://127.0.0.1:{up_port}{PATH}"

    def launch(name, w):
        """Start a fresh `name` proxy with w workers; returns (proc, url, admin_port)."""
        if name == "direct":
            return upstream, direct_url, None
        return launch_proxy(name, w, tmp, up_port, tok_port)

    quiet_spent = [0.0]
    waits = {str(w): {"requests": 0.0, "waited": 0.0, "wait_sum_s": 0.0} for w in WORKERS}

    # interleaved rounds: for each round, each worker count, each scenario: A B C D
    total = ROUNDS * len(WORKERS) * len(SCENARIOS) * len(TARGETS)
    done = 0
    for rnd in range(1, ROUNDS + 1):
        for w in WORKERS:
            for sc in SCENARIOS:
                for name in TARGETS:
                    proc, url, admin = launch(name, w)
                    res = measure(proc.pid, sc, url, DURATION, tmp, upstream.pid)
                    retries, waited = 0, 0.0
                    while res["foreign_cpu_pct"] > MAX_OTHER_CPU and retries < RETRIES \
                            and quiet_spent[0] < QUIET_BUDGET:
                        retries += 1
                        log(f"  other processes used {res['foreign_cpu_pct']:.0f}% CPU; "
                            f"repeating ({retries}/{RETRIES})")
                        if proc is not upstream:
                            stop(proc)
                            STARTED.remove(proc)
                        w_s = wait_quiet(min(60.0, QUIET_BUDGET - quiet_spent[0]))
                        waited += w_s
                        quiet_spent[0] += w_s + DURATION
                        proc, url, admin = launch(name, w)
                        res = measure(proc.pid, sc, url, DURATION, tmp, upstream.pid)
                    res["retries"], res["waited_quiet_s"] = retries, waited
                    res.update({"round": rnd, "workers": w, "scenario": sc, "target": name})
                    out["samples"].append(res)
                    if name == "tokenproxy":
                        th = out["threads"].setdefault(str(w), {})
                        th["tokenproxy_threads"] = threads_of(proc.pid)
                        th["tokenproxy_thread_names"] = sorted(
                            open(f"/proc/{proc.pid}/task/{t}/comm").read().strip()
                            for t in os.listdir(f"/proc/{proc.pid}/task"))
                        vals = scrape(admin)
                        c = metric(vals, "tokenproxy_token_wait_seconds_count")
                        waits[str(w)]["requests"] += c
                        waits[str(w)]["waited"] += c - metric(
                            vals, "tokenproxy_token_wait_seconds_bucket", le="0")
                        waits[str(w)]["wait_sum_s"] += metric(
                            vals, "tokenproxy_token_wait_seconds_sum")
                    elif name == "nginx":
                        out["threads"].setdefault(str(w), {})["nginx_processes"] = \
                            len(tree(proc.pid))
                    elif name == "haproxy":
                        out["threads"].setdefault(str(w), {})["haproxy_threads"] = \
                            threads_of(proc.pid)
                    if name != "direct":
                        stop(proc)
                        STARTED.remove(proc)
                    done += 1
                    log(f"[{done}/{total}] r{rnd} w{w} {sc:5} {name:10} {res['rps']:9.0f} req/s "
                        f"p50 {res['p50_ms']:.3f} p99 {res['p99_ms']:.3f} ms "
                        f"cpu/100k {res['cpu_s_per_100k']:.2f}s rss {res['peak_rss_mib']:.1f}MiB "
                        f"err {res['errors']} non2xx {res['non2xx']} ctxsw/req {res['ctxsw_per_req']:.2f} "
                        f"other-cpu {res['foreign_cpu_pct']:.0f}% steal {res['steal_pct']:.0f}%")
    out["main_waits"] = waits

    # RSS: tokenproxy idle with 2 clients configured, then holding 1,000 connections
    p_a, p_b, p_admin = (ports.pop() for _ in range(3))
    tcfg = os.path.join(tmp, "tokenproxy-2clients.toml")
    with open(tcfg, "w") as f:
        f.write(tokenproxy_conf(p_admin, [("alpha", p_a, up_port), ("beta", p_b, up_port)],
                                tok_port, MAIN_LIFETIME))
    env = dict(os.environ)
    env.pop("TOKIO_WORKER_THREADS", None)
    env.pop("RUST_LOG", None)
    tp = start([TOKENPROXY, "run", "--config", tcfg], os.path.join(tmp, "tokenproxy-2clients.log"),
               env=env)
    wait_http(f"http://127.0.0.1:{p_admin}/readyz")
    http(f"http://127.0.0.1:{p_a}{PATH}")
    http(f"http://127.0.0.1:{p_b}{PATH}")
    time.sleep(1.0)
    rss = {"threads": threads_of(tp.pid), "idle_rss_mib": rss_of([tp.pid]) / 1024,
           "idle_hwm_mib": hwm_of([tp.pid]) / 1024}
    hold = max(3, DURATION)
    res = run_wrk(f"http://127.0.0.1:{p_a}{PATH}", 1000, hold, "get.lua")
    rss["c1000_hwm_mib"] = hwm_of([tp.pid]) / 1024
    rss["c1000_rps"] = res["rps"]
    rss["c1000_after_rss_mib"] = rss_of([tp.pid]) / 1024
    out["rss"] = rss
    log(f"rss: {rss}")
    stop(tp)
    STARTED.remove(tp)

    # token cost: 1 and 1,000 callers over TOKEN_LIFETIMES lifetimes of TOKEN_LIFETIME s
    for callers in (1, 1000):
        p_c, p_admin = ports.pop(), ports.pop()
        lifetime_path = f"/token/{TOKEN_LIFETIME}"
        tcfg = os.path.join(tmp, f"tokenproxy-cost-{callers}.toml")
        with open(tcfg, "w") as f:
            f.write(tokenproxy_conf(p_admin, [("cost", p_c, up_port)], tok_port, TOKEN_LIFETIME))
        before = token_count(tok_port)["by_path"].get(lifetime_path, 0)
        tp = start([TOKENPROXY, "run", "--config", tcfg],
                   os.path.join(tmp, f"tokenproxy-cost-{callers}.log"), env=env)
        wait_http(f"http://127.0.0.1:{p_admin}/readyz")
        t0 = time.time()
        at_ready = token_count(tok_port)["by_path"].get(lifetime_path, 0) - before
        v0 = scrape(p_admin)
        secs = TOKEN_LIFETIME * TOKEN_LIFETIMES
        res = run_wrk(f"http://127.0.0.1:{p_c}{PATH}", callers, secs, "get.lua")
        v1 = scrape(p_admin)
        elapsed = time.time() - t0
        total_tokens = token_count(tok_port)["by_path"].get(lifetime_path, 0) - before

        def d(name, **lab):
            return metric(v1, name, **lab) - metric(v0, name, **lab)

        margin = max(1.0, min(TOKEN_LIFETIME / 10, 60.0))
        margin = min(margin, TOKEN_LIFETIME / 2)
        tc = {
            "callers": callers, "lifetime_s": TOKEN_LIFETIME, "load_s": secs,
            "elapsed_since_first_token_s": elapsed,
            "requests": res["requests"], "rps": res["rps"], "errors": res["errors"],
            "non2xx": res["non2xx"],
            "token_requests_total": total_tokens, "token_requests_at_ready": at_ready,
            "token_requests_during_load": total_tokens - at_ready,
            "refresh_interval_s": TOKEN_LIFETIME - margin,
            "scheduled_during_load": int(elapsed // (TOKEN_LIFETIME - margin)),
            "triggers": {t: metric(v1, "tokenproxy_token_refreshes_total", trigger=t)
                         for t in ("startup", "proactive", "expired", "unauthorized")},
            "waited_requests": d("tokenproxy_token_wait_seconds_count")
            - d("tokenproxy_token_wait_seconds_bucket", le="0"),
            "wait_sum_s": d("tokenproxy_token_wait_seconds_sum"),
            "wait_count": d("tokenproxy_token_wait_seconds_count"),
        }
        out["token_cost"].append(tc)
        log(f"token cost: {tc}")
        stop(tp)
        STARTED.remove(tp)

    out["elapsed_s"] = time.time() - t_start
    stop_all()
    name = f"{stamp}{'-quick' if QUICK else ''}.json"
    for path in (os.path.join(RESULTS, name), os.path.join(RESULTS, "latest.json")):
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    md = report(out)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {RESULTS}/{name}, latest.json, latest.md; took {out['elapsed_s']:.0f}s")
    shutil.rmtree(tmp, ignore_errors=True)


def profile():
    """tokenproxy alone (1 worker) under the small-GET load, sampled by perf."""
    secs = int(os.environ.get("PROFILE_SECONDS", "10"))
    freq = os.environ.get("PROFILE_FREQ", "999")
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tokenproxy-profile-")
    up_port, tok_port, p_tp, p_admin = free_ports(4)
    upstream, tokep = start_backends(tmp, up_port, tok_port)
    tcfg = os.path.join(tmp, "tokenproxy.toml")
    with open(tcfg, "w") as f:
        f.write(tokenproxy_conf(p_admin, [("bench", p_tp, up_port)], tok_port, MAIN_LIFETIME))
    env = dict(os.environ, TOKIO_WORKER_THREADS="1")
    env.pop("RUST_LOG", None)
    what = os.environ.get("PROFILE_TARGET", "tokenproxy")
    if what == "nginx":  # the reference, for comparison
        pre = os.path.join(tmp, "nginx")
        os.makedirs(pre)
        with open(os.path.join(pre, "nginx.conf"), "w") as f:
            f.write(proxy_nginx_conf(pre, p_tp, up_port, 1))
        tp = start(["nginx", "-p", pre, "-c", os.path.join(pre, "nginx.conf"),
                    "-g", "daemon off;"], os.path.join(tmp, "nginx.log"))
        wait_port(p_tp, tp)
    else:
        tp = start([TOKENPROXY, "run", "--config", tcfg], os.path.join(tmp, "tokenproxy.log"),
                   env=env)
        wait_http(f"http://127.0.0.1:{p_admin}/readyz")
    url = f"http://127.0.0.1:{p_tp}{PATH}"
    run_wrk(url, 50, 2, "get.lua")  # warm-up
    data = os.environ.get("PROFILE_DATA", os.path.join(tmp, "perf.data"))
    perf = subprocess.Popen(["perf", "record", "-F", freq, "--call-graph", "dwarf,8192",
                             "-p", ",".join(str(p) for p in tree(tp.pid)), "-o", data, "--", "sleep", str(secs + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    res = run_wrk(url, 50, secs, "get.lua")
    perf.wait(timeout=secs + 120)
    # syscalls per request, from the syscall tracepoints, over a shorter run of the same load
    names = ["writev", "write", "sendto", "sendmsg", "recvfrom", "read", "readv", "recvmsg",
             "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "sched_yield", "getsockopt",
             "setsockopt", "accept4", "connect", "close", "clock_gettime"]
    stat = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter," + ",".join(
        f"syscalls:sys_enter_{n}" for n in names), "-p", ",".join(str(p) for p in tree(tp.pid)),
        "--", "sleep", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    sres = run_wrk(url, 50, 4, "get.lua")
    _, err = stat.communicate(timeout=60)
    syscalls = []
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0].strip().isdigit() and int(parts[0]) > 0:
            syscalls.append(f"  {parts[2].replace('syscalls:sys_enter_', ''):24} "
                            f"{int(parts[0]) / sres['requests']:.3f} per request")
    stop_all()
    log(f"profiled {res['requests']:,} requests at {res['rps']:,.0f} req/s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outputs = {}
    for kind, extra in (("self", ["--no-children", "-F", "overhead,dso,sym"]),
                        ("children", ["--children", "--sort", "dso,sym"])):
        r = subprocess.run(["perf", "report", "-i", data, "--stdio",
                            "-g", "none", "--percent-limit", "0.4"] + extra,
                           capture_output=True, text=True, timeout=600)
        outputs[kind] = r.stdout
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso",
                        "-g", "none"], capture_output=True, text=True, timeout=600)
    outputs["dso"] = r.stdout
    exe = os.path.basename(TOKENPROXY) if what == "tokenproxy" else what
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                        "--dsos", f"{exe},libc.so.6,[vdso]", "-F", "overhead,dso,sym",
                        "--percent-limit", "0.1"], capture_output=True, text=True, timeout=600)
    outputs["self, user space only (% of all samples)"] = r.stdout
    path = os.path.join(RESULTS, f"profile-{what}-{stamp}.txt")
    with open(path, "w") as f:
        f.write(f"{what}, 1 worker, wrk -t{WRK_THREADS} -c50 -d{secs}s small GET; "
                f"{res['rps']:,.0f} req/s; perf -F {freq} cpu-clock, dwarf call graphs\n")
        f.write(f"\n===== syscalls per request (perf stat, {sres['requests']:,} requests; "
                f"the 4 s window is inside the 5 s count) =====\n")
        f.write("\n".join(syscalls) + "\n")
        for kind in ("dso", "self", "self, user space only (% of all samples)", "children"):
            f.write(f"\n===== by {kind} =====\n")
            f.write("\n".join(re.sub(r"[\s-]+$", "", l) for l in outputs[kind].splitlines()
                               if l.strip() and not l.startswith("#")))
            f.write("\n")
    print(open(path).read()[:12000])
    log(f"wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- report

def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def spread(vals, nd=2, suffix=""):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{fmt(med, nd)}{suffix}"
    return f"{fmt(med, nd)}{suffix} ({fmt(min(vals), nd)}–{fmt(max(vals), nd)})"


def ratios(samples, w, sc, target, key):
    """Per-round ratio target/nginx, paired by round."""
    by_round = {}
    for s in samples:
        if s["workers"] == w and s["scenario"] == sc:
            by_round.setdefault(s["round"], {})[s["target"]] = s[key]
    out = []
    for r in by_round.values():
        if target in r and "nginx" in r and r["nginx"]:
            out.append(r[target] / r["nginx"])
    return out


def values(samples, w, sc, target, key):
    return [s.get(key) for s in samples if s["workers"] == w and s["scenario"] == sc
            and s["target"] == target]


def report(data):
    m, st, samples = data["machine"], data["settings"], data["samples"]
    L = []
    L.append(f"Run {m['date']} on {m['nproc']} cores ({m['cpu_model']}), kernel {m['kernel']}; "
             f"tokenproxy {m['tokenproxy_commit']}; {m['nginx']}; {m['haproxy'].split(' - ')[0]}; "
             f"{m['wrk'].split(' [')[0]}; {m['oha']}.")
    L.append(f"Settings: {st['rounds']} interleaved rounds × {st['duration_s']} s per measurement; "
             f"wrk -t{st['wrk_threads']}; open loop {st['rate']} req/s over {st['rate_conns']} "
             f"connections; total run {data.get('elapsed_s', 0) / 60:.1f} min"
             f"{' (QUICK smoke run: numbers are not meaningful)' if st['quick'] else ''}.")
    fc = sorted(x.get("foreign_cpu_pct", 0.0) for x in samples)
    if fc:
        stl = sorted(x.get("steal_pct", 0.0) for x in samples)
        if "busy_before_start_pct" in m:
            L.append(f"Machine busy before the start: {m['busy_before_start_pct']:.0f}% of all "
                     f"cores.")
        rep = [x for x in samples if x.get("retries")]
        if rep:
            L.append(f"{len(rep)} of {len(samples)} measurements were repeated because other "
                     f"processes used more than {st.get('max_other_cpu', 20):g}% of the CPUs "
                     f"during them (up to {max(x['retries'] for x in rep)} times; "
                     f"{sum(x.get('waited_quiet_s', 0) for x in samples):.0f} s spent waiting "
                     f"for a quiet machine).")
        L.append(f"CPU used by other processes on the machine during the measurements (not the "
                 f"proxy, upstream or load generator), in % of all cores: median "
                 f"{statistics.median(fc):.0f}%, max {fc[-1]:.0f}%; hypervisor steal: median "
                 f"{statistics.median(stl):.0f}%, max {stl[-1]:.0f}%.")
    L.append("")
    L.append("Cells: median over rounds (min–max). `×nginx` is the per-round ratio to nginx "
             "with the same worker count, then median (min–max) over rounds. CPU is the proxy's "
             "own process tree (for `direct`: the upstream nginx). Peak RSS is VmHWM summed over "
             "the process tree (nginx: master + workers) of a proxy started fresh for that "
             "measurement (for `direct`: the long-lived upstream, reset with clear_refs).")
    L.append("")
    for w in st["workers"]:
        th = data.get("threads", {}).get(str(w), {})
        L.append(f"### {w} worker{'s' if w > 1 else ''} each "
                 f"(nginx worker_processes {w}, HAProxy nbthread {w}, tokenproxy "
                 f"TOKIO_WORKER_THREADS={w}: {th.get('tokenproxy_threads', '?')} threads in "
                 f"/proc/PID/task)")
        L.append("")
        L.append("| scenario | target | req/s | req/s ×nginx | p50 ms | p99 ms | p99 ×nginx | "
                 "p99.9 ms | CPU s/100k req | CPU ×nginx | of which user | ctx sw/req | peak RSS MiB | "
                 "RSS ×nginx | errors |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for sc in SCENARIOS:
            title = SCENARIO_TITLES[sc]
            if sc == "rate":
                title = f"open loop {st['rate']:,} req/s, {st['rate_conns']} conns (oha, latency-corrected)"
            for t in TARGETS:
                if not values(samples, w, sc, t, "rps"):
                    continue
                errs = sum(values(samples, w, sc, t, "errors")) + \
                    sum(values(samples, w, sc, t, "non2xx"))
                rr = (lambda k: spread(ratios(samples, w, sc, t, k), 2, "×")) if t != "nginx" \
                    else (lambda k: "1")
                L.append("| " + " | ".join([
                    title if t == "direct" else "",
                    f"**{t}**" if t == "tokenproxy" else t,
                    spread(values(samples, w, sc, t, "rps")),
                    rr("rps"),
                    spread(values(samples, w, sc, t, "p50_ms"), 3),
                    spread(values(samples, w, sc, t, "p99_ms"), 3),
                    rr("p99_ms"),
                    spread(values(samples, w, sc, t, "p999_ms"), 3),
                    spread(values(samples, w, sc, t, "cpu_s_per_100k")),
                    rr("cpu_s_per_100k"),
                    fmt(statistics.median(values(samples, w, sc, t, "user_cpu_s_per_100k")))
                    if "user_cpu_s_per_100k" in samples[0] else "–",
                    spread([x for x in values(samples, w, sc, t, "ctxsw_per_req")
                            if x is not None], 2) if "ctxsw_per_req" in samples[0] else "–",
                    spread(values(samples, w, sc, t, "peak_rss_mib"), 1),
                    rr("peak_rss_mib"),
                    str(errs),
                ]) + " |")
        L.append("")

    # bars
    L.append("### Bars (issue 7)")
    L.append("")
    L.append("| bar | measured (median over rounds, min–max) | met? |")
    L.append("|---|---|---|")

    def bar_ratio(w, sc, key, ok):
        r = ratios(samples, w, sc, "tokenproxy", key)
        if not r:
            return None, "–"
        med = statistics.median(r)
        return ok(med), spread(r, 2, "×")

    rows = []
    if 1 in st["workers"]:
        rows.append(("small GET, 1 worker: throughput ≥ 1.0× nginx",
                     *bar_ratio(1, "get", "rps", lambda x: x >= 1.0)))
        rows.append(("small GET, 1 worker: p99 ≤ 1.1× nginx",
                     *bar_ratio(1, "get", "p99_ms", lambda x: x <= 1.1)))
    for w in st["workers"]:
        rows.append((f"POST 16 KiB, {w} worker{'s' if w > 1 else ''}: throughput ≥ 0.9× nginx",
                     *bar_ratio(w, "post", "rps", lambda x: x >= 0.9)))
        rows.append((f"1,000 connections, {w} worker{'s' if w > 1 else ''}: throughput ≥ 0.9× nginx",
                     *bar_ratio(w, "c1000", "rps", lambda x: x >= 0.9)))
    rss = data.get("rss", {})
    if rss:
        rows.append(("RSS idle, 2 clients configured ≤ 16 MiB",
                     rss["idle_rss_mib"] <= 16, f"{rss['idle_rss_mib']:.1f} MiB "
                     f"(default runtime: {rss['threads']} threads)"))
        peak = max([rss["c1000_hwm_mib"]] + [s["peak_rss_mib"] for s in samples
                                              if s["target"] == "tokenproxy"
                                              and s["scenario"] == "c1000"])
        rows.append(("RSS holding 1,000 connections ≤ 64 MiB", peak <= 64,
                     f"{peak:.1f} MiB peak (2-client instance: {rss['c1000_hwm_mib']:.1f} MiB)"))
    for tc in data.get("token_cost", []):
        extra = tc["triggers"]["expired"] + tc["triggers"]["unauthorized"]
        ok = extra == 0 and tc["token_requests_during_load"] <= tc["scheduled_during_load"] + 1
        rows.append((f"token endpoint, {tc['callers']:,} caller{'s' if tc['callers'] > 1 else ''}: "
                     "one request per token, whatever the number of callers",
                     ok, f"{tc['token_requests_total']} token requests in "
                     f"{tc['elapsed_since_first_token_s']:.1f} s of {tc['lifetime_s']} s tokens "
                     f"({tc['elapsed_since_first_token_s'] / tc['lifetime_s']:.1f} lifetimes; "
                     f"startup 1 + {tc['token_requests_during_load']} refreshes, one every "
                     f"{tc['refresh_interval_s']:g} s = lifetime − refresh_before, schedule "
                     f"allows {tc['scheduled_during_load']}); triggers expired/unauthorized: "
                     f"{extra:g}; {tc['requests']:,} requests"))
        rows.append((f"requests that waited on a token in steady state, {tc['callers']:,} "
                     f"caller{'s' if tc['callers'] > 1 else ''}: 0",
                     tc["waited_requests"] == 0,
                     f"{tc['waited_requests']:g} of {tc['wait_count']:,.0f} "
                     f"(wait sum {tc['wait_sum_s']:.4f} s)"))
    for w, mw in sorted(data.get("main_waits", {}).items()):
        rows.append((f"requests that waited on a token, all throughput runs, {w} worker(s): 0",
                     mw["waited"] == 0, f"{mw['waited']:g} of {mw['requests']:,.0f}"))
    for name, ok, text in rows:
        L.append(f"| {name} | {text} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--profile":
        try:
            profile()
        finally:
            stop_all()
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        with open(sys.argv[2]) as f:
            print(report(json.load(f)))
        sys.exit(0)

    def on_signal(signum, frame):
        stop_all()
        sys.exit(130)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        main()
    finally:
        stop_all()
