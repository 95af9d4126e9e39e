"""The README's embedding example runs as written, and `fastsfu serve` forwards and reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_runs() -> None:
    text = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, re.S)
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.splitlines()
    assert lines[0].startswith("AEAD_AES_128_GCM ") and "bytes for ssrc" in lines[0]
    assert lines[1] == "1 packet(s) forwarded"
    assert lines[2] == "alice left"


def test_serve_runs_the_demo_room_and_prints_stats() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastsfu.server.cli",
            "serve",
            "--duration",
            "2.5",
            "--stats-interval",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(stats) >= 2
    last = stats[-1]
    # 3 speakers x 2 listeners each x 50 pps for ~2.5 s
    assert 500 <= last["forwarded_packets"] <= 800
    assert last["drops"] == {}
    assert last["delivered_to_speakers"] >= last["forwarded_packets"] * 0.95


def test_serve_rejects_bad_arguments() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "serve", "--speakers", "1000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--speakers" in out.stderr
