"""Dominant speaker identification (fastsfu.dominant_speaker, docs/observers.md#active-speaker) on
synthetic level sequences: 20 ms frames, decisions every 300 ms (15 frames), as the observer runs."""

from __future__ import annotations

from fastsfu.dominant_speaker import (
    IMMEDIATE_SCORES,
    LONG_SCORES,
    MEDIUM_SCORES,
    MIN_SCORE,
    DominantSpeakerIdentification,
)

INTERVAL = 15  # frames per decision (300 ms)
TALK, NOISE, SILENCE = 25, 95, 127  # -dBov: speech, a quiet room, digital silence (RFC 6464 §3)


class Room:
    """Speakers A, B, C fed one decision interval at a time; `run` gives the decisions."""

    def __init__(self) -> None:
        self.dsi: DominantSpeakerIdentification[str] = DominantSpeakerIdentification()
        for key in "ABC":
            self.dsi.add(key)

    def run(self, intervals: int, **levels: list[int] | int) -> list[str | None]:
        """Each speaker's frames for the next intervals: a level for every frame, or a list of
        levels cycled over (bursts); a speaker not named sends nothing (DTX / stopped)."""
        out = []
        for _ in range(intervals):
            for key in self.dsi.speakers:
                spec = levels.get(key)
                if spec is None:
                    frames: list[int] = []
                elif isinstance(spec, int):
                    frames = [spec] * INTERVAL
                else:
                    frames = spec[:INTERVAL]
                    levels[key] = spec[INTERVAL:] or NOISE
                self.dsi.feed(key, bytes(frames), INTERVAL)
            out.append(self.dsi.decide())
        return out


def test_the_scores_are_the_likelihood_ratios_with_the_papers_parameters() -> None:
    # Silence scores the floor; a fully active long interval scores far above a single frame.
    assert IMMEDIATE_SCORES[0] == MEDIUM_SCORES[0] == LONG_SCORES[0] == MIN_SCORE
    assert 4.5 < IMMEDIATE_SCORES[9] < 5.0  # log C(13,9) + 13 log .5 - log .78 + .78*9
    assert 110 < MEDIUM_SCORES[5] < 115 and 450 < LONG_SCORES[10] < 470
    assert all(a < b for a, b in zip(LONG_SCORES[1:], LONG_SCORES[2:], strict=False))


def test_a_single_speaker_becomes_dominant_and_nobody_before_anyone_speaks() -> None:
    room = Room()
    assert room.run(3, A=NOISE, B=NOISE, C=SILENCE) == [None] * 3  # a quiet room names nobody
    assert room.run(1, A=TALK, B=NOISE, C=NOISE) == ["A"]  # within the first interval of speech


def test_a_cough_or_an_interjection_does_not_switch() -> None:
    room = Room()
    room.run(5, A=TALK, B=NOISE, C=NOISE)
    assert room.dsi.dominant == "A"
    # B coughs for 200 ms while A talks on; then C interjects 200 ms while A pauses for 300 ms.
    cough = [TALK] * 10 + [NOISE] * 5
    assert set(room.run(2, A=TALK, B=cough, C=NOISE)) == {"A"}
    pause = [NOISE] * 15
    interjection = [NOISE] * 5 + [TALK] * 10
    assert room.run(1, A=pause, B=NOISE, C=interjection) == ["A"]
    assert set(room.run(3, A=TALK, B=NOISE, C=NOISE)) == {"A"}


def test_a_sustained_challenger_takes_over_within_a_bounded_number_of_intervals() -> None:
    room = Room()
    room.run(10, A=TALK, B=NOISE, C=NOISE)
    # A stops; B keeps talking: B takes over once its long interval beats A's fading one.
    decisions = room.run(6, A=NOISE, B=TALK, C=NOISE)
    assert "B" in decisions, decisions
    switched = decisions.index("B")
    assert switched <= 2, decisions  # within 900 ms of B starting (about 0.6 s: the global decision's C3)
    assert set(decisions[switched:]) == {"B"}
    # B talking over A (both loud) never switches back while B keeps talking.
    assert set(room.run(5, A=TALK, B=TALK, C=NOISE)) == {"B"}


def test_silence_and_dtx_keep_the_last_dominant_speaker() -> None:
    room = Room()
    room.run(5, A=NOISE, B=TALK, C=NOISE)
    assert room.dsi.dominant == "B"
    assert set(room.run(20)) == {"B"}  # everyone sends nothing (DTX) for 6 s
    assert set(room.run(10, A=SILENCE, B=SILENCE, C=SILENCE)) == {"B"}
    # After the silence a new speaker needs the same sustained speech as ever.
    assert room.run(5, C=TALK)[-1] == "C"


def test_a_constant_loud_background_is_learned_as_noise_floor() -> None:
    """A microphone in a loud room (-40 dBov all the time) is not speech forever: after the noise
    window its frames are under the floor's band, and a real speaker takes over from it."""
    room = Room()
    assert room.run(3, A=40, B=NOISE, C=NOISE) == ["A"] * 3  # loud at first: cannot tell yet
    room.run(60, A=40, B=NOISE, C=NOISE)  # 18 s: a window of 15 s sets the floor at -40
    decisions = room.run(4, A=40, B=TALK, C=NOISE)
    assert decisions[-1] == "B", decisions


def test_removing_the_dominant_speaker_lets_the_next_speaker_in() -> None:
    room = Room()
    room.run(5, A=TALK, B=NOISE, C=NOISE)
    room.dsi.remove("A")
    assert room.dsi.dominant is None
    assert room.run(2, B=NOISE, C=TALK)[-1] == "C"


def test_the_switch_waits_for_a_frame_where_the_challenger_speaks() -> None:
    """The immediate horizon (C1): B out-talks a silent A over the medium and long horizons, but
    at every decision B's newest frame is a pause; B takes over at the first decision on speech."""
    room = Room()
    room.run(10, A=TALK, B=NOISE, C=NOISE)
    pausing = ([TALK] * 14 + [NOISE]) * 4
    assert set(room.run(4, A=NOISE, B=pausing, C=NOISE)) == {"A"}
    assert room.run(1, A=NOISE, B=TALK, C=NOISE) == ["B"]


def test_a_dominant_speaker_who_stops_sending_is_silent_not_frozen() -> None:
    """A mutes (no packets at all, no levels): the frames the interval lasted count as silence, so
    a talking B takes over as if A had gone quiet; missing frames are not A's last level repeated."""
    room = Room()
    room.run(10, A=TALK, B=NOISE, C=NOISE)
    decisions = room.run(4, B=TALK, C=NOISE)
    assert decisions[-1] == "B" and decisions.index("B") <= 2, decisions


def test_a_late_burst_of_packets_is_speech_not_silence() -> None:
    """The interval lasted 22 frames but the network delivered 15 of them (the rest come late, in
    the next batch): the speaker is still talking, and takes over from a silent one."""
    dsi: DominantSpeakerIdentification[str] = DominantSpeakerIdentification()
    dsi.add("A")
    dsi.add("B")
    for _ in range(4):
        dsi.feed("A", bytes([TALK] * 15), 15)
        dsi.feed("B", bytes([NOISE] * 15), 15)
        dsi.decide()
    decisions = []
    for _ in range(4):
        dsi.feed("A", b"", 22)
        dsi.feed("B", bytes([TALK] * 15), 22)
        decisions.append(dsi.decide())
    assert decisions[-1] == "B" and decisions.index("B") <= 2, decisions


def test_talking_over_a_dominant_speaker_who_is_still_talking_does_not_switch() -> None:
    """The medium horizon (C2): B talks without a break over A, who pauses 20 ms in every 100 ms
    (so A has no fully active 100 ms, and the decisions fall on A's pauses); A's last 100 ms are
    still speech, so B does not take over until A stops."""
    room = Room()
    room.run(10, A=TALK, B=NOISE, C=NOISE)
    breathing = ([TALK] * 4 + [NOISE]) * 15
    assert set(room.run(5, A=breathing, B=TALK, C=NOISE)) == {"A"}
    assert room.run(2, A=NOISE, B=TALK, C=NOISE)[-1] == "B"
