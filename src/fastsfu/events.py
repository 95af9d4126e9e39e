"""A small synchronous event emitter with mediasoup's verbs (on, once, off, emit)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Listener = Callable[..., Any]


class EventEmitter:
    """Listeners run synchronously in registration order; one that raises is logged, not propagated,
    so a faulty embedder callback cannot break a close cascade."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Listener, bool]]] = {}

    def on(self, event: str, listener: Listener) -> Listener:
        self._listeners.setdefault(event, []).append((listener, False))
        return listener

    def once(self, event: str, listener: Listener) -> Listener:
        self._listeners.setdefault(event, []).append((listener, True))
        return listener

    def off(self, event: str, listener: Listener) -> None:
        entries = self._listeners.get(event, [])
        self._listeners[event] = [e for e in entries if e[0] is not listener]

    def remove_all_listeners(self, event: str | None = None) -> None:
        """Drop the listeners of `event`, or of every event (Node's removeAllListeners)."""
        if event is None:
            self._listeners.clear()
        else:
            self._listeners.pop(event, None)

    def listener_count(self, event: str) -> int:
        return len(self._listeners.get(event, ()))

    def emit(self, event: str, *args: Any) -> bool:
        entries = self._listeners.get(event)
        if not entries:
            return False
        self._listeners[event] = [e for e in entries if not e[1]]
        for listener, _ in entries:
            try:
                listener(*args)
            except Exception:
                log.exception("listener for %r raised", event)
        return True
