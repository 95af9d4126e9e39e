"""Ogg Opus stream writer, sans-I/O: Opus packets in, Ogg pages (RFC 3533) out, with the
OpusHead/OpusTags headers and 48 kHz granule positions of RFC 7845. No encoding, no file access.
"""

from __future__ import annotations

import struct

from fastsfu._rtp import ogg_crc

PAGE_SAMPLES = 48000  # close a page after about one second of audio (RFC 7845 §6: ≤ 1 s per page)
PAGE_BYTES = 4096  # ... or this much data, so a crash loses little
MAX_SEGMENTS = 255  # lacing values per page (RFC 3533 §6)
HEADER_FIXED = 27  # page header without its segment table (RFC 3533 §6)

_FLAG_CONTINUED, _FLAG_BOS, _FLAG_EOS = 0x01, 0x02, 0x04


def _crc_table() -> list[int]:
    # RFC 3533 §6 ("CRC_checksum"): polynomial 0x04c11db7, initial value 0, no reflection, no final XOR.
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc_reference(data: bytes | bytearray) -> int:
    """The page checksum in Python: the reference of the datapath module's ogg_crc."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[(crc >> 24) ^ byte]
    return crc


def lacing(size: int) -> bytes:
    """The segment table entries of one whole packet: 255s then the remainder (0 after an exact
    multiple of 255, which is how a reader knows the packet ended; RFC 3533 §5)."""
    return b"\xff" * (size // 255) + bytes([size % 255])


def page(
    serial: int, sequence: int, granule: int, packets: list[bytes], *, bos: bool = False, eos: bool = False
) -> bytes:
    """One page holding whole packets (their lacing must fit in 255 segments)."""
    table = b"".join(lacing(len(p)) for p in packets)
    if len(table) > MAX_SEGMENTS:
        raise ValueError("packets do not fit in one Ogg page")
    flags = (_FLAG_BOS if bos else 0) | (_FLAG_EOS if eos else 0)
    header = bytearray(
        struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(table))
    )
    out = header + table + b"".join(packets)
    struct.pack_into("<I", out, 22, ogg_crc(out))
    return bytes(out)


def opus_head(channels: int = 2, pre_skip: int = 0, input_rate: int = 48000) -> bytes:
    """RFC 7845 §5.1: version 1, channel mapping family 0 (mono or stereo), output gain 0."""
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str, comments: list[str]) -> bytes:
    """RFC 7845 §5.2: vendor string and user comments, each length-prefixed UTF-8."""
    name = vendor.encode()
    out = [b"OpusTags", struct.pack("<I", len(name)), name, struct.pack("<I", len(comments))]
    for comment in comments:
        raw = comment.encode()
        out += [struct.pack("<I", len(raw)), raw]
    return b"".join(out)


class OggOpusStream:
    """One logical Ogg Opus stream. `headers()` first, then `packet()` per Opus packet (with its
    duration in 48 kHz samples), then `finish()`; each returns the bytes of the pages it completed.

    The granule position of a page counts every sample of the packets that end on it, the
    pre-skip ones included (RFC 7845 §4): a reader plays the last granule minus pre-skip samples.
    """

    def __init__(self, serial: int, channels: int = 2, pre_skip: int = 0) -> None:
        self.serial = serial & 0xFFFFFFFF
        self.channels = channels
        self.pre_skip = pre_skip
        self.sequence = 0
        self.granule = 0  # samples of every packet given, pre-skip included
        self.samples = 0  # samples given, pre-skip included
        self._packets: list[bytes] = []
        self._segments = 0
        self._bytes = 0
        self._page_samples = 0
        self.finished = False

    def headers(self, vendor: str = "fastsfu", comments: list[str] | None = None) -> bytes:
        """The two header pages (RFC 7845 §3: OpusHead alone on a BOS page, OpusTags on the next)."""
        head = self._page(0, [opus_head(self.channels, self.pre_skip)], bos=True)
        return head + self._page(0, [opus_tags(vendor, comments or [])])

    def pending_bytes(self) -> int:
        """What finish() would write now: the buffered page (header, table, data)."""
        return HEADER_FIXED + self._segments + self._bytes

    def packet(self, data: bytes, samples: int) -> bytes:
        if self.finished:
            raise RuntimeError("stream finished")
        need = len(data) // 255 + 1
        if need > MAX_SEGMENTS:
            raise ValueError("Opus packet too large for one page")
        out = b""
        if self._segments + need > MAX_SEGMENTS:
            out = self._flush()
        self._packets.append(data)
        self._segments += need
        self._bytes += len(data)
        self._page_samples += samples
        self.granule += samples
        self.samples = self.granule
        if self._page_samples >= PAGE_SAMPLES or self._bytes >= PAGE_BYTES:
            out += self._flush()
        return out

    def flush(self) -> bytes:
        """Close the page being filled, if any (the data becomes readable in the file)."""
        return self._flush() if self._packets else b""

    def finish(self) -> bytes:
        """The last page, flagged end of stream (RFC 3533 §6); empty if no packet was buffered."""
        if self.finished:
            return b""
        self.finished = True
        return self._flush(eos=True)

    def _flush(self, eos: bool = False) -> bytes:
        out = self._page(self.granule, self._packets, eos=eos)
        self._packets, self._segments, self._bytes, self._page_samples = [], 0, 0, 0
        return out

    def _page(self, granule: int, packets: list[bytes], bos: bool = False, eos: bool = False) -> bytes:
        out = page(self.serial, self.sequence, granule, packets, bos=bos, eos=eos)
        self.sequence += 1
        return out
