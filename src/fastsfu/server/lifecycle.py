"""How a `fastsfu serve` process starts and stops: the open-file limit raised at start; SIGINT,
SIGTERM or an optional duration to stop; a shutdown bounded by a grace period."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from collections.abc import Awaitable, Sequence

from fastsfu.server.edge import ConnectionGuard

log = logging.getLogger(__name__)

FINAL_WAIT = 1.0  # seconds the cleanups get after the grace, once every connection is cut


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (each connection is a descriptor; distributions
    default to a soft 1024); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20)  # Linux's default fs.nr_open; "unlimited" is refused
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
            return soft
        log.info("open file limit raised from %d to %d", soft, target)
        return target
    log.info("open file limit %d", soft)
    return soft


def stop_event(duration: float = 0.0) -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, or after `duration` seconds if that is not 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    return stop


async def drain(
    cleanups: Sequence[Awaitable[object]], guards: Sequence[ConnectionGuard], grace: float
) -> None:
    """Run the cleanups (listeners closing, streams ending with their close handshakes) for at most
    `grace` seconds; then cut every connection still open, without waiting for a peer's close reply,
    and give the cleanups FINAL_WAIT more seconds."""
    tasks = [asyncio.ensure_future(c) for c in cleanups]
    _, pending = await asyncio.wait(tasks, timeout=grace)
    if pending:
        cut = sum(guard.abort_all() for guard in guards)
        log.info("shutdown grace of %g s over: closed %d connections without their close reply", grace, cut)
        _, pending = await asyncio.wait(pending, timeout=FINAL_WAIT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=FINAL_WAIT)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("shutdown step failed", exc_info=task.exception())
