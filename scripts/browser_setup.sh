#!/usr/bin/env bash
# Prepare the headless-Chromium interop test (tests/test_interop_chromium.py): Chromium from the
# distribution, the pinned npm packages of tests/browser (npm ci), and the esbuild bundle
# tests/browser/static/harness.js. Idempotent; must run before entering the network namespace,
# which has no network. Never downloads a browser through playwright or puppeteer.
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

if ! command -v npm >/dev/null; then
    echo "browser_setup: npm (Node >= 18) is needed to build tests/browser/static/harness.js" >&2
    exit 1
fi
cd tests/browser
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ] || [ package.json -nt node_modules ]; then
    echo "browser_setup: npm ci in tests/browser"
    npm ci --no-audit --no-fund --loglevel=error
    touch node_modules
fi
if [ ! -f static/harness.js ] || [ -n "$(find entry.js node_modules -maxdepth 0 -newer static/harness.js -print -quit)" ]; then
    node_modules/.bin/esbuild entry.js --bundle --format=iife --platform=browser --target=chrome110 \
        --outfile=static/harness.js --log-level=warning
fi
echo "browser_setup: chromium $(command -v chromium || echo /usr/lib/chromium/chromium), bundle $(wc -c <static/harness.js) bytes"
