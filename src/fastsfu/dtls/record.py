"""DTLS 1.2 record layer (RFC 6347 §4.1): epochs, 48-bit sequence numbers, AES-128-GCM records, anti-replay.

Nothing here raises on bad input: callers get a drop reason to count (RFC 6347 §4.1.2.7).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CONTENT_TYPES = frozenset((CT_CHANGE_CIPHER_SPEC, CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA))

DTLS_1_2 = 0xFEFD
DTLS_1_0 = 0xFEFF  # still used on epoch-0 ClientHello and HelloVerifyRequest records (RFC 6347 §4.2.1)

RECORD_HEADER_LENGTH = 13
EXPLICIT_NONCE_LENGTH = 8  # RFC 5288 §3
TAG_LENGTH = 16
GCM_OVERHEAD = EXPLICIT_NONCE_LENGTH + TAG_LENGTH
MAX_SEQUENCE = (1 << 48) - 1  # must never wrap (RFC 6347 §4.1)
MAX_CIPHERTEXT_LENGTH = (1 << 14) + 2048  # RFC 5246 §6.2.3
REPLAY_WINDOW_SIZE = 64  # RFC 6347 §4.1.2.6

_HEADER = struct.Struct("!BHH6sH")


@dataclass(slots=True)
class Record:
    content_type: int
    version: int
    epoch: int
    sequence: int
    fragment: bytes


class SequenceExhausted(Exception):
    """The 48-bit write sequence of an epoch is used up: the association must end (RFC 6347 §4.1)."""


def parse_records(data: bytes) -> tuple[list[Record], str | None]:
    """Split a datagram into records (RFC 6347 §4.1.1); returns them and a drop reason for trailing junk."""
    records: list[Record] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < RECORD_HEADER_LENGTH:
            return records, "bad_record"
        content_type, version, epoch, seq, length = _HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER_LENGTH
        if length > MAX_CIPHERTEXT_LENGTH:
            return records, "too_big"
        if end - pos < length:
            return records, "bad_record"
        if content_type not in CONTENT_TYPES or version not in (DTLS_1_2, DTLS_1_0):
            # The length is still trustworthy enough to skip to the next record (RFC 6347 §4.1.2.7).
            pos += length
            records.append(Record(-1, version, epoch, 0, b""))
            continue
        records.append(
            Record(content_type, version, epoch, int.from_bytes(seq, "big"), data[pos : pos + length])
        )
        pos += length
    return records, None


def encode_record(
    content_type: int, epoch: int, sequence: int, fragment: bytes, version: int = DTLS_1_2
) -> bytes:
    return _HEADER.pack(content_type, version, epoch, sequence.to_bytes(6, "big"), len(fragment)) + fragment


class ReplayWindow:
    """Sliding 64-record window (RFC 6347 §4.1.2.6), updated only after a record authenticates."""

    __slots__ = ("latest", "bitmap")

    def __init__(self) -> None:
        self.latest = -1
        self.bitmap = 0  # bit i set: sequence latest - i was received

    def is_fresh(self, seq: int) -> bool:
        if seq > self.latest:
            return True
        offset = self.latest - seq
        return offset < REPLAY_WINDOW_SIZE and not (self.bitmap >> offset) & 1

    def mark(self, seq: int) -> None:
        if seq > self.latest:
            shift = seq - self.latest
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << REPLAY_WINDOW_SIZE) - 1) if shift < 64 else 1
            self.latest = seq
        else:
            self.bitmap |= 1 << (self.latest - seq)


class _Cipher:
    __slots__ = ("aead", "iv")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self.aead = AESGCM(key)
        self.iv = iv


class RecordLayer:
    """Per-epoch write sequences and keys, per-epoch read keys and replay windows."""

    def __init__(self) -> None:
        self._write_seq: dict[int, int] = {0: 0}
        self._write: dict[int, _Cipher] = {}
        self._read: dict[int, _Cipher] = {}
        self._windows: dict[int, ReplayWindow] = {0: ReplayWindow()}

    def set_write_keys(self, epoch: int, key: bytes, iv: bytes) -> None:
        self._write[epoch] = _Cipher(key, iv)
        self._write_seq.setdefault(epoch, 0)  # each epoch starts at sequence 0 (RFC 6347 §4.1)

    def set_read_keys(self, epoch: int, key: bytes, iv: bytes) -> None:
        self._read[epoch] = _Cipher(key, iv)
        self._windows.setdefault(epoch, ReplayWindow())

    def can_read(self, epoch: int) -> bool:
        return epoch == 0 or epoch in self._read

    def bump_write_sequence(self, epoch: int, sequence: int) -> None:
        """Never reuse a sequence number spent elsewhere, e.g. by a HelloVerifyRequest (RFC 6347 §4.2.1)."""
        self._write_seq[epoch] = max(self._write_seq[epoch], sequence)

    def seal(self, epoch: int, content_type: int, payload: bytes) -> bytes:
        seq = self._write_seq[epoch]
        if seq > MAX_SEQUENCE:
            raise SequenceExhausted
        self._write_seq[epoch] = seq + 1
        seq_bytes = seq.to_bytes(6, "big")
        if epoch == 0:
            return _HEADER.pack(content_type, DTLS_1_2, 0, seq_bytes, len(payload)) + payload
        cipher = self._write[epoch]
        # RFC 5288 §3 nonce: implicit IV || explicit part; epoch||seq is unique per key (RFC 6347 §4.1.2.1).
        explicit = epoch.to_bytes(2, "big") + seq_bytes
        aad = explicit + struct.pack("!BHH", content_type, DTLS_1_2, len(payload))  # RFC 5246 §6.2.3.3
        body = explicit + cipher.aead.encrypt(cipher.iv + explicit, payload, aad)
        return _HEADER.pack(content_type, DTLS_1_2, epoch, seq_bytes, len(body)) + body

    def open(self, record: Record) -> bytes | str:
        """Authenticate and decrypt; returns the plaintext or a drop reason. Marks the replay window."""
        window = self._windows.get(record.epoch)
        if window is None:
            return "bad_epoch"
        if not window.is_fresh(record.sequence):
            return "replay"
        if record.epoch == 0:
            plaintext = record.fragment
        else:
            cipher = self._read[record.epoch]
            fragment = record.fragment
            if len(fragment) < GCM_OVERHEAD:
                return "bad_record"
            explicit = fragment[:EXPLICIT_NONCE_LENGTH]
            header = record.epoch.to_bytes(2, "big") + record.sequence.to_bytes(6, "big")
            aad = header + struct.pack(
                "!BHH", record.content_type, record.version, len(fragment) - GCM_OVERHEAD
            )
            try:
                plaintext = cipher.aead.decrypt(cipher.iv + explicit, fragment[EXPLICIT_NONCE_LENGTH:], aad)
            except InvalidTag:
                return "bad_record"
        window.mark(record.sequence)
        return plaintext
