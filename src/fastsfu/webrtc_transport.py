"""WebRtcTransport: ICE-lite + DTLS 1.2 + SRTP for one browser-style peer, mediasoup-shaped.

ICE admits the selected tuple into the datapath, DTLS exports the SRTP keys into it; both are
sans-I/O objects driven here with the loop's clock and one timer per transport.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastsfu import rtp, stun
from fastsfu.dtls import DtlsClosed, DtlsConnected, DtlsFailed, DtlsTransport
from fastsfu.dtls.crypto import FINGERPRINT_ALGORITHMS
from fastsfu.ice import Address, IceDisconnected, IceRestarted, IceSelectedTuple, IceServer
from fastsfu.srtp import SrtpContext
from fastsfu.transport import Transport, TransportError
from fastsfu.types import (
    DtlsFingerprint,
    DtlsParameters,
    IceCandidate,
    IceParameters,
    TransportStats,
    TransportTuple,
    WebRtcTransportDump,
)

if TYPE_CHECKING:
    from fastsfu.engine import Engine, UdpSocket
    from fastsfu.router import Router

log = logging.getLogger(__name__)
# close_reason when the peer itself closed its DTLS association: a deliberate leave, no failure.
CLOSED_BY_PEER = "DTLS closed by the peer"

DTLS_ROLES = ("auto", "client", "server")
# Host candidate priority (RFC 8445 §5.1.2.1): type preference 126, local preference 65535, component 1.
HOST_PRIORITY = (126 << 24) | (65535 << 8) | (256 - 1)
# close_reason when the ICE-TCP connection carrying media closed and no other path was left.
TCP_PATH_CLOSED = "ICE-TCP connection closed"


def host_priority(local_preference: int) -> int:
    """RFC 8445 §5.1.2.1 priority of a host candidate of component 1."""
    return (126 << 24) | (local_preference << 8) | (256 - 1)


def tcp_local_preference(preferred: bool) -> int:
    """RFC 6544 §4.2: (2^13) * direction-pref + other-pref; a passive candidate's direction-pref
    is 4 (below UDP's 65535, so UDP wins), or 7 when TCP is preferred."""
    return ((7 if preferred else 4) << 13) | 8191


class UfragTable:
    """The engine's claimer for ICE: a STUN request from a new tuple names its transport by the
    local ufrag in USERNAME (RFC 8445 §7.2.2)."""

    def __init__(self) -> None:
        self.transports: dict[str, Transport] = {}

    @staticmethod
    def of(engine: Engine) -> UfragTable:
        table = engine.claimer("ice")
        if not isinstance(table, UfragTable):
            table = UfragTable()
            engine.register_claimer("ice", table)
        return table

    def add(self, ufrag: str, transport: Transport) -> None:
        if ufrag in self.transports:
            raise ValueError("ICE username fragment already in use")
        self.transports[ufrag] = transport

    def remove(self, ufrag: str) -> None:
        self.transports.pop(ufrag, None)

    def claim(self, kind: int, data: bytes) -> Transport | None:
        if kind != rtp.SLOW_STUN or not self.transports:
            return None
        try:
            username = stun.parse_message(data).get(stun.ATTR_USERNAME)
        except stun.StunError:
            return None
        if username is None:
            return None
        return self.transports.get(username.split(b":", 1)[0].decode("utf-8", "replace"))


class WebRtcTransport(Transport):
    """Events (beyond Transport's): "icestatechange", "iceselectedtuplechange", "dtlsstatechange"."""

    STATS_TYPE = "webrtc-transport"

    def __init__(
        self,
        router: Router,
        socket: UdpSocket,
        announced_ip: str | None,
        app_data: dict[str, Any] | None,
        enable_udp: bool = True,
        enable_tcp: bool = False,
        prefer_tcp: bool = False,
    ) -> None:
        super().__init__(router, socket, app_data)
        settings = self.engine.settings
        # mediasoup's enableUdp/enableTcp/preferTcp: which candidates we offer and accept checks on.
        self.udp_enabled = enable_udp
        self.tcp_enabled = enable_tcp and self.engine.ice_tcp is not None
        self._prefer_tcp = prefer_tcp
        self._tcp_path_closed: Address | None = None
        self.ice = IceServer(consent_timeout=settings.ice_consent_timeout)
        self._ufrag_table = UfragTable.of(self.engine)
        self._ufrag_table.add(self.ice.credentials.ufrag, self)
        self._ufrags = [self.ice.credentials.ufrag]
        self._announced_ip = announced_ip
        self.ice_state = "new"
        self.dtls_state = "new"
        # Why the transport closed itself (consent expiry, DTLS failure or the peer's DTLS close);
        # None while open or when closed by its owner.
        self.close_reason: str | None = None
        self._dtls: DtlsTransport | None = None
        self._dtls_role: str | None = None
        self._remote_fingerprints: list[DtlsFingerprint] | None = None
        self._connected = False
        self._timer: asyncio.TimerHandle | None = None
        self.control_send_failures = 0  # ICE/DTLS datagrams the socket refused (reported in stats)

    # ------------------------------------------------------------------ mediasoup's parameters

    @property
    def ice_parameters(self) -> IceParameters:
        return {
            "usernameFragment": self.ice.credentials.ufrag,
            "password": self.ice.credentials.pwd,
            "iceLite": True,
        }

    @property
    def ice_candidates(self) -> list[IceCandidate]:
        local_ip, port = self.socket.local_address
        ip = self._announced_ip or local_ip
        out: list[IceCandidate] = []
        if self.udp_enabled:
            out.append(
                {
                    "foundation": "udpcandidate",
                    "priority": host_priority(32767 if self._prefer_tcp and self.tcp_enabled else 65535),
                    "ip": ip,
                    "address": ip,
                    "protocol": "udp",
                    "port": port,
                    "type": "host",
                }
            )
        tcp = self.engine.ice_tcp
        if self.tcp_enabled and tcp is not None:
            out.append(
                {
                    "foundation": "tcpcandidate",
                    "priority": host_priority(tcp_local_preference(self._prefer_tcp)),
                    "ip": ip,
                    "address": ip,
                    "protocol": "tcp",
                    "port": tcp.local_address[1],
                    "type": "host",
                    "tcpType": "passive",
                }
            )
        return out

    @property
    def dtls_parameters(self) -> DtlsParameters:
        return {"role": "auto", "fingerprints": self.engine.dtls_certificate.fingerprints()}

    @property
    def ice_selected_tuple(self) -> TransportTuple | None:
        addr = self.ice.selected_tuple
        if addr is None:
            return None
        local_ip, local_port = self.socket.local_address
        tcp = self.engine.ice_tcp
        if len(addr) == 3 and tcp is not None:
            local_ip, local_port = tcp.local_address
        return {
            "localIp": local_ip,
            "localAddress": local_ip,
            "localPort": local_port,
            "remoteIp": addr[0],
            "remotePort": addr[1],
            "protocol": "tcp" if len(addr) == 3 else "udp",
        }

    # ------------------------------------------------------------------ connect / restart

    def connect(self, dtls_parameters: DtlsParameters) -> None:
        """The remote's DTLS parameters (role and certificate fingerprints), mediasoup style."""
        self._check_open()
        if self._connected:
            raise TransportError("connect() already called")
        if not isinstance(dtls_parameters, dict):
            raise TransportError("dtlsParameters must be an object")
        role = dtls_parameters.get("role", "auto")
        fingerprints = dtls_parameters.get("fingerprints")
        if role not in DTLS_ROLES:
            raise TransportError(f"dtlsParameters.role must be one of {', '.join(DTLS_ROLES)}")
        if (
            not isinstance(fingerprints, list)
            or not fingerprints
            or not all(
                isinstance(f, dict)
                and isinstance(f.get("algorithm"), str)
                and isinstance(f.get("value"), str)
                for f in fingerprints
            )
        ):
            raise TransportError("dtlsParameters.fingerprints must be a non-empty list of {algorithm, value}")
        if not any(f["algorithm"].lower() in FINGERPRINT_ALGORITHMS for f in fingerprints):
            # No certificate could match: fail now, not in the handshake (docs/transports.md#fingerprints).
            supported = ", ".join(FINGERPRINT_ALGORITHMS)
            raise TransportError(f"dtlsParameters.fingerprints has no supported algorithm ({supported})")
        # mediasoup: a remote client makes us the server; a remote server or "auto" makes us the client.
        our_role = "server" if role == "client" else "client"
        if self._dtls is not None and self._dtls_role != our_role:
            # A ClientHello arrived before connect() and made us a server, but the peer says
            # it is the server: follow signaling.
            self._dtls = None
        self._connected = True
        self._remote_fingerprints = fingerprints
        dtls = self._ensure_dtls(our_role)
        dtls.set_remote_fingerprints(fingerprints)
        if our_role == "client" and self.ice.selected_tuple is not None:
            dtls.start(self._now())
        self._pump()

    def restart_ice(self) -> IceParameters:
        """New ICE credentials (RFC 8445 §9); the old ones work until a check uses the new."""
        self._check_open()
        creds = self.ice.restart()
        self._ufrag_table.add(creds.ufrag, self)
        self._ufrags.append(creds.ufrag)
        return self.ice_parameters

    # ------------------------------------------------------------------ slow path

    def _now(self) -> float:
        return self.engine.loop.time()

    def _on_slow_datagram(self, kind: int, data: bytes, addr: tuple[str, int]) -> None:
        if not self.udp_enabled:
            self.engine.unhandled_datagrams += 1  # enableUdp false: no UDP candidate, no UDP path
            return
        self._on_packet(kind, data, addr)

    def _on_tcp_frame(self, kind: int, data: bytes, path: tuple[str, int, int]) -> None:
        """A frame from an ICE-TCP connection this transport's ufrag claimed (fastsfu.ice_tcp)."""
        self._on_packet(kind, data, path)

    def _on_tcp_closed(self, path: tuple[str, int, int]) -> None:
        """The connection is gone: ICE falls back to another validated path, or disconnects."""
        if not self._closed:
            self._tcp_path_closed = path
            self.ice.forget(path)
            self._pump()
            self._tcp_path_closed = None

    def _on_packet(self, kind: int, data: bytes, addr: Address) -> None:
        if kind == rtp.SLOW_STUN:
            self.ice.receive_datagram(data, addr, self._now())
        elif kind == rtp.SLOW_DTLS:
            if self._dtls is None:
                # A ClientHello before connect(): the peer is the DTLS client (docs/transports.md#roles).
                self._ensure_dtls("server")
            assert self._dtls is not None
            self._dtls.receive_datagram(data, self._now())
        elif kind == rtp.SLOW_RTCP:
            self._on_rtcp(data)
        else:
            self.engine.unhandled_datagrams += 1
        self._pump()

    def _ensure_dtls(self, role: str) -> DtlsTransport:
        if self._dtls is None:
            self._dtls = DtlsTransport(
                self.engine.dtls_certificate,
                role,
                handshake_timeout=self.engine.settings.dtls_handshake_timeout,
            )
            self._dtls_role = role
            # No deadline yet: as a server the handshake (and its timeout) starts with the first
            # DTLS datagram from the peer, as a client with our ClientHello once ICE selected a
            # tuple. mediasoup-client connects a receive transport only when it first consumes, so
            # a member alone in a channel may send nothing for minutes; ICE consent (RFC 7675) and
            # the signaling session's own timeouts still end a transport that is really dead.
            if self._remote_fingerprints is not None:
                self._dtls.set_remote_fingerprints(self._remote_fingerprints)
        return self._dtls

    def _send(self, data: bytes, addr: Address) -> None:
        if len(addr) == 3:
            # ICE-TCP: the datapath frames it (RFC 4571) into the connection's send buffer.
            tcp = self.engine.ice_tcp
            if tcp is None or not tcp.send(addr[2], data):
                self.control_send_failures += 1
            return
        try:
            self.socket.sock.sendto(data, (addr[0], addr[1]))
        except OSError:
            self.control_send_failures += 1  # e.g. a full socket buffer: ICE and DTLS retransmit

    def _pump(self) -> None:
        """Send what ICE and DTLS produced, handle their events, re-arm the one timer."""
        if self._closed:
            return
        now = self._now()
        for data, addr in self.ice.datagrams_to_send(now):
            self._send(data, addr)
        while (ice_event := self.ice.next_event()) is not None:
            self._on_ice_event(ice_event)
        if self._dtls is not None:
            target = self.ice.selected_tuple
            for data in self._dtls.datagrams_to_send(now):
                if target is not None:
                    self._send(data, target)
            while (dtls_event := self._dtls.next_event()) is not None:
                self._on_dtls_event(dtls_event)
        self._rearm()

    def _on_ice_event(self, event: IceSelectedTuple | IceDisconnected | IceRestarted) -> None:
        if isinstance(event, IceSelectedTuple):
            addr = event.addr
            try:
                if len(addr) == 3:
                    self.engine.datapath.set_transport_tcp(self.slot, addr[2])
                else:
                    self.engine.datapath.set_transport_remote(self.slot, addr[0], addr[1])
            except ValueError:
                log.warning(
                    "transport %s: tuple %s:%d belongs to another transport", self.id, addr[0], addr[1]
                )
                return
            self._set_ice_state("completed")
            self.emit("iceselectedtuplechange", self.ice_selected_tuple)
            if self._dtls is not None and self._dtls_role == "client" and self._dtls.state == "new":
                self._dtls.start(self._now())
        elif isinstance(event, IceDisconnected):
            # No valid check for the consent timeout (RFC 7675 §5.1), or the last path's TCP
            # connection closed: stop sending and close.
            self.engine.datapath.clear_transport_remote(self.slot)
            tcp_closed = event.addr == self._tcp_path_closed
            if not tcp_closed:
                self.engine.ice_consent_expiries += 1
            self._set_ice_state("disconnected")
            self._close_soon(TCP_PATH_CLOSED if tcp_closed else "ICE consent expired")
        elif isinstance(event, IceRestarted):
            for ufrag in self._ufrags[:-1]:
                self._ufrag_table.remove(ufrag)
            self._ufrags = self._ufrags[-1:]

    def _on_dtls_event(self, event: DtlsConnected | DtlsFailed | DtlsClosed) -> None:
        if isinstance(event, DtlsConnected):
            # RFC 5764 §4.2: keys exported from the handshake; ours encrypt what we send.
            self._install_srtp(
                SrtpContext(event.srtp_suite, event.remote_key, inbound=True),
                SrtpContext(event.srtp_suite, event.local_key, inbound=False),
            )
            self._set_dtls_state("connected")
        elif isinstance(event, DtlsFailed):
            log.warning("transport %s: DTLS failed: %s", self.id, event.reason)
            self.engine.dtls_failures += 1
            self._set_dtls_state("failed")
            self._close_soon(f"DTLS failed: {event.reason}")
        else:
            # The peer's close_notify or fatal alert (RFC 5246 §7.2): it is gone, and no media can
            # follow on this association, so the transport closes now rather than waiting for ICE
            # consent to expire (RFC 7675 §5.1: up to 30 s of a ghost member).
            self._set_dtls_state("closed")
            self._close_soon(CLOSED_BY_PEER)

    def _close_soon(self, reason: str) -> None:
        """Close after the current callback (its listeners may still be running), once."""
        if self.close_reason is None:
            self.close_reason = reason
            self.engine.loop.call_soon(self.close)

    def _set_ice_state(self, state: str) -> None:
        if state != self.ice_state:
            self.ice_state = state
            self.emit("icestatechange", state)

    def _set_dtls_state(self, state: str) -> None:
        if state != self.dtls_state:
            self.dtls_state = state
            self.emit("dtlsstatechange", state)

    def _rearm(self) -> None:
        deadlines = [
            t for t in (self.ice.get_timer(), self._dtls.get_timer() if self._dtls else None) if t is not None
        ]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self.engine.loop.call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._now()
        self.ice.handle_timer(now)
        if self._dtls is not None:
            self._dtls.handle_timer(now)
        self._pump()
        tcp = self.engine.ice_tcp
        if self.tcp_enabled and tcp is not None and not self._closed:
            tcp.prune(self)  # connections of paths whose consent just expired

    # ------------------------------------------------------------------ close, stats

    def _close(self) -> bool:
        if self._closed:
            return False
        if self._dtls is not None and self.ice.selected_tuple is not None:
            self._dtls.close()  # close_notify (RFC 5246 §7.2.1)
            for data in self._dtls.datagrams_to_send(self._now()):
                self._send(data, self.ice.selected_tuple)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ufrag in self._ufrags:
            self._ufrag_table.remove(ufrag)
        if self.engine.ice_tcp is not None:
            self.engine.ice_tcp.close_transport(self)
        self.ice_state = "closed"
        if self.dtls_state != "failed":  # a failure stays visible in dump() and stats
            self.dtls_state = "closed"
        return super()._close()

    def get_stats(self) -> list[TransportStats]:
        stats = super().get_stats()
        if stats:
            stats[0].update(
                {
                    "iceRole": "controlled",
                    "iceState": self.ice_state,
                    "dtlsState": self.dtls_state,
                    "iceSelectedTuple": self.ice_selected_tuple,
                    "iceCounters": dict(self.ice.counters),
                    "dtlsCounters": dict(self._dtls.counters) if self._dtls else {},
                    "controlSendFailures": self.control_send_failures,
                }
            )
        return stats

    def dump(self) -> WebRtcTransportDump:
        return {
            "id": self.id,
            "iceParameters": self.ice_parameters,
            "iceCandidates": self.ice_candidates,
            "iceState": self.ice_state,
            "iceSelectedTuple": self.ice_selected_tuple,
            "dtlsParameters": self.dtls_parameters,
            "dtlsState": self.dtls_state,
            "producerIds": list(self.producers),
            "consumerIds": list(self.consumers),
        }
