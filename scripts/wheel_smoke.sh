#!/usr/bin/env bash
# Install fastsfu as a user would, outside this checkout: scripts/build_wheel.sh (`python -m build`:
# an sdist, then the wheel from that sdist; auditwheel repair to a manylinux tag), deploy/install.sh
# (a fresh venv in a temporary directory, pip install of the repaired wheel), the test clients
# from PyPI, then scripts/wheel_smoke.py run from that directory: serve, two aiortc members over
# gRPC, /metrics, /demo; and mypy --strict on an embedder's typed code against the installed wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)

work=$(mktemp -d "${TMPDIR:-/tmp}/fastsfu-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# The same build as deploy/Dockerfile's: python -m build, then auditwheel repair.
scripts/build_wheel.sh "$work" | tee "$work/build_wheel.out"
repaired=$(tail -1 "$work/build_wheel.out")
echo "wheel_smoke: built and repaired $(basename "$repaired") ($((SECONDS - start)) s)"

# The bundle is shipped when scripts/web_build.sh made it before the build (the sdist carries it).
expect_demo=no
[ -f src/fastsfu/server/static/demo.js ] && expect_demo=yes

# Installed as an operator installs it (deploy/install.sh), then the test clients from PyPI.
env -u PYTHONPATH PYTHON="$PYTHON" deploy/install.sh "$repaired" "$work/venv"
"$work/venv/bin/pip" install "${PIP_FLAGS[@]}" "aiortc==1.16.*" "mypy>=1.10"
echo "wheel_smoke: installed into $work/venv ($((SECONDS - start)) s)"
(cd "$work" && env -u PYTHONPATH "$work/venv/bin/python" "$ROOT/scripts/wheel_smoke.py" \
    --tests "$ROOT/tests" --wheel "$repaired" --expect-demo "$expect_demo")
# An embedder's typed code checks clean under mypy --strict against the installed wheel (its
# py.typed, stubs and the generated protobuf modules), not this checkout.
cp tests/typing_check.py "$work/typing_check.py"
(cd "$work" && env -u PYTHONPATH -u MYPYPATH "$work/venv/bin/mypy" --strict --no-incremental \
    --python-executable "$work/venv/bin/python" typing_check.py)
echo "wheel_smoke: done in $((SECONDS - start)) s"
