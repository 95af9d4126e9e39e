#!/usr/bin/env bash
# Install Chromium, Firefox ESR and nftables from the distribution for the browser tests (the bundles come
# from scripts/web_build.sh, run by bootstrap.sh). Idempotent; must run before entering the network
# namespace, which has no network. Never downloads a browser through playwright or puppeteer.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v chromium >/dev/null && [ ! -x /usr/lib/chromium/chromium ]; then
    missing+=(chromium)
fi
if ! command -v firefox-esr >/dev/null; then
    missing+=(firefox-esr)
fi
if ! command -v nft >/dev/null; then
    missing+=(nftables)  # the ICE-TCP browser test drops UDP in a namespace (tests/test_ice_tcp_chromium.py)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "browser_setup: ${missing[*]} missing; install (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "browser_setup: installing ${missing[*]} (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "browser_setup: chromium $(command -v chromium || echo /usr/lib/chromium/chromium)"
echo "browser_setup: firefox-esr $(command -v firefox-esr)"
echo "browser_setup: nft $(command -v nft)"
