"""Router: one room (a voice channel), holding transports and the producers they can consume."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastsfu import ortc
from fastsfu.events import EventEmitter
from fastsfu.observers import ActiveSpeakerObserver, AudioLevelObserver, RtpObserver, SpeakingObserver
from fastsfu.pipe_transport import PipeToRouterResult, PipeTransport, pipe_to_router
from fastsfu.plain_transport import PlainTransport
from fastsfu.recorder import Recorder, RecorderOptions
from fastsfu.srtp import DEFAULT_SUITE
from fastsfu.types import RouterDump, RtpCapabilities, RtpCodecCapability
from fastsfu.webrtc_transport import WebRtcTransport

if TYPE_CHECKING:
    from fastsfu.consumer import Consumer
    from fastsfu.discord.udp_transport import DiscordUdpTransport
    from fastsfu.engine import Engine
    from fastsfu.producer import Producer
    from fastsfu.transport import Transport


class RouterLimitError(RuntimeError):
    """A configured limit (producers or consumers per router) would be exceeded."""


class Router(EventEmitter):
    """A room. Events: "engineclose". Observer events: "close", "newtransport", "newrtpobserver"."""

    def __init__(
        self,
        engine: Engine,
        media_codecs: list[RtpCodecCapability] | None,
        app_data: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        self.id = str(uuid.uuid4())
        self.engine = engine
        self.rtp_capabilities = ortc.generate_router_rtp_capabilities(media_codecs)
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self.transports: dict[str, Transport] = {}
        self._consumer_count = 0  # open consumers over all transports (the limit's count)
        self.producers: dict[str, Producer] = {}
        # (other router's id, SRTP?) -> (our pipe, its pipe), reused by pipe_to_router
        self._pipes: dict[tuple[str, bool], tuple[PipeTransport, PipeTransport]] = {}
        self.rtp_observers: dict[str, RtpObserver] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def create_audio_level_observer(
        self,
        max_entries: int = 1,
        threshold: int = -80,
        interval: int = 1000,
        app_data: dict[str, Any] | None = None,
    ) -> AudioLevelObserver:
        """mediasoup `createAudioLevelObserver` (docs/observers.md)."""
        if self._closed:
            raise RuntimeError("router closed")
        observer = AudioLevelObserver(self, max_entries, threshold, interval, app_data)
        self.rtp_observers[observer.id] = observer
        self.observer.emit("newrtpobserver", observer)
        return observer

    def create_active_speaker_observer(
        self, interval: int = 300, app_data: dict[str, Any] | None = None
    ) -> ActiveSpeakerObserver:
        """mediasoup `createActiveSpeakerObserver` (docs/observers.md)."""
        if self._closed:
            raise RuntimeError("router closed")
        observer = ActiveSpeakerObserver(self, interval, app_data)
        self.rtp_observers[observer.id] = observer
        self.observer.emit("newrtpobserver", observer)
        return observer

    def create_speaking_observer(
        self, threshold: int = -50, interval: int = 250, hold: int = 3, app_data: dict[str, Any] | None = None
    ) -> SpeakingObserver:
        """Speaking indicators with hysteresis (fastsfu's own, docs/observers.md#speaking)."""
        if self._closed:
            raise RuntimeError("router closed")
        observer = SpeakingObserver(self, threshold, interval, hold, app_data)
        self.rtp_observers[observer.id] = observer
        self.observer.emit("newrtpobserver", observer)
        return observer

    def on_observer_closed(self, observer: RtpObserver) -> None:
        self.rtp_observers.pop(observer.id, None)

    def create_plain_transport(
        self,
        listen_ip: str | None = None,
        port: int = 0,
        rtcp_mux: bool = True,
        comedia: bool = False,
        enable_srtp: bool = False,
        srtp_crypto_suite: str = DEFAULT_SUITE,
        app_data: dict[str, Any] | None = None,
        srtp_key: bytes | None = None,
    ) -> PlainTransport:
        """A PlainTransport on its own UDP socket (port 0: any free port).

        `srtp_key` pre-provisions our master key||salt (SDES-style key management); by default
        a random key is generated and announced in `transport.srtp_parameters`.
        """
        if self._closed:
            raise RuntimeError("router closed")
        if not rtcp_mux:
            raise ValueError("rtcp_mux=False is not supported: RTP and RTCP share the port (RFC 5761)")
        socket = self.engine.open_socket(listen_ip or self.engine.settings.listen_ip, port)
        try:
            transport = PlainTransport(
                self, socket, comedia, enable_srtp, srtp_crypto_suite, app_data, srtp_key
            )
        except BaseException:
            self.engine.close_socket(socket)
            raise
        transport.observer.once("close", lambda: self.engine.close_socket(socket))
        self.add_transport(transport)
        return transport

    def create_pipe_transport(
        self,
        listen_ip: str | None = None,
        port: int = 0,
        enable_srtp: bool = False,
        app_data: dict[str, Any] | None = None,
    ) -> PipeTransport:
        """A PipeTransport on its own UDP socket: plain RTP, or SRTP AEAD_AES_128_GCM whose
        parameters the two ends exchange through `connect` (mediasoup `createPipeTransport`)."""
        if self._closed:
            raise RuntimeError("router closed")
        socket = self.engine.open_socket(listen_ip or self.engine.settings.listen_ip, port)
        try:
            transport = PipeTransport(self, socket, enable_srtp, app_data)
        except BaseException:
            self.engine.close_socket(socket)
            raise
        transport.observer.once("close", lambda: self.engine.close_socket(socket))
        self.transports[transport.id] = transport
        self.observer.emit("newtransport", transport)
        return transport

    def pipe_to_router(
        self,
        producer_id: str,
        router: Router,
        listen_ip: str = "127.0.0.1",
        enable_srtp: bool = False,
    ) -> PipeToRouterResult:
        """Make a producer of this router a producer (same id) of `router`, over two pipe
        transports on `listen_ip`: {"pipeConsumer", "pipeProducer"} (mediasoup `pipeToRouter`)."""
        if self._closed or router.closed:
            raise RuntimeError("router closed")
        return pipe_to_router(self, producer_id, router, listen_ip, enable_srtp)

    def create_webrtc_transport(
        self,
        listen_ip: str | None = None,
        announced_ip: str | None = None,
        port: int | None = None,
        app_data: dict[str, Any] | None = None,
        enable_udp: bool = True,
        enable_tcp: bool | None = None,
        prefer_udp: bool = False,
        prefer_tcp: bool = False,
    ) -> WebRtcTransport:
        """A WebRtcTransport (ICE-lite, DTLS, SRTP). By default it shares the engine's WebRTC port;
        `listen_ip` or `port` give it a socket of its own. `enable_tcp` (default: Settings.ice_tcp)
        adds a passive ICE-TCP candidate on the engine's TCP port; UDP is preferred unless
        `prefer_tcp` (mediasoup's enableUdp/enableTcp/preferUdp/preferTcp)."""
        if self._closed:
            raise RuntimeError("router closed")
        if enable_tcp is None:
            enable_tcp = self.engine.settings.ice_tcp
        if not (enable_udp or enable_tcp):
            raise ValueError("enable_udp and enable_tcp cannot both be false")
        if enable_tcp and not self.engine.settings.ice_tcp:
            raise ValueError("enable_tcp needs Settings.ice_tcp (the engine's ICE-TCP port)")
        if prefer_udp and prefer_tcp:
            raise ValueError("prefer_udp and prefer_tcp are exclusive")
        settings = self.engine.settings
        own = listen_ip is not None or port is not None
        socket = (
            self.engine.open_socket(listen_ip or settings.media_listen_ip or settings.listen_ip, port or 0)
            if own
            else self.engine.media_socket()
        )
        try:
            transport = WebRtcTransport(
                self,
                socket,
                announced_ip or settings.media_announced_ip,
                app_data,
                enable_udp=enable_udp,
                enable_tcp=enable_tcp and not own,  # the TCP port belongs to the shared socket
                prefer_tcp=prefer_tcp,
            )
        except BaseException:
            if own:
                self.engine.close_socket(socket)
            raise
        if own:
            transport.observer.once("close", lambda: self.engine.close_socket(socket))
        self.add_transport(transport)
        return transport

    def create_discord_udp_transport(
        self, ssrc: int, announced_ip: str | None = None, app_data: dict[str, Any] | None = None
    ) -> DiscordUdpTransport:
        """Kept for embedders: fastsfu.discord.udp_transport.create_udp_transport builds it."""
        from fastsfu.discord.udp_transport import create_udp_transport

        return create_udp_transport(self, ssrc, announced_ip, app_data)

    def create_recorder(
        self,
        directory: str,
        options: RecorderOptions | None = None,
        record_all: bool = False,
        label: Callable[[Producer], str | None] | None = None,
        app_data: dict[str, Any] | None = None,
    ) -> Recorder:
        """Record producers of this router to Ogg Opus files in `directory`, one per speaker
        (docs/recording.md): those given to `recorder.add_producer`, or every one with `record_all`."""
        if self._closed:
            raise RuntimeError("router closed")
        return Recorder(self, directory, options, record_all, label, app_data)

    def add_transport(self, transport: Transport) -> None:
        """Adopt a transport built on this router (by a front-end's own transport family)."""
        self.transports[transport.id] = transport
        self.observer.emit("newtransport", transport)

    def can_consume(self, producer_id: str, rtp_capabilities: RtpCapabilities) -> bool:
        producer = self.producers.get(producer_id)
        if producer is None:
            return False
        try:
            return ortc.can_consume(producer.rtp_parameters, self.rtp_capabilities, rtp_capabilities)
        except ortc.OrtcError:
            return False

    def close(self) -> None:
        """Close the router and its transports (each emits "routerclose")."""
        self._close()  # the engine forgets it on the observer's "close"

    def _engine_closed(self) -> None:
        if self._close():
            self.emit("engineclose")

    def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        for rtp_observer in list(self.rtp_observers.values()):
            rtp_observer._router_closed()
        for transport in list(self.transports.values()):
            transport._router_closed()
        self.observer.emit("close")
        return True

    # ------------------------------------------------------------------ TransportListener

    def on_transport_will_produce(self) -> None:
        if len(self.producers) >= self.engine.settings.max_producers_per_router:
            raise RouterLimitError("too many producers in this router")

    def on_transport_new_producer(self, producer: Producer) -> None:
        self.producers[producer.id] = producer

    def on_transport_producer_closed(self, producer: Producer) -> None:
        self.producers.pop(producer.id, None)

    def on_transport_will_consume(self) -> None:
        if self._consumer_count >= self.engine.settings.max_consumers_per_router:
            raise RouterLimitError("too many consumers in this router")

    def on_transport_new_consumer(self, consumer: Consumer) -> None:
        self._consumer_count += 1

    def on_transport_consumer_closed(self, consumer: Consumer) -> None:
        self._consumer_count -= 1

    def on_transport_closed(self, transport: Transport) -> None:
        self.transports.pop(transport.id, None)

    def dump(self) -> RouterDump:
        return {
            "id": self.id,
            "rtpCapabilities": self.rtp_capabilities,
            "transportIds": list(self.transports),
            "producerIds": list(self.producers),
        }
