"""Checks of recorded Ogg Opus files with independent tools: the page structure read back by hand
(RFC 3533), the audio decoded by opus-tools' opusdec, its tone found by Goertzel filters."""

from __future__ import annotations

import array
import asyncio
import fractions
import math
import os
import shutil
import struct
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiortc.mediastreams import AudioStreamTrack
from av import AudioFrame

from fastsfu.ogg import ogg_crc_reference

RATE = 48000

# Skipped only outside CI: there scripts/recording_setup.sh installs it, and a missing one fails.
needs_opusdec = pytest.mark.skipif(
    shutil.which("opusdec") is None and os.environ.get("CI") != "true",
    reason="opusdec missing: scripts/recording_setup.sh installs opus-tools",
)


@dataclass
class Page:
    flags: int
    granule: int
    serial: int
    sequence: int
    segments: bytes
    body: bytes


def read_pages(path: Path) -> list[Page]:
    """Every page of an Ogg file, each CRC checked (raises AssertionError on a bad one)."""
    data = path.read_bytes()
    pages, off = [], 0
    while off < len(data):
        assert data[off : off + 4] == b"OggS", f"no capture pattern at {off}"
        _, flags, granule, serial, sequence, crc, count = struct.unpack_from("<BBqIIIB", data, off + 4)
        segments = data[off + 27 : off + 27 + count]
        size = 27 + count + sum(segments)
        raw = bytearray(data[off : off + size])
        raw[22:26] = b"\0\0\0\0"
        assert ogg_crc_reference(raw) == crc, f"bad CRC on page {sequence}"
        pages.append(Page(flags, granule, serial, sequence, segments, data[off + 27 + count : off + size]))
        off += size
    return pages


def check_structure(path: Path) -> list[Page]:
    """RFC 7845 §3 layout: OpusHead alone on a BOS page, OpusTags next, EOS on the last page only,
    granules never decreasing, sequence numbers without a gap."""
    pages = read_pages(path)
    assert len(pages) >= 3, "headers and at least one audio page"
    assert pages[0].flags == 0x02 and pages[0].body.startswith(b"OpusHead")
    assert pages[1].body.startswith(b"OpusTags")
    assert pages[-1].flags & 0x04, "the last page has the EOS flag"
    assert not any(p.flags & 0x04 for p in pages[:-1])
    assert [p.sequence for p in pages] == list(range(len(pages)))
    granules = [p.granule for p in pages[2:]]
    assert granules == sorted(granules)
    return pages


def decode(path: Path, tmp: Path) -> array.array[int]:
    """The file decoded by opusdec at 48 kHz, left channel, 16-bit."""
    out = tmp / (path.stem + ".wav")
    subprocess.run(
        ["opusdec", "--quiet", "--rate", "48000", "--force-wav", "--no-dither", str(path), str(out)],
        check=True,
        timeout=60,
    )
    with wave.open(str(out)) as w:
        channels, frames = w.getnchannels(), w.readframes(w.getnframes())
    pcm = array.array("h", frames)
    return pcm[::channels]


def decode_ffmpeg(path: Path) -> array.array[int]:
    """The file read by FFmpeg's Ogg demuxer and decoded by its own Opus decoder (through PyAV,
    which aiortc installs): a second, independent reader. Left channel, 16-bit."""
    import av

    out: array.array[int] = array.array("h")
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        for frame in container.decode(stream):
            for pcm in resampler.resample(frame):
                out.frombytes(bytes(pcm.planes[0])[: pcm.samples * 2])
    return out


def power(samples: array.array[int] | list[int], hz: float) -> float:
    """Goertzel: the signal's power at `hz`."""
    coeff = 2 * math.cos(2 * math.pi * hz / RATE)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def dominant_hz(samples: array.array[int], start: float, seconds: float = 0.2) -> float:
    """The strongest frequency of 100-2000 Hz (20 Hz steps) in `seconds` from `start` seconds."""
    window = samples[int(start * RATE) : int((start + seconds) * RATE)]
    return max(range(100, 2001, 20), key=lambda hz: power(window, hz))


def rms(samples: array.array[int], start: float, seconds: float) -> float:
    window = samples[int(start * RATE) : int((start + seconds) * RATE)]
    return math.sqrt(sum(x * x for x in window) / max(1, len(window)))


class ToneTrack(AudioStreamTrack):
    """aiortc audio in real time from `segments` of (Hz, seconds); Hz None sends nothing while the
    timestamps run on (a muted microphone). Starts at `go`; after the last segment, nothing more:
    `sent_seconds` is the wall time from the first frame to the end of the last."""

    def __init__(self, segments: list[tuple[float | None, float]], go: asyncio.Event) -> None:
        super().__init__()
        self.plan = [hz for hz, seconds in segments for _ in range(round(seconds * 50))]
        self.go = go
        self.index = 0
        self.start = 0.0

    @property
    def sent_seconds(self) -> float:
        return len(self.plan) * 0.02

    async def recv(self) -> AudioFrame:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        if self.index == 0:
            await self.go.wait()
            self.start = loop.time()
        while self.index < len(self.plan) and self.plan[self.index] is None:
            self.index += 1
        if self.index >= len(self.plan):
            await asyncio.Event().wait()  # nothing more until the sender stops
        hz, i = self.plan[self.index], self.index
        self.index += 1
        await asyncio.sleep(max(0.0, self.start + i * 0.02 - loop.time()))
        assert hz is not None
        pcm = array.array("h")
        for k in range(i * 960, (i + 1) * 960):
            v = int(8000 * math.sin(2 * math.pi * hz * k / RATE))
            pcm.extend((v, v))
        frame = AudioFrame(format="s16", layout="stereo", samples=960)
        frame.planes[0].update(pcm.tobytes())
        frame.pts = i * 960
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame
