#!/usr/bin/env bash
# Install opus-tools (opusdec, opusinfo) from the distribution: the recording tests decode the
# Ogg Opus files fastsfu writes with an independent decoder (docs/recording.md). Idempotent. In CI
# (CI=true) a failure is fatal; elsewhere, without root, it says what to install and the tests skip.
set -euo pipefail

PKGS=(opus-tools)

if ! command -v opusdec >/dev/null; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        msg="recording_setup: opusdec is missing; install it (Debian: apt-get install ${PKGS[*]})"
        if [ "${CI:-}" = "true" ]; then
            echo "$msg" >&2
            exit 1
        fi
        echo "$msg; the recording decode tests will be skipped"
        exit 0
    fi
    echo "recording_setup: installing ${PKGS[*]} (apt-get)"
    # Update the package lists only if the packages are unknown or the install fails (stale lists).
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
    command -v opusdec >/dev/null || { echo "recording_setup: opus-tools installed but no opusdec" >&2; exit 1; }
fi
echo "recording_setup: $(opusdec --version 2>&1 | head -1)"
