#!/usr/bin/env bash
# Build the browser bundles from the pinned npm packages of web/ (npm ci): the /demo page's
# src/fastsfu/server/static/demo.js and the test harness tests/browser/static/harness.js. The
# TypeScript protocol.voice.v1 client is generated from proto/ with protobuf-ts through the protoc
# inside grpcio-tools (.venv). Idempotent; rebuilds only when an input changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! command -v npm >/dev/null; then
    echo "web_build: npm (Node >= 18) is needed to build the /demo page and the browser test bundle" >&2
    exit 1
fi
cd web
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ] || [ package.json -nt node_modules ]; then
    echo "web_build: npm ci in web/"
    npm ci --no-audit --no-fund --loglevel=error
    touch node_modules
fi
newer() { [ ! -f "$1" ] || [ -n "$(find "${@:2}" -newer "$1" -print -quit)" ]; }
voice=gen/fastsfu/_proto/protocol/voice/v1/voice.client.ts
if newer "$voice" ../proto node_modules; then
    rm -rf gen && mkdir -p gen
    "../$PY" -m grpc_tools.protoc -I../proto --plugin=protoc-gen-ts=node_modules/.bin/protoc-gen-ts \
        --ts_out=gen --ts_opt=long_type_string \
        ../proto/fastsfu/_proto/harmonytypes/v1/types.proto ../proto/fastsfu/_proto/protocol/voice/v1/voice.proto
fi
build() {  # entry, output
    if newer "$2" "$1" src gen node_modules; then
        node_modules/.bin/esbuild "$1" --bundle --format=iife --platform=browser --target=chrome110 \
            --outfile="$2" --log-level=warning
    fi
}
build src/demo.ts ../src/fastsfu/server/static/demo.js
build src/harness.js ../tests/browser/static/harness.js
echo "web_build: demo.js $(wc -c <../src/fastsfu/server/static/demo.js) bytes, harness.js $(wc -c <../tests/browser/static/harness.js) bytes"
