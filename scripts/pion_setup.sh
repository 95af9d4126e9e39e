#!/usr/bin/env bash
# Install Go and pion (srtp v2, rtp) from the distribution for the load benchmark's pion peer
# (benchmarks/pion/, built in GOPATH mode: no module proxy is reachable). Idempotent. In CI
# (CI=true) a failure is fatal; elsewhere, without root, it says what to install and skips.
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

PKGS=(golang-go golang-github-pion-srtp.v2-dev golang-github-pion-rtp-dev)
GOPATH_DIR=/usr/share/gocode

have_all() {
    command -v go >/dev/null && [ -d "$GOPATH_DIR/src/github.com/pion/srtp/v2" ] &&
        [ -d "$GOPATH_DIR/src/github.com/pion/rtp" ]
}

if ! have_all; then
    apt_or_skip "pion_setup: Go or pion is missing; install them (Debian: apt-get install ${PKGS[*]})" \
        "the benchmark's pion peer"
    apt_install pion_setup "${PKGS[@]}"
    have_all || { echo "pion_setup: packages installed but Go or pion still missing" >&2; exit 1; }
fi

echo "pion_setup: $(go version), pion/srtp $(dpkg-query -W -f='${Version}' golang-github-pion-srtp.v2-dev 2>/dev/null || echo '?')"
