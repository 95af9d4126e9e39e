"""The datapath thread's lead over the event loop on a shared core: nice levels between the two
threads (docs/datapath.md, "Thread priority")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

NICE_MIN, NICE_MAX = -20, 19


@dataclass(frozen=True)
class ThreadNice:
    """The two threads' nice values after `apply`, and how the lead was made."""

    datapath: int
    loop: int
    # "datapath raised", "loop lowered", "refused" (no right to raise, not allowed to lower the
    # loop), or "off" (lead 0).
    how: str


def _nice(tid: int) -> int:
    # Linux keeps nice per thread (setpriority(2), "BUGS"): PRIO_PROCESS with a thread id.
    return os.getpriority(os.PRIO_PROCESS, tid)


def apply(datapath_tid: int, loop_tid: int, lead: int, lower_loop: bool) -> ThreadNice:
    """Give the datapath thread `lead` nice levels over the loop thread: raise the datapath's
    priority when the process may (CAP_SYS_NICE or RLIMIT_NICE), else, with `lower_loop`, lower
    the loop's (always allowed, and not undone: only a process that owns its loop asks for it)."""
    loop_nice = _nice(loop_tid)
    if lead <= 0:
        return ThreadNice(_nice(datapath_tid), loop_nice, "off")
    try:
        os.setpriority(os.PRIO_PROCESS, datapath_tid, max(NICE_MIN, loop_nice - lead))
        return ThreadNice(_nice(datapath_tid), loop_nice, "datapath raised")
    except PermissionError:
        pass
    if not lower_loop:
        log.warning(
            "the datapath thread cannot run ahead of the event loop: raising its priority needs "
            "CAP_SYS_NICE or RLIMIT_NICE (docs/datapath.md, \"Thread priority\")"
        )
        return ThreadNice(_nice(datapath_tid), loop_nice, "refused")
    os.setpriority(os.PRIO_PROCESS, loop_tid, min(NICE_MAX, loop_nice + lead))
    return ThreadNice(_nice(datapath_tid), _nice(loop_tid), "loop lowered")
