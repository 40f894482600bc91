"""Structural checks for deploy/, called by deploy/check.sh as: checks.py COMMAND ARGS."""
import base64
import json
import os
import re
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: a few checks fall back to regular expressions
    tomllib = None

problems = []


def bad(msg):
    problems.append(msg)


def done():
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def duration_seconds(text):
    """'25s', '1m 30s', '2m' -> seconds (the subset of humantime the configs use)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, found = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if unit not in units:
            raise ValueError(f"unknown duration unit in {text!r}")
        total += float(num) * units[unit]
        found = True
    if not found:
        raise ValueError(f"not a duration: {text!r}")
    return total


def parse_toml(text):
    if tomllib is not None:
        return tomllib.loads(text)
    return None


def toml_value(text, section, key):
    data = parse_toml(text)
    if data is not None:
        cur = data
        for part in section.split(".") if section else []:
            cur = cur.get(part, {}) if isinstance(cur, dict) else {}
        return cur.get(key) if isinstance(cur, dict) else None
    m = re.search(r"^\[" + re.escape(section) + r"\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not m:
        return None
    k = re.search(r"^\s*" + re.escape(key) + r"\s*=\s*\"([^\"]*)\"", m.group(1), re.M)
    return k.group(1) if k else None


def admin_port(text):
    listen = toml_value(text, "admin", "listen") or "127.0.0.1:9090"
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def shutdown_grace(text):
    return duration_seconds(toml_value(text, "limits", "shutdown_grace") or "25s")


def secret_file_keys(data, prefix=""):
    """(dotted key, value) of every *_file key in a parsed TOML document."""
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += secret_file_keys(v, key + ".")
        elif k.endswith("_file") and isinstance(v, str):
            out.append((key, v))
    return out


def documented_metrics(readme):
    text = Path(readme).read_text(encoding="utf-8")
    section = text.split("## Metrics", 1)[-1].split("\n## ", 1)[0]
    return set(re.findall(r"`(tokenproxy_[a-z_]+)`", section))


def metric_names(expr):
    names = set()
    for m in re.findall(r"\btokenproxy_[a-z_]+", expr):
        names.add(re.sub(r"_(bucket|sum|count)$", "", m))
    return names


# ------------------------------------------------------------------ commands

def cmd_parse_yaml(path):
    docs = load_docs(path)
    if not docs:
        bad(f"{path}: no YAML document")
    done()


def cmd_parse_json(path):
    with open(path, encoding="utf-8") as f:
        json.load(f)
    done()


def configmap_tomls(kdir):
    """{(configmap name, key): toml text} for every *.toml key of every ConfigMap."""
    out = {}
    for f in sorted(Path(kdir).glob("*.y*ml")):
        for d in load_docs(f):
            if d.get("kind") == "ConfigMap":
                for k, v in (d.get("data") or {}).items():
                    if k.endswith(".toml"):
                        out[(d["metadata"]["name"], k)] = v
    return out


def cmd_k8s_extract_toml(kdir, outdir):
    for (cm, key), text in configmap_tomls(kdir).items():
        d = Path(outdir) / f"configmap-{cm}"
        d.mkdir(parents=True, exist_ok=True)
        (d / key).write_text(text, encoding="utf-8")
        print(d / key)


def resource_ok(c, where):
    r = c.get("resources") or {}
    for part in ("requests", "limits"):
        if not (r.get(part) or {}).get("memory") or not (r.get(part) or {}).get("cpu"):
            bad(f"{where}: resources.{part} needs cpu and memory")


def security_ok(c, where, pod_sc):
    sc = c.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        bad(f"{where}: securityContext.runAsNonRoot must be true")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if not isinstance(uid, int) or uid == 0:
        bad(f"{where}: securityContext.runAsUser must be a numeric non-root UID")
    if sc.get("readOnlyRootFilesystem") is not True:
        bad(f"{where}: securityContext.readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        bad(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        bad(f"{where}: securityContext.capabilities.drop must contain ALL")


def probe_port(probe, ports):
    port = ((probe or {}).get("httpGet") or {}).get("port")
    return ports.get(port, port)


def cmd_k8s_structure(kdir):
    objs = []
    for f in sorted(Path(kdir).glob("*.y*ml")):
        for i, d in enumerate(load_docs(f)):
            where = f"{f.name}#{i}"
            if not isinstance(d, dict):
                bad(f"{where}: not a mapping")
                continue
            for k in ("apiVersion", "kind"):
                if not d.get(k):
                    bad(f"{where}: {k} missing")
            if not (d.get("metadata") or {}).get("name"):
                bad(f"{where}: metadata.name missing")
            objs.append((where, d))
    by_kind = {}
    for where, d in objs:
        by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = d
    cms = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})

    def secret_keys(name):
        s = secrets.get(name) or {}
        return set((s.get("data") or {}).keys()) | set((s.get("stringData") or {}).keys())

    workloads = [(w, d) for w, d in objs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]
    if not workloads:
        bad("no Deployment found")
    for where, d in workloads:
        spec = d["spec"]
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            bad(f"{where}: selector.matchLabels must match the pod template's labels")
        pod = tmpl.get("spec") or {}
        pod_sc = pod.get("securityContext") or {}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        inits = pod.get("initContainers") or []
        mains = pod.get("containers") or []
        sidecars = [c for c in inits if c.get("name") == "tokenproxy"]
        if not sidecars:
            bad(f"{where}: no init container named tokenproxy (native sidecar)")
            continue
        tp = sidecars[0]
        if tp.get("restartPolicy") != "Always":
            bad(f"{where}: init container tokenproxy needs restartPolicy: Always (native sidecar)")
        if not mains:
            bad(f"{where}: no app container")
        for c in inits + mains:
            cw = f"{where}: container {c.get('name')}"
            resource_ok(c, cw)
            security_ok(c, cw, pod_sc)
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    bad(f"{cw}: volumeMount {m.get('name')} has no volume")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref.get("key") not in secret_keys(ref.get("name")):
                    bad(f"{cw}: env {e['name']} refers to missing key {ref.get('key')} of Secret {ref.get('name')}")
        # Where each projected/configMap/secret volume puts which key.
        files = {}  # mountPath-relative file -> (kind, name, key)
        config_text = None
        config_path = None
        tp_args = (tp.get("args") or []) + (tp.get("command") or [])
        for m in tp.get("volumeMounts") or []:
            v = volumes.get(m.get("name")) or {}
            sources = []
            if "configMap" in v:
                sources.append({"configMap": v["configMap"]})
            if "secret" in v:
                sources.append({"secret": {**v["secret"], "name": v["secret"].get("secretName")}})
            sources += (v.get("projected") or {}).get("sources") or []
            for s in sources:
                for kind in ("configMap", "secret"):
                    if kind not in s:
                        continue
                    src = s[kind]
                    name = src.get("name")
                    keys = set((cms.get(name) or {}).get("data") or {}) if kind == "configMap" else secret_keys(name)
                    if not keys:
                        bad(f"{where}: volume {m['name']} uses {kind} {name}, which is not in {kdir}")
                    items = src.get("items") or [{"key": k, "path": k} for k in keys]
                    for it in items:
                        if it["key"] not in keys:
                            bad(f"{where}: volume {m['name']}: {kind} {name} has no key {it['key']}")
                        path = os.path.normpath(os.path.join(m["mountPath"], it["path"]))
                        files[path] = (kind, name, it["key"])
        for p, (kind, name, key) in files.items():
            if kind == "configMap" and key.endswith(".toml") and p in tp_args:
                config_path, config_text = p, cms[name]["data"][key]
        if config_text is None:
            bad(f"{where}: tokenproxy's --config does not name a TOML mounted from a ConfigMap")
            continue
        # The config's relative/absolute *_file paths must be mounted.
        data = parse_toml(config_text)
        if data is not None:
            for key, value in secret_file_keys(data):
                if "${" in value:
                    continue
                p = os.path.normpath(os.path.join(os.path.dirname(config_path), value))
                if p not in files:
                    bad(f"{where}: config key {key} = {value!r} -> {p}, which no volume provides")
            for m in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config_text):
                if m not in {e.get("name") for e in tp.get("env") or []}:
                    bad(f"{where}: config uses ${{{m}}} but the tokenproxy container sets no env {m}")
        # Probes on the admin port.
        host, port = admin_port(config_text)
        ports = {p.get("name"): p.get("containerPort") for p in tp.get("ports") or []}
        if host not in ("0.0.0.0", "::"):
            bad(f"{where}: admin.listen must bind 0.0.0.0 in a pod (kubelet probes and Prometheus use the pod IP), found {host}")
        if port not in ports.values():
            bad(f"{where}: admin port {port} is not a containerPort of tokenproxy")
        expect = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        for probe, path in expect.items():
            pr = tp.get(probe)
            if not pr:
                bad(f"{where}: tokenproxy has no {probe}")
                continue
            if pr.get("httpGet", {}).get("path") != path:
                bad(f"{where}: {probe} must GET {path}")
            if probe_port(pr, ports) != port:
                bad(f"{where}: {probe} port {pr.get('httpGet', {}).get('port')} is not the admin port {port}")
        if tp.get("startupProbe") and probe_port(tp["startupProbe"], ports) != port:
            bad(f"{where}: startupProbe is not on the admin port {port}")
        # Grace period above shutdown_grace.
        grace = pod.get("terminationGracePeriodSeconds", 30)
        sg = shutdown_grace(config_text)
        if not grace > sg:
            bad(f"{where}: terminationGracePeriodSeconds {grace} must exceed limits.shutdown_grace {sg:g}s")
        # The app's base URL points at a client listener on loopback.
        listens = set()
        if data is not None:
            for c in (data.get("clients") or {}).values():
                listens.add(c.get("listen"))
        urls = [e.get("value", "") for c in mains for e in c.get("env") or []]
        if listens and not any(f"http://{l}" == u.rstrip("/") for l in listens for u in urls):
            bad(f"{where}: no app env points at a client listener (http://{sorted(listens)[0]})")
    done()


def cmd_toml_prepare(src, outdir):
    """Copies SRC into OUTDIR, creates dummy files for relative *_file keys, prints VAR=value lines."""
    text = Path(src).read_text(encoding="utf-8")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / Path(src).name
    dst.write_text(text, encoding="utf-8")
    names = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)))
    env = {}
    for n in names:
        if n.endswith("_URL"):
            env[n] = "https://deploy-check.invalid/" + n.lower()
        elif n.endswith(("_DIR", "_PATH")):
            env[n] = str(out / n.lower())
        else:
            env[n] = "deploy-check-dummy-" + n.lower()
    data = parse_toml(text)
    file_keys = secret_file_keys(data) if data is not None else [("", v) for v in re.findall(
        r"^\s*[A-Za-z0-9_]+_file\s*=\s*\"([^\"]*)\"", text, re.M)]
    for key, v in file_keys:
        for n, val in env.items():
            v = v.replace("${" + n + "}", val)
        p = Path(v)
        if not p.is_absolute():
            p = out / p
        elif not p.exists() and not str(p).startswith(str(out)):
            print(f"ERROR {src}: *_file path {v} is absolute and does not exist here; "
                  "use a path relative to the config file or one built from ${VAR}", file=sys.stderr)
            sys.exit(1)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            if key == "store.key_file":
                # The store key must be 32 bytes in base64; a dummy of that shape.
                p.write_text(base64.b64encode(b"deploy-check-dummy-store-key-32b").decode() + "\n",
                             encoding="utf-8")
            else:
                p.write_text("deploy-check-dummy-secret\n", encoding="utf-8")
            # tokenproxy refuses a secret file of its own user open to group or others.
            p.chmod(0o600)
    print(dst)
    for n, val in env.items():
        print(f"{n}={val}")


def cmd_rules_structure(path, readme):
    known = documented_metrics(readme)
    doc = load_docs(path)[0]
    groups = doc.get("groups") or []
    if not groups:
        bad(f"{path}: no groups")
    alerts = set()
    for g in groups:
        if not g.get("name"):
            bad(f"{path}: a group has no name")
        for r in g.get("rules") or []:
            name = r.get("alert") or r.get("record")
            if not name or not r.get("expr"):
                bad(f"{path}: rule {name!r} needs alert/record and expr")
                continue
            if name in alerts:
                bad(f"{path}: duplicate alert {name}")
            alerts.add(name)
            if r.get("alert"):
                ann = r.get("annotations") or {}
                for k in ("summary", "description", "runbook"):
                    if not ann.get(k):
                        bad(f"{path}: {name}: annotation {k} missing")
                if not (r.get("labels") or {}).get("severity"):
                    bad(f"{path}: {name}: label severity missing")
                if "for" in r:
                    duration_seconds(r["for"])
            for m in metric_names(r["expr"]) - known:
                bad(f"{path}: {name}: metric {m} is not in README.md's metric table")
            if r["expr"].count("(") != r["expr"].count(")"):
                bad(f"{path}: {name}: unbalanced parentheses")
    wanted = {
        'tokenproxy_token_refreshes_total{outcome!="success"}',
        'tokenproxy_client_state{state="needs_authorization"}',
        "tokenproxy_token_expiry_timestamp_seconds",
        "tokenproxy_request_duration_seconds_bucket",
        "tokenproxy_token_wait_seconds",
        "tokenproxy_errors_total",
    }
    exprs = " ".join(r.get("expr", "") for g in groups for r in g.get("rules") or [])
    for w in wanted:
        if w not in exprs:
            bad(f"{path}: no rule uses {w}")
    done()


def cmd_rules_strip(src, dst):
    doc = load_docs(src)[0]
    for g in doc.get("groups") or []:
        for r in g.get("rules") or []:
            r.pop("annotations", None)
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def dashboard_exprs(dash):
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title"), t["expr"]))
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    return out


def cmd_dashboard_structure(path, readme):
    known = documented_metrics(readme)
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        bad(f"{path}: schemaVersion must be >= 36")
    if not any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in d.get("__inputs") or []):
        bad(f"{path}: __inputs needs a DS_PROMETHEUS prometheus datasource")
    tv = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
    q = (tv.get("client") or {}).get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if q != "label_values(tokenproxy_client_state, client)":
        bad(f"{path}: template variable client must be label_values(tokenproxy_client_state, client)")
    ids = set()
    titles = []

    def walk(panels):
        for p in panels:
            if p.get("id") in ids:
                bad(f"{path}: duplicate panel id {p.get('id')}")
            ids.add(p.get("id"))
            if p.get("type") != "row":
                titles.append(p.get("title", ""))
                ds = p.get("datasource") or {}
                if ds.get("uid") != "${DS_PROMETHEUS}":
                    bad(f"{path}: panel {p.get('title')!r}: datasource must be ${{DS_PROMETHEUS}}")
                if not p.get("targets"):
                    bad(f"{path}: panel {p.get('title')!r} has no query")
                gp = p.get("gridPos") or {}
                if not all(k in gp for k in "hwxy"):
                    bad(f"{path}: panel {p.get('title')!r}: gridPos incomplete")
            walk(p.get("panels") or [])

    walk(d.get("panels") or [])
    for title, expr in dashboard_exprs(d):
        for m in metric_names(expr) - known:
            bad(f"{path}: panel {title!r}: metric {m} is not in README.md's metric table")
        if expr.count("(") != expr.count(")"):
            bad(f"{path}: panel {title!r}: unbalanced parentheses")
    want = ["expir", "refresh", "request rate", "latency", "token wait", "401", "in-flight", "state"]
    for w in want:
        if not any(w in t.lower() for t in titles):
            bad(f"{path}: no panel about {w!r}")
    done()


def cmd_dashboard_rules(path, dst):
    """Writes the dashboard's queries as recording rules, so promtool parses them."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs(d)):
        e = expr
        for var, val in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
            e = e.replace(var, val)
        e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", e)
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)


def cmd_sd_to_static(src, dst):
    doc = load_docs(src)[0]
    for sc in doc.get("scrape_configs") or []:
        if sc.pop("kubernetes_sd_configs", None) is not None:
            sc["static_configs"] = [{"targets": ["placeholder.invalid:9090"]}]
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def cmd_dockerfile_basic(dockerfile, cargo_toml, dockerignore):
    text = Path(dockerfile).read_text(encoding="utf-8")
    # Join continuation lines, drop comments.
    lines = []
    cur = ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") and not cur:
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    args = {}
    stages = set()
    froms, users, entry, cmd, expose = [], [], None, None, set()
    for ln in lines:
        ins, _, rest = ln.partition(" ")
        ins = ins.upper()
        if ins == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif ins == "FROM":
            parts = rest.split()
            image = parts[0]
            for k, v in args.items():
                image = image.replace("${" + k + "}", v).replace("$" + k, v)
            froms.append(image)
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
        elif ins == "USER":
            users.append((len(froms), rest.strip()))
        elif ins == "ADD" and re.search(r"https?://", rest):
            bad(f"{dockerfile}: ADD of a URL: {ln}")
        elif ins == "ENTRYPOINT":
            entry = json.loads(rest)
        elif ins == "CMD":
            cmd = json.loads(rest)
        elif ins == "EXPOSE":
            expose |= set(rest.split())
        elif ins == "HEALTHCHECK" and "NONE" not in rest.upper():
            bad(f"{dockerfile}: HEALTHCHECK cannot run in a distroless image (no shell)")
    if len(froms) < 2:
        bad(f"{dockerfile}: expected a multi-stage build")
    for image in froms:
        if image in stages:
            continue
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag or tag == "latest":
            bad(f"{dockerfile}: FROM {image} is not pinned to a tag")
    final_users = [u for n, u in users if n == len(froms)]
    if not final_users:
        bad(f"{dockerfile}: the final stage sets no USER")
    else:
        uid = final_users[-1].split(":")[0]
        if not uid.isdigit() or uid == "0":
            bad(f"{dockerfile}: final USER must be a numeric non-root UID, found {final_users[-1]}")
    rust = [i for i in froms if i.startswith("rust:")]
    cargo = Path(cargo_toml).read_text(encoding="utf-8")
    m = re.search(r'^rust-version\s*=\s*"([^"]+)"', cargo, re.M)
    if not rust:
        bad(f"{dockerfile}: no rust:<version> build stage")
    elif not re.match(r"\d+\.\d+", rust[0].split(":")[1]):
        bad(f"{dockerfile}: {rust[0]}: pin the Rust version (rust:<version>-bookworm)")
    elif m and version_tuple(rust[0].split(":")[1]) < version_tuple(m.group(1)):
        bad(f"{dockerfile}: {rust[0]} is older than rust-version {m.group(1)} in Cargo.toml")
    if "--locked" not in text:
        bad(f"{dockerfile}: cargo build must use --locked")
    if entry != ["/usr/local/bin/tokenproxy"]:
        bad(f"{dockerfile}: ENTRYPOINT must be [\"/usr/local/bin/tokenproxy\"]")
    if not cmd or cmd[:1] != ["--config"]:
        bad(f"{dockerfile}: CMD must pass --config")
    if not {"8080", "9090"} <= expose:
        bad(f"{dockerfile}: EXPOSE 8080 9090 missing")
    ignore = []
    if Path(dockerignore).exists():
        for raw in Path(dockerignore).read_text(encoding="utf-8").splitlines():
            s = raw.strip()
            if s and not s.startswith("#"):
                ignore.append(s.rstrip("/"))
    for needed in ("target", ".git"):
        if needed not in ignore and "/" + needed not in ignore:
            bad(f"{dockerignore}: must exclude {needed}")
    for needed in ("src", "Cargo.toml", "Cargo.lock"):
        if needed in ignore:
            bad(f"{dockerignore}: excludes {needed}, which the build needs")
    done()


def cmd_compose_structure(cdir):
    cdir = Path(cdir)
    compose = load_docs(cdir / "compose.yaml")[0]
    services = compose.get("services") or {}
    for s in ("app", "tokenproxy", "redis", "prometheus"):
        if s not in services:
            bad(f"compose.yaml: service {s} missing")
    tp = services.get("tokenproxy") or {}
    cfg_mount = None
    for v in tp.get("volumes") or []:
        src, _, rest = v.partition(":")
        target = rest.split(":")[0]
        if src.endswith(".toml"):
            cfg_mount = (cdir / src, target)
    if not cfg_mount:
        bad("compose.yaml: tokenproxy mounts no .toml config")
        done()
    host_cfg, target = cfg_mount
    command = tp.get("command") or []
    if target not in command:
        bad(f"compose.yaml: tokenproxy's command does not pass --config {target}")
    text = host_cfg.read_text(encoding="utf-8")
    data = parse_toml(text)
    if data is not None:
        store = data.get("store") or {}
        if store.get("kind") == "redis":
            host = str(store.get("url", "")).split("://", 1)[-1].split("@")[-1].split(":")[0].split("/")[0]
            if host not in services:
                bad(f"{host_cfg}: store.url names {host!r}, which is not a compose service")
        # Secret targets must be where the config's *_file keys look.
        targets = {s.get("target") for s in tp.get("secrets") or [] if isinstance(s, dict)}
        for key, value in secret_file_keys(data):
            p = os.path.normpath(os.path.join(os.path.dirname(target), value))
            if p not in targets:
                bad(f"compose.yaml: {key} = {value!r} reads {p}, but no secret is mounted there")
        env = tp.get("environment") or {}
        for n in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)):
            if n not in env:
                bad(f"compose.yaml: tokenproxy.toml uses ${{{n}}}, but the service sets no {n}")
    host, port = admin_port(text)
    if host not in ("0.0.0.0", "::"):
        bad(f"{host_cfg}: admin.listen must bind 0.0.0.0 for Prometheus in another container")
    grace = duration_seconds(str(tp.get("stop_grace_period", "10s")))
    if not grace > shutdown_grace(text):
        bad(f"compose.yaml: tokenproxy stop_grace_period {grace:g}s must exceed limits.shutdown_grace")
    app = services.get("app") or {}
    if app.get("network_mode") != "service:tokenproxy":
        bad("compose.yaml: app must share tokenproxy's network namespace (network_mode: service:tokenproxy)")
    # Prometheus: config mounted, scrapes tokenproxy's admin port, rule files mounted where it looks.
    prom = services.get("prometheus") or {}
    mounts = {}
    for v in prom.get("volumes") or []:
        src, _, rest = v.partition(":")
        if src.startswith((".", "/")):
            mounts[rest.split(":")[0]] = cdir / src
    for tgt, src in mounts.items():
        if not src.exists():
            bad(f"compose.yaml: prometheus mounts {src}, which does not exist")
    pcfg = mounts.get("/etc/prometheus/prometheus.yml")
    if not pcfg:
        bad("compose.yaml: prometheus does not mount prometheus.yml")
    else:
        p = load_docs(pcfg)[0]
        targets = [t for sc in p.get("scrape_configs") or [] for s in sc.get("static_configs") or [] for t in s.get("targets") or []]
        if f"tokenproxy:{port}" not in targets:
            bad(f"{pcfg}: does not scrape tokenproxy:{port} (admin.listen)")
        import fnmatch
        rule_globs = p.get("rule_files") or []
        if not any(fnmatch.fnmatch(t, g) for g in rule_globs for t in mounts):
            bad(f"{pcfg}: rule_files {rule_globs} match none of the files compose mounts")
    for name, s in services.items():
        for v in s.get("volumes") or []:
            if isinstance(v, str) and v.startswith(".") and not (cdir / v.split(":")[0]).exists():
                bad(f"compose.yaml: {name} mounts {v.split(':')[0]}, which does not exist")
    done()


if __name__ == "__main__":
    cmd, *argv = sys.argv[1:]
    try:
        globals()["cmd_" + cmd.replace("-", "_")](*argv)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        # JSONDecodeError is a ValueError. One readable line instead of a traceback.
        print(f"ERROR {type(e).__name__}: {e}")
        sys.exit(1)
