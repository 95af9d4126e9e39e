"""How a `fastsfu serve` process starts and stops: the open-file limit raised at start; SIGINT,
SIGTERM or an optional duration to stop."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal

log = logging.getLogger("fastsfu")


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
