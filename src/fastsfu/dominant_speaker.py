"""Dominant speaker identification of Volfin and Cohen ("Dominant speaker identification for
multipoint videoconferencing", Computer Speech and Language 27 (2013) 895-910), sans-I/O: feed each
speaker's per-frame RFC 6464 levels, then ask who dominates (docs/observers.md#active-speaker)."""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Levels are RFC 6464 §3 -dBov (0 loudest, 127 silence); the algorithm works on loudness, 127 - level.
MAX_LOUDNESS = 127

# The paper's local processing stage (docs/observers.md#active-speaker) counts active frequency
# sub-bands per frame; with only the level of each frame at hand, its loudness is cut into N1 bands
# instead (as Jitsi and mediasoup do).
N1 = 13  # sub-bands of a frame: an "immediate" is 0..N1-1
N2 = 5  # immediates per medium time-interval (5 frames: 100 ms of 20 ms packets)
N3 = 10  # mediums per long time-interval (50 frames: 1 s)
BAND = (MAX_LOUDNESS + N1 - 1) // N1  # loudness per sub-band (10 dB)
IMMEDIATE_ACTIVE = 7  # an immediate above this (louder than about -47 dBov) makes a medium count it
MEDIUM_ACTIVE = 4  # a medium above this (all N2 frames active) makes a long count it
FRAMES = N2 * N3  # the frames the long time-interval spans: all the history a speaker needs

# Local processing: a speech activity score is the log likelihood ratio of k active sub-units out of n under
# speech (binomial, p) against non-speech (exponential, lambda): one lambda per time-interval.
P = 0.5
LAMBDA_IMMEDIATE = 0.78
LAMBDA_MEDIUM = 24.0
LAMBDA_LONG = 47.0
MIN_SCORE = 1e-10  # scores are floored so that the ratios below stay finite

# The paper's global decision stage: a challenger replaces the dominant speaker when the log ratios of its
# scores to the dominant's exceed C1 (immediate), C2 (medium) and C3 (long); among several, the
# one with the largest medium ratio wins.
C1 = 3.0
C2 = 2.0
C3 = 0.0

# Packets arrive in bursts around the decision time (network jitter, a late batch): an interval
# that brought fewer than half its frames is silence at its end (DTX sends one frame in 20, a
# muted or stopped sender none); a fuller one is a late or early speaker (fastsfu's rule; see
# DominantSpeakerIdentification.feed).
SILENT_SHARE = 0.5

# Noise floor (the paper's sub-band noise estimate of its local stage, reduced to the frame's level as Jitsi
# does): a frame within one band of the quietest loudness of the last window of about 15 s is not
# activity, so a constant background does not count as speech. A quieter frame lowers the floor at
# once; it rises only at the end of a window, halfway (geometric mean) to that window's quietest.
NOISE_WINDOW = 15_000 // 20


def activity_score(active: int, n: int, lam: float) -> float:
    """Local processing: log( C(n,k) p^k (1-p)^(n-k) / (lam e^(-lam k)) ), floored at MIN_SCORE."""
    score = (
        math.log(math.comb(n, active))
        + active * math.log(P)
        + (n - active) * math.log(1 - P)
        - math.log(lam)
        + lam * active
    )
    return max(score, MIN_SCORE)


# The scores of each possible count, computed once.
IMMEDIATE_SCORES = [activity_score(k, N1, LAMBDA_IMMEDIATE) for k in range(N1 + 1)]
MEDIUM_SCORES = [activity_score(k, N2, LAMBDA_MEDIUM) for k in range(N2 + 1)]
LONG_SCORES = [activity_score(k, N3, LAMBDA_LONG) for k in range(N3 + 1)]
SILENT_SCORES = (MIN_SCORE, MIN_SCORE, MIN_SCORE)  # no dominant speaker yet: compared with silence


def _count_active(values: list[int], start: int, length: int, threshold: int) -> int:
    return sum(1 for v in values[start : start + length] if v > threshold)


# A level byte (-dBov) to its loudness; the levels of an interval are mapped with bytes.translate.
LOUDNESS = bytes(MAX_LOUDNESS - min(v, MAX_LOUDNESS) for v in range(256))


@functools.cache
def _immediates_table(floor: int) -> bytes:
    """Loudness to immediate (its sub-band), 0 within one band of the noise floor."""
    return bytes(0 if v < floor + BAND else min(v // BAND, N1 - 1) for v in range(256))


@dataclass
class Speaker:
    """One speaker's last FRAMES immediates (newest first) and noise floor."""

    immediates: deque[int] = field(default_factory=lambda: deque([0] * FRAMES, maxlen=FRAMES))
    floor: int = 0  # the noise floor's loudness (0: no full window seen yet)
    window_min: int = 0  # the quietest non-silent loudness of the current window
    window: int = 0
    _scores: tuple[float, float, float] | None = None  # cached until the next frames

    def frames(self, levels: bytes) -> None:
        """Frames' RFC 6464 levels (-dBov), oldest first; the floor moves per call (an interval)."""
        if not levels:
            return
        self._scores = None
        loudness = levels.translate(LOUDNESS)
        heard = loudness.replace(b"\0", b"")  # digital silence or no packet: not the room's noise
        if heard:
            quietest = min(heard)
            if quietest < self.floor:
                self.floor = quietest
            self.window_min = min(self.window_min or quietest, quietest)
            self.window += len(heard)
            if self.window >= NOISE_WINDOW:
                rise = self.window_min if self.floor == 0 else math.sqrt(self.floor * self.window_min)
                self.floor = int(rise)
                self.window_min = self.window = 0
        self.immediates.extendleft(loudness.translate(_immediates_table(self.floor)))

    def scores(self) -> tuple[float, float, float]:
        """Local processing: immediate, medium and long scores from the newest frame, the newest N2 frames and
        the newest N3 mediums."""
        if self._scores is None:
            imm = list(self.immediates)
            if max(imm) <= IMMEDIATE_ACTIVE:  # nothing active in the long interval
                self._scores = (IMMEDIATE_SCORES[imm[0]], MIN_SCORE, MIN_SCORE)
            else:
                mediums = [_count_active(imm, i * N2, N2, IMMEDIATE_ACTIVE) for i in range(N3)]
                long = _count_active(mediums, 0, N3, MEDIUM_ACTIVE)
                self._scores = (IMMEDIATE_SCORES[imm[0]], MEDIUM_SCORES[mediums[0]], LONG_SCORES[long])
        return self._scores


class DominantSpeakerIdentification(Generic[K]):
    """Speakers by key; `feed` frames after each interval, then `decide` (global decision). Silence changes
    nothing: the last dominant speaker stays until someone else wins the comparison."""

    def __init__(self) -> None:
        self.speakers: dict[K, Speaker] = {}
        self.dominant: K | None = None

    def add(self, key: K) -> None:
        self.speakers.setdefault(key, Speaker())

    def remove(self, key: K) -> None:
        self.speakers.pop(key, None)
        if self.dominant == key:
            self.dominant = None

    def feed(self, key: K, levels: bytes, frames: int = 0) -> None:
        """The interval's levels (-dBov, oldest first), one per frame; `frames`: how many frames
        the interval lasted. When fewer than SILENT_SHARE of them brought a level (DTX, muted,
        stopped), the missing ones are silent and count as the newest (the sender is silent now;
        mediasoup's idle timeout does the same)."""
        speaker = self.speakers[key]
        speaker.frames(levels)
        if len(levels) < frames * SILENT_SHARE:
            speaker.frames(bytes([MAX_LOUDNESS]) * min(frames - len(levels), FRAMES))

    def decide(self) -> K | None:
        """Global decision: the dominant speaker after this interval. With none yet, the challengers are
        compared with silence, so the first who speaks becomes dominant."""
        current = self.speakers.get(self.dominant) if self.dominant is not None else None
        base = current.scores() if current is not None else SILENT_SCORES
        best: K | None = None
        best_c2 = C2
        for key, speaker in self.speakers.items():
            if speaker is current:
                continue
            imm, med, lng = speaker.scores()
            if math.log(imm / base[0]) <= C1:  # most speakers, most of the time: not speaking now
                continue
            c2 = math.log(med / base[1])
            if c2 > best_c2 and math.log(lng / base[2]) > C3:
                best, best_c2 = key, c2
        if best is not None:
            self.dominant = best
        return self.dominant
