"""A Harmony voice client for tests: protocol.voice.v1 over gRPC, media through aiortc's ORTC legs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from aiortc import RTCRtpCodecParameters, RTCRtpReceiver, RTCRtpSender
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcrtpparameters import (
    RTCRtcpParameters,
    RTCRtpDecodingParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc_helpers import AiortcLeg
from helpers import AUDIO_LEVEL_ID as LEVEL_ID
from helpers import OPUS_CAPS

from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.ortc import URI_AUDIO_LEVEL

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
CAPS = OPUS_CAPS


def start(leg: AiortcLeg, options: Any) -> Any:
    """Start a leg from the server's TransportOptions (JSON strings, as the protocol carries them)."""
    return leg.start(
        [json.loads(c) for c in options.ice_candidates],
        json.loads(options.ice_parameters),
        json.loads(options.dtls_parameters),
    )


class HarmonyMember:
    """A Harmony voice client over gRPC with aiortc legs (docs/harmony.md#client-side, ORTC style)."""

    def __init__(
        self,
        port: int,
        token: str,
        guild_id: int = 10,
        channel_id: int = 20,
        track: Any = None,
        host: str = "127.0.0.1",
    ) -> None:
        """`track`: what to send (silence by default); with one, ssrc-audio-level is negotiated and
        aiortc writes the level of that audio (RFC 6464)."""
        self.guild_id, self.channel_id = guild_id, channel_id
        self.track = track
        self.channel = grpc.aio.insecure_channel(f"{host}:{port}")
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
        await self.call.write(
            Req(initialize=Req.Initialize(guild_id=self.guild_id, channel_id=self.channel_id))
        )
        assert (await self.read()).WhichOneof("message") == "initialized"
        await self.call.write(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CAPS)))
        )
        prep = (await self.read()).prepared_for_join_channel
        await asyncio.gather(self.producer.gatherer.gather(), self.consumer.gatherer.gather())
        self.sender = RTCRtpSender(self.track or AudioStreamTrack(), self.producer.dtls)
        ssrc = self.sender._ssrc
        params = {
            "codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}],
            "encodings": [{"ssrc": ssrc}],
            "rtcp": {"cname": f"m{ssrc}", "reducedSize": True},
        }
        if self.track is not None:
            params["headerExtensions"] = [{"uri": URI_AUDIO_LEVEL, "id": LEVEL_ID}]
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
                headerExtensions=(
                    [RTCRtpHeaderExtensionParameters(id=LEVEL_ID, uri=URI_AUDIO_LEVEL)] if self.track else []
                ),
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
