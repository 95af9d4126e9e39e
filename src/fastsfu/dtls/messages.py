"""DTLS 1.2 handshake codecs (RFC 6347 §4.2, RFC 5246 §7.4, RFC 8422 §5) on `aioquic.buffer.Buffer`.

Parsers take one reassembled message body and raise `DecodeError` on anything malformed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aioquic import tls
from aioquic.buffer import Buffer, BufferReadError
from aioquic.tls import pull_block, pull_list, pull_opaque, push_block, push_list, push_opaque

T = TypeVar("T")

# Handshake types (RFC 5246 §7.4, RFC 6347 §4.3.2).
HT_CLIENT_HELLO = 1
HT_SERVER_HELLO = 2
HT_HELLO_VERIFY_REQUEST = 3
HT_CERTIFICATE = 11
HT_SERVER_KEY_EXCHANGE = 12
HT_CERTIFICATE_REQUEST = 13
HT_SERVER_HELLO_DONE = 14
HT_CERTIFICATE_VERIFY = 15
HT_CLIENT_KEY_EXCHANGE = 16
HT_FINISHED = 20

# Extensions (RFC 8422 §5.1, RFC 5246 §7.4.1.4.1, RFC 5764 §4.1.1, RFC 7627 §5.1, RFC 5746 §3.2).
EXT_SUPPORTED_GROUPS = 10
EXT_EC_POINT_FORMATS = 11
EXT_SIGNATURE_ALGORITHMS = 13
EXT_USE_SRTP = 14
EXT_EXTENDED_MASTER_SECRET = 23
EXT_RENEGOTIATION_INFO = 0xFF01

CIPHER_ECDHE_ECDSA_AES_128_GCM_SHA256 = 0xC02B
CIPHER_EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF  # RFC 5746 §3.3
GROUP_X25519 = 0x001D
GROUP_SECP256R1 = 0x0017
SIG_ECDSA_SECP256R1_SHA256 = 0x0403
CERT_TYPE_ECDSA_SIGN = 64  # RFC 8422 §5.5
CURVE_TYPE_NAMED = 3  # RFC 8422 §5.4
POINT_FORMAT_UNCOMPRESSED = 0

HANDSHAKE_HEADER_LENGTH = 12
_HS_HEADER = struct.Struct("!B3sH3s3s")

# Alerts (RFC 5246 §7.2).
ALERT_WARNING = 1
ALERT_FATAL = 2
ALERT_CLOSE_NOTIFY = 0
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_HANDSHAKE_FAILURE = 40
ALERT_BAD_CERTIFICATE = 42
ALERT_UNSUPPORTED_CERTIFICATE = 43
ALERT_ILLEGAL_PARAMETER = 47
ALERT_DECODE_ERROR = 50
ALERT_DECRYPT_ERROR = 51
ALERT_PROTOCOL_VERSION = 70
ALERT_INSUFFICIENT_SECURITY = 71
ALERT_INTERNAL_ERROR = 80
ALERT_UNSUPPORTED_EXTENSION = 110


class DecodeError(Exception):
    """A malformed handshake message: answered with a fatal decode_error alert."""


def _parse(data: bytes, pull: Callable[[Buffer], T]) -> T:
    buf = Buffer(data=data)
    try:
        value = pull(buf)
    except (BufferReadError, tls.Alert, ValueError) as exc:
        raise DecodeError(str(exc) or type(exc).__name__) from exc
    if not buf.eof():
        raise DecodeError("trailing bytes after a handshake message")
    return value


def _build(push: Callable[[Buffer], None], capacity: int = 4096) -> bytes:
    buf = Buffer(capacity=capacity)
    push(buf)
    return buf.data


# ---- Handshake header (RFC 6347 §4.2.2) ----


@dataclass(slots=True)
class HandshakeFragment:
    msg_type: int
    length: int
    message_seq: int
    fragment_offset: int
    body: bytes


def parse_handshake_fragments(data: bytes) -> list[HandshakeFragment]:
    """Several handshake fragments may share one record."""
    fragments: list[HandshakeFragment] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < HANDSHAKE_HEADER_LENGTH:
            raise DecodeError("truncated handshake header")
        msg_type, length, seq, offset, frag_len = _HS_HEADER.unpack_from(data, pos)
        length_i, offset_i, frag_len_i = (int.from_bytes(x, "big") for x in (length, offset, frag_len))
        pos += HANDSHAKE_HEADER_LENGTH
        if end - pos < frag_len_i or offset_i + frag_len_i > length_i:
            raise DecodeError("handshake fragment outside its message")
        fragments.append(HandshakeFragment(msg_type, length_i, seq, offset_i, data[pos : pos + frag_len_i]))
        pos += frag_len_i
    return fragments


def encode_handshake_header(
    msg_type: int, length: int, message_seq: int, offset: int, fragment_length: int
) -> bytes:
    return _HS_HEADER.pack(
        msg_type,
        length.to_bytes(3, "big"),
        message_seq,
        offset.to_bytes(3, "big"),
        fragment_length.to_bytes(3, "big"),
    )


def encode_handshake(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """The message as if unfragmented: the form that enters the transcript (RFC 6347 §4.2.6)."""
    return encode_handshake_header(msg_type, len(body), message_seq, 0, len(body)) + body


# ---- Extension bodies ----


def parse_uint16_list(data: bytes) -> list[int]:
    return _parse(data, lambda buf: pull_list(buf, 2, buf.pull_uint16))


def encode_uint16_list(values: list[int]) -> bytes:
    return _build(lambda buf: push_list(buf, 2, buf.push_uint16, values))


def parse_uint8_list(data: bytes) -> list[int]:
    return _parse(data, lambda buf: pull_list(buf, 1, buf.pull_uint8))


def encode_uint8_list(values: list[int]) -> bytes:
    return _build(lambda buf: push_list(buf, 1, buf.push_uint8, values))


def parse_use_srtp(data: bytes) -> tuple[list[int], bytes]:
    """RFC 5764 §4.1.1: UseSRTPData = SRTPProtectionProfiles profiles + opaque srtp_mki<0..255>."""

    def pull(buf: Buffer) -> tuple[list[int], bytes]:
        profiles = pull_list(buf, 2, buf.pull_uint16)
        return profiles, pull_opaque(buf, 1)

    return _parse(data, pull)


def encode_use_srtp(profiles: list[int], mki: bytes = b"") -> bytes:
    def push(buf: Buffer) -> None:
        push_list(buf, 2, buf.push_uint16, profiles)
        push_opaque(buf, 1, mki)

    return _build(push)


def parse_opaque8(data: bytes) -> bytes:
    return _parse(data, lambda buf: pull_opaque(buf, 1))


def _pull_extensions(buf: Buffer) -> list[tuple[int, bytes]]:
    extensions: list[tuple[int, bytes]] = []
    if buf.eof():  # extensions are optional in both hellos (RFC 5246 §7.4.1.2)
        return extensions
    seen: set[int] = set()
    with pull_block(buf, 2) as length:
        end = buf.tell() + length
        while buf.tell() < end:
            ext_type = buf.pull_uint16()
            if ext_type in seen:  # RFC 5246 §7.4.1.4: no type may appear twice
                raise DecodeError(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            extensions.append((ext_type, pull_opaque(buf, 2)))
    return extensions


def _push_extensions(buf: Buffer, extensions: list[tuple[int, bytes]]) -> None:
    if not extensions:
        return
    with push_block(buf, 2):
        for ext_type, body in extensions:
            buf.push_uint16(ext_type)
            push_opaque(buf, 2, body)


# ---- Messages ----


@dataclass
class ClientHello:
    """RFC 6347 §4.2.1: the TLS 1.2 ClientHello plus a cookie."""

    version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: list[int]
    compression_methods: list[int]
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    def extension(self, ext_type: int) -> bytes | None:
        for t, body in self.extensions:
            if t == ext_type:
                return body
        return None

    def cookie_input(self) -> bytes:
        """The fields a stateless cookie is bound to (RFC 6347 §4.2.1), i.e. everything but the cookie."""
        copy = ClientHello(
            self.version,
            self.random,
            self.session_id,
            b"",
            self.cipher_suites,
            self.compression_methods,
            self.extensions,
        )
        return encode_client_hello(copy)


def parse_client_hello(data: bytes) -> ClientHello:
    def pull(buf: Buffer) -> ClientHello:
        version = buf.pull_uint16()
        random = buf.pull_bytes(32)
        session_id = pull_opaque(buf, 1)
        cookie = pull_opaque(buf, 1)
        suites = pull_list(buf, 2, buf.pull_uint16)
        compression = pull_list(buf, 1, buf.pull_uint8)
        return ClientHello(version, random, session_id, cookie, suites, compression, _pull_extensions(buf))

    hello = _parse(data, pull)
    if len(hello.session_id) > 32 or not hello.cipher_suites or not hello.compression_methods:
        raise DecodeError("malformed ClientHello")
    return hello


def encode_client_hello(hello: ClientHello) -> bytes:
    def push(buf: Buffer) -> None:
        buf.push_uint16(hello.version)
        buf.push_bytes(hello.random)
        push_opaque(buf, 1, hello.session_id)
        push_opaque(buf, 1, hello.cookie)
        push_list(buf, 2, buf.push_uint16, hello.cipher_suites)
        push_list(buf, 1, buf.push_uint8, hello.compression_methods)
        _push_extensions(buf, hello.extensions)

    return _build(push)


@dataclass
class ServerHello:
    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    def extension(self, ext_type: int) -> bytes | None:
        for t, body in self.extensions:
            if t == ext_type:
                return body
        return None


def parse_server_hello(data: bytes) -> ServerHello:
    def pull(buf: Buffer) -> ServerHello:
        version = buf.pull_uint16()
        random = buf.pull_bytes(32)
        session_id = pull_opaque(buf, 1)
        suite = buf.pull_uint16()
        compression = buf.pull_uint8()
        return ServerHello(version, random, session_id, suite, compression, _pull_extensions(buf))

    return _parse(data, pull)


def encode_server_hello(hello: ServerHello) -> bytes:
    def push(buf: Buffer) -> None:
        buf.push_uint16(hello.version)
        buf.push_bytes(hello.random)
        push_opaque(buf, 1, hello.session_id)
        buf.push_uint16(hello.cipher_suite)
        buf.push_uint8(hello.compression_method)
        _push_extensions(buf, hello.extensions)

    return _build(push)


def parse_hello_verify_request(data: bytes) -> tuple[int, bytes]:
    """RFC 6347 §4.2.1: server_version, cookie<0..2^8-1>."""

    def pull(buf: Buffer) -> tuple[int, bytes]:
        return buf.pull_uint16(), pull_opaque(buf, 1)

    return _parse(data, pull)


def encode_hello_verify_request(version: int, cookie: bytes) -> bytes:
    return struct.pack("!HB", version, len(cookie)) + cookie


def parse_certificate(data: bytes) -> list[bytes]:
    """RFC 5246 §7.4.2: certificate_list<0..2^24-1> of ASN.1Cert<1..2^24-1>."""

    def pull(buf: Buffer) -> list[bytes]:
        return pull_list(buf, 3, lambda: pull_opaque(buf, 3))

    certificates = _parse(data, pull)
    if any(not der for der in certificates):
        raise DecodeError("empty ASN.1Cert")
    return certificates


def encode_certificate(certificates: list[bytes]) -> bytes:
    size = sum(len(c) + 3 for c in certificates) + 3
    return _build(lambda buf: push_list(buf, 3, lambda der: push_opaque(buf, 3, der), certificates), size)


@dataclass
class ServerKeyExchange:
    """RFC 8422 §5.4: ServerECDHParams (named curve) and a TLS 1.2 digitally-signed struct."""

    group: int
    public: bytes
    signature_algorithm: int
    signature: bytes

    def params(self) -> bytes:
        return struct.pack("!BHB", CURVE_TYPE_NAMED, self.group, len(self.public)) + self.public


def parse_server_key_exchange(data: bytes) -> ServerKeyExchange:
    def pull(buf: Buffer) -> ServerKeyExchange:
        if buf.pull_uint8() != CURVE_TYPE_NAMED:
            raise DecodeError("only named_curve ECDHE parameters are supported")
        group = buf.pull_uint16()
        public = pull_opaque(buf, 1)
        algorithm = buf.pull_uint16()
        return ServerKeyExchange(group, public, algorithm, pull_opaque(buf, 2))

    ske = _parse(data, pull)
    if not ske.public:
        raise DecodeError("empty ECDHE point")
    return ske


def encode_server_key_exchange(ske: ServerKeyExchange) -> bytes:
    return ske.params() + struct.pack("!HH", ske.signature_algorithm, len(ske.signature)) + ske.signature


@dataclass
class CertificateRequest:
    """RFC 5246 §7.4.4: certificate_types, supported_signature_algorithms, certificate_authorities."""

    certificate_types: list[int]
    signature_algorithms: list[int]
    authorities: bytes = b""


def parse_certificate_request(data: bytes) -> CertificateRequest:
    def pull(buf: Buffer) -> CertificateRequest:
        types = pull_list(buf, 1, buf.pull_uint8)
        algorithms = pull_list(buf, 2, buf.pull_uint16)
        return CertificateRequest(types, algorithms, pull_opaque(buf, 2))

    return _parse(data, pull)


def encode_certificate_request(request: CertificateRequest) -> bytes:
    def push(buf: Buffer) -> None:
        push_list(buf, 1, buf.push_uint8, request.certificate_types)
        push_list(buf, 2, buf.push_uint16, request.signature_algorithms)
        push_opaque(buf, 2, request.authorities)

    return _build(push)


def parse_client_key_exchange(data: bytes) -> bytes:
    """RFC 8422 §5.7: ClientECDiffieHellmanPublic, point<1..2^8-1>."""
    public = _parse(data, lambda buf: pull_opaque(buf, 1))
    if not public:
        raise DecodeError("empty ECDHE point")
    return public


def encode_client_key_exchange(public: bytes) -> bytes:
    return bytes([len(public)]) + public


def parse_certificate_verify(data: bytes) -> tuple[int, bytes]:
    """RFC 5246 §7.4.8: a digitally-signed struct (algorithm, signature<0..2^16-1>)."""

    def pull(buf: Buffer) -> tuple[int, bytes]:
        return buf.pull_uint16(), pull_opaque(buf, 2)

    return _parse(data, pull)


def encode_certificate_verify(algorithm: int, signature: bytes) -> bytes:
    return struct.pack("!HH", algorithm, len(signature)) + signature


def encode_alert(level: int, description: int) -> bytes:
    return bytes((level, description))
