# Sourced by the benchmark scripts (from the repository's root):
#   need COMMAND[:PACKAGE] ...
# installs from Debian every package whose command is missing (the package is named like
# the command unless given after a colon), with sudo when not root.
need() {
    local missing=() spec sudo=""
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    ((${#missing[@]})) || return 0
    echo "installing from Debian: ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
