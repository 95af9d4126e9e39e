"""Opus RED (RFC 2198) end to end: a router with audio/red forwards RED to a receiver that
negotiated it and unwraps it to plain Opus for one that did not, through real SRTP sockets
(docs/transports.md#opus-red)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import SrtpClient, client_caps, producer_params

from fastsfu import Engine, ortc
from fastsfu.rtp import RtpPacket

pytestmark = pytest.mark.loopback

OPUS, RED = 111, 63  # the sender's PTs, as Chromium numbers them
RED_CODECS: list[Any] = [
    {"kind": "audio", "mimeType": "audio/red", "clockRate": 48000, "channels": 2},
    {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2},
]


def red_producer_params(ssrc: int) -> dict[str, Any]:
    params = producer_params(ssrc, OPUS)
    params["codecs"].append(
        {"mimeType": "audio/red", "payloadType": RED, "clockRate": 48000, "channels": 2, "parameters": {}}
    )
    return params


def red_caps(opus_pt: int, red_pt: int) -> dict[str, Any]:
    caps = client_caps(opus_pt=opus_pt)
    caps["codecs"].append(
        {
            "kind": "audio",
            "mimeType": "audio/red",
            "preferredPayloadType": red_pt,
            "clockRate": 48000,
            "channels": 2,
        }
    )
    return caps


def red(blocks: list[tuple[int, int, bytes]], primary_pt: int, primary: bytes) -> bytes:
    """An RFC 2198 §3 payload: (pt, timestamp offset, data) per redundant block, then the primary."""
    headers = b"".join(bytes([0x80 | pt]) + (off << 10 | len(d)).to_bytes(3, "big") for pt, off, d in blocks)
    return headers + bytes([primary_pt]) + b"".join(d for _, _, d in blocks) + primary


def test_red_forwarded_to_red_receivers_and_unwrapped_for_opus_receivers() -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router(RED_CODECS)
            # Opus before RED whatever the order asked (mediasoup-client sends with the first).
            assert [c["mimeType"] for c in router.rtp_capabilities["codecs"]] == ["audio/opus", "audio/red"]
            clients = [SrtpClient() for _ in range(3)]
            transports = []
            for c in clients:
                t = router.create_plain_transport(enable_srtp=True)
                t.connect("127.0.0.1", c.port, c.srtp_parameters)
                c.set_server_parameters(t.srtp_parameters)
                transports.append(t)
            producer = transports[0].produce(red_producer_params(4242))
            with_red = transports[1].consume(producer.id, red_caps(opus_pt=100, red_pt=101))
            opus_only = transports[2].consume(producer.id, client_caps(opus_pt=109))
            assert [c["mimeType"] for c in with_red.rtp_parameters["codecs"]] == ["audio/opus", "audio/red"]
            assert [c["mimeType"] for c in opus_only.rtp_parameters["codecs"]] == ["audio/opus"]
            server = (transports[0].tuple["localIp"], transports[0].tuple["localPort"])

            prev, primary = os.urandom(37), os.urandom(80)
            good = red([(OPUS, 960, prev)], OPUS, primary)
            sent = [
                good,  # one redundant block
                red([], OPUS, primary),  # no redundancy: the header is one byte
                red([(OPUS, 1920, b""), (OPUS, 960, prev)], OPUS, primary),  # two, one empty
                red([(OPUS, 960, prev + primary)], OPUS, b""),  # block length past the end: drop
                red([(OPUS, 960, prev)], 0, primary),  # a primary that is not Opus: drop
                red([(OPUS, 0, b"")] * 16, OPUS, primary),  # 17 blocks: drop
                bytes([0x80 | OPUS, 0x0F]),  # a header cut short: drop
            ]
            for i, payload in enumerate(sent):
                clients[0].send_rtp(server, RtpPacket(RED, 100 + i, 48000 * i, 4242, payload=payload))
                await asyncio.sleep(0.002)
            # A plain Opus packet of the same producer reaches both as Opus.
            clients[0].send_rtp(server, RtpPacket(OPUS, 107, 7 * 48000, 4242, payload=primary))
            # Padding only, at the RED PT (Chromium's bandwidth probes): no media, so no receiver
            # gets it (an empty payload stops aiortc's decoder), and the next packet takes its
            # sequence number so that the receivers see no loss.
            clients[0].send_rtp(server, RtpPacket(RED, 108, 8 * 48000, 4242, payload=b"", padding=32))
            clients[0].send_rtp(server, RtpPacket(OPUS, 109, 8 * 48000, 4242, payload=primary))

            assert clients[1].rx is not None and clients[2].rx is not None
            got_red = [
                RtpPacket.parse(clients[1].rx.unprotect(d)) for d in await clients[1].receive_rtp(5, 5)
            ]
            got_opus = [
                RtpPacket.parse(clients[2].rx.unprotect(d)) for d in await clients[2].receive_rtp(5, 5)
            ]
            assert [p.sequence_number for p in got_red] == [100, 101, 102, 107, 108]
            assert [p.sequence_number for p in got_opus] == [100, 101, 102, 107, 108]
            assert [p.padding for p in got_red] == [p.padding for p in got_opus] == [0, 0, 0, 0, 0]
            # RED as sent, with every block header naming the receiver's Opus PT (100).
            assert [p.payload_type for p in got_red] == [101, 101, 101, 100, 100]
            assert [p.payload for p in got_red] == [
                red([(100, 960, prev)], 100, primary),
                red([], 100, primary),
                red([(100, 1920, b""), (100, 960, prev)], 100, primary),
                primary,
                primary,
            ]
            # Unwrapped: the primary block alone, at the receiver's Opus PT.
            assert [p.payload_type for p in got_opus] == [109] * 5
            assert [p.payload for p in got_opus] == [primary] * 5
            assert [p.timestamp for p in got_opus] == [0, 48000, 96000, 7 * 48000, 8 * 48000]
            # The four malformed packets: a counted drop for each receiver, nothing sent.
            assert producer.get_stats()[0]["redPacketCount"] == 3
            drops = engine.datapath.stats()["drops"]
            assert drops["red_malformed"] == 4 * 2
            for c in clients:
                c.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_opus_producer_reaches_red_receiver_as_plain_opus() -> None:
    """A producer that never sends RED: its consumers get no audio/red codec and plain Opus."""

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router(RED_CODECS)
            clients = [SrtpClient() for _ in range(2)]
            transports = []
            for c in clients:
                t = router.create_plain_transport(enable_srtp=True)
                t.connect("127.0.0.1", c.port, c.srtp_parameters)
                c.set_server_parameters(t.srtp_parameters)
                transports.append(t)
            producer = transports[0].produce(producer_params(77))
            consumer = transports[1].consume(producer.id, red_caps(opus_pt=100, red_pt=101))
            assert [c["mimeType"] for c in consumer.rtp_parameters["codecs"]] == ["audio/opus"]
            server = (transports[0].tuple["localIp"], transports[0].tuple["localPort"])
            payload = os.urandom(60)
            clients[0].send_rtp(server, RtpPacket(OPUS, 1, 960, 77, payload=payload))
            # A RED packet from a producer that did not declare RED is an unknown payload type.
            clients[0].send_rtp(server, RtpPacket(RED, 2, 1920, 77, payload=red([], OPUS, payload)))
            assert clients[1].rx is not None
            got = [RtpPacket.parse(clients[1].rx.unprotect(d)) for d in await clients[1].receive_rtp(2, 2)]
            assert [(p.payload_type, p.payload) for p in got] == [(100, payload)]
            assert engine.datapath.stats()["drops"]["unknown_pt"] == 1
            for c in clients:
                c.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_router_red_needs_opus() -> None:
    with pytest.raises(ortc.OrtcError, match="audio/red needs audio/opus"):
        ortc.generate_router_rtp_capabilities([RED_CODECS[0]])


@pytest.mark.parametrize("impl", ["datapath", "reference"])
def test_red_payload_types_are_checked_against_the_opus_pt_of_each_side(impl: str) -> None:
    """set_producer_red and set_consumer_red (and the pure-Python reference) take -1 (none) or
    0..127, but not the Opus PT of that producer or consumer, whose blocks the RED packets carry:
    the consumer's own Opus PT is refused, the producer's is not."""
    from reference_forwarder import ReferenceForwarder

    from fastsfu import _rtp

    fw: Any = ReferenceForwarder()
    if impl == "datapath":
        fw = _rtp.Datapath(max_sockets=1, max_transports=2, max_producers=1, max_consumers=1)
    sock = fw.add_socket(-1, socket.AF_INET, False)
    t_in, t_out = fw.add_transport(sock), fw.add_transport(sock)
    p = fw.add_producer(t_in, 1111, OPUS, 48000, {})
    c = fw.add_consumer(p, t_out, 2222, 100, {})
    for setter, slot, opus_pt in ((fw.set_producer_red, p, OPUS), (fw.set_consumer_red, c, 100)):
        for bad in (-2, 128, opus_pt):
            with pytest.raises(ValueError, match="RED payload type must be 0..127"):
                setter(slot, bad)
        for good in (RED, 0, 127, -1):
            setter(slot, good)
    fw.set_consumer_red(c, OPUS)  # the producer's Opus PT: another number on the consumer's side


def test_opus_red_room_policy_routes_red_and_defaults_off() -> None:
    """`[voice] opus_red` (VoiceSettings.opus_red): the rooms' routers list audio/red after Opus."""
    from fastsfu.harmony.session import VoiceRooms, VoiceSettings

    async def main() -> None:
        async with Engine() as engine:
            on = VoiceRooms(engine, VoiceSettings(opus_red=True)).acquire(("guild", "red"))
            off = VoiceRooms(engine).acquire(("guild", "plain"))
            assert [c["mimeType"] for c in on.router.rtp_capabilities["codecs"]] == [
                "audio/opus",
                "audio/red",
            ]
            assert [c["mimeType"] for c in off.router.rtp_capabilities["codecs"]] == ["audio/opus"]

    asyncio.run(asyncio.wait_for(main(), 30))


def test_opus_red_config_knob(tmp_path: Path) -> None:
    """TOML `[voice] opus_red`, FASTSFU_OPUS_RED and --opus-red reach VoiceSettings."""
    from fastsfu.server.config import load_config

    assert load_config(None, {}, {}).voice.opus_red is False
    toml = tmp_path / "fastsfu.toml"
    toml.write_text("[voice]\nopus_red = true\n")
    assert load_config(str(toml), {}, {}).voice.opus_red is True
    assert load_config(str(toml), {"FASTSFU_OPUS_RED": "false"}, {}).voice.opus_red is False
    assert load_config(None, {}, {"voice.opus_red": "true"}).voice.opus_red is True
