"""fastsfu used as an embedder would, with its typed API: test_types.py type-checks this file with
mypy --strict and runs it, then holds what it returned against the TypedDicts."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from dataclasses import dataclass
from typing import assert_type

from fastsfu import Engine, ortc
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key
from fastsfu.types import (
    ConsumerDump,
    ConsumerStats,
    DatapathConsumerStats,
    DatapathProducerStats,
    DatapathStats,
    DatapathTransportStats,
    DtlsParameters,
    EngineStats,
    IceCandidate,
    IceParameters,
    PlainTransportDump,
    ProducerDump,
    ProducerStats,
    RouterDump,
    RtpCapabilities,
    RtpCodecCapability,
    RtpParameters,
    SrtpParameters,
    TransportStats,
    TransportTuple,
    WebRtcTransportDump,
)

SUITE = "AES_CM_128_HMAC_SHA1_80"
OPUS_PT = 111
PACKETS = 5


def opus_parameters(ssrc: int) -> RtpParameters:
    """A sender's RtpParameters, written as a literal (as mediasoup-client would send them)."""
    return {
        "mid": "0",
        "codecs": [
            {
                "mimeType": "audio/opus",
                "payloadType": OPUS_PT,
                "clockRate": 48000,
                "channels": 2,
                "parameters": {"minptime": 10, "useinbandfec": 1},
                "rtcpFeedback": [],
            }
        ],
        "headerExtensions": [{"uri": ortc.URI_AUDIO_LEVEL, "id": 1, "encrypt": False}],
        "encodings": [{"ssrc": ssrc, "dtx": False}],
        "rtcp": {"cname": "typing-check", "reducedSize": True},
    }


def receiver_capabilities(pt: int) -> RtpCapabilities:
    return {
        "codecs": [
            {
                "kind": "audio",
                "mimeType": "audio/opus",
                "preferredPayloadType": pt,
                "clockRate": 48000,
                "channels": 2,
            }
        ],
        "headerExtensions": [
            {"kind": "audio", "uri": ortc.URI_AUDIO_LEVEL, "preferredId": 12, "direction": "sendrecv"}
        ],
    }


@dataclass
class Snapshot:
    """Everything the API returned, for the test to compare with the TypedDicts at run time."""

    router_capabilities: RtpCapabilities
    router_dump: RouterDump
    srtp_parameters: SrtpParameters | None
    plain_tuple: TransportTuple
    plain_dump: PlainTransportDump
    plain_stats: list[TransportStats]
    producer_parameters: RtpParameters
    producer_stats: list[ProducerStats]
    producer_dump: ProducerDump
    consumer_parameters: RtpParameters
    consumer_stats: list[ConsumerStats]
    consumer_dump: ConsumerDump
    ortc_parameters: RtpParameters
    ice_parameters: IceParameters
    ice_candidates: list[IceCandidate]
    dtls_parameters: DtlsParameters
    webrtc_dump: WebRtcTransportDump
    webrtc_stats: list[TransportStats]
    engine_stats: EngineStats
    # The datapath's own counters (engine.datapath), which the stats above are made from.
    datapath_stats: DatapathStats
    datapath_transport_stats: DatapathTransportStats
    datapath_producer_stats: DatapathProducerStats
    datapath_consumer_stats: DatapathConsumerStats


async def run_room() -> Snapshot:
    """One SRTP sender and one plain receiver through a router, plus a WebRTC transport."""
    media_codecs: list[RtpCodecCapability] = [
        {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2}
    ]
    engine = Engine()
    sender_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender_sock.bind(("127.0.0.1", 0))
        receiver_sock.bind(("127.0.0.1", 0))
        receiver_sock.setblocking(False)
        router = engine.create_router(media_codecs)
        key = generate_key(SUITE)
        ingest = router.create_plain_transport(
            listen_ip="127.0.0.1", enable_srtp=True, srtp_crypto_suite=SUITE
        )
        remote_srtp: SrtpParameters = {"cryptoSuite": SUITE, "keyBase64": base64.b64encode(key).decode()}
        ingest.connect("127.0.0.1", sender_sock.getsockname()[1], remote_srtp)
        producer = ingest.produce(opus_parameters(0x1234))

        egress = router.create_plain_transport(listen_ip="127.0.0.1")
        egress.connect("127.0.0.1", receiver_sock.getsockname()[1])
        consumer = egress.consume(producer.id, receiver_capabilities(100))
        assert_type(consumer.rtp_parameters, RtpParameters)

        # RTP through the real sockets, so that the counters in the stats are not all zero.
        srtp = SrtpContext(SUITE, key, inbound=False)
        server = ("127.0.0.1", ingest.tuple["localPort"])
        for seq in range(PACKETS):
            pkt = RtpPacket(
                payload_type=OPUS_PT,
                sequence_number=seq,
                timestamp=960 * seq,
                ssrc=0x1234,
                payload=b"\xf8" * 20,
            )
            sender_sock.sendto(srtp.protect(bytes(pkt)), server)
        received = 0
        for _ in range(200):  # 2 s at most
            await asyncio.sleep(0.01)
            received = consumer.get_stats()[0]["packetCount"]
            if received >= PACKETS:
                break
        assert received == PACKETS, received

        webrtc = router.create_webrtc_transport(listen_ip="127.0.0.1")
        ours = webrtc.dtls_parameters
        webrtc.connect({"role": "client", "fingerprints": [ours["fingerprints"][0]]})
        producer_stats = producer.get_stats()
        jitter: int = producer_stats[0]["jitter"]
        assert jitter >= 0
        wire = json.dumps(producer.rtp_parameters)
        return Snapshot(
            router_capabilities=router.rtp_capabilities,
            router_dump=router.dump(),
            srtp_parameters=ingest.srtp_parameters,
            plain_tuple=egress.tuple,
            plain_dump=ingest.dump(),
            plain_stats=ingest.get_stats(),
            producer_parameters=ortc.validate_rtp_parameters(json.loads(wire)),
            producer_stats=producer_stats,
            producer_dump=producer.dump(),
            consumer_parameters=consumer.rtp_parameters,
            consumer_stats=consumer.get_stats(),
            consumer_dump=consumer.dump(),
            ortc_parameters=ortc.get_consumer_rtp_parameters(
                producer.rtp_parameters, router.rtp_capabilities, receiver_capabilities(101), ssrc=77
            ),
            ice_parameters=webrtc.restart_ice(),
            ice_candidates=webrtc.ice_candidates,
            dtls_parameters=ours,
            webrtc_dump=webrtc.dump(),
            webrtc_stats=webrtc.get_stats(),
            engine_stats=engine.stats(),
            datapath_stats=engine.datapath.stats(),
            datapath_transport_stats=engine.datapath.transport_stats(ingest.slot),
            datapath_producer_stats=engine.datapath.producer_stats(producer.slot),
            datapath_consumer_stats=engine.datapath.consumer_stats(consumer.slot),
        )
    finally:
        engine.close()
        sender_sock.close()
        receiver_sock.close()


if __name__ == "__main__":
    print(asyncio.run(run_room()))
