"""Leaving a Discord voice session with the real clients (issue 14): discord.py's disconnect() and
@discordjs/voice's destroy() close the voice WebSocket with 1000, and the others get op 13 within a
second; a socket that drops without a close frame still RESUMEs and no frame is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from discord_clients import (
    djs_available,
    dpy_available,
    make_test_certificate,
    opus_tone_frames,
    start_djs_client,
    start_dpy_bot,
    voice_ids,
)
from discord_helpers import Observer
from helpers import serve_app

from fastsfu import Engine, Settings
from fastsfu.discord.gateway import Gateway
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import make_gateway_app
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(90)]

AUTH = TokenAuth("discord-leave-test-secret-0123456789abcdef")
GUILD, CHANNEL = 41, 42
DPY_USER, DJS_USER, OBSERVER = 1001, 1002, 1003


def ids(user: int) -> dict[str, Any]:
    return voice_ids(GUILD, CHANNEL, user, AUTH.mint(user))


@contextlib.asynccontextmanager
async def gateway_over_wss(
    tmp_path: Path, settings: Settings | None = None
) -> AsyncIterator[tuple[Gateway, int, Path, ssl.SSLContext]]:
    """An Engine and the voice gateway over wss (default resume_grace: 60 s); yields the gateway,
    its port, the CA file for the clients and an ssl context for the observer."""
    if not dpy_available() or not djs_available():
        pytest.fail(
            "discord.py 2.7.1 or tests/discord/node_modules missing (scripts/discord_clients_setup.sh)"
        )
    cert, key = make_test_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with Engine(settings or Settings(listen_ip="127.0.0.1")) as engine:
        gateway = Gateway(DiscordVoice(VoiceRooms(engine), AUTH.authenticate))
        async with serve_app(make_gateway_app(gateway), server_tls) as port:
            try:
                yield gateway, port, cert, ssl.create_default_context(cafile=str(cert))
            finally:
                gateway.shutdown()


async def observe(http: aiohttp.ClientSession, port: int, client_tls: ssl.SSLContext) -> Observer:
    return await Observer.join(
        http,
        f"wss://127.0.0.1:{port}/?v=8",
        server_id=str(GUILD),
        user_id=OBSERVER,
        token=AUTH.mint(OBSERVER),
        ssl=client_tls,
    )


def test_discord_py_disconnect_and_discordjs_destroy_reach_the_others_within_a_second(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            gateway_over_wss(tmp_path) as (gateway, port, cert, client_tls),
            aiohttp.ClientSession() as http,
        ):
            observer = await observe(http, port, client_tls)
            endpoint = f"127.0.0.1:{port}"
            djs = await start_djs_client(endpoint, **ids(DJS_USER), duration=4.0, cafile=cert)
            bot = await start_dpy_bot(endpoint, **ids(DPY_USER), cafile=cert, hold=1.0)
            try:
                await observer.wait_op(11, DPY_USER, 15)
                await observer.wait_op(11, DJS_USER, 15)
                dpy = await bot.result()  # disconnect() after `hold`
                dpy_gone = await observer.wait_op(13, DPY_USER, 5)
                djs_result = await djs.result()  # destroy() after `duration`
                djs_gone = await observer.wait_op(13, DJS_USER, 5)
            finally:
                await bot.aclose()
                await djs.aclose()
                await observer.close()
            assert dpy.ok and dpy.disconnected, (dpy.error, dpy.stderr[-2000:])
            assert djs_result.ready, djs_result.errors
            latencies = {
                "discord.py disconnect()": dpy_gone - dpy.events[-1]["mono"],
                "@discordjs/voice destroy()": djs_gone
                - next(e for e in djs_result.events if e["event"] == "leaving")["mono"],
            }
            print(
                "leave -> op 13 at the other member:",
                json.dumps({k: f"{v * 1000:.1f} ms" for k, v in latencies.items()}),
            )
            assert [e["event"] for e in dpy.events][-1] == "leaving"
            assert all(0 <= v < 1.0 for v in latencies.values()), latencies
            assert not gateway.sessions or list(gateway.sessions) == [(str(OBSERVER), f"obs-{OBSERVER}")]

    asyncio.run(asyncio.wait_for(main(), 80))


def about(message: dict[str, Any]) -> list[str]:
    """The user ids a gateway message names (op 11's user_ids, or user_id)."""
    d = message.get("d")
    if not isinstance(d, dict):
        return []
    return [*d.get("user_ids", ()), *([d["user_id"]] if "user_id" in d else [])]


class TcpRelay:
    """A TCP relay in front of the gateway whose connections can be cut without a close frame
    (both sides reset), as a dead network path would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.pairs.append((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> int:
        """Reset every open connection (no WebSocket close frame either way)."""
        cut = 0
        for client, upstream in self.pairs:
            if not client.transport.is_closing():
                client.transport.abort()
                upstream.transport.abort()
                cut += 1
        return cut


def test_discordjs_resumes_after_a_dropped_socket_and_gets_every_frame(tmp_path: Path) -> None:
    """The TCP connection dies without a close frame: the session waits for RESUME, djs resumes
    through a new socket, and receives all 200 frames discord.py sends meanwhile."""
    frames = opus_tone_frames(200, 440.0)
    # The server shares this process's event loop with the relay, the observer and the two client
    # pipes; on a loaded machine a stall past the datapath's 20 ms queue-age limit would drop
    # frames (counted as queue_age), which is not what this test is about.
    settings = Settings(listen_ip="127.0.0.1", max_queue_age_ms=500.0)

    async def main() -> None:
        async with (
            gateway_over_wss(tmp_path, settings) as (gateway, port, cert, client_tls),
            aiohttp.ClientSession() as http,
        ):
            relay = TcpRelay(port)
            server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
            relay_port = server.sockets[0].getsockname()[1]
            observer = await observe(http, port, client_tls)
            djs = await start_djs_client(
                f"127.0.0.1:{relay_port}",
                **ids(DJS_USER),
                receive_from=[DPY_USER],
                expect_frames={DPY_USER: len(frames)},
                expect_resume=True,
                duration=20,
                cafile=cert,
            )
            bot = None
            try:
                await djs.wait_event("ready", 15)
                bot = await start_dpy_bot(
                    f"127.0.0.1:{port}", **ids(DPY_USER), frames=frames, cafile=cert, hold=1.0
                )
                await bot.wait_event("connected", 15)
                await asyncio.sleep(1.5)  # about 70 frames in
                assert relay.cut() == 1
                await djs.wait_event("resumed", 10)
                result = await djs.result()
                djs_gone = await observer.wait_op(13, DJS_USER, 3)  # at its destroy()
                dpy = await bot.result()
            finally:
                if bot is not None:
                    await bot.aclose()
                await djs.aclose()
                await observer.close()
                server.close()
            drops = {k: v for k, v in gateway.handler.rooms.engine.stats()["drops"].items() if v}  # type: ignore[attr-defined]
            print("server drops:", drops)
            print(
                "djs after a dropped socket:",
                json.dumps(
                    {
                        "resumes": result.resumes,
                        "close": result.ws_close_codes,
                        "received": {k: len(v) for k, v in result.received.items()},
                    }
                ),
            )
            assert dpy.ok, (dpy.error, dpy.stderr[-2000:])
            assert result.resumes == 1, result.ws_close_codes
            got = result.received.get(DPY_USER, [])
            bad = next((i for i, (a, b) in enumerate(zip(got, frames, strict=False)) if a != b), None)
            context = result.received_rtp[bad - 2 : bad + 3] if bad is not None else []
            assert got == frames, (len(got), bad, got[bad] if bad is not None else None, context, drops)
            # Nobody was told djs left while it was away: one op 11 for it, op 13 only at its destroy().
            about_djs = [m["op"] for _, m in observer.received if str(DJS_USER) in about(m)]
            assert about_djs.count(11) == 1 and about_djs.count(13) == 1 and about_djs[-1] == 13, about_djs
            leaving = next(e for e in result.events if e["event"] == "leaving")["mono"]
            assert 0 <= djs_gone - leaving < 1.0

    asyncio.run(asyncio.wait_for(main(), 80))
