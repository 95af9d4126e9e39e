"""protocol.voice.v1 over hRPC WebSocket (docs/harmony.md#hrpc): subprotocol, frame opcodes, the flow
with two members, and every error path, through a real aiohttp server and client on loopback."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from helpers import OPUS_CAPS, serve_app

from fastsfu import Engine
from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import StaticTokens
from fastsfu.harmony.hrpc_server import STREAM_PATH, make_app

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60)]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
TOKENS = StaticTokens({"tok-1": 1, "tok-2": 2})
CAPS = OPUS_CAPS


def serve(body: Callable[[str, aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with (
            Engine() as engine,
            serve_app(make_app(VoiceRooms(engine), TOKENS.authenticate)) as port,
            aiohttp.ClientSession() as http,
        ):
            await body(f"http://127.0.0.1:{port}", http)

    asyncio.run(asyncio.wait_for(main(), 45))


async def recv(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, Any]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    op, body = msg.data[0], msg.data[1:]
    return op, (Resp.FromString(body) if op == 0 else hrpc_pb2.Error.FromString(body))


async def join(ws: aiohttp.ClientWebSocketResponse) -> Resp:
    await ws.send_bytes(Req(initialize=Req.Initialize(guild_id=1, channel_id=2)).SerializeToString())
    assert (await recv(ws))[1].WhichOneof("message") == "initialized"
    await ws.send_bytes(
        Req(
            prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CAPS))
        ).SerializeToString()
    )
    assert (await recv(ws))[1].WhichOneof("message") == "prepared_for_join_channel"
    dtls = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
    params = {
        "codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}],
        "encodings": [{"ssrc": id(ws) & 0xFFFFFF}],
        "rtcp": {"cname": "c"},
    }
    await ws.send_bytes(
        Req(
            join_channel=Req.JoinChannel(
                rtp_paramaters=json.dumps(params),
                producer_dtls_paramaters=dtls,
                consumer_dtls_paramaters=dtls,
            )
        ).SerializeToString()
    )
    op, joined = await recv(ws)
    assert op == 0 and joined.WhichOneof("message") == "joined_channel"
    return joined


def test_flow_over_hrpc_with_two_members() -> None:
    async def body(base: str, http: aiohttp.ClientSession) -> None:
        a = await http.ws_connect(base + STREAM_PATH, protocols=("hrpc1", "tok-1"))
        assert a.protocol == "hrpc1"  # exactly hrpc1, never the token
        await join(a)
        b = await http.ws_connect(base + STREAM_PATH, headers={"Authorization": "tok-2"})
        assert b.protocol is None  # no subprotocol offered: none answered
        joined = await join(b)
        assert [u.user_id for u in joined.joined_channel.other_users] == [1]
        op, user_joined = await recv(a)
        assert op == 0 and user_joined.user_joined.data.user_id == 2
        await b.close()  # a leave, as `complete()` does in the browser transport
        op, left = await recv(a)
        assert op == 0 and left.user_left.user_id == 2
        await a.close()

    serve(body)


def test_each_join_and_leave_is_an_info_line_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastsfu.harmony.session")

    async def body(base: str, http: aiohttp.ClientSession) -> None:
        a = await http.ws_connect(base + STREAM_PATH, protocols=("hrpc1", "tok-1"))
        await join(a)
        b = await http.ws_connect(base + STREAM_PATH, protocols=("hrpc1", "tok-2"))
        await join(b)
        assert (await recv(a))[1].user_joined.data.user_id == 2
        await b.close()  # a leave
        assert (await recv(a))[1].user_left.user_id == 2
        await a.send_str("not binary")  # ends the stream with an error: the leave's reason
        assert (await recv(a))[1].identifier == "fastsfu.voice-bad-frame"
        await a.close()

    serve(body)
    lines = [r for r in caplog.records if r.name == "fastsfu.harmony.session" and r.levelno == logging.INFO]
    room = {"guild_id": 1, "channel_id": 2, "protocol": "harmony", "frontend": "hrpc", "remote": "127.0.0.1"}
    assert [(r.getMessage().split(":")[0], vars(r)["user_id"], vars(r).get("reason")) for r in lines] == [
        ("voice join", 1, None),
        ("voice join", 2, None),
        ("voice leave", 2, "left"),
        ("voice leave", 1, "fastsfu.voice-bad-frame"),
    ]
    assert all(room.items() <= vars(r).items() for r in lines)
    assert lines[0].getMessage() == "voice join: user 1 guild 1 channel 2 via harmony/hrpc from 127.0.0.1"
    assert not [r for r in caplog.records if "tok-1" in str(vars(r)) or "tok-2" in str(vars(r))]


@pytest.mark.parametrize(
    ("token", "frame", "identifier"),
    [
        ("nope", None, "h.blank-session"),
        ("tok-1", "text", "fastsfu.voice-bad-frame"),
        ("tok-1", b"\xff\xff\xff", "fastsfu.voice-bad-frame"),
        (
            "tok-1",
            Req(resume_consumer=Req.ResumeConsumer(consumer_id="x")).SerializeToString(),
            "fastsfu.voice-unexpected-message",
        ),
        ("tok-1", b"", "fastsfu.voice-unexpected-message"),  # empty frame: no oneof set
        ("tok-1", b"\x0a" * 70000, "fastsfu.voice-bad-frame"),  # over the 64 KiB frame limit
        ("tok-1", b"\x0a" * (1024 * 1024 + 1), "close"),  # never buffered: close 1009 at once
    ],
)
def test_errors_are_an_error_frame_then_a_clean_close(token: str, frame: Any, identifier: str) -> None:
    async def body(base: str, http: aiohttp.ClientSession) -> None:
        ws = await http.ws_connect(base + STREAM_PATH, protocols=("hrpc1", token), max_msg_size=0)
        if isinstance(frame, str):
            await ws.send_str(frame)
        elif frame is not None:
            await ws.send_bytes(frame)
        if identifier == "close":
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg  # message too big
            return
        op, error = await recv(ws)
        assert op == 1 and error.identifier == identifier and error.human_message
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000

    serve(body)


def test_http_errors_before_the_upgrade() -> None:
    async def body(base: str, http: aiohttp.ClientSession) -> None:
        async with http.get(base + STREAM_PATH) as resp:
            assert resp.status == 400 and resp.headers["Content-Type"] == "application/hrpc"
            assert (
                hrpc_pb2.Error.FromString(await resp.read()).identifier == "hrpc.http.bad-streaming-request"
            )
        async with http.get(base + "/protocol.chat.v1.ChatService/Nope") as resp:
            assert resp.status == 404
            assert hrpc_pb2.Error.FromString(await resp.read()).identifier == "hrpc.not-found"

    serve(body)


def test_a_client_that_stops_mid_flow_times_out_and_one_that_vanishes_is_cleaned_up() -> None:
    from fastsfu.harmony import VoiceSettings

    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine, VoiceSettings(init_timeout=0.3, prepare_timeout=0.3, join_timeout=0.3))
            async with serve_app(make_app(rooms, TOKENS.authenticate)) as port:
                url = f"http://127.0.0.1:{port}{STREAM_PATH}"
                async with aiohttp.ClientSession() as http:
                    # Silent after PrepareForJoinChannel: the JOIN deadline passes.
                    ws = await http.ws_connect(url, protocols=("hrpc1", "tok-1"))
                    await ws.send_bytes(
                        Req(initialize=Req.Initialize(guild_id=1, channel_id=2)).SerializeToString()
                    )
                    await recv(ws)
                    caps = json.dumps(CAPS)
                    prepare = Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps))
                    await ws.send_bytes(prepare.SerializeToString())
                    assert (await recv(ws))[1].WhichOneof("message") == "prepared_for_join_channel"
                    assert engine.stats()["transports"] == 2
                    op, error = await recv(ws)
                    assert op == 1 and error.identifier == "fastsfu.voice-message-timeout"
                    assert (await asyncio.wait_for(ws.receive(), 5)).type == aiohttp.WSMsgType.CLOSE
                    # Vanishes (TCP closed, no close frame) after Initialize; no deadline helps here.
                    rooms.settings.prepare_timeout = 60.0
                    ws = await http.ws_connect(url, protocols=("hrpc1", "tok-2"))
                    await ws.send_bytes(
                        Req(initialize=Req.Initialize(guild_id=1, channel_id=2)).SerializeToString()
                    )
                    await recv(ws)
                    assert rooms.sessions and rooms.rooms
                    ws._response.connection.transport.abort()  # type: ignore[union-attr]
                for _ in range(50):
                    if not rooms.sessions and not rooms.open_sessions:
                        break
                    await asyncio.sleep(0.05)
                assert not rooms.sessions and not rooms.open_sessions and not rooms.rooms
                assert engine.stats()["transports"] == 0 and engine.stats()["routers"] == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_streams_cancelled_by_a_server_shutdown_leave_no_task_pending() -> None:
    """aiohttp cancels the handlers still running when its shutdown times out: a stream waiting
    for its client (before Initialize, after it, joined) must leave no task behind."""
    users = {f"tok-{u}": u for u in range(1, 13)}
    reported: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("message"))))
        async with Engine() as engine, aiohttp.ClientSession() as http:
            rooms = VoiceRooms(engine)
            runner = aiohttp.web.AppRunner(
                make_app(rooms, StaticTokens(users).authenticate), access_log=None, shutdown_timeout=0.3
            )
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            url = f"ws://127.0.0.1:{port}{STREAM_PATH}"
            sockets = []
            for user in users.values():
                ws = await http.ws_connect(url, protocols=("hrpc1", f"tok-{user}"))
                if user % 3 == 1:
                    hello = Req(initialize=Req.Initialize(guild_id=1, channel_id=2))
                    await ws.send_bytes(hello.SerializeToString())
                    assert (await recv(ws))[1].WhichOneof("message") == "initialized"
                elif user % 3 == 2:
                    await join(ws)
                sockets.append(ws)
            assert len(rooms.open_sessions) == len(users)
            await asyncio.wait_for(runner.cleanup(), 10)
            for ws in sockets:
                await ws.close()
            assert not rooms.open_sessions and not rooms.sessions and not rooms.rooms
        gc.collect()  # a pending task nobody references any more would be destroyed here

    asyncio.run(asyncio.wait_for(main(), 45))
    assert [m for m in reported if "destroyed but it is pending" in m] == [], reported
