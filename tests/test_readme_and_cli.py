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


def test_serve_demo_runs_the_demo_room_and_prints_stats() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastsfu.server.cli",
            "serve",
            "--demo",
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


SECRET = "cli-test-secret-0123456789abcdefghijklmnop"


def test_serve_runs_the_harmony_server_over_grpc_and_hrpc_and_stops_on_sigterm() -> None:
    import asyncio
    import signal

    import aiohttp
    import grpc

    from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc

    Req = voice_pb2.StreamMessageRequest
    token = subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "token", "--user", "42", "--secret", SECRET],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastsfu.server.cli",
            "serve",
            "--hrpc-port",
            "0",
            "--grpc-port",
            "0",
            "--token-secret",
            SECRET,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline().strip() for _ in range(4)]  # type: ignore[union-attr]
        hrpc_url = lines[0].split()[-1]
        grpc_addr = lines[1].split()[-1]
        assert hrpc_url.startswith("ws://127.0.0.1:") and lines[2].startswith("fastsfu: media udp 127.0.0.1:")

        async def clients() -> None:
            async with grpc.aio.insecure_channel(grpc_addr) as channel:
                call = voice_pb2_grpc.VoiceServiceStub(channel).StreamMessage(
                    metadata=(("authorization", token),)
                )
                await call.write(Req(initialize=Req.Initialize(guild_id=1, channel_id=1)))
                assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("message") == "initialized"
                call.cancel()
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(hrpc_url, protocols=("hrpc1", token))
                await ws.send_bytes(
                    Req(initialize=Req.Initialize(guild_id=1, channel_id=2)).SerializeToString()
                )
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.data[0] == 0
                assert (
                    voice_pb2.StreamMessageResponse.FromString(msg.data[1:]).WhichOneof("message")
                    == "initialized"
                )
                await ws.close()
                # The demo page and its bundle (built by scripts/web_build.sh) are served.
                demo_url = lines[3].split()[-1]
                assert demo_url == hrpc_url.replace("ws://", "http://").split("/protocol.")[0] + "/demo/"
                async with http.get(demo_url) as page:
                    assert page.status == 200 and '<script src="/demo/demo.js">' in await page.text()
                async with http.get(demo_url + "demo.js") as bundle:
                    assert bundle.status == 200 and "protocol.voice.v1.VoiceService" in await bundle.text()

        asyncio.run(asyncio.wait_for(clients(), 30))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
