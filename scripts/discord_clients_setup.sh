#!/usr/bin/env bash
# Install the pinned @discordjs/voice client of tests/discord/ (npm ci from its package-lock.json)
# for the Discord-gateway interop tests (tests/discord_clients.py; docs/testing.md#other-real-peers).
# discord.py 2.7.1 comes with the `test` extra of pyproject.toml instead.
# Idempotent: runs npm ci only when node_modules is missing or older than package(-lock).json.
set -euo pipefail
cd "$(dirname "$0")/../tests/discord"

if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "discord_clients_setup: node and npm are needed for the @discordjs/voice interop client" >&2
    exit 1
fi
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ] || [ package.json -nt node_modules ]; then
    echo "discord_clients_setup: npm ci in tests/discord/"
    # @discordjs/voice 0.19.2 declares node >= 22.12 but works on Node 20: no engine-strict
    npm ci --no-audit --no-fund --loglevel=error --engine-strict=false
    touch node_modules
fi
# The XChaCha provider djs loads at run time, and davey's prebuilt native module for this platform.
node --input-type=module -e "
import '@noble/ciphers/chacha.js';
import '@snazzah/davey';
const { generateDependencyReport } = await import('@discordjs/voice');
if (!generateDependencyReport().includes('@noble/ciphers: 2.4.0')) throw new Error('@noble/ciphers not found by @discordjs/voice');
" || { echo "discord_clients_setup: tests/discord/node_modules is incomplete; delete it and re-run" >&2; exit 1; }
echo "discord_clients_setup: @discordjs/voice $(node -p "require('./node_modules/@discordjs/voice/package.json').version") ready"
