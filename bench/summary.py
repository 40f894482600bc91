#!/usr/bin/env python3
"""One table from a full run (bench/full.sh): every figure of issue 24 next to its target.

    python3 bench/summary.py --since EPOCH --logs DIR     # as full.sh calls it
    python3 bench/summary.py                              # from the newest result of each part

Reads the newest bench/results/{*.json (bench.py), h2c-*, subjects-*, dpop-*, ws-*}.json written
after EPOCH (all of them without --since), and the `JSON:` lines of rss_conns.py's logs in DIR.
Writes bench/results/full-latest.md and prints it. Ratios are tokenproxy / reference in the same
round, median (min-max) over rounds.
"""
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

RESULTS = bench.RESULTS


def arg(name):
    if name in sys.argv:
        i = sys.argv.index(name)
        if i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return None


SINCE = float(arg("--since") or 0)
LOGS = arg("--logs")


def newest(pattern, where=None):
    """Newest file matching pattern written after SINCE (and passing `where`), loaded."""
    files = [f for f in glob.glob(os.path.join(RESULTS, pattern))
             if os.path.getmtime(f) >= SINCE and not f.endswith("latest.json")]
    for f in sorted(files, key=os.path.basename, reverse=True):  # names carry the time
        with open(f) as fh:
            data = json.load(fh)
        if where is None or where(data):
            return f, data
    return None, None


def spread(values, fmt="{:.2f}", suffix="x"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return (f"{fmt.format(statistics.median(values))}{suffix} ({fmt.format(min(values))}-"
            f"{fmt.format(max(values))})")


def verdict(values, target, higher_is_better):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    ok = med >= target if higher_is_better else med <= target
    return "yes" if ok else "**no**"


def main():
    rows = []  # (area, measure, result, target, met)
    sources = []

    f, main_run = newest("20*.json")
    if main_run:
        sources.append(f)
        samples = main_run["samples"]
        for w in main_run["settings"]["workers"]:
            def r(sc, key, target="tokenproxy"):
                return bench.ratios(samples, w, sc, target, key)
            get_rps, get_p99, get_cpu = r("get", "rps"), r("get", "p99_ms"), r("get", "cpu_s_per_100k")
            c_rps, c_p99, c_p999 = r("c1000", "rps"), r("c1000", "p99_ms"), r("c1000", "p999_ms")
            c_rss = r("c1000", "peak_rss_mib")
            h_rps = r("get", "rps", "haproxy")
            area = f"HTTP/1, {w} worker{'s' if w > 1 else ''} (vs nginx)"
            rows += [
                (area, "small GET throughput", spread(get_rps), ">= 1.0x",
                 verdict(get_rps, 1.0, True)),
                (area, "small GET p99", spread(get_p99), "<= 1.1x", verdict(get_p99, 1.1, False)),
                (area, "CPU per small GET", spread(get_cpu), "<= 1.05x",
                 verdict(get_cpu, 1.05, False)),
                (area, "1,000 connections throughput", spread(c_rps), ">= 1.0x",
                 verdict(c_rps, 1.0, True)),
                (area, "1,000 connections p99", spread(c_p99), "<= 1.2x",
                 verdict(c_p99, 1.2, False)),
                (area, "1,000 connections p99.9", spread(c_p999), "<= 1.2x",
                 verdict(c_p999, 1.2, False)),
                (area, "1,000 connections peak RSS", spread(c_rss), "<= 1.25x",
                 verdict(c_rss, 1.25, False)),
                (area, "(HAProxy's small GET throughput, same rounds)", spread(h_rps), "", ""),
            ]

    if LOGS:
        for w in (1, 2):
            path = os.path.join(LOGS, f"rss-w{w}.log")
            if not os.path.exists(path):
                continue
            with open(path) as fh:
                lines = [line[5:] for line in fh if line.startswith("JSON:")]
            if lines:
                d = json.loads(lines[-1])
                area = f"memory, {w} worker{'s' if w > 1 else ''} (rss_conns.py)"
                rows += [
                    (area, "idle keep-alive connection", f"{d['idle_conn_kib']:.1f} KiB",
                     "<= 12 KiB", "yes" if d["idle_conn_kib"] <= 12 else "**no**"),
                    (area, "peak under wrk -c1000, per connection",
                     f"{d['peak_conn_kib']:.1f} KiB ({d['peak_mib']:.1f} MiB)", "", ""),
                ]

    f, h2c = newest("h2c-*.json")
    if h2c:
        sources.append(f)
        for w in h2c["workers"]:
            for shape in ("streams", "conns"):
                by = {}
                for s in h2c["samples"]:
                    if s["workers"] == w and s["shape"] == shape:
                        by.setdefault(s["round"], {})[s["target"]] = s
                rps = [r["tokenproxy"]["rps"] / r["nginx"]["rps"] for r in by.values()
                       if "nginx" in r and "tokenproxy" in r and r["nginx"]["rps"]]
                p99 = [r["tokenproxy"]["p99_ms"] / r["nginx"]["p99_ms"] for r in by.values()
                       if "nginx" in r and "tokenproxy" in r and r["nginx"]["p99_ms"]]
                what = "50 streams on 1 connection" if shape == "streams" else "50 connections"
                rows.append((f"h2c, {w} worker{'s' if w > 1 else ''} (vs nginx h2c)",
                             f"{what}: throughput / p99", f"{spread(rps)} / {spread(p99)}",
                             "", ""))

    f, subjects = newest("subjects-*.json")
    if subjects:
        sources.append(f)
        t = subjects["throughput"]
        ratios = [q["rps"] / p["rps"] for p, q in zip(t["plain"], t["subjects"]) if p["rps"]]
        median = t["ratio_median"]  # subjects.py's own figure (its bar is on it)
        rows.append(("subjects, 1 worker (vs one-token client)",
                     f"{subjects['active']:,} active of {subjects['subjects']:,}: throughput",
                     f"{median:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})",
                     ">= 0.9x", "yes" if median >= 0.9 else "**no**"))

    for alg in ("ES256", "EdDSA"):
        f, dpop = newest("dpop-*.json", lambda d, a=alg: d.get("alg") == a)
        if dpop:
            sources.append(f)
            import dpop as dpop_mod  # noqa: E402
            _pairs, ratios, proof_us = dpop_mod.summary(dpop)
            rows.append((f"DPoP {alg}, {dpop['workers']} worker (vs Bearer)",
                         "throughput; CPU per proof",
                         f"{spread(ratios)}; {spread(proof_us, '{:.1f}', ' µs')}",
                         ">= 0.7x", verdict(ratios, 0.7, True)))

    for w in (1, 2):
        f, ws = newest("ws-*.json", lambda d, w=w: d.get("workers") == w)
        if ws:
            sources.append(f)
            by = {}
            for s in ws["samples"]:
                by.setdefault(s["round"], {})[s["target"]] = s

            def ratio(key):
                return [r["tokenproxy"][key] / r["nginx"][key] for r in by.values()
                        if "nginx" in r and "tokenproxy" in r and r["nginx"].get(key)]
            rows.append((f"WebSocket echo, {w} worker{'s' if w > 1 else ''} (vs nginx)",
                         "round trips / p99 / CPU per round trip",
                         f"{spread(ratio('rps'))} / {spread(ratio('p99_ms'))} / "
                         f"{spread(ratio('cpu_us_per_round_trip'))}", "", ""))

    m = main_run["machine"] if main_run else bench.machine()
    out = ["# Full run: tokenproxy against its references", "",
           f"{m.get('date', '?')}, {m.get('nproc', '?')} cores ({m.get('cpu_model', '?')}), "
           f"tokenproxy {m.get('tokenproxy_commit', '?')}. Sources: "
           + ", ".join(f"`{os.path.relpath(s, bench.ROOT)}`" for s in sources) + ".", "",
           "| area | measure | result | target | met? |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    text = "\n".join(out) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "full-latest.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
