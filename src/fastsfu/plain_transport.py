"""PlainTransport: RTP or SRTP with pre-shared keys over UDP (ingest tools, pipes, benchmarks).

mediasoup's semantics: `connect(ip, port, srtp_parameters)` fixes the remote, or comedia
learns it from the first authenticated RTP packet. RTP and RTCP share one port (RFC 5761).
"""

from __future__ import annotations

import builtins
import ipaddress
from typing import TYPE_CHECKING, Any

from fastsfu import srtp
from fastsfu.srtp import SrtpContext
from fastsfu.transport import Transport, TransportError
from fastsfu.types import PlainTransportDump, SrtpParameters, TransportTuple

if TYPE_CHECKING:
    from fastsfu.engine import UdpSocket
    from fastsfu.router import Router


class PlainTransport(Transport):
    """A UDP transport whose remote address and SRTP keys come from signaling.

    Events (beyond Transport's): "tuple" when comedia learns the remote address.
    """

    STATS_TYPE = "plain-rtp-transport"

    def __init__(
        self,
        router: Router,
        socket: UdpSocket,
        comedia: bool,
        enable_srtp: bool,
        srtp_crypto_suite: str,
        app_data: dict[str, Any] | None,
        srtp_key: bytes | None = None,
    ) -> None:
        if enable_srtp:
            expected = srtp.suite(
                srtp_crypto_suite
            ).master_length  # unknown suite: fail before any resource exists
            if srtp_key is not None and len(srtp_key) != expected:
                raise srtp.SrtpError(f"srtp_key must be {expected} bytes for {srtp_crypto_suite}")
        elif srtp_key is not None:
            raise srtp.SrtpError("srtp_key given but SRTP is not enabled")
        super().__init__(router, socket, app_data)
        self.comedia = comedia
        self.rtcp_mux = True
        self._connected = False
        self._remote: builtins.tuple[str, int] | None = None  # `tuple` is a property here
        self._srtp_suite = srtp_crypto_suite if enable_srtp else None
        self._local_key = (srtp_key or srtp.generate_key(srtp_crypto_suite)) if enable_srtp else b""
        self._fixed_key = srtp_key is not None
        # Plain RTP with comedia can learn its remote right away; with SRTP only once the
        # remote key is known, so that nothing unauthenticated ever teaches a tuple.
        if comedia and not enable_srtp:
            self.engine.datapath.set_transport_comedia(self.slot, True)
        if self.engine.settings.connect_sockets:
            # The socket is this transport's alone: connected to the remote once it is known.
            self.engine.datapath.set_socket_connect(socket.slot, True)

    @property
    def tuple(self) -> TransportTuple:
        """mediasoup's TransportTuple of this transport."""
        local_ip, local_port = self.socket.local_address
        out: TransportTuple = {
            "localIp": local_ip,
            "localAddress": local_ip,
            "localPort": local_port,
            "protocol": "udp",
        }
        if self._remote is not None:
            out["remoteIp"], out["remotePort"] = self._remote
        return out

    @property
    def srtp_parameters(self) -> SrtpParameters | None:
        """Our SRTP parameters: the key we encrypt with, for the remote to decrypt."""
        if self._srtp_suite is None:
            return None
        return srtp.srtp_parameters(self._srtp_suite, self._local_key)

    def connect(
        self,
        ip: str | None = None,
        port: int | None = None,
        srtp_parameters: SrtpParameters | None = None,
    ) -> None:
        """Set the remote address (not with comedia) and the remote's SRTP parameters."""
        self._check_open()
        if self._connected:
            raise TransportError("connect() already called")
        if self.comedia:
            if ip is not None or port is not None:
                raise TransportError("comedia mode learns the remote address: do not pass ip/port")
        else:
            if ip is None or port is None:
                raise TransportError("ip and port are required without comedia")
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise TransportError(f"not an IP address: {ip!r}") from None
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise TransportError("port must be an integer 1..65535")
        if self._srtp_suite is not None:
            if srtp_parameters is None:
                raise TransportError("srtpParameters are required: SRTP is enabled")
            suite, remote_key = srtp.parse_srtp_parameters(srtp_parameters)
            if suite.name != self._srtp_suite:
                if self._fixed_key:
                    raise TransportError(
                        f"remote suite {suite.name} differs from the provisioned {self._srtp_suite}"
                    )
                # mediasoup: our local parameters follow the remote's suite.
                self._srtp_suite = suite.name
                self._local_key = srtp.generate_key(suite.name)
            self._install_srtp(
                SrtpContext(suite.name, remote_key, inbound=True),
                SrtpContext(suite.name, self._local_key, inbound=False),
            )
        elif srtp_parameters is not None:
            raise TransportError("srtpParameters given but SRTP is not enabled on this transport")
        if self.comedia:
            self.engine.datapath.set_transport_comedia(self.slot, True)
        else:
            assert ip is not None and port is not None
            self.engine.datapath.set_transport_remote(self.slot, ip, port)
            self._remote = (ip, port)
        self._connected = True

    def _on_tuple_learned(self) -> None:
        remote = self.engine.datapath.transport_stats(self.slot)["remote"]
        self._remote = remote
        self.emit("tuple", self.tuple)

    def dump(self) -> PlainTransportDump:
        return {
            "id": self.id,
            "tuple": self.tuple,
            "comedia": self.comedia,
            "rtcpMux": self.rtcp_mux,
            "srtpParameters": self.srtp_parameters,
            "producerIds": list(self.producers),
            "consumerIds": list(self.consumers),
        }
