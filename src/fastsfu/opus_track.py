"""One speaker's tapped Opus packets put back in RTP order, with silence, DTX and loss filled by
empty Opus frames, so a file's sample count follows the sender's clock (docs/recording.md). Sans-I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATE = 48000  # Opus's RTP clock and Ogg Opus's granule rate (RFC 7587 §4.1, RFC 7845 §4)
HOLD_NS = 100_000_000  # a packet waits this long after arrival for earlier ones arriving late
MAX_PACKET_SAMPLES = 5760  # 120 ms (RFC 6716 §3.2.5)
JUMP_SLACK = RATE  # a timestamp gap more than 1 s past the arrival gap is a discontinuity
PLC_SAMPLES = 2880  # the first 60 ms of a gap are left to the decoder's concealment, then silence
SILENCE = b"\xff\xfe"  # a CELT frame whose silence flag is set (RFC 6716 §4.3)
SLIP = RATE  # arrivals 1 s behind the timestamps: the sender's clock stood still during a silence


def frame_samples(toc: int) -> int:
    """48 kHz samples of one frame of the TOC byte's configuration (RFC 6716 §3.1, Table 2)."""
    config = toc >> 3
    if config < 12:  # SILK-only: 10, 20, 40, 60 ms
        return (480, 960, 1920, 2880)[config & 3]
    if config < 16:  # hybrid: 10, 20 ms
        return (480, 960)[config & 1]
    return (120, 240, 480, 960)[config & 3]  # CELT-only: 2.5, 5, 10, 20 ms


def opus_samples(packet: bytes) -> int:
    """48 kHz samples in an Opus packet from its TOC byte (RFC 6716 §3.1, §3.2); 0 if invalid."""
    if not packet:
        return 0
    code = packet[0] & 3
    if code == 0:
        frames = 1
    elif code < 3:
        frames = 2
    else:
        if len(packet) < 2:
            return 0
        frames = packet[1] & 0x3F
    total = frames * frame_samples(packet[0])
    return total if 0 < total <= MAX_PACKET_SAMPLES else 0


def gap_packets(samples: int, previous: int | None = None) -> list[tuple[bytes, int]]:
    """Opus packets lasting `samples` (rounded down to 2.5 ms) that stand for audio never received.

    First up to 60 ms of zero-length frames, which ask the decoder to conceal (PLC) what is missing
    (RFC 7845 §4.1, RFC 6716 §3.2.1), with the configuration of the `previous` packet's TOC byte as
    RFC 7845 §4.1 advises. Then CELT frames with the silence flag set (RFC 6716 §4.3, the first
    symbol; the 0xFF 0xFE frame Discord clients send), which decode to digital silence: libopus's
    PLC over a long gap settles on a noise floor about 21 dB under the speech instead
    (docs/recording.md). Code 3 packets (RFC 6716 §3.2.5) carry several frames each, up to 120 ms.
    """
    out: list[tuple[bytes, int]] = []
    toc = previous if previous is not None else (31 << 3)  # default: CELT FB 20 ms
    head = toc & 0xFC  # the configuration and stereo flag, code 0
    frame = frame_samples(toc)
    conceal = min(samples, max(PLC_SAMPLES, frame)) // frame
    while conceal:
        n = min(conceal, MAX_PACKET_SAMPLES // frame)
        out.append((bytes([head | 3, n]), n * frame))  # code 3, CBR, n zero-length frames
        samples -= n * frame
        conceal -= n
    silent = (31 << 3) | (toc & 4)  # CELT FB 20 ms, the previous packet's stereo flag
    while samples >= 960:
        n = min(6, samples // 960)
        out.append((bytes([silent | 3, n]) + SILENCE * n, n * 960))
        samples -= n * 960
    for config, size in ((30, 480), (29, 240), (28, 120)):  # CELT 10, 5, 2.5 ms, zero-length
        if samples >= size:
            out.append((bytes([config << 3]), size))
            samples -= size
    return out


@dataclass
class SpeakerTrack:
    """Packets in by (extended sequence, RTP timestamp, arrival ns, payload); out in sequence order
    as (Opus packet, samples), each gap before a packet filled by gap_packets()."""

    pending: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)
    last_ext: int | None = None
    next_ts: int | None = None  # the RTP timestamp (mod 2^32) right after the last packet out
    last_arrival: int = 0
    packets: int = 0
    late: int = 0  # duplicates, or older than a packet already written
    malformed: int = 0  # not an Opus packet (RFC 6716 §3.4 R1-R7 on the TOC and count)
    concealed: int = 0  # samples of gap filled
    first_arrival: int | None = None
    position: int = 0  # samples out (packets and fill)
    base_offset: int = 0  # the least (arrival clock - position) so far: the path's own delay
    last_toc: int | None = None

    def push(self, ext: int, ts: int, arrival_ns: int, payload: bytes) -> None:
        if (self.last_ext is not None and ext <= self.last_ext) or ext in self.pending:
            self.late += 1
            return
        self.pending[ext] = (ts, arrival_ns, payload)

    def pop(self, now_ns: int, final: bool = False) -> list[tuple[bytes, int]]:
        """What can be written: packets that arrived HOLD_NS before `now_ns` (all if `final`)."""
        out: list[tuple[bytes, int]] = []
        if not self.pending:
            return out
        ready = sorted(self.pending)
        if not final:
            # Hold back from the first packet still within its hold: later ones must not pass it.
            for i, ext in enumerate(ready):
                if now_ns - self.pending[ext][1] < HOLD_NS:
                    ready = ready[:i]
                    break
        for ext in ready:
            ts, arrival, payload = self.pending.pop(ext)
            self._emit(ext, ts, arrival, payload, out)
        return out

    def _emit(self, ext: int, ts: int, arrival: int, payload: bytes, out: list[tuple[bytes, int]]) -> None:
        samples = opus_samples(payload)
        if not samples:
            self.malformed += 1
            return
        if self.first_arrival is None:
            self.first_arrival = arrival
        elapsed = (arrival - self.first_arrival) * RATE // 1_000_000_000  # on the arrival clock
        fill = 0
        if self.next_ts is not None:
            gap = (ts - self.next_ts) & 0xFFFFFFFF  # modulo 2^32: the timestamp may wrap
            if gap >= 1 << 31:
                gap -= 1 << 32
            wall = max(0, (arrival - self.last_arrival) * RATE // 1_000_000_000)
            if gap > wall + JUMP_SLACK or gap < -JUMP_SLACK:
                # The sender's clock jumped (a restart), or a frame held back by the encoder came
                # late and was filled for already (below): trust the arrivals.
                gap = wall - samples
            fill = max(0, gap)
            # A sender whose timestamp stood still while it sent nothing (discord.py counts frames
            # sent) arrives late by the whole silence: fill what exceeds the least delay seen.
            slip = elapsed - (self.position + fill) - self.base_offset
            if slip > SLIP:
                fill += slip
        if fill:
            filler = gap_packets(fill, self.last_toc)
            out.extend(filler)
            filled = sum(n for _, n in filler)
            self.concealed += filled
            self.position += filled
        self.base_offset = min(self.base_offset, elapsed - self.position)
        out.append((payload, samples))
        self.position += samples
        self.packets += 1
        self.last_ext = ext
        self.next_ts = (ts + samples) & 0xFFFFFFFF
        self.last_arrival = arrival
        self.last_toc = payload[0]
