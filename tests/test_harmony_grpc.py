"""protocol.voice.v1 over gRPC with real clients: three aiortc endpoints join one channel through
VoiceService/StreamMessage; each hears the other two; UserJoined and UserLeft go where they should."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("aiortc")
from harmony_client import HarmonyMember  # noqa: E402

from fastsfu import Engine  # noqa: E402
from fastsfu._proto.hrpc.v1 import hrpc_pb2  # noqa: E402
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc  # noqa: E402
from fastsfu.harmony import VoiceRooms  # noqa: E402
from fastsfu.harmony.auth import StaticTokens  # noqa: E402
from fastsfu.harmony.grpc_server import start_grpc_server  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(90), pytest.mark.usefixtures("aiortc_loopback")]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
TOKENS = StaticTokens({"tok-1": 1, "tok-2": 2, "tok-3": 3})


def test_three_aiortc_clients_over_grpc() -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            server, port = await start_grpc_server(rooms, TOKENS.authenticate)
            try:
                members = [HarmonyMember(port, f"tok-{i}") for i in (1, 2, 3)]
                for m in members:  # one after the other: each later joiner is a UserJoined for the earlier
                    await m.join()
                for _ in range(100):
                    if all(len(m.receivers) == 2 for m in members):
                        break
                    await asyncio.sleep(0.05)
                for m, me in zip(members, (1, 2, 3), strict=True):
                    assert sorted(m.receivers) == sorted({1, 2, 3} - {me})
                    for other in m.receivers:
                        assert await m.heard(other) == 5, (me, other)
                joins = [
                    [
                        r.user_joined.data.user_id
                        for r in m.received
                        if r.WhichOneof("message") == "user_joined"
                    ]
                    for m in members
                ]
                assert joins == [[2, 3], [3], []]  # never to the joiner, once per member
                await members[2].leave()
                for _ in range(100):
                    if all(
                        any(r.WhichOneof("message") == "user_left" for r in m.received) for m in members[:2]
                    ):
                        break
                    await asyncio.sleep(0.05)
                for m in members[:2]:
                    assert [
                        r.user_left.user_id for r in m.received if r.WhichOneof("message") == "user_left"
                    ] == [3]
                assert engine.stats()["drops"]["decrypt_failed"] == 0
                for m in members[:2]:
                    await m.leave()
            finally:
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 80))


def test_bad_token_and_wrong_first_message_end_with_a_status() -> None:
    async def main() -> None:
        async with Engine() as engine:
            server, port = await start_grpc_server(VoiceRooms(engine), TOKENS.authenticate)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = voice_pb2_grpc.VoiceServiceStub(channel)
                    call = stub.StreamMessage(metadata=(("authorization", "Bearer nope"),))
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await call.read()
                    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    trailer = dict(exc.value.trailing_metadata())["hrpc-error-bin"]
                    assert hrpc_pb2.Error.FromString(trailer).identifier == "h.blank-session"
                    call = stub.StreamMessage(metadata=(("authorization", "tok-1"),))
                    await call.write(Req(join_channel=Req.JoinChannel()))
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await call.read()
                    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    trailer = dict(exc.value.trailing_metadata())["hrpc-error-bin"]
                    assert hrpc_pb2.Error.FromString(trailer).identifier == "fastsfu.voice-unexpected-message"
                    # An oversize message (64 KiB limit): grpc refuses it, the server goes on.
                    call = stub.StreamMessage(metadata=(("authorization", "tok-1"),))
                    huge = "x" * 70_000
                    await call.write(
                        Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=huge))
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await call.read()
                    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    call = stub.StreamMessage(metadata=(("authorization", "tok-1"),))
                    await call.write(Req(initialize=Req.Initialize(guild_id=1, channel_id=1)))
                    assert (await call.read()).WhichOneof("message") == "initialized"
                    call.cancel()
            finally:
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 30))
