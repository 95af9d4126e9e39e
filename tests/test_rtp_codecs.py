"""Pure-Python RTP and RTCP codecs (the datapath's reference and the slow path)."""

from __future__ import annotations

import pytest

from fastsfu import rtp


def test_rtp_round_trip_with_everything() -> None:
    pkt = rtp.RtpPacket(
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
    data = bytes(pkt)
    assert data[-1] == 3 and data[0] & 0x30 == 0x30  # P and X bits set
    assert rtp.RtpPacket.parse(data) == pkt


def test_two_byte_extensions_for_large_ids_and_empty_values() -> None:
    block = rtp.write_extensions([(200, b""), (3, b"abc")])
    assert block[:2] == b"\x10\x00"
    assert rtp.iter_extensions(block[4:], 0x1000) == [(200, b""), (3, b"abc")]


def test_one_byte_extension_id_15_stops_parsing() -> None:
    # RFC 8285 §4.2: ID 15 ends the block; padding bytes are skipped.
    block = bytes([0x10, 0xAA, 0x00, 0xF0, 0x20, 0xBB])
    assert rtp.iter_extensions(block, 0xBEDE) == [(1, b"\xaa")]


def test_unknown_extension_profile_has_no_elements() -> None:
    assert rtp.iter_extensions(b"\x10\xaa\x00\x00", 0xABCD) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80" * 11,
        b"\x40" + bytes(11),
        b"\x8f" + bytes(20),
        b"\x90" + bytes(11) + b"\xbe\xde\x00\x09",
        b"\xa0" + bytes(11) + b"\x00",
    ],
)
def test_rtp_parse_errors(data: bytes) -> None:
    with pytest.raises(rtp.RtpError):
        rtp.parse_header(data)


def test_rtcp_sr_rr_sdes_bye_round_trip() -> None:
    block = rtp.ReportBlock(
        ssrc=7, fraction_lost=25, packets_lost=-3, highest_sequence=70000, jitter=12, lsr=5, dlsr=6
    )
    compound = (
        rtp.build_sender_report(1, 0x0102030405060708, 960, 10, 1000, [block])
        + rtp.build_receiver_report(2, [block])
        + rtp.build_sdes_cname(1, "cname")
        + rtp.build_bye([1, 2])
    )
    sr, rr, sdes, bye = rtp.parse_rtcp(compound)
    assert (sr.packet_type, sr.ssrc, sr.ntp_timestamp, sr.rtp_timestamp, sr.packet_count, sr.octet_count) == (
        rtp.RTCP_SR,
        1,
        0x0102030405060708,
        960,
        10,
        1000,
    )
    assert sr.reports == [block] and rr.reports == [block] and rr.ssrc == 2
    assert sdes.packet_type == rtp.RTCP_SDES and b"cname" in sdes.body
    assert bye.sources == [1, 2]


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\xc9\x00",
        b"\x40\xc9\x00\x01" + bytes(4),
        b"\x80\xc9\x00\x05" + bytes(4),
        b"\x81\xc9\x00\x01" + bytes(4),
        b"\xa0\xc9\x00\x01" + bytes(3) + b"\x09",
        b"\x80\xc8\x00\x01" + bytes(4),
    ],
)
def test_rtcp_parse_errors(data: bytes) -> None:
    with pytest.raises(rtp.RtpError):
        rtp.parse_rtcp(data)


def test_is_rtcp_follows_rfc5761() -> None:
    assert rtp.is_rtcp(b"\x80\xc8") and rtp.is_rtcp(b"\x80\xdf")
    assert not rtp.is_rtcp(b"\x80\x6f") and not rtp.is_rtcp(b"\x80\xe0")
