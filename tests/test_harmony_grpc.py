"""protocol.voice.v1 over gRPC with real clients: three aiortc endpoints join one channel through
VoiceService/StreamMessage; each hears the other two; UserJoined and UserLeft go where they should."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

pytest.importorskip("aiortc")
from aiortc import (  # noqa: E402
    RTCRtpCodecParameters,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.mediastreams import AudioStreamTrack  # noqa: E402
from aiortc.rtcrtpparameters import (  # noqa: E402
    RTCRtcpParameters,
    RTCRtpDecodingParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.rtcrtpreceiver import RemoteStreamTrack  # noqa: E402
from aiortc_helpers import AiortcLeg  # noqa: E402

from fastsfu import Engine  # noqa: E402
from fastsfu._proto.hrpc.v1 import hrpc_pb2  # noqa: E402
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc  # noqa: E402
from fastsfu.harmony import VoiceRooms  # noqa: E402
from fastsfu.harmony.auth import StaticTokens  # noqa: E402
from fastsfu.harmony.grpc_server import start_grpc_server  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(90), pytest.mark.usefixtures("aiortc_loopback")]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
TOKENS = StaticTokens({"tok-1": 1, "tok-2": 2, "tok-3": 3})
CAPS = {
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


def start(leg: AiortcLeg, options: Any) -> Any:
    """Start a leg from the server's TransportOptions (JSON strings, as the protocol carries them)."""
    return leg.start(
        [json.loads(c) for c in options.ice_candidates],
        json.loads(options.ice_parameters),
        json.loads(options.dtls_parameters),
    )


class Member:
    def __init__(self, port: int, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", token),)
        )
        self.producer, self.consumer = AiortcLeg(), AiortcLeg()
        self.received: list[Resp] = []
        self.receivers: dict[int, RTCRtpReceiver] = {}
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> Resp:
        msg = await asyncio.wait_for(self.call.read(), 10)
        assert msg is not grpc.aio.EOF
        return msg

    async def join(self) -> None:
        await self.call.write(Req(initialize=Req.Initialize(guild_id=10, channel_id=20)))
        assert (await self.read()).WhichOneof("message") == "initialized"
        await self.call.write(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CAPS)))
        )
        prep = (await self.read()).prepared_for_join_channel
        await asyncio.gather(self.producer.gatherer.gather(), self.consumer.gatherer.gather())
        self.sender = RTCRtpSender(AudioStreamTrack(), self.producer.dtls)
        ssrc = self.sender._ssrc
        params = {
            "codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}],
            "encodings": [{"ssrc": ssrc}],
            "rtcp": {"cname": f"m{ssrc}", "reducedSize": True},
        }
        await self.call.write(
            Req(
                join_channel=Req.JoinChannel(
                    rtp_paramaters=json.dumps(params),
                    producer_dtls_paramaters=json.dumps(self.producer.dtls_parameters()),
                    consumer_dtls_paramaters=json.dumps(self.consumer.dtls_parameters()),
                )
            )
        )
        joined = await self.read()
        assert joined.WhichOneof("message") == "joined_channel"
        await asyncio.wait_for(
            asyncio.gather(
                start(self.producer, prep.producer_transport_options),
                start(self.consumer, prep.consumer_transport_options),
            ),
            15,
        )
        await self.sender.send(
            RTCRtpSendParameters(
                codecs=[
                    RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
                ],
                rtcp=RTCRtcpParameters(cname=f"m{ssrc}", ssrc=ssrc),
            )
        )
        for other in joined.joined_channel.other_users:
            await self.consume(other)
        self.reader = asyncio.create_task(self.pump())

    async def consume(self, data: Any) -> None:
        params = json.loads(data.rtp_parameters)
        receiver = RTCRtpReceiver("audio", self.consumer.dtls)
        receiver._track = RemoteStreamTrack(kind="audio")  # RTCPeerConnection does this for its receivers
        codec = params["codecs"][0]
        await receiver.receive(
            RTCRtpReceiveParameters(
                codecs=[
                    RTCRtpCodecParameters(
                        mimeType="audio/opus", clockRate=48000, channels=2, payloadType=codec["payloadType"]
                    )
                ],
                encodings=[
                    RTCRtpDecodingParameters(
                        ssrc=params["encodings"][0]["ssrc"], payloadType=codec["payloadType"]
                    )
                ],
                rtcp=RTCRtcpParameters(cname="x"),
            )
        )
        self.receivers[data.user_id] = receiver
        await self.call.write(Req(resume_consumer=Req.ResumeConsumer(consumer_id=data.consumer_id)))

    async def pump(self) -> None:
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                return
            self.received.append(msg)
            if msg.WhichOneof("message") == "user_joined":
                await self.consume(msg.user_joined.data)

    async def heard(self, user: int) -> int:
        frames = 0
        for _ in range(5):
            frame = await asyncio.wait_for(self.receivers[user].track.recv(), 5)
            frames += frame.samples == 960
        return frames

    async def leave(self) -> None:
        await self.call.done_writing()
        await self.sender.stop()
        for r in self.receivers.values():
            await r.stop()
        for leg in (self.producer, self.consumer):
            await leg.stop()
        if self.reader:
            self.reader.cancel()
        await self.channel.close()


def test_three_aiortc_clients_over_grpc() -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            server, port = await start_grpc_server(rooms, TOKENS.authenticate)
            try:
                members = [Member(port, f"tok-{i}") for i in (1, 2, 3)]
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
