"""The Ogg Opus writer (RFC 3533 pages, RFC 7845 headers and granules) and the speaker track (RTP
order, gaps, wraps) without sockets; the written pages are read back by tests/recording_helpers.py
and, where it exists, checked by opus-tools' opusinfo."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from recording_helpers import check_structure, read_pages

from fastsfu.ogg import OggOpusStream, lacing, ogg_crc, ogg_crc_reference, opus_head, page
from fastsfu.opus_track import HOLD_NS, SILENCE, SpeakerTrack, gap_packets, opus_samples

TONE = bytes([0xFC]) + bytes(80)  # CELT FB 20 ms stereo, code 0: 960 samples


def test_crc_is_the_ogg_polynomial_not_zlibs() -> None:
    # The Ogg CRC (RFC 3533 §6): poly 0x04c11db7, no reflection, init 0; "123456789" -> 0x89A1897F
    # (the CRC-32/MPEG-2 family without init/xorout), and it is not zlib's reflected CRC-32.
    assert ogg_crc(b"123456789") == 0x89A1897F
    assert ogg_crc(b"123456789") != zlib.crc32(b"123456789")
    assert ogg_crc(b"") == 0
    rng = random.Random(7)
    for size in (1, 27, 255, 4096, 65307):
        data = rng.randbytes(size)
        assert ogg_crc(data) == ogg_crc_reference(data)  # the C one against the Python reference


def test_lacing_of_a_255_byte_packet_ends_with_a_zero() -> None:
    assert lacing(0) == b"\x00"
    assert lacing(254) == b"\xfe"
    assert lacing(255) == b"\xff\x00"  # without the 0 the packet would continue into the next
    assert lacing(510) == b"\xff\xff\x00"
    assert lacing(600) == b"\xff\xff\x5a"


def test_page_with_a_255_byte_packet_reads_back(tmp_path: Path) -> None:
    raw = page(7, 3, 1234, [b"a" * 255, b"b" * 10], eos=True)
    path = tmp_path / "p.ogg"
    path.write_bytes(raw)
    (p,) = read_pages(path)
    assert p.segments == b"\xff\x00\x0a" and p.body == b"a" * 255 + b"b" * 10
    assert (p.flags, p.granule, p.serial, p.sequence) == (0x04, 1234, 7, 3)


def test_a_page_never_holds_more_than_255_segments(tmp_path: Path) -> None:
    stream = OggOpusStream(1)
    out = stream.headers()
    big = b"x" * 300  # two lacing values each
    for _ in range(200):
        out += stream.packet(big, 960)
    out += stream.finish()
    path = tmp_path / "s.opus"
    path.write_bytes(out)
    pages = check_structure(path)
    assert all(len(p.segments) <= 255 for p in pages)
    # Granule of each page: every sample of the packets ending on it (pre-skip 0).
    audio = pages[2:]
    counted = 0
    for p in audio:
        counted += sum(1 for s in p.segments if s < 255) * 960
        assert p.granule == counted
    assert audio[-1].granule == 200 * 960


def test_headers_are_rfc7845_opushead_and_opustags(tmp_path: Path) -> None:
    head = opus_head(2, 0)
    assert head[:8] == b"OpusHead" and len(head) == 19
    assert struct.unpack("<BBHIhB", head[8:]) == (1, 2, 0, 48000, 0, 0)
    stream = OggOpusStream(9, pre_skip=480)
    lead = bytes([30 << 3])  # an empty 10 ms frame: the decoder has no state, it outputs zeros
    data = stream.headers("fastsfu", ["A=b"]) + stream.packet(lead, 480) + stream.packet(TONE, 960)
    data += stream.finish()
    path = tmp_path / "h.opus"
    path.write_bytes(data)
    pages = check_structure(path)
    assert pages[0].body[10:12] == struct.pack("<H", 480)
    assert pages[-1].granule == 480 + 960  # pre-skip samples included (RFC 7845 §4)
    tags = b"OpusTags" + struct.pack("<I", 7) + b"fastsfu" + struct.pack("<I", 1) + b"\x03\0\0\0A=b"
    assert pages[1].body == tags
    if shutil.which("opusinfo"):
        info = subprocess.run(["opusinfo", str(path)], capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stdout + info.stderr
        assert "WARNING" not in info.stdout and "0m:00.020s" in info.stdout, info.stdout


def test_opus_samples_from_the_toc() -> None:
    assert opus_samples(bytes([0xFC])) == 960  # CELT 20 ms, one frame
    assert opus_samples(bytes([0x08])) == 960  # SILK NB 20 ms
    assert opus_samples(bytes([0x0B, 0x03])) == 3 * 960  # SILK NB 20 ms, code 3, three frames
    assert opus_samples(bytes([0x21])) == 2 * 480  # SILK WB 10 ms, code 1: two frames
    assert opus_samples(bytes([0x1B, 0x07])) == 0  # 7 x 60 ms is past 120 ms (RFC 6716 R5)
    assert opus_samples(b"") == 0
    assert opus_samples(bytes([0xFB])) == 0  # code 3 without its frame count


def test_gap_packets_conceal_then_silence_and_add_up() -> None:
    for previous in (None, 0xFC, 0x08, 0x18, 0x78):  # CELT 20 ms, SILK 20 ms, SILK 60 ms, hybrid 10 ms
        for samples in (120, 960, 1000, 2 * 960, 3 * 960 + 480, 48000, 480 + 240 + 120):
            packets = gap_packets(samples, previous)
            assert sum(n for _, n in packets) == samples - samples % 120, (previous, samples)
            assert all(opus_samples(p) == n for p, n in packets)
    first, *rest = gap_packets(10 * 960, 0xFC)
    assert first == (bytes([0xFF, 3]), 3 * 960)  # three zero-length frames as the last TOC: PLC
    assert rest[0][0] == bytes([0xFF, 6]) + SILENCE * 6  # then CELT silence frames, stereo as before
    assert gap_packets(960, 0x08) == [(bytes([0x0B, 1]), 960)]  # SILK NB 20 ms, as the last packet
    assert gap_packets(2880, 0x18) == [(bytes([0x1B, 1]), 2880)]  # one lost 60 ms SILK frame


def push_all(track: SpeakerTrack, packets: list[tuple[int, int, bytes]], t0: int = 0) -> None:
    for i, (ext, ts, payload) in enumerate(packets):
        track.push(ext, ts, t0 + i * 20_000_000, payload)


def test_track_orders_drops_duplicates_and_fills_gaps_across_a_timestamp_wrap() -> None:
    track = SpeakerTrack()
    ts0 = (1 << 32) - 2 * 960
    packets = [(100 + i, (ts0 + i * 960) & 0xFFFFFFFF, TONE) for i in range(6)]
    del packets[3]  # lost: its 20 ms is concealed
    packets[0], packets[1] = packets[1], packets[0]  # reordered within the hold
    push_all(track, packets)
    track.push(102, (ts0 + 2 * 960) & 0xFFFFFFFF, 0, TONE)  # a duplicate still pending
    out = track.pop(10**12)
    assert sum(n for _, n in out) == 6 * 960  # across the wrap, the lost packet included
    assert out[3] == (bytes([0xFF, 1]), 960)  # TONE's configuration, stereo, one empty frame
    assert track.late == 1 and track.concealed == 960
    track.push(101, ts0 + 960, 10**12, TONE)  # older than what was written: late
    assert track.late == 2 and track.pop(10**13, final=True) == []


def test_track_holds_recent_packets_for_late_ones() -> None:
    track = SpeakerTrack()
    track.push(5, 0, 0, TONE)
    track.push(7, 1920, 10_000_000, TONE)
    assert [n for _, n in track.pop(HOLD_NS)] == [960]  # 7 is within its hold: 6 may come
    track.push(6, 960, 15_000_000, TONE)
    assert [n for _, n in track.pop(HOLD_NS + 20_000_000)] == [960, 960]
    assert track.concealed == 0


def test_track_follows_arrivals_when_the_senders_clock_stands_still() -> None:
    # discord.py counts frames: after 2 s sent nothing, its timestamp continues where it stopped.
    track = SpeakerTrack()
    track.push(1, 0, 0, TONE)
    track.push(2, 960, 20_000_000, TONE)
    track.push(3, 1920, 2_040_000_000, TONE)
    out = track.pop(10**12)
    assert sum(n for _, n in out) == 3 * 960 + 2 * 48000


def test_track_counts_a_held_frame_and_the_timestamp_gap_after_it_once() -> None:
    # An encoder with a frame of lookahead sends its last frame before a 2 s gap only when the
    # next input comes: that frame arrives 2 s late, then the timestamp jumps by the gap.
    track = SpeakerTrack()
    track.push(1, 0, 0, TONE)
    track.push(2, 960, 2_020_000_000, TONE)
    track.push(3, 1920 + 2 * 48000, 2_040_000_000, TONE)
    track.push(4, 2880 + 2 * 48000, 2_060_000_000, TONE)
    assert sum(n for _, n in track.pop(10**12)) == 4 * 960 + 2 * 48000


def test_track_trusts_arrivals_over_a_timestamp_jump() -> None:
    track = SpeakerTrack()
    track.push(1, 0, 0, TONE)
    track.push(2, 960 + 10 * 48000, 20_000_000, TONE)  # a sender restart: 10 s ahead
    assert sum(n for _, n in track.pop(10**12)) == 2 * 960


@pytest.mark.parametrize("bad", [b"", bytes([0xFB])])
def test_track_counts_packets_that_are_not_opus(bad: bytes) -> None:
    track = SpeakerTrack()
    track.push(1, 0, 0, bad)
    assert track.pop(10**12) == [] and track.malformed == 1
