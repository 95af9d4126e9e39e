#!/usr/bin/env bash
# The whole test suite: lint and types, the datapath micro-benchmarks, the short loopback load
# benchmark (fastsfu against the bare C forwarder, same run), then every test (last, so its
# summary closes the output). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PY=.venv/bin/python
export PYTHONDONTWRITEBYTECODE=1

echo "== lint (ruff, mypy --strict)"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy src/fastsfu

echo "== micro-benchmarks (pytest-benchmark): datapath, STUN answers, DTLS handshakes"
$PY -m pytest benchmarks/bench_datapath.py benchmarks/bench_stun.py benchmarks/bench_dtls.py -q -p no:cacheprovider -s \
    --benchmark-columns=median,min,max,rounds --benchmark-sort=name

echo "== loopback load benchmark, short (fastsfu vs bare C forwarder, both SRTP suites)"
$PY benchmarks/run.py --quick --suite both --json benchmarks/.build/last-run.json

echo "== tests"
$PY -m pytest tests -q -p no:cacheprovider
