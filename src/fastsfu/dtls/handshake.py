"""Sans-I/O DTLS 1.2 endpoint for WebRTC (RFC 6347, RFC 5763/5764): both roles, flights, reassembly, timers.

One suite (0xC02B), ECDHE X25519 or P-256, EMS and use_srtp; success is a `DtlsConnected` with SRTP keys.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fastsfu.dtls import crypto
from fastsfu.dtls import messages as m
from fastsfu.dtls.crypto import DtlsCertificate
from fastsfu.dtls.record import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    DTLS_1_0,
    DTLS_1_2,
    GCM_OVERHEAD,
    RECORD_HEADER_LENGTH,
    Record,
    RecordLayer,
    SequenceExhausted,
    encode_record,
    parse_records,
)
from fastsfu.types import DtlsFingerprint

MAX_MESSAGE_LENGTH = 16 * 1024  # per handshake message being reassembled
MAX_REASSEMBLY_BYTES = 64 * 1024  # per association
MAX_FUTURE_MESSAGES = 16  # how far ahead of the next expected message_seq we buffer
MAX_HOLES = 32  # disjoint received ranges per message being reassembled
MAX_EARLY_RECORDS = 8  # next-epoch records kept until the keys exist (RFC 6347 §4.1)
MAX_RETRANSMIT_INTERVAL = 60.0  # RFC 6347 §4.2.4.1
MIN_MTU = 80
SUPPORTED_GROUPS = (m.GROUP_X25519, m.GROUP_SECP256R1)  # X25519 first (docs/transports.md#ciphers)

_T = TypeVar("_T")


@dataclass(frozen=True)
class DtlsConnected:
    srtp_profile: int
    srtp_suite: str
    local_key: bytes
    remote_key: bytes
    peer_fingerprint: str


@dataclass(frozen=True)
class DtlsFailed:
    reason: str


@dataclass(frozen=True)
class DtlsClosed:
    pass


DtlsEvent = DtlsConnected | DtlsFailed | DtlsClosed


class _Fatal(Exception):
    """A protocol violation: becomes a fatal alert and DtlsFailed (RFC 5246 §7.2.2)."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason


@dataclass(slots=True)
class _Outgoing:
    """One item of a flight; records are rebuilt (fresh sequence numbers) on every (re)transmission."""

    epoch: int
    msg_type: int  # -1 for ChangeCipherSpec
    message_seq: int
    body: bytes


class _Partial:
    __slots__ = ("msg_type", "length", "epoch", "body", "ranges")

    def __init__(self, msg_type: int, length: int, epoch: int) -> None:
        self.msg_type = msg_type
        self.length = length
        self.epoch = epoch
        self.body = bytearray(length)
        self.ranges: list[tuple[int, int]] = []  # merged, sorted [start, end) intervals received

    def add(self, offset: int, data: bytes) -> bool:
        """Store a fragment; False when it would leave too many holes (a peer trickling 1-byte pieces)."""
        if not data:
            return True
        end = offset + len(data)
        merged: list[tuple[int, int]] = []
        for start, stop in sorted([*self.ranges, (offset, end)]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        if len(merged) > MAX_HOLES:
            return False
        self.body[offset:end] = data
        self.ranges = merged
        return True

    def complete(self) -> bool:
        return self.length == 0 or self.ranges == [(0, self.length)]


class _Reassembler:
    """Handshake reassembly (RFC 6347 §4.2.3): any order, overlaps, duplicates; delivered by message_seq."""

    def __init__(self) -> None:
        self.next_seq = 0
        self._partial: dict[int, _Partial] = {}
        self._buffered = 0

    def reset(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self._partial.clear()
        self._buffered = 0

    def add(self, fragment: m.HandshakeFragment, epoch: int) -> str | None:
        """Returns None when stored, "old" for a message already delivered, else a drop reason."""
        seq = fragment.message_seq
        if seq < self.next_seq:
            return "old"
        if seq >= self.next_seq + MAX_FUTURE_MESSAGES:
            return "future_message"
        if fragment.length > MAX_MESSAGE_LENGTH:
            return "too_big"
        partial = self._partial.get(seq)
        if partial is None:
            if self._buffered + fragment.length > MAX_REASSEMBLY_BYTES:
                return "too_big"
            partial = self._partial[seq] = _Partial(fragment.msg_type, fragment.length, epoch)
            self._buffered += fragment.length
        elif (partial.msg_type, partial.length, partial.epoch) != (fragment.msg_type, fragment.length, epoch):
            return "bad_fragment"
        if not partial.add(fragment.fragment_offset, fragment.body):
            return "too_fragmented"
        return None

    def pop(self) -> tuple[int, int, bytes, int] | None:
        """The next message in order as (msg_type, message_seq, body, epoch), if complete."""
        partial = self._partial.get(self.next_seq)
        if partial is None or not partial.complete():
            return None
        del self._partial[self.next_seq]
        self._buffered -= partial.length
        self.next_seq += 1
        return partial.msg_type, self.next_seq - 1, bytes(partial.body), partial.epoch


Role = Literal["server", "client"]


class DtlsTransport:
    """One DTLS 1.2 association, driven by the caller with `now` (seconds, any monotonic origin)."""

    def __init__(
        self,
        certificate: DtlsCertificate,
        role: str,
        srtp_profiles: tuple[int, ...] = (0x0007, 0x0008, 0x0001),
        mtu: int = 1200,
        retransmit_initial: float = 1.0,
        handshake_timeout: float = 30.0,
        hello_verify: bool = False,
        require_ems: bool = True,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        if mtu < MIN_MTU:
            raise ValueError(f"mtu must be at least {MIN_MTU}")
        unknown = [p for p in srtp_profiles if p not in crypto.SRTP_PROFILES]
        if unknown or not srtp_profiles:
            raise ValueError(f"unsupported SRTP profiles {unknown}")
        self.certificate = certificate
        self.role: Role = "server" if role == "server" else "client"
        self.srtp_profiles = tuple(srtp_profiles)
        self.mtu = mtu
        self.retransmit_initial = retransmit_initial
        self.handshake_timeout = handshake_timeout
        self.hello_verify = hello_verify
        self.require_ems = require_ems
        self.state = "new"
        self.counters: collections.Counter[str] = collections.Counter()

        self._records = RecordLayer()
        self._reassembler = _Reassembler()
        self._events: collections.deque[DtlsEvent] = collections.deque()
        self._out: list[bytes] = []
        self._early: list[Record] = []
        self._step = "wait_client_hello" if self.role == "server" else "idle"
        self._handshake_done = False
        self._write_epoch = 0
        self._send_seq = 0
        self._transcript = hashlib.sha256()
        self._flight: list[_Outgoing] = []
        self._flight_sent_at = 0.0
        self._retransmit_at: float | None = None
        self._retransmit_interval = retransmit_initial
        self._deadline: float | None = None
        self._resend_requested = False
        self._record_seq = 0  # record sequence of the record being processed (echoed by HelloVerifyRequest)
        self._cookie_secret = secrets.token_bytes(32)

        self._remote_fingerprints: list[DtlsFingerprint] | None = None
        self._peer_der: bytes | None = None
        self._peer_key: ec.EllipticCurvePublicKey | None = None
        self._fingerprint_ok = False

        self._client_random = b""
        self._server_random = b""
        self._client_hello_msg = b""  # client: our latest ClientHello as it enters the transcript
        self._offered_client_hello: m.ClientHello | None = None
        self._ecdhe: x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey | None = None
        self._group = 0
        self._server_public = b""
        self._srtp_profile = 0
        self._ems = True
        self._certificate_requested = False
        self._master_secret = b""

    # ---- public API ----

    def set_remote_fingerprints(self, fingerprints: list[DtlsFingerprint]) -> None:
        self._remote_fingerprints = list(fingerprints)
        if self.state in ("failed", "closed"):
            return
        try:
            self._check_peer_certificate()
            self._maybe_connected()
        except _Fatal as fatal:
            self._fail(fatal.alert, fatal.reason)

    def start(self, now: float) -> None:
        if self.state != "new":
            return
        self.state = "connecting"
        self._deadline = now + self.handshake_timeout
        if self.role == "client":
            self._send_client_hello(b"", now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.state in ("failed", "closed"):
            self.counters["after_close"] += 1
            return
        if self.state == "new":
            if self.role == "client":  # nothing can be expected before our ClientHello
                self.counters["not_started"] += 1
                return
            self.start(now)
        try:
            self._receive(data, now)
        except _Fatal as fatal:
            self._fail(fatal.alert, fatal.reason)
        except SequenceExhausted:
            self._fail(None, "record sequence number exhausted")
        except Exception as exc:  # never raise into the I/O edge (docs/transports.md#sans-io-interface)
            self._fail(m.ALERT_INTERNAL_ERROR, f"internal error: {exc!r}")

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        if self.state != "connecting":
            return None
        timers = [t for t in (self._retransmit_at, self._deadline) if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        if self.state != "connecting":
            return
        if self._deadline is not None and now >= self._deadline:
            if self._handshake_done:
                self._fail(None, "DTLS handshake timed out waiting for the remote fingerprints")
            else:
                self._fail(None, "DTLS handshake timed out")
            return
        if self._retransmit_at is not None and now >= self._retransmit_at:
            # RFC 6347 §4.2.4.1: double the timer on each retransmission, up to 60 s.
            self._retransmit_interval = min(self._retransmit_interval * 2, MAX_RETRANSMIT_INTERVAL)
            self._retransmit_at = now + self._retransmit_interval
            self.counters["retransmit_timer"] += 1
            try:
                self._transmit_flight(now)
            except SequenceExhausted:
                self._fail(None, "record sequence number exhausted")

    def next_event(self) -> DtlsConnected | DtlsFailed | DtlsClosed | None:
        return self._events.popleft() if self._events else None

    def close(self) -> None:
        if self.state in ("failed", "closed"):
            return
        if self.state == "connected":
            self._send_alert(m.ALERT_WARNING, m.ALERT_CLOSE_NOTIFY)  # RFC 5246 §7.2.1
        self._finish("closed", DtlsClosed())

    # ---- record processing ----

    def _receive(self, data: bytes, now: float) -> None:
        records, junk = parse_records(data)
        self._resend_requested = False
        for record in records:
            self._handle_record(record, now)
            if self.state in ("failed", "closed"):
                return
            # Records of the next epoch that arrived before its keys (reordering) can be opened now.
            if self._early and self._records.can_read(1):
                early, self._early = self._early, []
                for held in early:
                    self._handle_record(held, now)
                    if self.state in ("failed", "closed"):
                        return
        if junk is not None:
            self.counters[junk] += 1
        if self._resend_requested and now - self._flight_sent_at >= self.retransmit_initial / 8:
            # RFC 6347 §4.2.4: a repeat of the peer's previous flight means ours was lost.
            self.counters["retransmit_triggered"] += 1
            self._transmit_flight(now)

    def _handle_record(self, record: Record, now: float) -> None:
        if record.content_type < 0:
            self.counters["bad_record"] += 1
            return
        if not self._records.can_read(record.epoch):
            if record.epoch == 1 and len(self._early) < MAX_EARLY_RECORDS and not self._handshake_done:
                self._early.append(record)
            else:
                self.counters["bad_epoch"] += 1
            return
        if record.version == DTLS_1_0 and record.epoch != 0:
            self.counters["bad_record"] += 1
            return
        plaintext = self._records.open(record)
        if isinstance(plaintext, str):
            self.counters[plaintext] += 1
            return
        self._record_seq = record.sequence
        if record.content_type == CT_HANDSHAKE:
            self._handle_handshake_record(plaintext, record.epoch, now)
        elif record.content_type == CT_CHANGE_CIPHER_SPEC:
            # The epoch in each record says which keys apply, so CCS carries no state here (RFC 6347 §4.1).
            if plaintext != b"\x01":
                self.counters["bad_record"] += 1
        elif record.content_type == CT_ALERT:
            self._handle_alert(plaintext, record.epoch)
        elif record.content_type == CT_APPLICATION_DATA:
            # No data channels over this transport: WebRTC media goes over SRTP.
            self.counters["application_data"] += 1

    def _handle_alert(self, data: bytes, epoch: int) -> None:
        if len(data) != 2:
            self.counters["bad_alert"] += 1
            return
        level, description = data[0], data[1]
        if self._handshake_done and epoch == 0:
            # Once keys are in use, a plaintext alert is unauthenticated: anyone on the path could forge it.
            self.counters["plaintext_alert"] += 1
            return
        if description == m.ALERT_CLOSE_NOTIFY:
            if self.state == "connected":
                self._send_alert(m.ALERT_WARNING, m.ALERT_CLOSE_NOTIFY)  # RFC 5246 §7.2.1: answer in kind
            self._finish("closed", DtlsClosed())
        elif level == m.ALERT_FATAL:
            self._finish("failed", DtlsFailed(f"peer sent fatal alert {description}"))
        else:
            self.counters["warning_alert"] += 1

    def _handle_handshake_record(self, data: bytes, epoch: int, now: float) -> None:
        try:
            fragments = m.parse_handshake_fragments(data)
        except m.DecodeError as exc:
            if self._handshake_done:
                self.counters["bad_handshake"] += 1
                return
            raise _Fatal(m.ALERT_DECODE_ERROR, f"bad handshake record: {exc}") from exc
        for fragment in fragments:
            if self._handshake_done:
                self._handle_fragment_after_handshake(fragment)
                continue
            if (
                self._step == "wait_client_hello"
                and fragment.msg_type == m.HT_CLIENT_HELLO
                and fragment.message_seq != self._reassembler.next_seq
                and epoch == 0
            ):
                # Stateless cookie exchange: any ClientHello restarts the wait (RFC 6347 §4.2.1).
                self._reassembler.reset(fragment.message_seq)
            status = self._reassembler.add(fragment, epoch)
            if status == "old":
                if self._retransmit_at is not None:
                    self._resend_requested = True
                else:
                    self.counters["old_message"] += 1
            elif status is not None:
                self.counters[status] += 1
            while (message := self._reassembler.pop()) is not None:
                msg_type, seq, body, msg_epoch = message
                self._handle_message(msg_type, seq, body, msg_epoch, now)
                if self.state in ("failed", "closed") or self._handshake_done:
                    break

    def _handle_fragment_after_handshake(self, fragment: m.HandshakeFragment) -> None:
        if fragment.msg_type == m.HT_CLIENT_HELLO:
            # No renegotiation (docs/transports.md#extensions): a new session needs a new transport.
            self.counters["client_hello_after_handshake"] += 1
        elif fragment.message_seq < self._reassembler.next_seq and self.role == "server":
            # Flight 5 repeated: our flight 6 was lost; the server resends it (RFC 6347 §4.2.4).
            self._resend_requested = True
            self.counters["old_message"] += 1
        else:
            self.counters["unexpected_handshake"] += 1

    # ---- handshake messages ----

    def _handle_message(self, msg_type: int, seq: int, body: bytes, epoch: int, now: float) -> None:
        if (msg_type == m.HT_FINISHED) != (epoch == 1):
            # Finished is the only handshake message protected by the new epoch (RFC 5246 §7.4.9).
            raise _Fatal(m.ALERT_UNEXPECTED_MESSAGE, f"handshake message {msg_type} in epoch {epoch}")
        step = self._step
        if self.role == "server":
            if step == "wait_client_hello" and msg_type == m.HT_CLIENT_HELLO:
                return self._server_client_hello(seq, body, now)
            if step == "wait_certificate" and msg_type == m.HT_CERTIFICATE:
                return self._server_certificate(seq, body)
            if step == "wait_certificate" and msg_type == m.HT_CLIENT_KEY_EXCHANGE:
                raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "client sent no certificate")  # RFC 5763 §5
            if step == "wait_client_key_exchange" and msg_type == m.HT_CLIENT_KEY_EXCHANGE:
                return self._server_client_key_exchange(seq, body)
            if step == "wait_certificate_verify" and msg_type == m.HT_CERTIFICATE_VERIFY:
                return self._server_certificate_verify(seq, body)
            if step == "wait_finished" and msg_type == m.HT_FINISHED:
                return self._server_finished(seq, body, now)
        else:
            if step == "wait_server_hello" and msg_type == m.HT_HELLO_VERIFY_REQUEST:
                return self._client_hello_verify_request(body, now)
            if step == "wait_server_hello" and msg_type == m.HT_SERVER_HELLO:
                return self._client_server_hello(seq, body)
            if step == "wait_certificate" and msg_type == m.HT_CERTIFICATE:
                return self._client_certificate(seq, body)
            if step == "wait_server_key_exchange" and msg_type == m.HT_SERVER_KEY_EXCHANGE:
                return self._client_server_key_exchange(seq, body)
            if step == "wait_server_hello_done" and msg_type == m.HT_CERTIFICATE_REQUEST:
                return self._client_certificate_request(seq, body)
            if step == "wait_server_hello_done" and msg_type == m.HT_SERVER_HELLO_DONE:
                return self._client_server_hello_done(seq, body, now)
            if step == "wait_finished" and msg_type == m.HT_FINISHED:
                return self._client_finished(seq, body)
        raise _Fatal(m.ALERT_UNEXPECTED_MESSAGE, f"unexpected handshake message {msg_type} in {step}")

    def _hash(self, msg_type: int, seq: int, body: bytes) -> None:
        # Transcript: each message as if unfragmented, with its 12-byte DTLS header (RFC 6347 §4.2.6).
        self._transcript.update(m.encode_handshake(msg_type, seq, body))

    def _transcript_hash(self) -> bytes:
        return self._transcript.copy().digest()

    def _queue(self, msg_type: int, body: bytes, epoch: int = 0) -> _Outgoing:
        item = _Outgoing(epoch, msg_type, self._send_seq, body)
        self._send_seq += 1
        self._hash(msg_type, item.message_seq, body)
        return item

    # -- server --

    def _server_client_hello(self, seq: int, body: bytes, now: float) -> None:
        try:
            hello = m.parse_client_hello(body)
        except m.DecodeError as exc:
            raise _Fatal(m.ALERT_DECODE_ERROR, f"bad ClientHello: {exc}") from exc
        # DTLS versions count down: 0xFEFF is 1.0, 0xFEFD 1.2, 0xFEFC 1.3 (RFC 6347 §4.1, RFC 9147 §5.3).
        if hello.version > DTLS_1_2 or hello.version < 0xFE00:
            raise _Fatal(m.ALERT_PROTOCOL_VERSION, f"client offers only DTLS version {hello.version:#06x}")
        if self.hello_verify:
            cookie = hmac.digest(self._cookie_secret, hello.cookie_input(), "sha256")[:20]
            if not hmac.compare_digest(cookie, hello.cookie):
                self._send_hello_verify_request(seq, cookie)
                return
        if m.CIPHER_ECDHE_ECDSA_AES_128_GCM_SHA256 not in hello.cipher_suites:
            raise _Fatal(
                m.ALERT_HANDSHAKE_FAILURE, "client does not offer TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            )
        if 0 not in hello.compression_methods:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, "client does not offer null compression")
        try:
            response = self._negotiate_extensions(hello)
        except m.DecodeError as exc:
            raise _Fatal(m.ALERT_DECODE_ERROR, f"bad ClientHello extension: {exc}") from exc

        self._client_random = hello.random
        self._server_random = os.urandom(32)
        self._send_seq = seq  # the ServerHello answers with the ClientHello's message_seq (RFC 6347 §4.2.2)
        self._hash(m.HT_CLIENT_HELLO, seq, body)

        server_hello = m.ServerHello(
            DTLS_1_2, self._server_random, b"", m.CIPHER_ECDHE_ECDSA_AES_128_GCM_SHA256, 0, response
        )
        self._ecdhe, public = self._generate_ecdhe(self._group)
        ske = m.ServerKeyExchange(self._group, public, m.SIG_ECDSA_SECP256R1_SHA256, b"")
        # RFC 8422 §5.4: the signature covers both randoms and the ECDHE parameters.
        signed = self._client_random + self._server_random + ske.params()
        ske.signature = self.certificate.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        request = m.CertificateRequest([m.CERT_TYPE_ECDSA_SIGN], [m.SIG_ECDSA_SECP256R1_SHA256])
        flight = [
            self._queue(m.HT_SERVER_HELLO, m.encode_server_hello(server_hello)),
            self._queue(m.HT_CERTIFICATE, m.encode_certificate([self.certificate.der])),
            self._queue(m.HT_SERVER_KEY_EXCHANGE, m.encode_server_key_exchange(ske)),
            self._queue(m.HT_CERTIFICATE_REQUEST, m.encode_certificate_request(request)),
            self._queue(m.HT_SERVER_HELLO_DONE, b""),
        ]
        self._step = "wait_certificate"
        self._send_flight(flight, now, retransmit=True)

    def _negotiate_extensions(self, hello: m.ClientHello) -> list[tuple[int, bytes]]:
        """Choose from the ClientHello; returns the ServerHello extensions (only ones the client sent)."""
        response: list[tuple[int, bytes]] = []
        reneg = hello.extension(m.EXT_RENEGOTIATION_INFO)
        if reneg is not None and m.parse_opaque8(reneg):
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "renegotiation_info not empty on an initial handshake")
        # RFC 5746 §3.6: echo an empty renegotiation_info for the extension or the SCSV.
        if reneg is not None or m.CIPHER_EMPTY_RENEGOTIATION_INFO_SCSV in hello.cipher_suites:
            response.append((m.EXT_RENEGOTIATION_INFO, b"\x00"))

        point_formats = hello.extension(m.EXT_EC_POINT_FORMATS)
        if point_formats is not None:
            if m.POINT_FORMAT_UNCOMPRESSED not in m.parse_uint8_list(point_formats):
                raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, "client does not accept uncompressed points")
            response.append((m.EXT_EC_POINT_FORMATS, m.encode_uint8_list([m.POINT_FORMAT_UNCOMPRESSED])))

        self._ems = hello.extension(m.EXT_EXTENDED_MASTER_SECRET) is not None
        if self._ems:
            response.append((m.EXT_EXTENDED_MASTER_SECRET, b""))  # RFC 7627 §5.2
        elif self.require_ems:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "client does not offer extended_master_secret")

        groups_ext = hello.extension(m.EXT_SUPPORTED_GROUPS)
        # Without supported_groups, RFC 8422 §4 lets the server pick; P-256 is the baseline.
        groups = m.parse_uint16_list(groups_ext) if groups_ext is not None else [m.GROUP_SECP256R1]
        chosen = next((g for g in SUPPORTED_GROUPS if g in groups), None)
        if chosen is None:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "no common ECDHE group (need X25519 or P-256)")
        self._group = chosen

        algorithms_ext = hello.extension(m.EXT_SIGNATURE_ALGORITHMS)
        # Absent, RFC 5246 §7.4.1.4.1 implies SHA-1 signatures, which we never make.
        if algorithms_ext is None or m.SIG_ECDSA_SECP256R1_SHA256 not in m.parse_uint16_list(algorithms_ext):
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "client does not accept ecdsa_secp256r1_sha256")

        srtp = hello.extension(m.EXT_USE_SRTP)
        if srtp is None:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "client does not offer use_srtp")
        offered, _mki = m.parse_use_srtp(srtp)
        profile = next((p for p in self.srtp_profiles if p in offered), None)
        if profile is None:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, f"no common SRTP profile in {offered}")
        self._srtp_profile = profile
        # RFC 5764 §4.1.1: exactly one profile and our (empty) MKI.
        response.append((m.EXT_USE_SRTP, m.encode_use_srtp([profile])))
        return response

    def _send_hello_verify_request(self, seq: int, cookie: bytes) -> None:
        body = m.encode_hello_verify_request(DTLS_1_0, cookie)
        fragment = m.encode_handshake(m.HT_HELLO_VERIFY_REQUEST, seq, body)
        # RFC 6347 §4.2.1: echo the ClientHello's record sequence number, and keep ours above it afterwards.
        self._out.append(encode_record(CT_HANDSHAKE, 0, self._record_seq, fragment, DTLS_1_0))
        self._records.bump_write_sequence(0, self._record_seq + 1)
        self.counters["hello_verify_request"] += 1

    def _server_certificate(self, seq: int, body: bytes) -> None:
        certificates = self._parse(m.parse_certificate, body)
        if not certificates:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "client sent an empty certificate list")  # RFC 5763 §5
        self._set_peer_certificate(certificates[0])
        self._hash(m.HT_CERTIFICATE, seq, body)
        self._step = "wait_client_key_exchange"

    def _server_client_key_exchange(self, seq: int, body: bytes) -> None:
        public = self._parse(m.parse_client_key_exchange, body)
        pre_master = self._ecdhe_shared(public)
        self._hash(m.HT_CLIENT_KEY_EXCHANGE, seq, body)
        self._derive_keys(pre_master)
        self._step = "wait_certificate_verify"

    def _server_certificate_verify(self, seq: int, body: bytes) -> None:
        algorithm, signature = self._parse(m.parse_certificate_verify, body)
        if algorithm != m.SIG_ECDSA_SECP256R1_SHA256:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"CertificateVerify uses algorithm {algorithm:#06x}")
        assert self._peer_key is not None
        try:
            # RFC 5246 §7.4.8: the signature covers every handshake message before this one.
            self._peer_key.verify(signature, self._transcript_hash(), ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature as exc:
            raise _Fatal(m.ALERT_DECRYPT_ERROR, "bad CertificateVerify signature") from exc
        self._hash(m.HT_CERTIFICATE_VERIFY, seq, body)
        self._step = "wait_finished"

    def _server_finished(self, seq: int, body: bytes, now: float) -> None:
        self._check_finished(body, b"client finished")
        self._hash(m.HT_FINISHED, seq, body)
        finished = crypto.verify_data(self._master_secret, b"server finished", self._transcript_hash())
        flight = [_Outgoing(0, -1, 0, b"\x01"), self._queue(m.HT_FINISHED, finished, epoch=1)]
        # Flight 6 has no timer: it is kept and resent when flight 5 repeats (RFC 6347 §4.2.4).
        self._send_flight(flight, now, retransmit=False)
        self._handshake_complete()

    # -- client --

    def _send_client_hello(self, cookie: bytes, now: float) -> None:
        extensions = [
            (m.EXT_SUPPORTED_GROUPS, m.encode_uint16_list(list(SUPPORTED_GROUPS))),
            (m.EXT_EC_POINT_FORMATS, m.encode_uint8_list([m.POINT_FORMAT_UNCOMPRESSED])),
            (m.EXT_SIGNATURE_ALGORITHMS, m.encode_uint16_list([m.SIG_ECDSA_SECP256R1_SHA256])),
            (m.EXT_USE_SRTP, m.encode_use_srtp(list(self.srtp_profiles))),
            (m.EXT_EXTENDED_MASTER_SECRET, b""),
        ]
        if not self._client_random:
            # The same random again after a HelloVerifyRequest (RFC 6347 §4.2.1).
            self._client_random = os.urandom(32)
        hello = m.ClientHello(
            DTLS_1_2,
            self._client_random,
            b"",
            cookie,
            [m.CIPHER_ECDHE_ECDSA_AES_128_GCM_SHA256, m.CIPHER_EMPTY_RENEGOTIATION_INFO_SCSV],
            [0],
            extensions,
        )
        self._offered_client_hello = hello
        body = m.encode_client_hello(hello)
        item = _Outgoing(0, m.HT_CLIENT_HELLO, self._send_seq, body)
        self._send_seq += 1
        # Hashed when the ServerHello arrives: a HelloVerifyRequest restarts the transcript (RFC 6347 §4.2.6).
        self._client_hello_msg = m.encode_handshake(m.HT_CLIENT_HELLO, item.message_seq, body)
        self._step = "wait_server_hello"
        self._send_flight([item], now, retransmit=True)

    def _client_hello_verify_request(self, body: bytes, now: float) -> None:
        _version, cookie = self._parse(m.parse_hello_verify_request, body)
        self.counters["hello_verify_request"] += 1
        self._send_client_hello(cookie, now)

    def _client_server_hello(self, seq: int, body: bytes) -> None:
        hello = self._parse(m.parse_server_hello, body)
        if hello.version != DTLS_1_2:
            raise _Fatal(m.ALERT_PROTOCOL_VERSION, f"server chose version {hello.version:#06x}")
        if hello.cipher_suite != m.CIPHER_ECDHE_ECDSA_AES_128_GCM_SHA256 or hello.compression_method != 0:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"server chose suite {hello.cipher_suite:#06x}")
        offered = (
            {t for t, _ in self._offered_client_hello.extensions} if self._offered_client_hello else set()
        )
        offered.add(m.EXT_RENEGOTIATION_INFO)  # we sent the SCSV
        for ext_type, _ in hello.extensions:
            if ext_type not in offered:  # RFC 5246 §7.4.1.4
                raise _Fatal(m.ALERT_UNSUPPORTED_EXTENSION, f"server sent unrequested extension {ext_type}")
        reneg = hello.extension(m.EXT_RENEGOTIATION_INFO)
        if reneg is not None and self._parse(m.parse_opaque8, reneg):
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "renegotiation_info not empty on an initial handshake")
        self._ems = hello.extension(m.EXT_EXTENDED_MASTER_SECRET) is not None
        if not self._ems and self.require_ems:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "server does not support extended_master_secret")
        srtp = hello.extension(m.EXT_USE_SRTP)
        if srtp is None:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "server did not negotiate use_srtp")
        profiles, mki = self._parse(m.parse_use_srtp, srtp)
        if len(profiles) != 1 or profiles[0] not in self.srtp_profiles or mki:
            # RFC 5764 §4.1.1: exactly one of the offered profiles and no MKI.
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"server chose SRTP profiles {profiles}")
        self._srtp_profile = profiles[0]
        self._server_random = hello.random
        self._transcript = hashlib.sha256(self._client_hello_msg)
        self._hash(m.HT_SERVER_HELLO, seq, body)
        self._step = "wait_certificate"

    def _client_certificate(self, seq: int, body: bytes) -> None:
        certificates = self._parse(m.parse_certificate, body)
        if not certificates:
            raise _Fatal(m.ALERT_HANDSHAKE_FAILURE, "server sent an empty certificate list")
        self._set_peer_certificate(certificates[0])
        self._hash(m.HT_CERTIFICATE, seq, body)
        self._step = "wait_server_key_exchange"

    def _client_server_key_exchange(self, seq: int, body: bytes) -> None:
        ske = self._parse(m.parse_server_key_exchange, body)
        if ske.group not in SUPPORTED_GROUPS:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"server chose group {ske.group:#06x}")
        if ske.signature_algorithm != m.SIG_ECDSA_SECP256R1_SHA256:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"server signed with {ske.signature_algorithm:#06x}")
        assert self._peer_key is not None
        try:
            signed = self._client_random + self._server_random + ske.params()
            self._peer_key.verify(ske.signature, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise _Fatal(m.ALERT_DECRYPT_ERROR, "bad ServerKeyExchange signature") from exc
        self._group = ske.group
        self._server_public = ske.public
        self._hash(m.HT_SERVER_KEY_EXCHANGE, seq, body)
        self._step = "wait_server_hello_done"

    def _client_certificate_request(self, seq: int, body: bytes) -> None:
        request = self._parse(m.parse_certificate_request, body)
        if (
            m.CERT_TYPE_ECDSA_SIGN not in request.certificate_types
            or m.SIG_ECDSA_SECP256R1_SHA256 not in request.signature_algorithms
        ):
            raise _Fatal(
                m.ALERT_HANDSHAKE_FAILURE, "server does not accept an ECDSA P-256 client certificate"
            )
        self._certificate_requested = True
        self._hash(m.HT_CERTIFICATE_REQUEST, seq, body)

    def _client_server_hello_done(self, seq: int, body: bytes, now: float) -> None:
        if body:
            raise _Fatal(m.ALERT_DECODE_ERROR, "ServerHelloDone is not empty")
        self._hash(m.HT_SERVER_HELLO_DONE, seq, body)
        flight: list[_Outgoing] = []
        if self._certificate_requested:
            flight.append(self._queue(m.HT_CERTIFICATE, m.encode_certificate([self.certificate.der])))
        self._ecdhe, public = self._generate_ecdhe(self._group)
        pre_master = self._ecdhe_shared(self._server_public)
        flight.append(self._queue(m.HT_CLIENT_KEY_EXCHANGE, m.encode_client_key_exchange(public)))
        self._derive_keys(pre_master)
        if self._certificate_requested:
            signature = self.certificate.private_key.sign(
                self._transcript_hash(), ec.ECDSA(Prehashed(hashes.SHA256()))
            )
            body_cv = m.encode_certificate_verify(m.SIG_ECDSA_SECP256R1_SHA256, signature)
            flight.append(self._queue(m.HT_CERTIFICATE_VERIFY, body_cv))
        flight.append(_Outgoing(0, -1, 0, b"\x01"))
        finished = crypto.verify_data(self._master_secret, b"client finished", self._transcript_hash())
        flight.append(self._queue(m.HT_FINISHED, finished, epoch=1))
        self._step = "wait_finished"
        self._send_flight(flight, now, retransmit=True)

    def _client_finished(self, seq: int, body: bytes) -> None:
        self._check_finished(body, b"server finished")
        self._hash(m.HT_FINISHED, seq, body)
        self._handshake_complete()

    # ---- shared pieces ----

    def _parse(self, parser: Callable[[bytes], _T], body: bytes) -> _T:
        try:
            return parser(body)
        except m.DecodeError as exc:
            raise _Fatal(m.ALERT_DECODE_ERROR, f"malformed handshake message: {exc}") from exc

    def _generate_ecdhe(
        self, group: int
    ) -> tuple[x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey, bytes]:
        if group == m.GROUP_X25519:
            x_key = x25519.X25519PrivateKey.generate()
            return x_key, x_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        p_key = ec.generate_private_key(ec.SECP256R1())
        # RFC 8422 §5.4.1: uncompressed X9.62 points only.
        return p_key, p_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def _ecdhe_shared(self, peer_public: bytes) -> bytes:
        try:
            if isinstance(self._ecdhe, x25519.X25519PrivateKey):
                if len(peer_public) != 32:
                    raise ValueError("X25519 keys are 32 bytes")
                shared = self._ecdhe.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
            elif isinstance(self._ecdhe, ec.EllipticCurvePrivateKey):
                if len(peer_public) != 65 or peer_public[0] != 4:
                    raise ValueError("P-256 points must be uncompressed")
                peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_public)
                shared = self._ecdhe.exchange(ec.ECDH(), peer)  # the x-coordinate (RFC 8422 §5.10)
            else:
                raise _Fatal(m.ALERT_INTERNAL_ERROR, "no ECDHE key")
        except ValueError as exc:
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, f"bad ECDHE public key: {exc}") from exc
        if not any(shared):  # RFC 8422 §5.11: reject the all-zero X25519 result
            raise _Fatal(m.ALERT_ILLEGAL_PARAMETER, "ECDHE shared secret is all zero")
        self._ecdhe = None
        return shared

    def _derive_keys(self, pre_master: bytes) -> None:
        if self._ems:
            # RFC 7627 §4: session_hash runs up to and including ClientKeyExchange.
            self._master_secret = crypto.extended_master_secret(pre_master, self._transcript_hash())
        else:
            self._master_secret = crypto.legacy_master_secret(
                pre_master, self._client_random, self._server_random
            )
        keys = crypto.key_block(self._master_secret, self._client_random, self._server_random)
        if self.role == "server":
            self._records.set_read_keys(1, keys.client_write_key, keys.client_write_iv)
            self._records.set_write_keys(1, keys.server_write_key, keys.server_write_iv)
        else:
            self._records.set_read_keys(1, keys.server_write_key, keys.server_write_iv)
            self._records.set_write_keys(1, keys.client_write_key, keys.client_write_iv)

    def _check_finished(self, body: bytes, label: bytes) -> None:
        expected = crypto.verify_data(self._master_secret, label, self._transcript_hash())
        if not hmac.compare_digest(expected, body):
            raise _Fatal(m.ALERT_DECRYPT_ERROR, "Finished verify_data mismatch")  # RFC 5246 §7.4.9

    def _set_peer_certificate(self, der: bytes) -> None:
        try:
            key = x509.load_der_x509_certificate(der).public_key()
        except (ValueError, x509.InvalidVersion) as exc:
            # InvalidVersion is not a ValueError: a Version other than v1-v3 (RFC 5280 §4.1.2.1)
            # is a corrupt certificate, RFC 5246 §7.2.2 bad_certificate.
            raise _Fatal(m.ALERT_BAD_CERTIFICATE, f"unparsable peer certificate: {exc}") from exc
        except UnsupportedAlgorithm as exc:
            # A key on a curve (or of a type) cryptography does not know: RFC 5246 §7.2.2
            # unsupported_certificate, not an internal error.
            raise _Fatal(m.ALERT_UNSUPPORTED_CERTIFICATE, f"unsupported peer certificate: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise _Fatal(m.ALERT_BAD_CERTIFICATE, "peer certificate key is not ECDSA P-256")
        self._peer_der = der
        self._peer_key = key
        self._check_peer_certificate()

    def _check_peer_certificate(self) -> None:
        """RFC 5763 §5: the certificate must match the fingerprint from signaling, whichever arrives last."""
        if self._peer_der is None or self._remote_fingerprints is None or self._fingerprint_ok:
            return
        problem = crypto.match_fingerprint(self._peer_der, self._remote_fingerprints)
        if problem is not None:
            raise _Fatal(m.ALERT_BAD_CERTIFICATE, problem)
        self._fingerprint_ok = True

    def _handshake_complete(self) -> None:
        self._handshake_done = True
        self._step = "done"
        self._retransmit_at = None
        self._early.clear()
        self._maybe_connected()

    def _maybe_connected(self) -> None:
        if not self._handshake_done or not self._fingerprint_ok or self.state != "connecting":
            return
        assert self._peer_der is not None
        profile = crypto.SRTP_PROFILES[self._srtp_profile]
        client_key, server_key = crypto.srtp_keys(
            self._master_secret, self._client_random, self._server_random, profile
        )
        local, remote = (server_key, client_key) if self.role == "server" else (client_key, server_key)
        self.state = "connected"
        self._deadline = None
        fingerprint = crypto.fingerprint_der(self._peer_der, "sha-256")
        self._events.append(DtlsConnected(profile.value, profile.suite, local, remote, fingerprint))

    # ---- sending ----

    def _send_flight(self, flight: list[_Outgoing], now: float, retransmit: bool) -> None:
        self._flight = flight
        self._retransmit_interval = self.retransmit_initial
        self._retransmit_at = now + self._retransmit_interval if retransmit else None
        self._transmit_flight(now)

    def _transmit_flight(self, now: float) -> None:
        """Pack the flight into few MTU-sized datagrams, fragmenting only what must be (RFC 6347 §4.1.1)."""
        self._flight_sent_at = now
        datagram = bytearray()
        for item in self._flight:
            if item.msg_type < 0:
                record = self._records.seal(item.epoch, CT_CHANGE_CIPHER_SPEC, item.body)
                if datagram and len(datagram) + len(record) > self.mtu:
                    self._out.append(bytes(datagram))
                    datagram = bytearray()
                datagram += record
                if item.epoch == self._write_epoch:
                    self._write_epoch = item.epoch + 1  # what follows the CCS uses the next epoch
                continue
            overhead = RECORD_HEADER_LENGTH + (GCM_OVERHEAD if item.epoch else 0) + m.HANDSHAKE_HEADER_LENGTH
            total, offset = len(item.body), 0
            while True:
                room = self.mtu - len(datagram) - overhead
                if datagram and room < min(total - offset, 64):
                    self._out.append(bytes(datagram))  # too little room left: start a new datagram
                    datagram = bytearray()
                    continue
                size = min(room, total - offset)
                fragment = m.encode_handshake_header(item.msg_type, total, item.message_seq, offset, size)
                fragment += item.body[offset : offset + size]
                datagram += self._records.seal(item.epoch, CT_HANDSHAKE, fragment)
                offset += size
                if offset >= total:
                    break
        if datagram:
            self._out.append(bytes(datagram))

    def _send_alert(self, level: int, description: int) -> None:
        with contextlib.suppress(SequenceExhausted):
            alert = m.encode_alert(level, description)
            self._out.append(self._records.seal(self._write_epoch, CT_ALERT, alert))

    def _fail(self, alert: int | None, reason: str) -> None:
        if self.state in ("failed", "closed"):
            return
        if alert is not None:
            self._send_alert(m.ALERT_FATAL, alert)
        self._finish("failed", DtlsFailed(reason))

    def _finish(self, state: str, event: DtlsEvent) -> None:
        self.state = state
        self._retransmit_at = None
        self._deadline = None
        self._flight = []
        self._early.clear()
        self._reassembler.reset(self._reassembler.next_seq)
        self._events.append(event)
