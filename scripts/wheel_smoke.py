"""Smoke test of an installed fastsfu wheel (run by scripts/wheel_smoke.sh from a fresh venv, cwd
outside the checkout): `fastsfu serve` starts, two aiortc clients join over gRPC and hear each
other, /metrics answers, and the /demo page works or says plainly that it was not built.

Only the test clients come from the checkout's tests/ (HarmonyMember, AiortcLeg); fastsfu itself
must be the installed one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import aiohttp

SECRET = "wheel-smoke-secret-0123456789abcdefghijklmn"
GUILD, CHANNEL = 7, 8


def check_wheel(wheel: Path, expect_demo: bool) -> None:
    """The wheel carries the compiled datapath and the generated protobuf modules, no C source."""
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if re.fullmatch(r"fastsfu/_rtp\..*\.so", n)], "no compiled fastsfu._rtp"
    for module in ("protocol/voice/v1/voice_pb2.py", "protocol/voice/v1/voice_pb2_grpc.py"):
        assert f"fastsfu/_proto/{module}" in names, f"fastsfu/_proto/{module} is missing"
    assert not [n for n in names if n.endswith((".c", ".pyx"))], "C or Cython source in the wheel"
    assert ("fastsfu/server/static/demo.js" in names) == expect_demo, "demo.js shipped or not as built"
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], "no LICENSE in the wheel"
    shipped = "shipped" if expect_demo else "not shipped (not built)"
    print(f"wheel_smoke: {wheel.name}: {len(names)} files, demo bundle {shipped}")


def banner(proc: subprocess.Popen[str], deadline: float) -> dict[str, str]:
    """Read `fastsfu serve`'s start-up lines until its metrics URL (the last one we need)."""
    lines: dict[str, str] = {}
    assert proc.stdout is not None
    while "metrics" not in lines:
        assert time.monotonic() < deadline, f"no start-up banner in time: {lines}"
        line = proc.stdout.readline()
        assert line, f"fastsfu serve exited early ({proc.poll()}): {lines}"
        print(f"  | {line.rstrip()}")
        for key in ("hRPC", "gRPC", "metrics", "demo page"):
            if line.startswith(f"fastsfu: {key} "):
                lines[key] = line.split()[-1]
        if line.startswith("fastsfu: the /demo page is not available: "):
            lines["not built"] = line
    return lines


async def clients(grpc_addr: str, tokens: list[str]) -> None:
    """Two members join one channel over gRPC; each hears the other's Opus frames."""
    from harmony_client import HarmonyMember

    port = int(grpc_addr.rsplit(":", 1)[1])
    members = [HarmonyMember(port, token, GUILD, CHANNEL) for token in tokens]
    try:
        for m in members:
            await m.join()
        for _ in range(200):
            if all(len(m.receivers) == 1 for m in members):
                break
            await asyncio.sleep(0.05)
        for m, other in zip(members, (2, 1), strict=True):
            assert list(m.receivers) == [other], m.receivers
            assert await m.heard(other) == 5
        print("wheel_smoke: two aiortc members over gRPC hear each other")
    finally:
        for m in members:
            await m.leave()


async def http_checks(lines: dict[str, str], expect_demo: bool) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(lines["metrics"]) as resp:
            text = await resp.text()
            assert resp.status == 200 and "fastsfu_" in text, (resp.status, text[:200])
        print(f"wheel_smoke: /metrics answers ({len(text)} bytes)")
        base = lines["hRPC"].replace("ws://", "http://").split("/protocol.")[0]
        async with http.get(base + "/demo/") as page:
            body = await page.text()
            if expect_demo:
                assert lines.get("demo page") == base + "/demo/", lines
                assert page.status == 200 and '<script src="/demo/demo.js">' in body
                async with http.get(base + "/demo/demo.js") as bundle:
                    js = await bundle.text()
                    assert bundle.status == 200 and "protocol.voice.v1.VoiceService" in js
                print("wheel_smoke: /demo/ and its bundle are served")
            else:
                assert "demo page" not in lines and "not built" in lines, lines
                assert page.status == 503 and "was not built" in body, (page.status, body)
                print("wheel_smoke: /demo/ says plainly that its bundle was not built (503)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tests", type=Path, required=True, help="the checkout's tests/ (test clients)")
    ap.add_argument("--wheel", type=Path, required=True, help="the wheel installed in this venv")
    ap.add_argument("--expect-demo", choices=("yes", "no"), required=True)
    args = ap.parse_args()
    expect_demo = args.expect_demo == "yes"

    import fastsfu

    venv = Path(sys.prefix).resolve()
    installed = Path(fastsfu.__file__).resolve()
    checkout = args.tests.resolve().parent
    assert installed.is_relative_to(venv) and not installed.is_relative_to(checkout), installed
    print(f"wheel_smoke: fastsfu {fastsfu.__version__} from {installed.parent}")
    check_wheel(args.wheel, expect_demo)
    sys.path.append(str(args.tests))  # after site-packages: fastsfu still resolves to the venv
    from aioice import ice as aioice_ice

    # aiortc's ICE on 127.0.0.1 only, as in the tests (conftest.aiortc_loopback).
    aioice_ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

    bin_dir = Path(sys.executable).parent
    fastsfu_cmd = str(bin_dir / "fastsfu")
    version = subprocess.run(
        [sys.executable, "-m", "fastsfu", "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert version.stdout.strip() == f"fastsfu {fastsfu.__version__}", version.stdout
    tokens = [
        subprocess.run(
            [fastsfu_cmd, "token", "--user", str(user), "--secret", SECRET],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        for user in (1, 2)
    ]
    ports = ["--hrpc-port", "0", "--grpc-port", "0", "--media-port", "0", "--discord-port", "0"]
    serve = [fastsfu_cmd, "serve", *ports]
    proc = subprocess.Popen(
        [*serve, "--token-secret", SECRET, "--duration", "120"], stdout=subprocess.PIPE, text=True
    )
    try:
        lines = banner(proc, time.monotonic() + 30)
        asyncio.run(asyncio.wait_for(clients(lines["gRPC"], tokens), 60))
        asyncio.run(asyncio.wait_for(http_checks(lines, expect_demo), 30))
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()  # type: ignore[union-attr]  # (communicate() would skip its buffer)
        assert proc.wait(20) == 0 and "shutting down" in out, (proc.returncode, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print("wheel_smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
