"""protocol.voice.v1 over gRPC with real clients: three aiortc endpoints join one channel through
VoiceService/StreamMessage; each hears the other two; UserJoined and UserLeft go where they should."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

pytest.importorskip("aiortc")
from aioice import ice as aioice_ice  # noqa: E402
from aiortc import (  # noqa: E402
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
    RTCIceCandidate,
    RTCIceGatherer,
    RTCIceParameters,
    RTCIceTransport,
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

from fastsfu import Engine  # noqa: E402
from fastsfu._proto.hrpc.v1 import hrpc_pb2  # noqa: E402
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc  # noqa: E402
from fastsfu.harmony import VoiceError, VoiceRooms  # noqa: E402
from fastsfu.harmony.grpc_server import start_grpc_server  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(90)]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
TOKENS = {"tok-1": 1, "tok-2": 2, "tok-3": 3}
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


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice_ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def authenticate(token: str) -> int:
    if token not in TOKENS:
        raise VoiceError("h.blank-session", "unknown token")
    return TOKENS[token]


class Leg:
    """One aiortc ICE + DTLS transport (aiortc is ICE-controlling, so its DTLS role is server)."""

    def __init__(self) -> None:
        self.gatherer = RTCIceGatherer(iceServers=[])
        self.ice = RTCIceTransport(self.gatherer)
        self.dtls = RTCDtlsTransport(self.ice, [RTCCertificate.generateCertificate()])

    def dtls_parameters(self) -> str:
        fps = [
            {"algorithm": f.algorithm, "value": f.value} for f in self.dtls.getLocalParameters().fingerprints
        ]
        return json.dumps({"role": "server", "fingerprints": fps})

    async def start(self, options: Any) -> None:
        for text in options.ice_candidates:
            c = json.loads(text)
            await self.ice.addRemoteCandidate(
                RTCIceCandidate(
                    component=1,
                    foundation=c["foundation"],
                    ip=c["ip"],
                    port=c["port"],
                    priority=c["priority"],
                    protocol="udp",
                    type="host",
                )
            )
        await self.ice.addRemoteCandidate(None)
        ice = json.loads(options.ice_parameters)
        dtls = json.loads(options.dtls_parameters)
        await self.ice.start(
            RTCIceParameters(usernameFragment=ice["usernameFragment"], password=ice["password"], iceLite=True)
        )
        await self.dtls.start(
            RTCDtlsParameters(
                fingerprints=[RTCDtlsFingerprint(f["algorithm"], f["value"]) for f in dtls["fingerprints"]],
                role="auto",
            )
        )


class Member:
    def __init__(self, port: int, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", token),)
        )
        self.producer, self.consumer = Leg(), Leg()
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
                    producer_dtls_paramaters=self.producer.dtls_parameters(),
                    consumer_dtls_paramaters=self.consumer.dtls_parameters(),
                )
            )
        )
        joined = await self.read()
        assert joined.WhichOneof("message") == "joined_channel"
        await asyncio.wait_for(
            asyncio.gather(
                self.producer.start(prep.producer_transport_options),
                self.consumer.start(prep.consumer_transport_options),
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
            await leg.dtls.stop()
            await leg.ice.stop()
        if self.reader:
            self.reader.cancel()
        await self.channel.close()


def test_three_aiortc_clients_over_grpc() -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            server, port = await start_grpc_server(rooms, authenticate)
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
            server, port = await start_grpc_server(VoiceRooms(engine), authenticate)
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
            finally:
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 30))
