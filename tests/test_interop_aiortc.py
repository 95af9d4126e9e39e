"""Two aiortc 1.16 clients (ORTC classes: ICE, DTLS, RTP) join one Router over ICE-lite + DTLS-SRTP;
Opus from one is forwarded by the datapath and decoded by the other (issue 3, real-stack proof)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

aiortc = pytest.importorskip("aiortc")
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

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60), pytest.mark.usefixtures("aiortc_loopback")]

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
CLIENT_CAPS = {
    "codecs": [
        {
            "kind": "audio",
            "mimeType": "audio/opus",
            "preferredPayloadType": 111,
            "clockRate": 48000,
            "channels": 2,
        }
    ],
    "headerExtensions": [],
}


class Client:
    """An aiortc endpoint speaking to one fastsfu WebRtcTransport in the given DTLS role."""

    def __init__(self, transport: Any, aiortc_role: str) -> None:
        self.server = transport
        self.leg = AiortcLeg(aiortc_role)
        self.dtls = self.leg.dtls

    async def connect(self) -> None:
        await self.leg.gatherer.gather()
        self.server.connect(self.leg.dtls_parameters())
        await asyncio.wait_for(
            self.leg.start(
                self.server.ice_candidates, self.server.ice_parameters, self.server.dtls_parameters
            ),
            20,
        )

    async def stop(self) -> None:
        await self.leg.stop()


@pytest.mark.parametrize("aiortc_role", ["server", "client"])
def test_two_aiortc_clients_hear_each_other_through_the_datapath(aiortc_role: str) -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            t_a, t_b = router.create_webrtc_transport(), router.create_webrtc_transport()
            alice, bob = Client(t_a, aiortc_role), Client(t_b, aiortc_role)
            await asyncio.gather(alice.connect(), bob.connect())
            # aiortc's start() returns once its own side is done; as the DTLS server it is done when
            # it sends its last flight, which our side handles on the loop a moment later.
            for _ in range(250):
                if t_a.dtls_state == t_b.dtls_state == "connected":
                    break
                await asyncio.sleep(0.02)
            assert t_a.dtls_state == t_b.dtls_state == "connected"
            assert t_a.ice_selected_tuple is not None

            # Alice sends Opus (aiortc encodes a generated track); fastsfu forwards to Bob.
            sender = RTCRtpSender(AudioStreamTrack(), alice.dtls)
            ssrc = sender._ssrc
            await sender.send(
                RTCRtpSendParameters(codecs=[OPUS], rtcp=RTCRtcpParameters(cname="alice", ssrc=ssrc))
            )
            producer = t_a.produce(
                {
                    "codecs": [
                        {"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}
                    ],
                    "encodings": [{"ssrc": ssrc}],
                    "rtcp": {"cname": "alice"},
                }
            )
            consumer = t_b.consume(producer.id, CLIENT_CAPS)
            receiver = RTCRtpReceiver("audio", bob.dtls)
            receiver._track = RemoteStreamTrack(kind="audio")  # RTCPeerConnection does this for its receivers
            await receiver.receive(
                RTCRtpReceiveParameters(
                    codecs=[
                        RTCRtpCodecParameters(
                            mimeType="audio/opus",
                            clockRate=48000,
                            channels=2,
                            payloadType=consumer.rtp_parameters["codecs"][0]["payloadType"],
                        )
                    ],
                    encodings=[RTCRtpDecodingParameters(ssrc=consumer.ssrc, payloadType=111)],
                    rtcp=RTCRtcpParameters(cname="bob"),
                )
            )
            frames = []
            for _ in range(10):
                frame = await asyncio.wait_for(receiver.track.recv(), 5)
                frames.append(frame)
            # Decoded Opus: 20 ms of 48 kHz audio per frame.
            assert all(f.sample_rate == 48000 and f.samples == 960 for f in frames)
            assert producer.get_stats()[0]["packetCount"] >= 10
            assert consumer.get_stats()[0]["packetCount"] >= 10
            assert engine.stats()["drops"]["decrypt_failed"] == 0
            await sender.stop()
            await receiver.stop()
            await alice.stop()
            await bob.stop()

    asyncio.run(asyncio.wait_for(main(), 45))
