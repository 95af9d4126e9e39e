"""How a `fastsfu serve` process is told to stop: SIGINT, SIGTERM, or an optional duration."""

from __future__ import annotations

import asyncio
import signal


def stop_event(duration: float = 0.0) -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, or after `duration` seconds if that is not 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    return stop
