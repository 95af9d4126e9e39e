#!/usr/bin/env bash
# Install opus-tools (opusdec, opusinfo) from the distribution: the recording tests decode the
# Ogg Opus files fastsfu writes with an independent decoder (docs/recording.md). Idempotent. In CI
# (CI=true) a failure is fatal; elsewhere, without root, it says what to install and the tests skip.
set -euo pipefail
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

PKGS=(opus-tools)

if ! command -v opusdec >/dev/null; then
    apt_or_skip "recording_setup: opusdec is missing; install it (Debian: apt-get install ${PKGS[*]})" \
        "the recording decode tests"
    apt_install recording_setup "${PKGS[@]}"
    command -v opusdec >/dev/null || { echo "recording_setup: opus-tools installed but no opusdec" >&2; exit 1; }
fi
echo "recording_setup: $(opusdec --version 2>&1 | head -1)"
