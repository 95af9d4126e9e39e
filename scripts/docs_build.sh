#!/usr/bin/env bash
# API reference from the docstrings (pdoc) into build/api. Any warning pdoc prints (an annotation
# it cannot resolve, a module it cannot import, ...) fails the build, as does an import error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-build/api}
# Every module of the package except the generated protobuf code. pdoc follows a package's
# submodules by itself unless the package defines __all__, so only those are named one by one.
MODULES=(fastsfu)
while read -r f; do
    mod=${f%.py}; mod=${mod%/__init__}; mod=${mod//\//.}
    parent=$(dirname "$f"); [ "${f##*/}" = __init__.py ] && parent=$(dirname "$parent")
    if grep -q '^__all__' "src/$parent/__init__.py"; then MODULES+=("$mod"); fi
done < <(cd src && find fastsfu -mindepth 1 -name '*.py' -not -path '*/_proto/*' -not -path 'fastsfu/__init__.py' | sort)
# fastsfu._rtp is the compiled datapath: docstrings embedded by Cython, signatures from _rtp.pyi.
MODULES+=(fastsfu._rtp)
rm -rf "$OUT"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W error::DeprecationWarning:fastsfu -m pdoc \
    --docformat markdown -o "$OUT" "${MODULES[@]}" >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
if grep -qiE 'warn|error|traceback' "$LOG"; then
    cat "$LOG" >&2
    echo "docs_build: pdoc reported problems (above)" >&2
    exit 1
fi
echo "API reference: $OUT/index.html (${#MODULES[@]} modules)"
