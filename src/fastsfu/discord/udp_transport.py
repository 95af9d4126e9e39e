"""Discord's `udp` transport (docs/transports.md#discord-udp): IP discovery, keep-alives and RTP
protected with an rtpsize AEAD mode, on the engine's shared media port.

IP discovery admits the client's address; media is then decrypted, rewritten (PT 120, CC 0) and
re-encrypted per receiver in the datapath, with each receiver's own nonce counter. The address then
moves only on proof of the session key (see DiscordUdpTransport._on_discovery).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import struct
from typing import TYPE_CHECKING, Any

from fastsfu import rtp
from fastsfu.discord.crypto import LEGACY_MODES, MODES, AeadContext
from fastsfu.transport import Transport, TransportError
from fastsfu.types import RtpCapabilities, RtpParameters, TransportStats

if TYPE_CHECKING:
    from fastsfu.engine import Engine, UdpSocket
    from fastsfu.router import Router

log = logging.getLogger("fastsfu.discord")

DISCOVERY_LEN = 74
DISCOVERY_REQUEST = 1
DISCOVERY_RESPONSE = 2
OPUS_PT = 120  # what Discord clients send and accept (docs/transports.md#encryption-modes)
# Answers to refused discoveries (sent only while the bound address is unconfirmed), per transport:
# a client that lost a race retries a few times at most; nobody gets a reflector out of a session.
MAX_REFUSED_ANSWERS = 4
PING_MAGIC = 0x1337CAFE
PONG_MAGIC = 0x1337F00D

# What a Discord client receives: Opus on PT 120, no header extensions (docs/transports.md#encryption-modes).
DISCORD_RTP_CAPABILITIES: RtpCapabilities = {
    "codecs": [
        {
            "kind": "audio",
            "mimeType": "audio/opus",
            "preferredPayloadType": OPUS_PT,
            "clockRate": 48000,
            "channels": 2,
        }
    ],
    "headerExtensions": [],
}


def parse_discovery_request(data: bytes) -> int | None:
    """The SSRC of a 74-byte IP discovery request (type 1, length 70), else None."""
    if len(data) != DISCOVERY_LEN:
        return None
    kind, length, ssrc = struct.unpack_from("!HHI", data)
    if kind != DISCOVERY_REQUEST or length != DISCOVERY_LEN - 4:
        return None
    return int(ssrc)


class DiscoveryTable:
    """The engine's claimer for Discord: an IP discovery request from a new tuple names its
    transport by READY's SSRC (docs/transports.md#ip-discovery), so those SSRCs are unique per engine."""

    def __init__(self) -> None:
        self.transports: dict[int, DiscordUdpTransport] = {}

    def add(self, ssrc: int, transport: DiscordUdpTransport) -> None:
        if ssrc in self.transports:
            raise ValueError(f"SSRC {ssrc} is already in use by a Discord transport")
        self.transports[ssrc] = transport

    def remove(self, ssrc: int, transport: DiscordUdpTransport) -> None:
        if self.transports.get(ssrc) is transport:
            del self.transports[ssrc]

    def lookup(self, ssrc: int) -> DiscordUdpTransport | None:
        return self.transports.get(ssrc)

    def claim(self, kind: int, data: bytes) -> Transport | None:
        if kind != rtp.SLOW_STUN or not self.transports:
            return None
        ssrc = parse_discovery_request(data)
        return self.transports.get(ssrc) if ssrc is not None else None


def discovery_table(engine: Engine) -> DiscoveryTable:
    """The engine's DiscoveryTable, registered as its "discord" claimer on first use."""
    table = engine.claimer("discord")
    if not isinstance(table, DiscoveryTable):
        table = DiscoveryTable()
        engine.register_claimer("discord", table)
    return table


def create_udp_transport(
    router: Router, ssrc: int, announced_ip: str | None = None, app_data: dict[str, Any] | None = None
) -> DiscordUdpTransport:
    """A Discord `udp` protocol transport for READY's `ssrc`, on the engine's shared media port
    (docs/transports.md#discord-udp): IP discovery admits the client, rtpsize AEAD protects the media."""
    if router.closed:
        raise RuntimeError("router closed")
    engine = router.engine
    transport = DiscordUdpTransport(
        router, engine.media_socket(), ssrc, announced_ip or engine.settings.media_announced_ip, app_data
    )
    router.add_transport(transport)
    return transport


def discovery_response(ssrc: int, ip: str, port: int) -> bytes:
    """Type 2, length 70, the SSRC, the observed address (ASCII, NUL-padded to 64) and port."""
    address = ip.encode("ascii")
    if len(address) >= 64:
        raise ValueError("address too long for IP discovery")
    return struct.pack("!HHI64sH", DISCOVERY_RESPONSE, DISCOVERY_LEN - 4, ssrc, address, port)


def rtp_parameters(ssrc: int) -> RtpParameters:
    """The producer parameters of a Discord sender: Opus on PT 120 with READY's SSRC."""
    return {
        "codecs": [{"mimeType": "audio/opus", "payloadType": OPUS_PT, "clockRate": 48000, "channels": 2}],
        "encodings": [{"ssrc": ssrc}],
        "rtcp": {"cname": f"discord-{ssrc}", "reducedSize": True},
    }


class DiscordUdpTransport(Transport):
    """One Discord voice session's media: `ssrc` is READY's; `select_mode()` makes the op 4 key."""

    STATS_TYPE = "discord-udp-transport"

    def __init__(
        self,
        router: Router,
        socket: UdpSocket,
        ssrc: int,
        announced_ip: str | None,
        app_data: dict[str, Any] | None,
    ) -> None:
        super().__init__(router, socket, app_data)
        self.ssrc = ssrc
        self.announced_ip = announced_ip
        self.mode: str | None = None
        self.remote: tuple[str, int] | None = None
        self.discoveries = 0
        self.discoveries_refused = 0
        self.remote_moves = 0  # authenticated packets that moved `remote` (NAT rebinding)
        self.keepalives = 0
        self._context: AeadContext | None = None
        self._discovery = discovery_table(self.engine)
        try:
            self._discovery.add(ssrc, self)
        except BaseException:
            super()._close()
            raise

    @property
    def local_address(self) -> tuple[str, int]:
        """READY's `ip` and `port`: the address clients send to and expect replies from."""
        ip, port = self.socket.local_address
        return (self.announced_ip or ip, port)

    def select_mode(self, mode: str, key: bytes | None = None) -> bytes:
        """Install a fresh 32-byte key for `mode` (op 4's secret_key) and return it.

        `key` provisions a given key instead (benchmarks and tests that share it out of band).
        """
        self._check_open()
        if mode not in MODES and mode not in LEGACY_MODES:
            raise TransportError(f"unknown encryption mode {mode!r}")
        if key is None:
            key = secrets.token_bytes(32)
        elif len(key) != 32:
            raise TransportError("a Discord transport key is 32 bytes")
        key = bytes(key)
        # One context per transport: inbound replay window and this receiver's outbound counter.
        context = AeadContext(mode, key)
        datapath = self.engine.datapath
        datapath.set_transport_aead(self.slot, context)
        # An RTP packet with READY's SSRC that authenticates with this key may move the remote
        # (_on_discovery). Legacy modes have no replay window (or only some do): never.
        datapath.set_transport_roaming(self.slot, self.ssrc if mode in MODES else None)
        self._context = context
        self.mode = mode
        return key

    # ------------------------------------------------------------------ slow path

    def _on_slow_datagram(self, kind: int, data: bytes, addr: tuple[str, int]) -> None:
        ssrc = parse_discovery_request(data) if kind == rtp.SLOW_STUN else None
        if ssrc == self.ssrc:
            self._on_discovery(addr)
        elif ssrc is not None and (named := discovery_table(self.engine).lookup(ssrc)) is not None:
            # A discovery from our tuple that names another session: its client now holds the
            # address we were bound to (a port reused after our client left, within our RESUME
            # grace). It is no proof, so the tuple stays ours; the session it names answers.
            named._on_discovery(addr)
        elif kind == rtp.SLOW_OTHER and len(data) == 8:
            self._on_keepalive(data, addr)
        elif kind == rtp.SLOW_RTCP:
            self._on_rtcp(data)
        else:
            self.engine.unhandled_datagrams += 1

    def _on_discovery(self, addr: tuple[str, int]) -> None:
        """Bind the remote to the first discovery's source; answer re-discoveries from it.

        The SSRC is no secret (every member hears it in SPEAKING) and a UDP source can be spoofed,
        so a discovery is no proof of anything: once bound, the remote never moves on discovery,
        or anyone could take a member's media or point it at a third party. It moves only when an
        RTP packet that authenticates with the session key arrives from another address (the
        datapath's roaming, set up in select_mode): NAT rebinding, and also the case of an
        attacker who raced the real client to the first discovery, since proof of the key wins.
        The answer to a refused discovery carries only the sender's own address, and goes out
        (MAX_REFUSED_ANSWERS times at most) only while no authenticated packet has confirmed the
        bound address: a client that lost that race needs it to go on and prove its key. After
        that, a refused discovery gets nothing. (The datapath decrypts only packets someone
        receives, so the replay window has not seen packets sent while nobody listened: an
        attacker on the path could replay one of those from elsewhere, and the member's next
        packet moves the remote back. One off the path never sees a packet to replay.)
        """
        source = (addr[0], addr[1])
        stats = self.engine.datapath.transport_stats(self.slot)
        if stats["remote"] is not None:  # the datapath's word, should its move event have been lost
            self.remote = (stats["remote"][0], stats["remote"][1])
        if self.remote is None:
            try:
                self.engine.datapath.set_transport_remote(self.slot, *source)
            except ValueError:
                # The address is another session's: no binding, but an answer (bounded, only the
                # sender's own address), so that the client goes on; its media flows once the
                # other session lets the address go (it ends, or its own roaming moves it).
                self._refuse(source, "its address belongs to another session")
                if self.discoveries_refused > MAX_REFUSED_ANSWERS:
                    return
                self._send(discovery_response(self.ssrc, *source), source)
                return
            self.remote = source
        elif source != self.remote:
            self._refuse(source, "the session is bound to another address")
            if stats["authenticated_packets"] or self.discoveries_refused > MAX_REFUSED_ANSWERS:
                return
        else:
            self.discoveries += 1  # a client may re-discover from its address: answer it
        self._send(discovery_response(self.ssrc, *source), source)

    def _refuse(self, source: tuple[str, int], why: str) -> None:
        """Count a refused discovery; warn once per transport (a flood must not flood the log)."""
        self.discoveries_refused += 1
        self.engine.discord_discoveries_refused += 1
        level = logging.WARNING if self.discoveries_refused == 1 else logging.DEBUG
        log.log(
            level,
            "transport %s (SSRC %d): IP discovery from %s:%d refused, %s",
            self.id,
            self.ssrc,
            source[0],
            source[1],
            why,
        )

    def set_yields_address(self, yields: bool) -> None:
        """While True (the session waits for RESUME: its client may be gone), another session whose
        client got this one's port from the OS takes the address by proof of its own key: an RTP
        packet from the address with its SSRC that authenticates. Without it the new client's media
        would wait for this session to end (resume_grace). A session whose client is connected
        never yields, so no other member can take its address (docs/transports.md#ip-discovery)."""
        self._check_open()
        self.engine.datapath.set_transport_yields_tuple(self.slot, yields)

    def _on_tuple_learned(self) -> None:
        """The datapath moved the remote to the source of an authenticated RTP packet, or (this
        transport yielding its address) gave the address to the session that proved its key there."""
        remote = self.engine.datapath.transport_stats(self.slot)["remote"]
        if remote is None:
            if self.remote is not None:
                log.info("transport %s: address %s:%d taken by another session", self.id, *self.remote)
                self.remote = None
            return
        if tuple(remote) == self.remote:
            return
        old, self.remote = self.remote, (remote[0], remote[1])
        self.remote_moves += 1
        self.engine.discord_remote_moves += 1
        level = logging.INFO if self.remote_moves == 1 else logging.DEBUG
        log.log(
            level, "transport %s: remote moved from %s to %s:%d (authenticated RTP)", self.id, old, *remote
        )

    def _on_keepalive(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.remote is None or (addr[0], addr[1]) != self.remote:
            return
        self.keepalives += 1
        for order in ("big", "little"):
            if int.from_bytes(data[:4], order) == PING_MAGIC:  # native ping: answer pong
                self._send(PONG_MAGIC.to_bytes(4, order) + data[4:], addr)
                return
        self._send(data, addr)  # a keep-alive: echoing is harmless and old clients expect it

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        # A full socket buffer: the client retries discovery; keep-alives are best effort.
        with contextlib.suppress(OSError):
            self.socket.sock.sendto(data, addr)

    def _close(self) -> bool:
        if not super()._close():
            return False
        self._discovery.remove(self.ssrc, self)
        return True

    def get_stats(self) -> list[TransportStats]:
        stats = super().get_stats()
        if not stats:
            return stats
        stats[0].update(
            {
                "mode": self.mode,
                "ssrc": self.ssrc,
                "remote": list(self.remote) if self.remote else None,
                "discoveries": self.discoveries,
                "discoveriesRefused": self.discoveries_refused,
                "remoteMoves": self.remote_moves,
                "keepalives": self.keepalives,
            }
        )
        return stats
