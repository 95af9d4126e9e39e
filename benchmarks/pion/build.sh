#!/usr/bin/env bash
# Build the pion/srtp peer forwarder from Debian's Go packages (scripts/pion_setup.sh installs
# them): GOPATH mode, no module proxy. Usage: build.sh [OUTPUT] (default benchmarks/.build/pion-forwarder).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../.build/pion-forwarder}"
mkdir -p "$(dirname "$out")"
export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS=
export GOCACHE="${GOCACHE:-$(cd "$(dirname "$out")" && pwd)/gocache}"
cd "$here"
go build -o "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "$out"
