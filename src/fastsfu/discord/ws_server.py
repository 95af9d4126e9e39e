"""The Discord voice gateway's WebSocket edge (aiohttp): `wss://host:port/?v=8` (also `?v=8` on any
path), JSON text frames fed to the sans-I/O core, its output and closes written back.

TLS comes from the listener's ssl context (a configured certificate), or from a proxy in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import WSMessage, WSMsgType, web

from fastsfu.discord.gateway import Close, Gateway, Output, parse_version

log = logging.getLogger("fastsfu.discord")

# aiohttp refuses frames past this (close 1009) before buffering them; the core refuses anything
# over its own limit (64 KiB) with 4002, which clients understand.
HARD_FRAME_LIMIT = 1024 * 1024


class GatewayLink(Protocol):
    """What the edge drives per WebSocket: a gateway Connection, or a cluster worker's connection
    that may run at its room's home node (docs/cluster.md#bridging)."""

    on_output: Callable[[], None] | None

    @property
    def closed(self) -> bool: ...

    def poll_output(self) -> list[Output]: ...

    def next_deadline(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def receive(self, frame: str | bytes, now: float) -> None: ...

    def transport_closed(self, now: float, code: int | None = None) -> None: ...


class GatewayEndpoint:
    """One handler for every WebSocket; `run_timers()` expires suspended sessions."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.closes: Counter[int] = Counter()  # close codes sent, for /metrics
        # Makes each WebSocket's link (version, now); a cluster worker's routes it to the room's home.
        self.connect: Callable[[int | None, float], GatewayLink] = gateway.connect

    async def handle(self, request: web.Request) -> web.StreamResponse:
        version = parse_version(request.query_string)
        if not self.gateway.accepts_version(version):
            return web.Response(status=400, text="voice gateway version 4 to 8 required (?v=8)\n")
        ws = web.WebSocketResponse(max_msg_size=HARD_FRAME_LIMIT, autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="this is a WebSocket endpoint\n")
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        connection = self.connect(version, loop.time())
        wake = asyncio.Event()
        connection.on_output = wake.set
        receiver: asyncio.Future[WSMessage] | None = None
        try:
            while True:
                wake.clear()
                for output in connection.poll_output():
                    if isinstance(output, Close):
                        self.closes[output.code] += 1
                        await ws.close(code=output.code, message=output.reason.encode())
                        return ws
                    await ws.send_str(output.text)
                if receiver is None:
                    receiver = asyncio.ensure_future(ws.receive())
                deadline = connection.next_deadline()
                timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
                waker: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
                pending: set[asyncio.Future[Any]] = {receiver, waker}
                done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if receiver not in done:
                    if not done:
                        connection.handle_timer(loop.time())
                    continue
                msg = receiver.result()
                receiver = None
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    connection.receive(msg.data, loop.time())
                else:
                    # The client's close frame (its status decides between a leave and a RESUME
                    # window; aiohttp reports a frame without a status as 0), an error, or the
                    # socket went away (no frame: the session may RESUME later).
                    code = msg.data if msg.type == WSMsgType.CLOSE and isinstance(msg.data, int) else 0
                    connection.transport_closed(loop.time(), code or None)
                    return ws
        except ConnectionError:  # the client went away while we wrote: the same as a drop
            return ws
        finally:
            if receiver is not None:
                receiver.cancel()
            connection.on_output = None
            if not connection.closed:
                connection.transport_closed(loop.time())
            if not ws.closed:
                await ws.close()

    async def run_timers(self) -> None:
        """Expire suspended sessions at the gateway's deadlines (resume grace), until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self.gateway.next_deadline()
            delay = 1.0 if deadline is None else min(max(deadline - loop.time(), 0.01), 1.0)
            await asyncio.sleep(delay)
            try:
                self.gateway.handle_timer(loop.time())
            except Exception:
                log.exception("gateway timer failed")


def make_gateway_app(gateway: Gateway, endpoint: GatewayEndpoint | None = None) -> web.Application:
    """The voice gateway on every path (clients connect to `/?v=8` or `?v=8`)."""
    endpoint = endpoint or GatewayEndpoint(gateway)
    app = web.Application()
    app.router.add_get("/{tail:.*}", endpoint.handle)

    async def timers(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(endpoint.run_timers())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(timers)
    return app
