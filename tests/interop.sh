#!/usr/bin/env bash
# Interop suite: the real tokenproxy binary against real OAuth2 servers
# (django-oauth-toolkit and panva/oidc-provider, see ../shared/peers/README.md).
#
#   bash tests/interop.sh                 peers from $TOKENPROXY_PEERS, else ../shared/peers
#   INTEROP_OPTIONAL=1 bash tests/interop.sh   exit 0 with one "interop: skipped" line when the
#                                              peers are missing (.ci/run does this)
#   bash tests/interop.sh CASE_FILTER     passed to the test binary, e.g. "oidc_"
#
# The peers' start scripts install their own dependencies (pip into a venv, npm ci).
# oidc_fifty_subjects_...: 50 subjects connected through real connect links (oidc's login pages
# driven like a browser) on 3 replicas sharing Redis, then 20 s of load across all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

PEERS="${TOKENPROXY_PEERS:-$ROOT/../shared/peers}"
if [ ! -f "$PEERS/start-dot.sh" ] || [ ! -f "$PEERS/start-oidc.sh" ]; then
    if [ "${INTEROP_OPTIONAL:-0}" = 1 ]; then
        echo "interop: skipped, the OAuth2 peers are not in $PEERS; set TOKENPROXY_PEERS=DIR (the peers directory) to run it"
        exit 0
    fi
    echo "interop: the OAuth2 peers are not in $PEERS; set TOKENPROXY_PEERS=DIR (the peers directory), or INTEROP_OPTIONAL=1 to skip" >&2
    exit 1
fi
PEERS="$(cd "$PEERS" && pwd)"
export TOKENPROXY_PEERS="$PEERS"

# --- tools the peers need: python3 >= 3.10 with venv, node and npm
missing=()
py_ok() {
    command -v "${PYTHON:-python3}" >/dev/null 2>&1 &&
        "${PYTHON:-python3}" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}
py_ok || missing+=(python3 python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "interop: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "interop: missing ${missing[*]} (install them, or run as root to let this script apt-get them)" >&2
        exit 1
    fi
fi
py_ok || { echo "interop: ${PYTHON:-python3} must be >= 3.10 with the venv module" >&2; exit 1; }
for tool in curl flock; do
    command -v "$tool" >/dev/null 2>&1 || { echo "interop: $tool is needed by the peer scripts" >&2; exit 1; }
done
echo "interop: peers in $PEERS; $("${PYTHON:-python3}" --version), node $(node --version), npm $(npm --version)"

# --- run
OUT="$(mktemp "${TMPDIR:-/tmp}/tokenproxy-interop.XXXXXX.log")"
T0=$(date +%s)
set +e
cargo test --test interop -- --ignored --test-threads=1 --nocapture "$@" 2>&1 | tee "$OUT"
rc=${PIPESTATUS[0]}
set -e
T1=$(date +%s)

echo
echo "== interop figures (token requests counted in the peer's own log; limit = ceil(run/lifetime) + 2)"
printf 'INTEROP | %-16s | %8s | %8s | %-14s | %8s | %9s | %8s | %s\n' \
    case requests failures "token reqs/lim" "rt grant" "401 fixed" duration result
grep -a '^INTEROP |' "$OUT" || echo "(no case reported figures)"
echo "interop: cargo test exit $rc, $((T1 - T0)) s in all; full output in $OUT"
exit "$rc"
