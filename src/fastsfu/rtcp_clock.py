"""One event-loop timer for every transport's periodic RTCP: reports that fall due close together
are sent in one wake-up of the loop (docs/datapath.md, "Waking the event loop")."""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable

log = logging.getLogger(__name__)

BATCH_WINDOW = 0.1  # seconds: a report due this soon goes out with the one whose time has come


class RtcpEntry:
    """A scheduled call; cancel() drops its callback (and the reference to its owner) at once."""

    __slots__ = ("due", "seq", "callback")

    def __init__(self, due: float, seq: int, callback: Callable[[], None]) -> None:
        self.due = due
        self.seq = seq
        self.callback: Callable[[], None] | None = callback

    def __lt__(self, other: RtcpEntry) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)


class RtcpClock:
    """`call_later` for periodic reports, on one asyncio timer.

    When the timer fires it runs every call due within `window` seconds, so N transports
    reporting every T seconds wake the loop at most about T / window times per interval instead
    of N times. A report leaves at most `window` early; RFC 3550 §6.3.1 spreads intervals over
    [0.5, 1.5] x T anyway. Each wake-up of a loop that shares its core with the datapath costs
    far more than the report it sends (cold caches), which is why they are batched.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float = BATCH_WINDOW) -> None:
        self._loop = loop
        self._window = window
        self._heap: list[RtcpEntry] = []
        self._seq = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self.wakeups = 0  # times the timer fired
        self.calls = 0  # callbacks run

    def call_later(self, delay: float, callback: Callable[[], None]) -> RtcpEntry:
        self._seq += 1
        entry = RtcpEntry(self._loop.time() + delay, self._seq, callback)
        heapq.heappush(self._heap, entry)
        if entry.due < self._armed_at:
            self._arm(entry.due)
        return entry

    def cancel(self, entry: RtcpEntry) -> None:
        entry.callback = None  # skipped when its time comes
        while self._heap and self._heap[0].callback is None:
            heapq.heappop(self._heap)
        if not self._heap and self._handle is not None:
            self._handle.cancel()  # nothing left: no wake-up
            self._handle = None
            self._armed_at = math.inf

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = math.inf
        self._heap.clear()

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        self.wakeups += 1
        horizon = self._loop.time() + self._window
        due: list[Callable[[], None]] = []
        while self._heap and self._heap[0].due <= horizon:
            callback = heapq.heappop(self._heap).callback
            if callback is not None:
                due.append(callback)
        # Popped first: a callback that schedules itself again lands in a later round.
        for callback in due:
            self.calls += 1
            try:
                callback()
            except Exception:  # one transport's failure must not stop the others' reports
                log.exception("RTCP timer callback failed")
        while self._heap and self._heap[0].callback is None:
            heapq.heappop(self._heap)  # cancelled: no wake-up for them
        if self._heap and self._heap[0].due < self._armed_at:
            self._arm(self._heap[0].due)
