#!/usr/bin/env bash
# The whole test suite: lint and types, the datapath micro-benchmarks, the short loopback load
# benchmark (fastsfu against the bare C forwarder and a pion/srtp Go forwarder, same run), the
# short soak (join/leave churn), headless Chromium against fastsfu in a loopback-only network
# namespace, the wheel installed and run outside the checkout, then every other test (last, so its
# summary closes the output).
# Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/discord_clients_setup.sh  # @discordjs/voice for the Discord gateway interop tests
scripts/recording_setup.sh  # opusdec: the recording tests decode what fastsfu wrote
PY=.venv/bin/python
export PYTHONDONTWRITEBYTECODE=1

echo "== lint (ruff, mypy --strict, tsc --strict on web/)"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy src/fastsfu
(cd web && node_modules/.bin/tsc -p .)

echo "== API reference (pdoc, warnings are errors) into build/api"
scripts/docs_build.sh

echo "== micro-benchmarks (pytest-benchmark): datapath, STUN answers, DTLS handshakes"
$PY -m pytest benchmarks/bench_datapath.py benchmarks/bench_stun.py benchmarks/bench_dtls.py -q -p no:cacheprovider -s \
    --benchmark-columns=median,min,max,rounds --benchmark-sort=name

echo "== event-loop time of one join (Harmony and Discord, rooms of 10 and 50)"
$PY benchmarks/join_loop_time.py --members 10 50 --repeat 2

echo "== loopback load benchmark, short (fastsfu vs bare C forwarder vs pion/srtp Go forwarder, both SRTP suites, plus a round with a 30 % CPU hog on the SUT core; Discord UDP vs SRTP GCM)"
scripts/pion_setup.sh  # Go and pion/srtp from Debian packages for the pion peer
$PY benchmarks/run.py --quick --suite both --suite discord --hog 0.3 --json benchmarks/.build/last-run.json

echo "== soak, short (join/leave churn over hRPC, gRPC, Discord beside a talking reference call: gauges, fds, loss)"
$PY benchmarks/soak.py --quick --quiet --json benchmarks/.build/last-soak.json

echo "== headless Chromium and Firefox ESR: mediasoup-client interop, the /demo page over hRPC, Discord webrtc leaves, in a loopback-only network namespace"
# No network inside the namespace (docs/testing.md#network-namespace): browser_setup.sh installs
# Chromium first (the bundles were built by bootstrap.sh) and Firefox ESR. Needs root for apt-get
# and unshare (CI runs as root); elsewhere it skips.
if scripts/browser_setup.sh && unshare -n true 2>/dev/null; then
    unshare -n -- sh -c 'ip link set lo up && ip route add default dev lo src 127.0.0.1 2>/dev/null;
        exec .venv/bin/python -m pytest tests -m browser -q -p no:cacheprovider'
elif [ "${CI:-}" = "true" ]; then
    echo "browser interop: setup failed or no network namespace (unshare -n needs root)" >&2
    exit 1
else
    echo "browser interop skipped: setup failed or no network namespace (unshare -n needs root)"
fi

echo "== wheel: python -m build, auditwheel repair, install in a fresh venv outside the checkout, smoke test"
scripts/wheel_smoke.sh

echo "== tests"
$PY -m pytest tests -m "not browser" -q -p no:cacheprovider --durations=25  # CI's log lists the 25 slowest tests
