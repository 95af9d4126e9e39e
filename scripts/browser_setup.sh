#!/usr/bin/env bash
# Install Chromium, Firefox ESR and nftables from the distribution for the browser tests (the bundles come
# from scripts/web_build.sh, run by bootstrap.sh). Idempotent; must run before entering the network
# namespace, which has no network. Never downloads a browser through playwright or puppeteer.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

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
    # Always a failure (never a skip): scripts/test.sh then skips the browser tests outside CI.
    if ! apt_can_install; then
        echo "browser_setup: ${missing[*]} missing; install (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    apt_install browser_setup "${missing[@]}"
fi

echo "browser_setup: chromium $(command -v chromium || echo /usr/lib/chromium/chromium)"
echo "browser_setup: firefox-esr $(command -v firefox-esr)"
echo "browser_setup: nft $(command -v nft)"
