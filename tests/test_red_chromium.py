"""Opus RED with real clients, both kinds in one room (docs/transports.md#opus-red): Chromium +
mediasoup-client sends RED, a second Chromium page receives it as RED and plays it, and an aiortc
receiver (Opus only) gets it unwrapped to plain Opus that decodes to the sender's 440 Hz tone.

Runs only in a loopback-only network namespace, like tests/test_interop_chromium.py.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp.web")
pytest.importorskip("playwright.async_api")
pytest.importorskip("aiortc")

from aiortc import RTCRtpCodecParameters, RTCRtpReceiver  # noqa: E402
from aiortc.rtcrtpparameters import RTCRtcpParameters, RTCRtpDecodingParameters, RTCRtpReceiveParameters  # noqa: E402
from aiortc.rtcrtpreceiver import RemoteStreamTrack  # noqa: E402
from aiortc_helpers import AiortcLeg  # noqa: E402
from chromium_helpers import chromium_args, harness, require_harness, wait_result  # noqa: E402
from helpers import OPUS_CAPS  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.loopback,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("aiortc_loopback"),
]

SECONDS = 3
ROUTER_CODECS: list[Any] = [
    {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2},
    {"kind": "audio", "mimeType": "audio/red", "clockRate": 48000, "channels": 2},
]


def test_chromium_red_to_chromium_red_and_aiortc_opus(tmp_path: Path) -> None:
    chromium = require_harness()
    # Playback without a user gesture, so that the receiving page's decoded audio is pulled and
    # its getStats audio level shows the tone.
    args = [*chromium_args(tmp_path), "--autoplay-policy=no-user-gesture-required"]
    asyncio.run(asyncio.wait_for(run_red(chromium, args), 100))


def tone_power(pcm: bytes, channels: int, rate: int, hz: float) -> float:
    """The first channel's power at `hz` (Goertzel), relative to its total power."""
    samples = array.array("h", pcm)[::channels]
    coeff = 2 * math.cos(2 * math.pi * hz / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    total = sum(x * x for x in samples) or 1
    return power / total / len(samples) * 2


async def aiortc_opus_receiver(router: Any, producer_id: str) -> tuple[Any, Any, AiortcLeg, Any]:
    transport = router.create_webrtc_transport()
    leg = AiortcLeg()
    await leg.gatherer.gather()
    transport.connect(leg.dtls_parameters())
    await asyncio.wait_for(
        leg.start(transport.ice_candidates, transport.ice_parameters, transport.dtls_parameters), 20
    )
    consumer = transport.consume(producer_id, OPUS_CAPS)  # Opus only: RED unwrapped
    receiver = RTCRtpReceiver("audio", leg.dtls)
    receiver._track = RemoteStreamTrack(kind="audio")  # RTCPeerConnection does this for its receivers
    (codec,) = consumer.rtp_parameters["codecs"]
    await receiver.receive(
        RTCRtpReceiveParameters(
            codecs=[
                RTCRtpCodecParameters(
                    mimeType="audio/opus", clockRate=48000, channels=2, payloadType=codec["payloadType"]
                )
            ],
            encodings=[RTCRtpDecodingParameters(ssrc=consumer.ssrc, payloadType=codec["payloadType"])],
            rtcp=RTCRtcpParameters(cname="aiortc"),
        )
    )
    return transport, consumer, leg, receiver


async def run_red(chromium_path: str, args: list[str]) -> None:
    async with (
        Engine(Settings(listen_ip="127.0.0.1")) as engine,
        harness(engine.create_router(ROUTER_CODECS), chromium_path, args) as run,
    ):
        signaling = run.signaling
        sender = await run.open("send", f"role=send&red=1&seconds={SECONDS + 3}")
        producer_id = await run.producer_id(sender)
        producer = signaling.producers[producer_id]
        assert producer.info.red_payload_type is not None, producer.rtp_parameters

        # The Opus-only receiver first, then the RED one; both listen at once.
        transport, consumer, leg, receiver = await aiortc_opus_receiver(signaling.router, producer_id)
        chromium_rx = await run.open("recv", f"role=recv&unmute=1&producerId={producer_id}&seconds={SECONDS}")
        pcm = b""
        frame = None
        for _ in range(100):  # 2 s of 20 ms frames
            try:
                frame = await asyncio.wait_for(receiver.track.recv(), 15)  # a loaded CI host
            except TimeoutError:
                raise AssertionError(
                    f"aiortc decoded nothing for 15 s: opus consumer {consumer.get_stats()}, "
                    f"producer {producer.get_stats()}, drops {engine.stats()['drops']}"
                ) from None
            pcm += bytes(frame.planes[0])
        recv_result = await wait_result(chromium_rx, 30_000)
        send_result = await wait_result(sender, 30_000)
        red_consumer = signaling.consumers[recv_result["consumerId"]]
        p_stats = producer.get_stats()[0]
        report = {
            "send": send_result,
            "recv": recv_result,
            "producer": p_stats,
            "redConsumer": red_consumer.get_stats()[0],
            "opusConsumer": consumer.get_stats()[0],
            "drops": engine.stats()["drops"],
        }
        print("chromium red:", json.dumps(report, default=str, sort_keys=True))

        # Chromium sent RED, and nothing of it was malformed.
        assert p_stats["redPacketCount"] > 50, report
        assert report["drops"]["red_malformed"] == 0, report
        # The Chromium receiver negotiated RED, got it and played audio.
        codecs = [c["mimeType"] for c in red_consumer.rtp_parameters["codecs"]]
        assert codecs == ["audio/opus", "audio/red"], codecs
        assert "audio/red" in recv_result["negotiatedCodecs"], recv_result
        # RED carries the previous frame too: the RED receiver's packets are larger
        # than the unwrapped ones (getStats names the decoded codec, Opus, for both).
        red_out, opus_out = report["redConsumer"], report["opusConsumer"]
        red_size = red_out["byteCount"] / red_out["packetCount"]
        opus_size = opus_out["byteCount"] / opus_out["packetCount"]
        assert red_size > 1.3 * opus_size, (red_size, opus_size)
        assert recv_result["packetsReceived"] > 50, recv_result
        assert recv_result["totalSamplesReceived"] > 0, recv_result
        assert (recv_result["audioLevel"] or 0) > 1e-3, recv_result  # decoded tone, not silence
        # aiortc (Opus only) decoded the primary blocks to the 440 Hz tone.
        assert [c["mimeType"] for c in consumer.rtp_parameters["codecs"]] == ["audio/opus"]
        assert frame is not None
        powers = {
            hz: tone_power(pcm, len(frame.layout.channels), frame.sample_rate, hz)
            for hz in (220, 330, 440, 550, 880, 1000)
        }
        print("aiortc tone powers:", powers)
        assert powers[440] > 100 * max(v for h, v in powers.items() if h != 440), powers
        await receiver.stop()
        await leg.stop()
        transport.close()
