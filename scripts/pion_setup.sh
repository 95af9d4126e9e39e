#!/usr/bin/env bash
# Install Go and pion (srtp v2, rtp) from the distribution for the load benchmark's pion peer
# (benchmarks/pion/, built in GOPATH mode: no module proxy is reachable). Idempotent. In CI
# (CI=true) a failure is fatal; elsewhere, without root, it says what to install and skips.
set -euo pipefail

PKGS=(golang-go golang-github-pion-srtp.v2-dev golang-github-pion-rtp-dev)
GOPATH_DIR=/usr/share/gocode

have_all() {
    command -v go >/dev/null && [ -d "$GOPATH_DIR/src/github.com/pion/srtp/v2" ] &&
        [ -d "$GOPATH_DIR/src/github.com/pion/rtp" ]
}

if ! have_all; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        msg="pion_setup: Go or pion is missing; install them (Debian: apt-get install ${PKGS[*]})"
        if [ "${CI:-}" = "true" ]; then
            echo "$msg" >&2
            exit 1
        fi
        echo "$msg; the benchmark's pion peer will be skipped"
        exit 0
    fi
    echo "pion_setup: installing ${PKGS[*]} (apt-get)"
    # Update the package lists once: first if the packages are not known yet, else only if the
    # install fails (stale lists point at versions the mirror no longer has).
    updated=0
    if ! apt-cache show "${PKGS[@]}" >/dev/null 2>&1; then
        apt-get update -qq
        updated=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PKGS[@]}" >/dev/null; then
        [ "$updated" = 1 ] && exit 1
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PKGS[@]}" >/dev/null
    fi
    have_all || { echo "pion_setup: packages installed but Go or pion still missing" >&2; exit 1; }
fi

echo "pion_setup: $(go version), pion/srtp $(dpkg-query -W -f='${Version}' golang-github-pion-srtp.v2-dev 2>/dev/null || echo '?')"
