"""ICE over TCP, passive side (RFC 6544): the listening socket, accepted connections and their limits.

The datapath reads and writes the RFC 4571 frames; this module accepts, finds a connection's
transport by the ufrag of its first Binding request, and closes what is bad or idle.
"""

from __future__ import annotations

import collections
import logging
import socket as socketlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastsfu.webrtc_transport import WebRtcTransport

if TYPE_CHECKING:
    import asyncio

    from fastsfu.engine import Engine

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64  # connections accepted per wake-up; the rest wait in the backlog
BACKLOG = 128


@dataclass(eq=False)
class TcpConnection:
    slot: int
    sock: socketlib.socket
    addr: tuple[str, int]
    transport: WebRtcTransport | None = None
    deadline: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def path(self) -> tuple[str, int, int]:
        """The ICE address of this connection (fastsfu.ice.Address)."""
        return (self.addr[0], self.addr[1], self.slot)


class IceTcpServer:
    """The engine's one passive ICE-TCP port: accepts, caps connections (total and per address),
    gives each `Settings.ice_tcp_timeout` seconds to complete ICE, and closes with a counted reason."""

    def __init__(self, engine: Engine, ip: str, port: int) -> None:
        self.engine = engine
        family = socketlib.AF_INET6 if ":" in ip else socketlib.AF_INET
        self.family = family
        sock = socketlib.socket(family, socketlib.SOCK_STREAM)
        try:
            sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((ip, port))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local_address: tuple[str, int] = sock.getsockname()[:2]
        self.conns: dict[int, TcpConnection] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        # Connections closed, by reason (TCP_CLOSE_REASONS of the datapath plus the ones below).
        self.closes: collections.Counter[str] = collections.Counter()
        self._closed = False
        engine.loop.add_reader(sock.fileno(), self._on_accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for slot in list(self.conns):
            self.close_connection(slot, "engine_closed")

    # ------------------------------------------------------------------ accept

    def _on_accept(self) -> None:
        s = self.engine.settings
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and friends: count and leave the rest in the backlog for the next wake-up.
                self.closes["accept_error"] += 1
                return
            ip, port = addr[0], addr[1]
            if len(self.conns) >= s.ice_tcp_max_connections:
                self._refuse(conn, "connection_cap")
                continue
            if self._per_ip[ip] >= s.ice_tcp_max_connections_per_ip:
                self._refuse(conn, "per_ip_cap")
                continue
            try:
                conn.setblocking(False)
                conn.setsockopt(socketlib.IPPROTO_TCP, socketlib.TCP_NODELAY, 1)
                slot = self.engine.datapath.add_tcp_connection(conn.fileno(), self.family, ip, port)
            except (OSError, OverflowError, ValueError):
                self._refuse(conn, "datapath_full")
                continue
            self.accepted += 1
            self._per_ip[ip] += 1
            c = self.conns[slot] = TcpConnection(slot, conn, (ip, port))
            c.deadline = self.engine.loop.call_later(s.ice_tcp_timeout, self._on_deadline, c)

    def _refuse(self, conn: socketlib.socket, reason: str) -> None:
        self.closes[reason] += 1
        conn.close()

    # ------------------------------------------------------------------ frames and paths

    def on_frame(self, slot: int, t: int, kind: int, data: bytes) -> None:
        """A slow-path frame (STUN, DTLS, RTCP) from connection `slot`. The first one names the
        connection's transport by the ufrag of its Binding request; a connection no transport
        claims is closed."""
        c = self.conns.get(slot)
        if c is None:
            return
        if c.transport is None:
            transport = self.engine.transport(t) if t >= 0 else self.engine.claim(kind, data)
            if not isinstance(transport, WebRtcTransport) or not transport.tcp_enabled:
                self.close_connection(slot, "unknown_ufrag")
                return
            c.transport = transport
        try:
            c.transport._on_tcp_frame(kind, data, c.path)
        except Exception:
            # Bad input must not break the loop or other sessions: count and log.
            self.engine.slow_path_errors += 1
            log.exception("ICE-TCP frame handling failed")

    def send(self, slot: int, data: bytes) -> bool:
        if slot not in self.conns:
            return False
        return self.engine.datapath.tcp_send(slot, data)

    def _on_deadline(self, c: TcpConnection) -> None:
        c.deadline = None
        if self.conns.get(c.slot) is not c:
            return
        if c.transport is None or c.path not in c.transport.ice.validated_tuples:
            self.close_connection(c.slot, "ice_timeout")

    # ------------------------------------------------------------------ closing

    def reap(self) -> None:
        """Close the connections the datapath gave up (peer closed, bad frame, not reading)."""
        for slot, reason in self.engine.datapath.take_tcp_closed():
            self.close_connection(slot, reason)

    def prune(self, transport: WebRtcTransport) -> None:
        """Close the transport's connections whose ICE path is gone (consent expired, RFC 7675, or
        evicted for a newer one), once past their first deadline (until then a path may still
        validate): a connection ICE no longer uses holds a descriptor and the address's cap."""
        valid = set(transport.ice.validated_tuples)
        for c in [c for c in self.conns.values() if c.transport is transport and c.deadline is None]:
            if c.path not in valid:
                self.close_connection(c.slot, "consent_expired", notify=False)

    def close_transport(self, transport: WebRtcTransport) -> None:
        for c in [c for c in self.conns.values() if c.transport is transport]:
            self.close_connection(c.slot, "transport_closed", notify=False)

    def close_connection(self, slot: int, reason: str, notify: bool = True) -> None:
        c = self.conns.pop(slot, None)
        if c is None:
            return
        self.closes[reason] += 1
        if c.deadline is not None:
            c.deadline.cancel()
        self._per_ip[c.addr[0]] -= 1
        if self._per_ip[c.addr[0]] <= 0:
            del self._per_ip[c.addr[0]]
        self.engine.datapath.close_tcp_connection(slot)
        c.sock.close()
        if notify and c.transport is not None:
            c.transport._on_tcp_closed(c.path)

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.conns), "accepted": self.accepted, **self.closes}
