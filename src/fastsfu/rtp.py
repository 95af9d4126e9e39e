"""Pure-Python RTP/RTCP codecs (RFC 3550, RFC 8285) for the slow path, and the datapath's shared
constants. The datapath's reference forwarder, the specification tests hold the C code to, lives
with the tests (tests/reference_forwarder.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fastsfu import _rtp
from fastsfu.ortc import URI_ABS_CAPTURE_TIME, URI_AUDIO_LEVEL, URI_MID

DROP_REASONS: tuple[str, ...] = _rtp.DROP_REASONS
SLOW_STUN, SLOW_DTLS, SLOW_RTCP, SLOW_OTHER = _rtp.SLOW_STUN, _rtp.SLOW_DTLS, _rtp.SLOW_RTCP, _rtp.SLOW_OTHER
EVENT_TUPLE_LEARNED, EVENT_UNKNOWN_SSRC = _rtp.EVENT_TUPLE_LEARNED, _rtp.EVENT_UNKNOWN_SSRC
EVENT_TCP_CLOSED = _rtp.EVENT_TCP_CLOSED

KIND_MID = 1  # the extension kind each consumer fills with its own MID (RFC 8843 §15)
# Header extensions the datapath forwards, by URI -> kind (a small integer the C tables use).
# Anything else (abs-send-time, transport-cc: per-hop values) is stripped from forwarded packets.
KIND_AUDIO_LEVEL = 2  # ssrc-audio-level (RFC 6464): the datapath reads it for observers
LEVEL_RECENT = 64  # levels per producer and interval the datapath keeps in order (_rtp.pxd)
EXTENSION_KINDS: dict[str, int] = {
    URI_MID: KIND_MID,
    URI_AUDIO_LEVEL: KIND_AUDIO_LEVEL,
    URI_ABS_CAPTURE_TIME: 3,
}

Address = tuple[str, int]


class RtpError(ValueError):
    """A packet that does not parse."""


# ------------------------------------------------------------------------------------ RTP


@dataclass
class RtpPacket:
    """An RTP packet (RFC 3550 §5.1) with its header extensions as (id, bytes) pairs (RFC 8285)."""

    payload_type: int = 0
    sequence_number: int = 0
    timestamp: int = 0
    ssrc: int = 0
    marker: bool = False
    csrcs: list[int] = field(default_factory=list)
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    extension_profile: int = 0xBEDE
    payload: bytes = b""
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        h = parse_header(data)
        pkt = cls(
            payload_type=data[1] & 0x7F,
            sequence_number=h.seq,
            timestamp=h.timestamp,
            ssrc=h.ssrc,
            marker=bool(data[1] & 0x80),
            csrcs=list(struct.unpack_from(f"!{h.cc}I", data, 12)),
        )
        if h.ext_offset:
            pkt.extension_profile = h.profile
            pkt.extensions = list(iter_extensions(data[h.ext_offset : h.header_length], h.profile))
        end = len(data) - h.padding
        pkt.payload = data[h.header_length : end]
        pkt.padding = h.padding
        return pkt

    def __bytes__(self) -> bytes:
        ext = write_extensions(self.extensions, force_two_byte=self.extension_profile != 0xBEDE)
        b0 = 0x80 | (0x20 if self.padding else 0) | (0x10 if ext else 0) | len(self.csrcs)
        out = struct.pack(
            "!BBHII",
            b0,
            (0x80 if self.marker else 0) | self.payload_type,
            self.sequence_number,
            self.timestamp,
            self.ssrc,
        )
        out += struct.pack(f"!{len(self.csrcs)}I", *self.csrcs) + ext + self.payload
        if self.padding:
            out += bytes(self.padding - 1) + bytes([self.padding])
        return out


@dataclass(frozen=True)
class RtpHeader:
    cc: int
    seq: int
    timestamp: int
    ssrc: int
    header_length: int
    ext_offset: int  # 0 when there is no extension block
    ext_length: int
    profile: int
    padding: int


def parse_header(data: bytes) -> RtpHeader:
    """Validate lengths exactly as the datapath does (RFC 3550 §5.1, §5.3.1)."""
    n = len(data)
    if n < 12 or data[0] >> 6 != 2:
        raise RtpError("short packet or RTP version is not 2")
    cc = data[0] & 0x0F
    hlen = 12 + 4 * cc
    ext_offset = ext_length = profile = 0
    if data[0] & 0x10:
        if hlen + 4 > n:
            raise RtpError("extension header past the end")
        profile, words = struct.unpack_from("!HH", data, hlen)
        ext_offset = hlen + 4
        ext_length = 4 * words
        hlen = ext_offset + ext_length
    if hlen > n:
        raise RtpError("CSRC list or extension past the end")
    padding = 0
    if data[0] & 0x20:
        if n <= hlen or data[-1] == 0 or hlen + data[-1] > n:
            raise RtpError("padding count past the payload")
        padding = data[-1]
    seq, ts, ssrc = struct.unpack_from("!HII", data, 2)
    return RtpHeader(cc, seq, ts, ssrc, hlen, ext_offset, ext_length, profile, padding)


def iter_extensions(block: bytes, profile: int) -> list[tuple[int, bytes]]:
    """Elements of an extension block; a block we cannot parse further simply ends (RFC 8285 §4)."""
    if profile == 0xBEDE:
        two_byte = False
    elif profile & 0xFFF0 == 0x1000:
        two_byte = True
    else:
        return []
    out = []
    p, n = 0, len(block)
    while p < n:
        if block[p] == 0:  # padding between elements
            p += 1
            continue
        if two_byte:
            if p + 2 > n:
                break
            eid, length = block[p], block[p + 1]
            p += 2
        else:
            eid, length = block[p] >> 4, (block[p] & 0x0F) + 1
            if eid == 15:  # RFC 8285 §4.2: stop
                break
            p += 1
        if p + length > n:
            break
        out.append((eid, bytes(block[p : p + length])))
        p += length
    return out


def write_extensions(elements: list[tuple[int, bytes]], force_two_byte: bool = False) -> bytes:
    """Extension block with its 4-byte header; one-byte form when every element allows it."""
    if not elements:
        return b""
    two_byte = force_two_byte or any(eid > 14 or not 1 <= len(v) <= 16 for eid, v in elements)
    body = bytearray()
    for eid, value in elements:
        if two_byte:
            body += bytes([eid, len(value)])
        else:
            body.append(eid << 4 | (len(value) - 1))
        body += value
    body += bytes(-len(body) % 4)
    return struct.pack("!HH", 0x1000 if two_byte else 0xBEDE, len(body) // 4) + bytes(body)


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: packet types 192-223 in the second byte are RTCP."""
    return len(data) >= 2 and 192 <= data[1] <= 223


# ------------------------------------------------------------------------------------ RTCP

RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE, RTCP_APP, RTCP_RTPFB, RTCP_PSFB = 200, 201, 202, 203, 204, 205, 206


@dataclass
class ReportBlock:
    """RFC 3550 §6.4.1 reception report block."""

    ssrc: int
    fraction_lost: int
    packets_lost: int
    highest_sequence: int
    jitter: int
    lsr: int = 0
    dlsr: int = 0

    def __bytes__(self) -> bytes:
        lost = self.packets_lost & 0xFFFFFF  # 24-bit two's complement
        return struct.pack(
            "!IIIIII",
            self.ssrc,
            (self.fraction_lost << 24) | lost,
            self.highest_sequence,
            self.jitter,
            self.lsr,
            self.dlsr,
        )

    @classmethod
    def parse(cls, data: bytes, off: int) -> ReportBlock:
        ssrc, fl, hs, jit, lsr, dlsr = struct.unpack_from("!IIIIII", data, off)
        lost = fl & 0xFFFFFF
        if lost & 0x800000:
            lost -= 1 << 24
        return cls(ssrc, fl >> 24, lost, hs, jit, lsr, dlsr)


@dataclass
class RtcpPacket:
    """One RTCP packet of a compound: type, count field, and parsed content for SR/RR/BYE."""

    packet_type: int
    count: int
    ssrc: int
    body: bytes
    reports: list[ReportBlock] = field(default_factory=list)
    ntp_timestamp: int = 0
    rtp_timestamp: int = 0
    packet_count: int = 0
    octet_count: int = 0
    sources: list[int] = field(default_factory=list)


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """Split and parse a compound RTCP packet (RFC 3550 §6.1); raises RtpError on bad lengths."""
    out = []
    off = 0
    while off < len(data):
        if len(data) - off < 4 or data[off] >> 6 != 2:
            raise RtpError("RTCP header too short or version is not 2")
        count, pt = data[off] & 0x1F, data[off + 1]
        length = (struct.unpack_from("!H", data, off + 2)[0] + 1) * 4
        if off + length > len(data) or length < 8 and pt in (RTCP_SR, RTCP_RR):
            raise RtpError("RTCP length past the end")
        chunk = data[off : off + length]
        if chunk[0] & 0x20:
            pad = chunk[-1]
            if pad == 0 or pad > length - 4:
                raise RtpError("RTCP padding count past the packet")
            chunk = chunk[: length - pad]
        ssrc = struct.unpack_from("!I", chunk, 4)[0] if len(chunk) >= 8 else 0
        pkt = RtcpPacket(pt, count, ssrc, bytes(chunk[8:]))
        pos = 8
        if pt == RTCP_SR:
            if len(chunk) < 28:
                raise RtpError("RTCP SR too short")
            pkt.ntp_timestamp, pkt.rtp_timestamp, pkt.packet_count, pkt.octet_count = struct.unpack_from(
                "!QIII", chunk, 8
            )
            pos = 28
        if pt in (RTCP_SR, RTCP_RR):
            if pos + 24 * count > len(chunk):
                raise RtpError("RTCP report blocks past the end")
            pkt.reports = [ReportBlock.parse(chunk, pos + 24 * i) for i in range(count)]
        elif pt == RTCP_BYE:
            if 4 + 4 * count > len(chunk):
                raise RtpError("RTCP BYE sources past the end")
            pkt.sources = list(struct.unpack_from(f"!{count}I", chunk, 4))
        out.append(pkt)
        off += length
    return out


def _rtcp_header(pt: int, count: int, body_len: int) -> bytes:
    return struct.pack("!BBH", 0x80 | count, pt, (body_len + 4) // 4 - 1)


def build_sender_report(
    ssrc: int,
    ntp: int,
    rtp_ts: int,
    packets: int,
    octets: int,
    reports: list[ReportBlock] = (),  # type: ignore[assignment]
) -> bytes:
    body = struct.pack("!IQIII", ssrc, ntp, rtp_ts, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF)
    body += b"".join(bytes(r) for r in reports)
    return _rtcp_header(RTCP_SR, len(reports), len(body)) + body


def build_receiver_report(ssrc: int, reports: list[ReportBlock]) -> bytes:
    body = struct.pack("!I", ssrc) + b"".join(bytes(r) for r in reports)
    return _rtcp_header(RTCP_RR, len(reports), len(body)) + body


def build_sdes(chunks: list[tuple[int, str]]) -> bytes:
    """SDES with one CNAME item per (ssrc, cname) chunk (RFC 3550 §6.5); at most 31 chunks."""
    body = b""
    for ssrc, cname in chunks:
        value = cname.encode()[:255]
        chunk = struct.pack("!IBB", ssrc, 1, len(value)) + value + b"\x00"
        body += chunk + bytes(-len(chunk) % 4)
    return _rtcp_header(RTCP_SDES, len(chunks), len(body)) + body


def build_sdes_cname(ssrc: int, cname: str) -> bytes:
    return build_sdes([(ssrc, cname)])


def build_bye(ssrcs: list[int]) -> bytes:
    body = struct.pack(f"!{len(ssrcs)}I", *ssrcs)
    return _rtcp_header(RTCP_BYE, len(ssrcs), len(body)) + body
