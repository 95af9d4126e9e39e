"""The gRPC StreamMessage edge through a real grpc.aio server and raw client calls on loopback: an
undecodable message ends the stream with voice-bad-frame (a leave for the room), and streams
cancelled, disconnected, timed out or cut by a server stop at any stage leave no task behind."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from helpers import OPUS_CAPS

from fastsfu import Engine
from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms, VoiceSettings
from fastsfu.harmony.auth import StaticTokens
from fastsfu.harmony.grpc_server import start_grpc_server

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(90)]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
PATH = "/protocol.voice.v1.VoiceService/StreamMessage"
TOKENS = StaticTokens({f"tok-{i}": i for i in range(1, 80)})
CLIENT_DTLS = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
STAGES = ("opened", "sent", "initialized", "prepared", "joined")  # how far a stream gets


def raw_call(channel: grpc.aio.Channel, user: int) -> Any:
    """A StreamMessage call that sends whatever bytes it is given (a Req is serialized first)."""
    method = channel.stream_stream(
        PATH,
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=Resp.FromString,
    )
    return method(metadata=(("authorization", f"tok-{user}"),))


async def read(call: Any) -> Resp:
    msg = await asyncio.wait_for(call.read(), 10)
    assert msg is not grpc.aio.EOF
    return msg


async def status(call: Any) -> tuple[grpc.StatusCode, str]:
    """The call's final status code and the hrpc-error-bin identifier ("" when none)."""
    try:
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass
    trailer = dict(await call.trailing_metadata() or ()).get("hrpc-error-bin")
    return await call.code(), hrpc_pb2.Error.FromString(trailer).identifier if trailer else ""


async def advance(call: Any, user: int, stage: str) -> None:
    """Drive one stream through the flow (docs/harmony.md#client-side) up to `stage`."""
    steps = STAGES.index(stage)
    if steps >= 1:
        await call.write(Req(initialize=Req.Initialize(guild_id=10, channel_id=20)))
    if steps >= 2:
        assert (await read(call)).WhichOneof("message") == "initialized"
    if steps >= 3:
        caps = json.dumps(OPUS_CAPS)
        await call.write(Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)))
        assert (await read(call)).WhichOneof("message") == "prepared_for_join_channel"
    if steps >= 4:
        params = {
            "codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}],
            "encodings": [{"ssrc": 5000 + user}],
            "rtcp": {"cname": f"c{user}"},
        }
        join = Req.JoinChannel(
            rtp_paramaters=json.dumps(params),
            producer_dtls_paramaters=CLIENT_DTLS,
            consumer_dtls_paramaters=CLIENT_DTLS,
        )
        await call.write(Req(join_channel=join))
        assert (await read(call)).WhichOneof("message") == "joined_channel"


def serve(body: Any, settings: VoiceSettings | None = None) -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine, settings)
            server, port = await start_grpc_server(rooms, TOKENS.authenticate)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await body(rooms, channel)
            finally:
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 60))


UNDECODABLE = {
    "bad-tag-varint": b"\xff\xff\xff",
    "truncated-varint": b"\x0a\x02\x08\x80",  # Initialize.guild_id's varint never ends
    "truncated-tag": b"\x80",
    "wire-type-6": b"\x0e",
    "wire-type-7": b"\x17",
    "stray-end-group": b"\x0c",
    "field-number-0": b"\x00",
    "bad-utf8-string": b"\x12\x04\x0a\x02\xc3\x28",  # rtp_capabilities = C3 28
    "length-past-end": b"\x0a\x05\x08\x01",
    "huge-length": b"\x1a\xff\xff\xff\xff\x0f",
}


@pytest.mark.parametrize("payload", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
def test_an_undecodable_message_ends_the_stream_with_voice_bad_frame(payload: bytes) -> None:
    async def body(rooms: VoiceRooms, channel: grpc.aio.Channel) -> None:
        with pytest.raises(DecodeError):  # really undecodable, not merely unexpected
            Req.FromString(payload)
        a, b = raw_call(channel, 1), raw_call(channel, 2)
        await advance(a, 1, "joined")
        await advance(b, 2, "joined")
        assert (await read(a)).user_joined.data.user_id == 2
        await b.write(payload)
        assert await status(b) == (grpc.StatusCode.INVALID_ARGUMENT, "fastsfu.voice-bad-frame")
        assert (await read(a)).user_left.user_id == 2  # a leave for the room, exactly as hRPC's
        assert rooms.stream_errors == {"fastsfu.voice-bad-frame": 1}
        first = raw_call(channel, 3)  # as the very first message too
        await first.write(payload)
        assert await status(first) == (grpc.StatusCode.INVALID_ARGUMENT, "fastsfu.voice-bad-frame")
        assert rooms.stream_errors == {"fastsfu.voice-bad-frame": 2}
        a.cancel()

    serve(body)


def test_decodable_messages_keep_their_meaning_and_a_half_close_is_a_clean_leave() -> None:
    async def body(rooms: VoiceRooms, channel: grpc.aio.Channel) -> None:
        # Field 1 with the wrong wire type is an unknown field to protobuf: no oneof set.
        for payload in (b"\x08\x01", b""):
            call = raw_call(channel, 3)
            await call.write(payload)
            code = await status(call)
            assert code == (grpc.StatusCode.INVALID_ARGUMENT, "fastsfu.voice-unexpected-message")
        a, b = raw_call(channel, 1), raw_call(channel, 2)
        await advance(a, 1, "joined")
        await advance(b, 2, "joined")
        assert (await read(a)).user_joined.data.user_id == 2
        await b.write(b"\x08\x01")  # once joined, anything but ResumeConsumer is ignored
        await b.write(Req(initialize=Req.Initialize(guild_id=1, channel_id=1)))
        await b.done_writing()
        assert await b.read() is grpc.aio.EOF
        assert await b.code() == grpc.StatusCode.OK
        assert (await read(a)).user_left.user_id == 2
        assert rooms.stream_errors == {"fastsfu.voice-unexpected-message": 2}
        a.cancel()

    serve(body)


def test_ended_streams_leave_no_task_pending(caplog: pytest.LogCaptureFixture) -> None:
    """Streams that a client cancels, that lose their connection, time out or are cut by a
    server stop, at every stage of the flow: afterwards no task of theirs is left in the loop."""
    caplog.set_level(logging.ERROR)
    reported: list[str] = []

    async def stage_then(call: Any, user: int, stage: str) -> None:
        await advance(call, user, stage)
        if stage != "opened":
            await asyncio.sleep(0.01 * (user % 4))  # some while the server waits, some while it works

    async def settled(rooms: VoiceRooms, baseline: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """The tasks over the baseline's count once every session has closed (bounded wait).
        A count, not identities: a grpc server keeps one pending task that waits for the next
        call, and replaces it with a new one after each call."""
        for _ in range(200):
            now = asyncio.all_tasks() - {asyncio.current_task()}
            if len(now) <= len(baseline) and not rooms.open_sessions:
                return []
            await asyncio.sleep(0.025)
        assert rooms.open_sessions == set()
        return [t for t in now if t not in baseline]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("message"))))
        settings = VoiceSettings(init_timeout=0.5)
        async with Engine() as engine:
            rooms = VoiceRooms(engine, settings)
            baseline = set(asyncio.all_tasks())
            server, port = await start_grpc_server(rooms, TOKENS.authenticate)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            try:
                await channel.channel_ready()
                serving = set(asyncio.all_tasks())
                user = iter(range(1, 80))

                # 30 streams the client cancels, 6 at each stage.
                calls = [(raw_call(channel, u), u, s) for s in STAGES for u in [next(user) for _ in range(6)]]
                await asyncio.gather(*(stage_then(c, u, s) for c, u, s in calls))
                for call, _, _ in calls:
                    call.cancel()
                # 5 streams that send nothing: the init timeout ends them.
                timed = [raw_call(channel, next(user)) for _ in range(5)]
                for code in await asyncio.gather(*(status(c) for c in timed)):
                    assert code == (grpc.StatusCode.DEADLINE_EXCEEDED, "fastsfu.voice-message-timeout")
                assert await settled(rooms, serving) == []

                # 10 streams whose connection closes under them.
                other = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                calls = [
                    (raw_call(other, u), u, STAGES[i % 5])
                    for i, u in enumerate(next(user) for _ in range(10))
                ]
                await asyncio.gather(*(stage_then(c, u, s) for c, u, s in calls))
                await other.close()
                assert await settled(rooms, serving) == []

                # 5 streams open while the server stops.
                calls = [
                    (raw_call(channel, u), u, STAGES[i]) for i, u in enumerate(next(user) for _ in range(5))
                ]
                await asyncio.gather(*(stage_then(c, u, s) for c, u, s in calls))
                await server.stop(grace=None)
                await channel.close()
                assert await settled(rooms, baseline) == []
            finally:  # idempotent: also on a failed assertion
                await server.stop(grace=None)
                await channel.close()
        gc.collect()  # a task nobody references any more would now be destroyed while pending
        await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert [m for m in reported if "destroyed but it is pending" in m] == []
    assert reported == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_joins_and_leaves_over_grpc_are_logged_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastsfu.harmony.session")

    async def body(rooms: VoiceRooms, channel: grpc.aio.Channel) -> None:
        a, b = raw_call(channel, 1), raw_call(channel, 2)
        await advance(a, 1, "joined")
        await advance(b, 2, "joined")
        await b.done_writing()  # a clean leave
        assert await status(b) == (grpc.StatusCode.OK, "")
        again = raw_call(channel, 1)  # the same user again: replaces the first session
        await advance(again, 1, "initialized")
        assert (await status(a))[1] == "fastsfu.voice-session-replaced"
        again.cancel()

    serve(body)
    lines = [r for r in caplog.records if r.name == "fastsfu.harmony.session" and r.levelno == logging.INFO]
    assert [(r.getMessage().split(":")[0], vars(r)["user_id"], vars(r).get("reason")) for r in lines] == [
        ("voice join", 1, None),
        ("voice join", 2, None),
        ("voice leave", 2, "left"),
        ("voice leave", 1, "fastsfu.voice-session-replaced"),
    ]
    where = {
        "guild_id": 10,
        "channel_id": 20,
        "protocol": "harmony",
        "frontend": "grpc",
        "remote": "127.0.0.1",
    }
    assert all(where.items() <= vars(r).items() for r in lines)
