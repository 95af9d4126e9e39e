"""Consumer: one producer's stream forwarded to one transport, rewritten for its receiver."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from fastsfu.events import EventEmitter
from fastsfu.ortc import red_payload_type
from fastsfu.types import ConsumerDump, ConsumerStats, MediaKind, RtpParameters

if TYPE_CHECKING:
    from fastsfu.producer import Producer
    from fastsfu.srtp import SrtpStream
    from fastsfu.transport import Transport


class ConsumerListener(Protocol):
    """A consumer's one upward call, to its transport (as mediasoup's Consumer::Listener)."""

    def on_consumer_closed(self, consumer: Consumer) -> None: ...


class Consumer(EventEmitter):
    """Forwarding of a producer to a receiving transport with the receiver's SSRC, PT and IDs.

    Events: "transportclose", "producerclose", "producerpause", "producerresume".
    Observer events: "close", "pause", "resume".
    """

    def __init__(
        self,
        transport: Transport,
        producer: Producer,
        rtp_parameters: RtpParameters,
        ext_ids: dict[int, int],
        paused: bool,
        app_data: dict[str, Any] | None,
        passthrough: bool = False,
        srtp_stream: SrtpStream | None = None,
    ) -> None:
        super().__init__()
        self.id = str(uuid.uuid4())
        self.kind: MediaKind = "audio"
        # "pipe": the producer's stream unchanged (SSRC, PT, extension IDs, seq, ts) for a PipeTransport.
        self.type = "pipe" if passthrough else "simple"
        self.transport = transport
        self._listener: ConsumerListener = transport
        self.producer = producer
        self.producer_id = producer.id
        self.rtp_parameters = rtp_parameters
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self._paused = paused
        self._suppressed = False  # held back by a loudest-N policy (fastsfu.last_n), apart from pause
        self._closed = False
        self._dp = transport.engine.datapath
        codec = rtp_parameters["codecs"][0]
        self.clock_rate: int = codec["clockRate"]
        mid = rtp_parameters.get("mid", "").encode()
        # Fixed for the consumer's life; read per RTCP report block and per report, so kept once.
        self._ssrc = int(rtp_parameters["encodings"][0]["ssrc"])
        self.slot: int = self._dp.add_consumer(
            producer.slot,
            transport.slot,
            self.ssrc,
            codec["payloadType"],
            ext_ids,
            mid,
            paused,
            passthrough,
            srtp_stream,
        )
        red_pt = red_payload_type(rtp_parameters)
        if red_pt is not None:
            self._dp.set_consumer_red(self.slot, red_pt)  # else RED is unwrapped to Opus
        # RTCP receiver reports about this stream (RFC 3550 §6.4.1), for stats.
        self.fraction_lost = 0
        self.round_trip_time: float | None = None

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def producer_paused(self) -> bool:
        return self.producer.paused

    @property
    def closed(self) -> bool:
        return self._closed

    def pause(self) -> None:
        if self._closed or self._paused:
            return
        self._paused = True
        self._dp.set_consumer_paused(self.slot, True)
        self.observer.emit("pause")

    @property
    def suppressed(self) -> bool:
        return self._suppressed

    def set_suppressed(self, suppressed: bool) -> None:
        """Hold the stream back (or let it through again) for a loudest-N policy, whatever the
        receiver's own pause: the datapath forwards only when neither holds it back."""
        if self._closed or self._suppressed == suppressed:
            return
        self._suppressed = suppressed
        self._dp.set_consumer_paused(self.slot, self._paused or suppressed)

    def resume(self) -> None:
        """Resume forwarding; sequence numbers and timestamps continue with no gap."""
        if self._closed or not self._paused:
            return
        self._paused = False
        self._dp.set_consumer_paused(self.slot, self._suppressed)
        self.observer.emit("resume")

    def close(self) -> None:
        self._close()

    def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        self._dp.remove_consumer(self.slot)
        self.producer.consumers.pop(self.id, None)
        self._listener.on_consumer_closed(self)
        self.observer.emit("close")
        return True

    def _transport_closed(self) -> None:
        if self._close():
            self.emit("transportclose")

    def _producer_closed(self) -> None:
        if self._close():
            self.emit("producerclose")

    def _on_producer_pause(self) -> None:
        self.emit("producerpause")

    def _on_producer_resume(self) -> None:
        self.emit("producerresume")

    def sender_report_state(self) -> tuple[int, int, int] | None:
        """(RTP timestamp now, packets, octets) for an RTCP SR, or None before the first packet."""
        (sent,) = self._dp.sender_states([self.slot])
        return None if sent is None else self.report_state(sent, time.monotonic_ns())

    def report_state(self, sent: tuple[int, int, int, int], now_ns: int) -> tuple[int, int, int]:
        """sender_report_state() from the datapath's (last timestamp, its send time, packets,
        octets) of this consumer (`Datapath.sender_states`, one call for a transport's report)."""
        last_timestamp, last_send_ns, packets, octets = sent
        elapsed_ns = max(0, now_ns - last_send_ns)
        rtp_now = (last_timestamp + elapsed_ns * self.clock_rate // 1_000_000_000) & 0xFFFFFFFF
        return rtp_now, packets, octets

    def get_stats(self) -> list[ConsumerStats]:
        if self._closed:
            return []
        s = self._dp.consumer_stats(self.slot)
        return [
            {
                "type": "outbound-rtp",
                "kind": "audio",
                "ssrc": self.ssrc,
                "mimeType": self.rtp_parameters["codecs"][0]["mimeType"],
                "packetCount": s["packets"],
                "byteCount": s["bytes"],
                "packetsDiscarded": s["drops"],
                "fractionLost": self.fraction_lost,
                "roundTripTime": self.round_trip_time,
            }
        ]

    def dump(self) -> ConsumerDump:
        return {
            "id": self.id,
            "producerId": self.producer_id,
            "kind": self.kind,
            "type": self.type,
            "paused": self._paused,
            "producerPaused": self.producer_paused,
            "rtpParameters": self.rtp_parameters,
        }
