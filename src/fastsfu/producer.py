"""Producer: one incoming audio stream (an SSRC on a transport), mediasoup's noun and events."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Protocol

from fastsfu.events import EventEmitter
from fastsfu.ortc import ProducerRtpInfo
from fastsfu.rtp import EXTENSION_KINDS
from fastsfu.types import MediaKind, ProducerDump, ProducerStats, RtpCapabilities, RtpParameters

if TYPE_CHECKING:
    from fastsfu.consumer import Consumer
    from fastsfu.observers import Levels
    from fastsfu.transport import Transport


class ProducerListener(Protocol):
    """A producer's one upward call, to its transport (as mediasoup's Producer::Listener)."""

    def on_producer_closed(self, producer: Producer) -> None: ...


class Producer(EventEmitter):
    """An audio stream a client sends to a transport.

    Events: "transportclose". Observer events: "close", "pause", "resume".
    """

    def __init__(
        self,
        transport: Transport,
        rtp_parameters: RtpParameters,
        info: ProducerRtpInfo,
        paused: bool,
        app_data: dict[str, Any] | None,
        producer_id: str | None = None,
    ) -> None:
        super().__init__()
        self.id = producer_id or str(uuid.uuid4())
        self.kind: MediaKind = "audio"
        self.type = "simple"
        self.transport = transport
        self._listener: ProducerListener = transport
        self.rtp_parameters = rtp_parameters
        self.info = info
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self.consumers: dict[str, Consumer] = {}
        # Observers' running level sums (fastsfu.observers): the datapath reads levels while any
        # observer watches this producer.
        self.level_subscribers: list[Levels] = []
        # Consumer RtpParameters without SSRC and mid, by kind of receiver (transport.py).
        self.consumer_templates: dict[int, tuple[RtpCapabilities, RtpParameters | None]] = {}
        self._paused = paused
        self._closed = False
        self._dp = transport.engine.datapath
        ext_kinds = {eid: EXTENSION_KINDS.get(uri, 0) for eid, uri in info.header_extensions.items()}
        self.slot: int = self._dp.add_producer(
            transport.slot, info.ssrc, info.payload_type, info.clock_rate, ext_kinds
        )
        if info.red_payload_type is not None:
            self._dp.set_producer_red(self.slot, info.red_payload_type)  # RFC 2198 beside Opus
        if paused:
            self._dp.set_producer_paused(self.slot, True)
        # RTCP state: the last SR from the sender (RFC 3550 §6.4.1 LSR/DLSR) and the last report.
        self.last_sr_ntp_mid: int = 0
        self.last_sr_arrival: float = 0.0
        self.report_expected: int = 0
        self.report_received: int = 0

    @property
    def ssrc(self) -> int:
        return self.info.ssrc

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def add_level_subscriber(self, levels: Levels) -> None:
        if not self.level_subscribers:
            self._dp.set_producer_levels(self.slot, True)
        self.level_subscribers.append(levels)

    def remove_level_subscriber(self, levels: Levels) -> None:
        if levels in self.level_subscribers:
            self.level_subscribers.remove(levels)
            if not self.level_subscribers and not self._closed:
                self._dp.set_producer_levels(self.slot, False)

    def pause(self) -> None:
        if self._closed or self._paused:
            return
        self._paused = True
        self._dp.set_producer_paused(self.slot, True)
        for consumer in list(self.consumers.values()):
            consumer._on_producer_pause()
        self.observer.emit("pause")

    def resume(self) -> None:
        if self._closed or not self._paused:
            return
        self._paused = False
        self._dp.set_producer_paused(self.slot, False)  # consumers resync: no seq/ts gap
        for consumer in list(self.consumers.values()):
            consumer._on_producer_resume()
        self.observer.emit("resume")

    def close(self) -> None:
        """Close the producer and its consumers (each emits "producerclose")."""
        self._close()

    def _transport_closed(self) -> None:
        if self._close():
            self.emit("transportclose")

    def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        for consumer in list(self.consumers.values()):
            consumer._producer_closed()
        self._dp.remove_producer(self.slot)
        self._listener.on_producer_closed(self)
        self.observer.emit("close")
        return True

    def get_stats(self) -> list[ProducerStats]:
        if self._closed:
            return []
        s = self._dp.producer_stats(self.slot)
        return [
            {
                "type": "inbound-rtp",
                "kind": "audio",
                "ssrc": self.ssrc,
                "mimeType": self.info.mime_type,
                "packetCount": s["packets"],
                "byteCount": s["bytes"],
                "packetsLost": s["lost"],
                "jitter": s["jitter"],
                "highestSequenceNumber": s["highest_seq"],
                "packetsDiscarded": s["drops"],
                "activeConsumers": s["active_consumers"],
                "redPacketCount": s["red_packets"],
            }
        ]

    def dump(self) -> ProducerDump:
        return {
            "id": self.id,
            "kind": self.kind,
            "type": self.type,
            "paused": self._paused,
            "rtpParameters": self.rtp_parameters,
            "consumerIds": list(self.consumers),
        }
