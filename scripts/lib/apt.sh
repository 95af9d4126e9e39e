# shellcheck shell=bash
# Debian packages for the *_setup.sh scripts: whether this process may install them (root with
# apt-get), what to do when it may not, and the install itself (non-interactive: CI has no stdin).
# Sourced, not run; the caller runs under `set -euo pipefail`.

# True when packages can be installed here: root, and apt-get on the PATH.
apt_can_install() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null
}

# apt_or_skip MESSAGE SKIPPED: return when packages can be installed here; otherwise print MESSAGE
# and stop the script: a failure in CI (CI=true), else a note that SKIPPED will be skipped.
apt_or_skip() {
    apt_can_install && return 0
    if [ "${CI:-}" = "true" ]; then
        echo "$1" >&2
        exit 1
    fi
    echo "$1; $2 will be skipped"
    exit 0
}

# apt_install WHO PACKAGE...: install the packages, saying so as WHO. The package lists are
# updated once: first if the packages are not known yet, else only if the install fails (stale
# lists point at versions the mirror no longer has).
apt_install() {
    local who=$1 updated=0
    shift
    echo "$who: installing $* (apt-get)"
    if ! apt-cache show "$@" >/dev/null 2>&1; then
        apt-get update -qq
        updated=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; then
        [ "$updated" = 1 ] && exit 1
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    fi
}
