"""Shared test helpers: producer parameters, client capabilities, an SRTP UDP client, an aiohttp
app served on a free loopback port, and `fastsfu serve` in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from fastsfu import ortc
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

OPUS_PT = 111
AUDIO_LEVEL_ID = 1
MID_ID = 4
CAPTURE_TIME_ID = 3

# A receiver's RtpCapabilities in the Harmony tests: Opus at the router's PT, no extensions.
OPUS_CAPS: dict[str, Any] = {
    "codecs": [
        {
            "mimeType": "audio/opus",
            "kind": "audio",
            "preferredPayloadType": 100,
            "clockRate": 48000,
            "channels": 2,
        }
    ],
    "headerExtensions": [],
}


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 at a free port (yielded) until the block ends."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


class ServeProcess:
    """A `fastsfu serve` subprocess and the lines it printed on stdout at start-up."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.stopped = False

    def address(self, prefix: str) -> str:
        """The last word of the start-up line that begins with `prefix` (a URL or host:port)."""
        for line in self.lines:
            if line.startswith(prefix):
                return line.split()[-1]
        raise AssertionError(f"no {prefix!r} in {self.lines}")

    @property
    def admin(self) -> str:
        """The recordings admin endpoint's URL (docs/recording.md)."""
        return self.address("fastsfu: recordings admin")

    @property
    def discord_endpoint(self) -> str:
        """host:port of the Discord voice gateway (announced as ws[s]://127.0.0.1:PORT/?v=8)."""
        return self.address("fastsfu: Discord voice gateway").split("://", 1)[1].split("/", 1)[0]

    @property
    def grpc_port(self) -> int:
        return int(self.address("fastsfu: gRPC").rsplit(":", 1)[1])

    async def stop(self) -> str:
        """SIGTERM; the exit code must be 0; the log (stderr)."""
        self.stopped = True
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            _, err = await loop.run_in_executor(None, lambda: self.proc.communicate(timeout=30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, err[-3000:]
        return err


@contextlib.asynccontextmanager
async def serve_process(config: Path, ready: str, *extra: str) -> AsyncIterator[ServeProcess]:
    """`fastsfu serve --config config [extra]`, yielded once it printed a line starting with `ready`
    (within 20 s); stopped at the end of the block unless the test stopped it (exit code 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsfu.server.cli", "serve", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ServeProcess(proc)
    loop = asyncio.get_running_loop()
    try:
        while not any(line.startswith(ready) for line in server.lines):
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 20)  # type: ignore[union-attr]
            if not line:
                raise AssertionError(f"fastsfu serve exited: {proc.stderr.read() if proc.stderr else ''}")
            server.lines.append(line.strip())
        yield server
    finally:
        if not server.stopped:
            await server.stop()


def producer_params(ssrc: int, pt: int = OPUS_PT, cname: str = "client") -> dict[str, Any]:
    """RtpParameters as mediasoup-client emits them for an Opus track."""
    return {
        "mid": "0",
        "codecs": [
            {
                "mimeType": "audio/opus",
                "payloadType": pt,
                "clockRate": 48000,
                "channels": 2,
                "parameters": {"minptime": 10, "useinbandfec": 1},
                "rtcpFeedback": [],
            }
        ],
        "headerExtensions": [
            {"uri": ortc.URI_AUDIO_LEVEL, "id": AUDIO_LEVEL_ID, "encrypt": False, "parameters": {}},
            {"uri": ortc.URI_MID, "id": MID_ID, "encrypt": False, "parameters": {}},
            {"uri": ortc.URI_ABS_CAPTURE_TIME, "id": CAPTURE_TIME_ID, "encrypt": False, "parameters": {}},
            {"uri": ortc.URI_TRANSPORT_CC, "id": 5, "encrypt": False, "parameters": {}},
        ],
        "encodings": [{"ssrc": ssrc, "dtx": False}],
        "rtcp": {"cname": cname, "reducedSize": True},
    }


def client_caps(
    opus_pt: int = 109, level_id: int = 12, mid_id: int = 9, capture_id: int = 14
) -> dict[str, Any]:
    """A receiver's RtpCapabilities with its own payload type and extension IDs."""
    return {
        "codecs": [
            {
                "kind": "audio",
                "mimeType": "audio/opus",
                "preferredPayloadType": opus_pt,
                "clockRate": 48000,
                "channels": 2,
                "parameters": {},
                "rtcpFeedback": [],
            }
        ],
        "headerExtensions": [
            {"kind": "audio", "uri": ortc.URI_AUDIO_LEVEL, "preferredId": level_id, "direction": "sendrecv"},
            {"kind": "audio", "uri": ortc.URI_MID, "preferredId": mid_id, "direction": "sendrecv"},
            {
                "kind": "audio",
                "uri": ortc.URI_ABS_CAPTURE_TIME,
                "preferredId": capture_id,
                "direction": "sendrecv",
            },
        ],
    }


class SrtpClient:
    """A UDP endpoint on loopback speaking SRTP with pre-shared keys, as an ingest tool would."""

    def __init__(self, suite: str = "AES_CM_128_HMAC_SHA1_80") -> None:
        self.suite = suite
        self.key = generate_key(suite)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.tx = SrtpContext(suite, self.key, inbound=False)
        self.rx: SrtpContext | None = None

    @property
    def srtp_parameters(self) -> dict[str, str]:
        return {"cryptoSuite": self.suite, "keyBase64": base64.b64encode(self.key).decode()}

    def set_server_parameters(self, params: dict[str, str]) -> None:
        key = base64.b64decode(params["keyBase64"])
        self.rx = SrtpContext(params["cryptoSuite"], key, inbound=True)

    def send_rtp(self, server: tuple[str, int], pkt: RtpPacket) -> None:
        self.sock.sendto(self.tx.protect(bytes(pkt)), server)

    def send_raw(self, server: tuple[str, int], data: bytes) -> None:
        self.sock.sendto(data, server)

    async def receive(self, count: int, timeout: float = 2.0) -> list[bytes]:
        """Up to `count` datagrams, waiting at most `timeout` seconds in all."""
        loop = asyncio.get_running_loop()
        out: list[bytes] = []
        deadline = loop.time() + timeout
        while len(out) < count and loop.time() < deadline:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                await asyncio.sleep(0.002)
        return out

    async def receive_rtp(self, count: int, timeout: float = 2.0) -> list[bytes]:
        """Like receive(), skipping RTCP (RFC 5761 §4: PT 192-223), which the server's report
        timers may send at any moment."""
        loop = asyncio.get_running_loop()
        out: list[bytes] = []
        deadline = loop.time() + timeout
        while len(out) < count and loop.time() < deadline:
            for d in await self.receive(count - len(out), max(deadline - loop.time(), 0)):
                if not (len(d) > 1 and 192 <= d[1] <= 223):
                    out.append(d)
        return out

    def close(self) -> None:
        self.sock.close()
