"""One hold of the datapath's table mutex across many control-plane calls (a join's consumers,
a transport's close), handed back to the datapath thread at bounded intervals."""

from __future__ import annotations

import time
from types import TracebackType

from fastsfu._rtp import TableLock

# How long a hold may last before tick() hands the tables to a datapath thread that waits for
# them: about the longest any packet waits for the control plane (plus one item's work).
HOLD_BUDGET = 0.0003


class TableHold:
    """`with TableHold(datapath.tables_lock) as hold:`, then `hold.tick()` between items.

    Every table write takes the (recursive) mutex itself; while the datapath thread forwards,
    each of those acquisitions waits for the thread to hand the tables over (tens to hundreds of
    microseconds, docs/datapath.md#the-datapath-thread), so a join that made 2N consumers one by
    one waited 2N times. Held across them, it is one wait per `budget` of work.
    """

    def __init__(self, lock: TableLock, budget: float = HOLD_BUDGET) -> None:
        self._lock = lock
        self._budget = budget
        self._since = 0.0
        self.hand_backs = 0  # times tick() let the datapath thread have the tables

    def __enter__(self) -> TableHold:
        self._lock.__enter__()
        self._since = time.perf_counter()
        return self

    def tick(self) -> None:
        """Between two items: past the budget, if the datapath thread waits for the tables, let
        it have them for a moment (TableLock.hand_back)."""
        if time.perf_counter() - self._since >= self._budget and self._lock.hand_back():
            self.hand_backs += 1
            self._since = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.__exit__(exc_type, exc, tb)
