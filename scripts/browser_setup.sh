#!/usr/bin/env bash
# Install Chromium from the distribution for the headless-Chromium tests (the bundles come from
# scripts/web_build.sh, run by bootstrap.sh). Idempotent; must run before entering the network
# namespace, which has no network. Never downloads a browser through playwright or puppeteer.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null && [ ! -x /usr/lib/chromium/chromium ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "browser_setup: chromium is missing; install it (Debian: apt-get install chromium)" >&2
        exit 1
    fi
    echo "browser_setup: installing chromium (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "browser_setup: chromium $(command -v chromium || echo /usr/lib/chromium/chromium)"
