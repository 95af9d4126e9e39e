"""The TCP edge of the aiohttp listeners (hRPC + /metrics, Discord gateway): our own accept loop with a
per-address connection cap, a deadline for the first request head (slowloris), accept errors logged at
a bounded rate and backed off, and every connection tracked so that shutdown can close what is left.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fastsfu.harmony.rate_limit import address_key

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64  # connections accepted per readiness event, so one listener cannot starve the loop
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # seconds without accepting after an accept error (doubling)
ERROR_LOG_INTERVAL = 10.0  # seconds between two log lines about accept errors or refused connections
# Errors of a full process or system (EMFILE, ENFILE) or of memory: the listener stays readable while
# they last, so accepting again at once would spin (and log) as fast as the loop runs.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ThrottledLog:
    """A warning at most once per `interval` seconds; the next one says how many were suppressed."""

    def __init__(
        self, logger: logging.Logger, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._next = 0.0

    def warning(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self.interval
        if self.suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(msg, *args)


@dataclass(frozen=True)
class EdgeLimits:
    header_timeout: float = 10.0  # seconds from accept to a complete request head (TLS included)
    max_per_address: int = 64  # open connections per address (IPv6: per /64); 0: no cap


class ConnectionGuard:
    """The connections of one listener: counts per address, head deadlines, and metrics."""

    def __init__(self, name: str, limits: EdgeLimits) -> None:
        self.name = name
        self.limits = limits
        self.closed: Counter[str] = Counter()  # closed by us, by reason (a metric)
        self.accept_errors = 0
        self._per_address: Counter[str] = Counter()
        self._open: dict[asyncio.Transport, _GuardedProtocol] = {}
        self._pending: set[asyncio.Task[Any]] = set()  # connections in their TLS handshake
        self._errors = ThrottledLog(log, ERROR_LOG_INTERVAL)
        self._refusals = ThrottledLog(log, ERROR_LOG_INTERVAL)

    @property
    def open_connections(self) -> int:
        return sum(self._per_address.values())

    def install(self, app: web.Application) -> None:
        """Mark a connection's request head as complete when aiohttp dispatches its request."""

        @web.middleware
        async def head_complete(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            protocol = self._open.get(request.transport) if request.transport is not None else None
            if protocol is not None:
                protocol.head_complete()
            return await handler(request)

        app.middlewares.append(head_complete)

    def admit(
        self,
        conn: socket.socket,
        addr: Any,
        factory: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
    ) -> None:
        """A socket just accepted: refuse it at once over the per-address cap, else serve it."""
        key = address_key(str(addr[0]) if isinstance(addr, tuple) else str(addr))
        cap = self.limits.max_per_address
        if cap and self._per_address[key] >= cap:
            self.closed["address_cap"] += 1
            conn.close()
            self._refusals.warning(
                "%s: %s has %d connections open (max_connections_per_address); refused one",
                self.name,
                key,
                cap,
            )
            return
        self._per_address[key] += 1
        loop = asyncio.get_running_loop()
        protocol = _GuardedProtocol(self, key, factory(), loop.time() + self.limits.header_timeout)
        conn.setblocking(False)
        timeout = self.limits.header_timeout if tls is not None else None
        task = loop.create_task(
            loop.connect_accepted_socket(lambda: protocol, conn, ssl=tls, ssl_handshake_timeout=timeout)
        )
        self._pending.add(task)
        task.add_done_callback(lambda t: self._connected(t, protocol, conn))

    def _connected(self, task: asyncio.Task[Any], protocol: _GuardedProtocol, conn: socket.socket) -> None:
        self._pending.discard(task)
        # The TLS handshake failed or timed out: the protocol never saw the connection.
        if (task.cancelled() or task.exception() is not None) and not protocol.made:
            self.closed["tls_handshake"] += 1
            protocol.release()
            conn.close()

    def accept_error(self, exc: OSError) -> None:
        self.accept_errors += 1
        self._errors.warning("%s: accept() failed: %s; backing off", self.name, exc)

    def abort_all(self) -> int:
        """Close every open connection at once (the end of a shutdown grace); the count closed."""
        for task in list(self._pending):
            task.cancel()
        transports = list(self._open)
        for transport in transports:
            transport.abort()
        return len(transports)

    def _track(self, protocol: _GuardedProtocol, transport: asyncio.Transport) -> None:
        self._open[transport] = protocol

    def _untrack(self, transport: asyncio.Transport) -> None:
        self._open.pop(transport, None)

    def _release(self, key: str) -> None:
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped: every event goes through to it, and the
    connection is aborted if its first request head is not complete by `deadline`."""

    def __init__(self, guard: ConnectionGuard, key: str, inner: asyncio.Protocol, deadline: float) -> None:
        self.guard = guard
        self.key = key
        self.inner = inner
        self.deadline = deadline
        self.transport: asyncio.Transport | None = None
        self.made = False
        self._released = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream socket, plain or TLS
        self.made = True
        self.transport = transport
        self.guard._track(self, transport)
        self._timer = asyncio.get_running_loop().call_at(self.deadline, self._head_timeout)
        self.inner.connection_made(transport)

    def head_complete(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.guard.closed["header_timeout"] += 1
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_complete()
        if self.transport is not None:
            self.guard._untrack(self.transport)
        self.release()
        self.inner.connection_lost(exc)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.guard._release(self.key)


class _Listener(asyncio.AbstractServer):
    """A listening socket served by our own accept loop: asyncio's, on EMFILE, goes on calling
    accept() up to `backlog` times per wake-up, logging a traceback and arming a retry for each."""

    def __init__(
        self,
        sock: socket.socket,
        guard: ConnectionGuard,
        factory: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
    ) -> None:
        self._sock = sock
        self._guard = guard
        self._factory = factory
        self._tls = tls
        self._loop = asyncio.get_running_loop()
        self._backoff = BACKOFF_MIN
        self._retry: asyncio.TimerHandle | None = None
        self._closed = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.done() else (self._sock,)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the peer gave up while in the backlog
                continue
            except OSError as exc:
                self._guard.accept_error(exc)
                self._pause()
                return
            self._backoff = BACKOFF_MIN
            self._guard.admit(conn, addr, self._factory, self._tls)

    def _pause(self) -> None:
        """Stop reading the listener for a while (doubling up to BACKOFF_MAX) instead of spinning."""
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(self._backoff, self._resume)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed.done():
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed.done():
            return
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._closed.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed.done()

    async def start_serving(self) -> None:
        return None  # serving from construction

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


class GuardedSite(web.BaseSite):
    """A TCP site for an AppRunner whose connections go through `guard` (its middleware must be
    installed on the app, see ConnectionGuard.install)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self.guard = guard
        self.reuse_port = reuse_port  # workers of one host share the port (the kernel spreads accepts)

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0)."""
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server(
            (self._host, self._port), family=family, backlog=self._backlog, reuse_port=self.reuse_port
        )
        sock.setblocking(False)
        self._server = _Listener(sock, self.guard, server, self._ssl_context)
