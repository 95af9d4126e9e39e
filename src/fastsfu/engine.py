"""Engine: owns the datapath, the UDP sockets and their asyncio readers.

The datapath runs on its own thread (GIL released) and wakes the loop through one eventfd only
for slow-path datagrams and events; or, with `datapath_thread=False`, inline on the loop through
one reader on its epoll descriptor (docs/datapath.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket as socketlib
import threading
from dataclasses import astuple, dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

from fastsfu import _rtp, rtp, thread_priority
from fastsfu import srtp as _srtp  # noqa: F401 - installs the libsrtp entry points in the datapath
from fastsfu.dtls import DtlsCertificate
from fastsfu.events import EventEmitter
from fastsfu.ice_tcp import IceTcpServer
from fastsfu.router import Router
from fastsfu.rtcp_clock import RtcpClock

if TYPE_CHECKING:
    from fastsfu.transport import Transport
    from fastsfu.types import EngineStats, RtpCodecCapability

log = logging.getLogger(__name__)


class Claimer(Protocol):
    """A transport family's lookup for slow-path datagrams from tuples no transport owns yet:
    ICE finds its transport by ufrag, Discord's IP discovery by SSRC (Engine.register_claimer)."""

    def claim(self, kind: int, data: bytes) -> Transport | None: ...


@dataclass
class Settings:
    """Limits and knobs of an Engine; every limit is explicit (docs/architecture.md#principles, 5)."""

    listen_ip: str = "127.0.0.1"
    max_sockets: int = 1024
    max_transports: int = 4096
    max_producers: int = 4096
    max_consumers: int = 65536
    max_producers_per_router: int = 1000
    max_consumers_per_router: int = 100_000
    # Drop RTP that waited longer than this in the socket queue; STUN, DTLS, RTCP and Discord
    # discovery/keep-alives are never dropped for age; 0: never drop (docs/datapath.md).
    max_queue_age_ms: float = 200.0
    drain_budget: int = 4096  # inline mode: datagrams per wake-up before yielding to the loop
    # Forward on a dedicated thread with the GIL released, so that a join or a GC pause on the
    # event loop does not hold up media; False: drain on the event loop (deterministic, tests).
    datapath_thread: bool = True
    # Nice levels the datapath thread runs ahead of the event-loop thread, so that a join's CPU
    # work on a shared core cannot hold media up for a scheduler slice; 0: leave both alone.
    # Raising the datapath needs CAP_SYS_NICE; when refused, `lower_loop_priority` lowers the
    # loop's priority instead (for a process that owns its loop; docs/datapath.md, "Thread priority").
    datapath_priority: int = 0
    lower_loop_priority: bool = False
    # Output slots: forwarded packets queued before sendmmsg; when they run out the datapath flushes.
    out_slots: int = 1024
    # connect(2) the socket of a PlainTransport or PipeTransport to its one remote: sends skip
    # the per-datagram route lookup (docs/datapath.md, "Connected sockets").
    connect_sockets: bool = True
    recv_buffer_bytes: int = 1 << 20
    send_buffer_bytes: int = 1 << 20
    # Mean seconds between a transport's RTCP reports, randomized per transport (RFC 3550 §6.3.1).
    # 5 s: RFC 3550 §6.2's recommended minimum, and what libwebrtc and mediasoup use for audio;
    # every report costs the event loop a wake-up (docs/datapath.md, "Waking the event loop").
    rtcp_interval: float = 5.0
    # The one shared media socket of an engine: every WebRtcTransport and Discord UDP transport
    # uses it (demuxed by tuple, then by STUN ufrag or Discord IP discovery).
    media_listen_ip: str | None = None  # default: listen_ip
    media_announced_ip: str | None = None  # the address put in ICE candidates (NAT, containers)
    media_port: int = 0  # 0: any free port
    # ICE over TCP, passive (RFC 6544; docs/transports.md, "ICE over TCP"): a listening TCP port
    # beside the UDP one, offered as a `tcptype passive` candidate of every WebRtcTransport.
    ice_tcp: bool = False
    media_tcp_port: int | None = None  # None: the UDP media port's number; 0: any free port
    ice_tcp_max_connections: int = 1000
    ice_tcp_max_connections_per_ip: int = 16
    ice_tcp_timeout: float = 10.0  # seconds an accepted connection has to complete an ICE check
    ice_tcp_send_buffer_bytes: int = 65536  # per connection; a receiver that fills it is cut off
    ice_consent_timeout: float = 30.0  # RFC 7675 §5.1, clamped to 10..60 s
    dtls_handshake_timeout: float = 30.0
    # PEM certificate and key for DTLS (ECDSA P-256); None: a fresh one per engine.
    dtls_certificate_pem: bytes | None = None
    dtls_private_key_pem: bytes | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_sockets",
            "max_transports",
            "max_producers",
            "max_consumers",
            "max_producers_per_router",
            "max_consumers_per_router",
            "drain_budget",
            "out_slots",
            "ice_tcp_max_connections",
            "ice_tcp_max_connections_per_ip",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"settings.{name} must be a positive integer")
        if self.max_queue_age_ms < 0 or self.rtcp_interval <= 0:
            raise ValueError("settings.max_queue_age_ms must be >= 0 and rtcp_interval > 0")
        if not 0 <= self.datapath_priority <= 39:
            raise ValueError("settings.datapath_priority must be in 0..39 (nice levels)")
        if self.ice_tcp_timeout <= 0:
            raise ValueError("settings.ice_tcp_timeout must be positive")


class UdpSocket:
    """A bound non-blocking UDP socket registered with the datapath and the event loop."""

    def __init__(self, engine: Engine, ip: str, port: int) -> None:
        family = socketlib.AF_INET6 if ":" in ip else socketlib.AF_INET
        sock = socketlib.socket(family, socketlib.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt, size in (
                (socketlib.SO_RCVBUF, engine.settings.recv_buffer_bytes),
                (socketlib.SO_SNDBUF, engine.settings.send_buffer_bytes),
            ):
                sock.setsockopt(socketlib.SOL_SOCKET, opt, size)
            sock.bind((ip, port))
            self.slot: int = engine.datapath.add_socket(sock.fileno(), family, True)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local_address: tuple[str, int] = sock.getsockname()[:2]


class Engine(EventEmitter):
    """The media engine: create routers from it (mediasoup's Worker, in-process).

    Must be created and used inside a running asyncio loop. Events: "died" is never emitted by
    design (no worker process); observer events: "close", "newrouter".
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings()
        self.loop = asyncio.get_running_loop()
        self.rtcp_clock = RtcpClock(self.loop)  # every transport's periodic reports, one timer
        s = self.settings
        self.datapath = _rtp.Datapath(
            max_sockets=s.max_sockets,
            max_transports=s.max_transports,
            max_producers=s.max_producers,
            max_consumers=s.max_consumers,
            max_queue_age_ms=s.max_queue_age_ms,
            out_slots=s.out_slots,
            tcp_send_buffer=s.ice_tcp_send_buffer_bytes,
        )
        self.observer = EventEmitter()
        self.routers: dict[str, Router] = {}
        self.unhandled_datagrams = 0
        # Wall-clock arrival (s) of the slow-path datagram being handled, when it is not now:
        # the datapath thread lets RTCP wait for company (docs/datapath.md). None: it is now.
        self.slow_arrival: float | None = None
        self.slow_path_errors = 0
        # WebRtcTransport handshake failures (monitoring: a rise means clients cannot connect).
        self.dtls_failures = 0
        self.ice_consent_expiries = 0
        # Discord IP discoveries that tried to move a bound transport, and authenticated moves.
        self.discord_discoveries_refused = 0
        self.discord_remote_moves = 0
        self._sockets: dict[int, UdpSocket] = {}
        self._transports: dict[int, Transport] = {}
        self._closed = False
        self._dtls_certificate: DtlsCertificate | None = None
        self._media_socket: UdpSocket | None = None
        self._ice_tcp: IceTcpServer | None = None
        self._claimers: dict[str, Claimer] = {}
        # The datapath and loop threads' nice values (None: inline datapath, one thread).
        self.thread_nice: thread_priority.ThreadNice | None = None
        if s.datapath_thread:
            # RTP never reaches Python: the loop wakes only for slow-path datagrams and events.
            self.datapath.start()
            tid = self.datapath.thread_id
            assert tid is not None
            self.thread_nice = thread_priority.apply(
                tid, threading.get_native_id(), s.datapath_priority, s.lower_loop_priority
            )
            log.info("datapath thread nice %d, event loop %d (%s)", *astuple(self.thread_nice))
            self._reader_fd: int = self.datapath.notify_fd
            self.loop.add_reader(self._reader_fd, self._on_notify)
        else:
            # One reader for all media sockets: the datapath's epoll set (one Python call per wake-up).
            self._reader_fd = self.datapath.epoll_fd
            self.loop.add_reader(self._reader_fd, self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed

    def create_router(
        self, media_codecs: list[RtpCodecCapability] | None = None, app_data: dict[str, Any] | None = None
    ) -> Router:
        if self._closed:
            raise RuntimeError("engine closed")
        router = Router(self, media_codecs, app_data)
        self.routers[router.id] = router
        router.observer.once("close", lambda: self.routers.pop(router.id, None))
        self.observer.emit("newrouter", router)
        return router

    def close(self) -> None:
        """Close every router (each emits "engineclose"), the sockets and the timer."""
        if self._closed:
            return
        self._closed = True
        for router in list(self.routers.values()):
            router._engine_closed()
        if self._ice_tcp is not None:
            self._ice_tcp.close()
        for sock in list(self._sockets.values()):
            self.close_socket(sock)
        self.loop.remove_reader(self._reader_fd)
        self.rtcp_clock.close()
        self.datapath.close()  # joins the thread before the tables can go away
        self.observer.emit("close")

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stats(self) -> EngineStats:
        """Datapath totals (packets and bytes) and drops by reason, plus slow-path and handshake counters."""
        out = cast("EngineStats", self.datapath.stats())  # the lines below complete it (tests/test_types.py)
        out["unhandled_datagrams"] = self.unhandled_datagrams
        out["slow_path_errors"] = self.slow_path_errors
        out["dtls_failures"] = self.dtls_failures
        out["ice_consent_expiries"] = self.ice_consent_expiries
        out["discord_discoveries_refused"] = self.discord_discoveries_refused
        out["discord_remote_moves"] = self.discord_remote_moves
        out["routers"] = len(self.routers)
        out["transports"] = len(self._transports)
        out["ice_tcp"] = self._ice_tcp.stats() if self._ice_tcp is not None else {}
        return out

    # ------------------------------------------------------------------ sockets and transports

    def open_socket(self, ip: str, port: int) -> UdpSocket:
        if self._closed:
            raise RuntimeError("engine closed")
        sock = UdpSocket(self, ip, port)
        self._sockets[sock.slot] = sock
        return sock

    def close_socket(self, sock: UdpSocket) -> None:
        if self._sockets.pop(sock.slot, None) is None:
            return
        self.datapath.remove_socket(sock.slot)
        sock.sock.close()

    def add_transport(self, transport: Transport) -> None:
        """A transport took its datapath slot: its slow-path datagrams and events go to it."""
        self._transports[transport.slot] = transport

    def remove_transport(self, transport: Transport) -> None:
        self._transports.pop(transport.slot, None)

    # ------------------------------------------------------------------ WebRTC: shared port, ufrags

    @property
    def dtls_certificate(self) -> DtlsCertificate:
        """The engine's DTLS certificate (loaded from Settings or generated once)."""
        if self._dtls_certificate is None:
            s = self.settings
            if s.dtls_certificate_pem is not None and s.dtls_private_key_pem is not None:
                self._dtls_certificate = DtlsCertificate.load_pem(
                    s.dtls_certificate_pem, s.dtls_private_key_pem
                )
            else:
                self._dtls_certificate = DtlsCertificate.generate()
        return self._dtls_certificate

    def media_socket(self) -> UdpSocket:
        """The UDP socket shared by WebRtcTransports (and Discord transports) of this engine."""
        if self._media_socket is None:
            s = self.settings
            ip = s.media_listen_ip or s.listen_ip
            for attempt in range(16):
                sock = self.open_socket(ip, s.media_port)
                if not s.ice_tcp:
                    break
                tcp_port = sock.local_address[1] if s.media_tcp_port is None else s.media_tcp_port
                try:
                    self._ice_tcp = IceTcpServer(self, ip, tcp_port)
                    break
                except OSError:
                    # The UDP port's number is taken for TCP: with a port of our choosing, try another.
                    self.close_socket(sock)
                    if s.media_port or s.media_tcp_port is not None or attempt == 15:
                        raise
            self._media_socket = sock
        return self._media_socket

    @property
    def ice_tcp(self) -> IceTcpServer | None:
        """The passive ICE-TCP listener (with Settings.ice_tcp, once the media socket exists)."""
        return self._ice_tcp

    def transport(self, slot: int) -> Transport | None:
        """The transport in datapath slot `slot`."""
        return self._transports.get(slot)

    def claim(self, kind: int, data: bytes) -> Transport | None:
        """The transport a slow-path datagram from an unknown tuple names (ICE ufrag, Discord SSRC)."""
        return self._claim(kind, data)

    def register_claimer(self, name: str, claimer: Claimer) -> None:
        """Consult `claimer` for slow-path datagrams from unknown tuples (one per transport family)."""
        if name in self._claimers:
            raise ValueError(f"a claimer named {name!r} is already registered")
        self._claimers[name] = claimer

    def claimer(self, name: str) -> Claimer | None:
        return self._claimers.get(name)

    # ------------------------------------------------------------------ the read path

    def _on_notify(self) -> None:
        # The datapath thread queued slow-path datagrams or events (never RTP). RTCP may have
        # waited in its ring (docs/datapath.md): each datagram comes with its arrival time.
        slow = self.datapath.take_slow(stamped=True)
        if slow is not None:
            tcp = self._ice_tcp
            try:
                for kind, t, data, addr, sock, arrival_ns in slow:
                    if tcp is not None and sock in tcp.conns:
                        tcp.on_frame(sock, t, kind, data)  # an ICE-TCP frame (docs/transports.md)
                        continue
                    self.slow_arrival = arrival_ns / 1e9
                    self._dispatch(kind, t, data, addr)
            finally:
                self.slow_arrival = None
        self._on_events()

    def _on_readable(self) -> None:
        # One Python wake-up per loop iteration for every ready socket; RTP never surfaces here.
        self._on_slow(self.datapath.poll(self.settings.drain_budget))
        if self.datapath.pending_events or self.datapath.tcp_dead:
            self._on_events()

    def _on_slow(self, slow: list[_rtp.SlowItem] | None) -> None:
        if slow is not None:
            tcp = self._ice_tcp
            for kind, t, data, addr, sock in slow:
                if tcp is not None and sock in tcp.conns:
                    tcp.on_frame(sock, t, kind, data)  # an ICE-TCP frame (docs/transports.md)
                    continue
                self._dispatch(kind, t, data, addr)

    def _dispatch(self, kind: int, t: int, data: bytes, addr: tuple[str, int]) -> None:
        transport = self._transports.get(t)
        if transport is None:
            transport = self._claim(kind, data)  # a new tuple (ICE ufrag, Discord SSRC...)
        if transport is None:
            self.unhandled_datagrams += 1
            return
        try:
            transport._on_slow_datagram(kind, data, addr)
        except Exception:
            # Bad input must not break the loop or other sessions: count and log.
            self.slow_path_errors += 1
            log.exception("slow-path datagram handling failed")

    def _claim(self, kind: int, data: bytes) -> Transport | None:
        for claimer in self._claimers.values():
            try:
                transport = claimer.claim(kind, data)
            except Exception:  # a claimer's bug must not break the read path: count and log
                self.slow_path_errors += 1
                log.exception("slow-path claimer failed")
                continue
            if transport is not None:
                return transport
        return None

    def _on_events(self) -> None:
        for kind, t, value in self.datapath.take_events():
            if kind == rtp.EVENT_TCP_CLOSED:
                continue  # reaped below, all at once
            transport = self._transports.get(t)
            if transport is None:
                continue
            if kind == rtp.EVENT_TUPLE_LEARNED:
                learned = getattr(transport, "_on_tuple_learned", None)
                if learned is not None:
                    learned()
            elif kind == rtp.EVENT_UNKNOWN_SSRC:
                log.debug("transport %s: RTP with unknown SSRC %d dropped", transport.id, value)
        if self._ice_tcp is not None and self.datapath.tcp_dead:
            self._ice_tcp.reap()
