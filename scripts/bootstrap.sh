#!/usr/bin/env bash
# Create .venv and install fastsfu (building the Cython datapath) with its test tools, then build
# the browser bundles (scripts/web_build.sh).
# Idempotent: re-running only rebuilds when sources changed. Used by `make serve` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: fastsfu needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))" >&2
    exit 1
fi
if ! command -v cc >/dev/null; then
    echo "bootstrap: a C compiler (cc) is needed for the datapath and the benchmark harness" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.fastsfu-installed"
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py src -newer "$stamp" \( -name '*.pyx' -o -name '*.pxd' -o -name 'pyproject.toml' -o -name 'setup.py' \) -print -quit)" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi

# The /demo page's bundle and the browser-test bundle, from the pinned npm packages of web/.
if ! scripts/web_build.sh; then
    if [ "${CI:-}" = "true" ]; then
        exit 1
    fi
    echo "bootstrap: the /demo page will be unavailable until scripts/web_build.sh succeeds" >&2
fi
