"""Headless Chromium for the browser tests (docs/testing.md): launch flags, a tone file for the
fake microphone, and the loopback-only namespace guard. scripts/test.sh runs these tests under
`unshare -n`; outside such a namespace they skip (developer machine) or fail (CI=true)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import struct
import wave
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# docs/testing.md#chromium. --allow-loopback-in-peer-connection is required in a lo-only namespace.
CHROMIUM_ARGS = [
    "--allow-loopback-in-peer-connection",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def write_tone(path: Path, seconds: int = 2, hz: float = 440.0, rate: int = 48000) -> Path:
    """A tone for --use-file-for-fake-audio-capture (Chromium loops it), so a receiving page can
    show real audio energy rather than the fake device's near-silence."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(seconds * rate)
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def require_loopback_namespace() -> None:
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        unavailable(f"not in a loopback-only network namespace (interfaces: {names}); run scripts/test.sh")


def find_chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("chromium is not installed; run scripts/browser_setup.sh")
    raise AssertionError("unreachable")


def require_bundle(bundle: Path) -> Path:
    if not bundle.is_file():
        unavailable(f"{bundle} is missing; run scripts/web_build.sh")
    return bundle


def chromium_args(tmp_path: Path) -> list[str]:
    return [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={write_tone(tmp_path / 'tone.wav')}"]
