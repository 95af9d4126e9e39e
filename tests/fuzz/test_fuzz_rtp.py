"""Fuzz RTP/RTCP: the pure-Python codecs raise only RtpError, and the Cython datapath and the Python
reference forwarder, fed the same random and mutated (S)RTP/RTCP datagrams, agree byte for byte on
outputs, slow-path hand-offs, drops by reason, events and counters (reusing the differential harness)."""

from __future__ import annotations

import contextlib
import random

from hypothesis import given
from hypothesis import strategies as st
from mutations import budget, corpus, mutated, seeded
from test_datapath_differential import Pair, Sender, assert_counters_agree, build, make_packet

from fastsfu import rtp

REPORT = rtp.ReportBlock(0xCAFEBABE, 12, 34, 0x10005, 7, 0x11223344, 5)


def rtcp_seeds(ssrc: int) -> list[bytes]:
    return [
        rtp.build_sender_report(ssrc, 0x0102030405060708, 960, 10, 1600, [REPORT]),
        rtp.build_receiver_report(ssrc, [REPORT, REPORT]),
        rtp.build_sdes([(ssrc, "cname"), (ssrc + 1, "x" * 40)]),
        rtp.build_bye([ssrc, 7]),
        rtp.build_receiver_report(ssrc, []) + rtp.build_sdes_cname(ssrc, "compound"),
    ]


CODEC_SEEDS = [
    bytes(
        rtp.RtpPacket(
            payload_type=111,
            sequence_number=65535,
            timestamp=2**32 - 1,
            ssrc=0xCAFEBABE,
            marker=True,
            csrcs=[1, 2],
            extensions=[(1, b"\x80"), (14, bytes(16))],
            payload=b"opus",
            padding=3,
        )
    ),
    bytes(rtp.RtpPacket(payload_type=96, extensions=[(15, b"ab"), (200, b"")], extension_profile=0x1000)),
    *rtcp_seeds(0xCAFEBABE),
    *corpus("rtp"),
]


@budget(500)
@given(seeded(CODEC_SEEDS))
def test_codecs_raise_only_rtp_error(data: bytes) -> None:
    for parse in (rtp.RtpPacket.parse, rtp.parse_header, rtp.parse_rtcp):
        with contextlib.suppress(rtp.RtpError):
            parse(data)


def _plain(rng: random.Random, s: Sender) -> bytes:
    srtp, s.srtp = s.srtp, None
    try:
        data = make_packet(rng, s)
    finally:
        s.srtp = srtp
    assert data is not None
    return data


@budget(100)
@given(st.integers(0, 2**32 - 1), st.data())
def test_datapath_matches_reference_on_fuzzed_datagrams(seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    pair = Pair()
    sock, senders, transports = build(rng, pair)
    now = 1_000_000_000_000
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        now += data.draw(st.sampled_from([0, 1, 20_000_000, 40_000_000, 10**10]), label="dt")
        s = senders[data.draw(st.integers(0, len(senders) - 1), label="sender")]
        port = 7000 + transports.index(s.transport)
        how = data.draw(
            st.sampled_from(["valid", "mutate_plain", "mutate_wire", "rtcp", "random", "other_port"]),
            label="how",
        )
        plain = _plain(rng, s)
        if how == "rtcp":
            plain = data.draw(st.sampled_from(rtcp_seeds(s.ssrc)).flatmap(mutated), label="rtcp")
        elif how == "mutate_plain":
            plain = data.draw(mutated(plain), label="plain")
        protect = None if s.srtp is None else s.srtp.protect_rtcp if how == "rtcp" else s.srtp.protect
        try:
            wire = plain if protect is None else protect(plain)
        except Exception:
            continue  # libsrtp refuses to protect it (too short, its own replay list): no such packet
        if how == "mutate_wire":
            wire = data.draw(mutated(wire), label="wire")
        elif how == "random":
            wire = data.draw(st.binary(max_size=200), label="random")
        elif how == "other_port":
            port = data.draw(st.sampled_from([9999, port + 1]), label="port")
        pair.feed(sock, wire, "127.0.0.1", port, now)
    assert_counters_agree(pair, senders)
