"""STUN codec for an ICE-lite server (RFC 8489): binding messages and the ICE attributes (RFC 8445).

Parsing keeps the raw bytes and attribute offsets, so MESSAGE-INTEGRITY and FINGERPRINT are
checked over exactly what was received; building appends both last, as RFC 8489 §14 requires.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field

from aioquic.buffer import Buffer, BufferReadError

MAGIC_COOKIE = 0x2112A442
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7

# Message types (RFC 8489 §5, §18.2): Binding is the only method ICE uses.
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attributes (RFC 8489 §18.3, RFC 8445 §16.1, ICE renomination draft).
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024
ATTR_USE_CANDIDATE = 0x0025
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A
ATTR_NOMINATION = 0xC001

# Comprehension-required attributes (< 0x8000) this codec understands; any other one in a
# request gets a 420 (RFC 8489 §6.3.1). 0x8000 and above are optional and ignored.
KNOWN_REQUIRED = frozenset(
    {
        ATTR_MAPPED_ADDRESS,
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_ERROR_CODE,
        ATTR_UNKNOWN_ATTRIBUTES,
        ATTR_REALM,
        ATTR_NONCE,
        ATTR_MESSAGE_INTEGRITY_SHA256,
        ATTR_XOR_MAPPED_ADDRESS,
        ATTR_PRIORITY,
        ATTR_USE_CANDIDATE,
    }
)

ERROR_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    420: "Unknown Attribute",
    487: "Role Conflict",
    500: "Server Error",
}


class StunError(ValueError):
    """Bytes that are not a well-formed STUN message."""


@dataclass
class StunMessage:
    """A parsed or to-be-built STUN message; attributes are (type, raw value) in wire order."""

    message_type: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    raw: bytes = b""
    integrity_offset: int | None = None  # where the MESSAGE-INTEGRITY attribute starts in raw
    fingerprint_offset: int | None = None

    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def has(self, attr_type: int) -> bool:
        return any(t == attr_type for t, _ in self.attributes)


def is_stun(data: bytes) -> bool:
    """Cheap demux check: two zero bits, the magic cookie, a 4-byte-aligned length (RFC 7983 §7)."""
    return (
        len(data) >= HEADER_LENGTH
        and data[0] < 4
        and data[4:8] == b"\x21\x12\xa4\x42"
        and (data[2] << 8 | data[3]) % 4 == 0
    )


def parse_message(data: bytes) -> StunMessage:
    """Parse and validate framing; raises StunError. Integrity is checked separately."""
    if len(data) < HEADER_LENGTH:
        raise StunError("shorter than a STUN header")
    buf = Buffer(data=data)
    try:
        message_type = buf.pull_uint16()
        length = buf.pull_uint16()
        cookie = buf.pull_uint32()
        transaction_id = buf.pull_bytes(12)
        if message_type & 0xC000 or cookie != MAGIC_COOKIE:
            raise StunError("not STUN: leading bits or magic cookie")
        if length % 4 or length != len(data) - HEADER_LENGTH:
            raise StunError("message length does not match the datagram")
        msg = StunMessage(message_type, transaction_id, raw=bytes(data))
        while not buf.eof():
            start = buf.tell()
            attr_type = buf.pull_uint16()
            attr_len = buf.pull_uint16()
            value = buf.pull_bytes(attr_len)
            buf.pull_bytes(-attr_len % 4)  # padding (RFC 8489 §14): content ignored
            if msg.fingerprint_offset is not None:
                raise StunError("attribute after FINGERPRINT")
            if attr_type == ATTR_FINGERPRINT:
                msg.fingerprint_offset = start
            elif msg.integrity_offset is not None:
                continue  # RFC 8489 §14.5: only FINGERPRINT may follow MESSAGE-INTEGRITY
            elif attr_type == ATTR_MESSAGE_INTEGRITY:
                msg.integrity_offset = start
            msg.attributes.append((attr_type, value))
    except BufferReadError:
        raise StunError("attribute runs past the end of the message") from None
    return msg


def _with_length(raw: bytes, end: int, extra: int) -> bytes:
    """raw[:end] with the header length rewritten as if the message ended `extra` bytes later."""
    return raw[:2] + struct.pack("!H", end - HEADER_LENGTH + extra) + raw[4:end]


def verify_integrity(msg: StunMessage, key: bytes) -> bool:
    """HMAC-SHA1 over the message up to MESSAGE-INTEGRITY (RFC 8489 §14.5), constant time."""
    if msg.integrity_offset is None:
        return False
    value = msg.get(ATTR_MESSAGE_INTEGRITY)
    if value is None or len(value) != 20:
        return False
    expected = hmac.new(key, _with_length(msg.raw, msg.integrity_offset, 24), hashlib.sha1).digest()
    return hmac.compare_digest(expected, value)


def verify_fingerprint(msg: StunMessage) -> bool:
    """CRC-32 of the message up to FINGERPRINT, XOR 0x5354554E (RFC 8489 §14.7)."""
    if msg.fingerprint_offset is None:
        return False
    value = msg.get(ATTR_FINGERPRINT)
    if value is None or len(value) != 4:
        return False
    crc = zlib.crc32(msg.raw[: msg.fingerprint_offset]) ^ FINGERPRINT_XOR
    return int.from_bytes(value, "big") == crc


def build_message(
    message_type: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Encode a message; MESSAGE-INTEGRITY (if a key is given) then FINGERPRINT come last."""
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    size = sum(4 + len(v) + (-len(v) % 4) for _, v in attributes)
    buf = Buffer(capacity=HEADER_LENGTH + size + 24 + 8)
    buf.push_uint16(message_type)
    buf.push_uint16(size)
    buf.push_uint32(MAGIC_COOKIE)
    buf.push_bytes(transaction_id)
    for attr_type, value in attributes:
        buf.push_uint16(attr_type)
        buf.push_uint16(len(value))
        buf.push_bytes(value + bytes(-len(value) % 4))
    out = buf.data
    if integrity_key is not None:
        mac = hmac.new(integrity_key, _with_length(out, len(out), 24), hashlib.sha1).digest()
        out = _with_length(out, len(out), 24) + struct.pack("!HH", ATTR_MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        head = _with_length(out, len(out), 8)
        crc = zlib.crc32(head) ^ FINGERPRINT_XOR
        out = head + struct.pack("!HHI", ATTR_FINGERPRINT, 4, crc)
    return out


def encode_xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 8489 §14.2): port ^ 0x2112, address ^ cookie (|| tid for v6)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    mask = struct.pack("!I", MAGIC_COOKIE) + (transaction_id if addr.version == 6 else b"")
    packed = bytes(a ^ b for a, b in zip(addr.packed, mask, strict=False))
    return struct.pack("!BBH", 0, 1 if addr.version == 4 else 2, port ^ (MAGIC_COOKIE >> 16)) + packed


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    if len(value) < 8:
        raise StunError("XOR-MAPPED-ADDRESS too short")
    family, xport = struct.unpack_from("!xBH", value)
    size = {1: 4, 2: 16}.get(family)
    if size is None or len(value) != 4 + size:
        raise StunError("XOR-MAPPED-ADDRESS family or length invalid")
    mask = struct.pack("!I", MAGIC_COOKIE) + transaction_id
    packed = bytes(a ^ b for a, b in zip(value[4:], mask, strict=False))
    return str(ipaddress.ip_address(packed)), xport ^ (MAGIC_COOKIE >> 16)


def encode_error_code(code: int, reason: str | None = None) -> bytes:
    """ERROR-CODE value (RFC 8489 §14.8): class and number, then a UTF-8 reason phrase."""
    text = (reason if reason is not None else ERROR_REASONS.get(code, "")).encode()[:763]
    return struct.pack("!HBB", 0, code // 100, code % 100) + text


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE too short")
    return (value[2] & 0x07) * 100 + value[3], value[4:].decode("utf-8", "replace")


def encode_unknown_attributes(types: list[int]) -> bytes:
    return b"".join(struct.pack("!H", t) for t in types)
