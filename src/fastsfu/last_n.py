"""Loudest-N forwarding (Jitsi's last-N): a receiving transport gets only the N most recent loud
speakers of its room; decided on the level observer's timer, applied as consumer pauses, so the
datapath's per-packet work is the paused check it always makes (docs/observers.md#loudest-n)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastsfu.observers import Volume

if TYPE_CHECKING:
    from fastsfu.consumer import Consumer
    from fastsfu.producer import Producer
    from fastsfu.router import Router
    from fastsfu.transport import Transport


class LastN:
    """Forward to the applied transports only the `n` producers that were loud most recently.

    Every interval the `n` loudest producers at or above `threshold` dBov move to the front of a
    recency list; the first `n` of it are forwarded. Speakers stay forwarded until someone louder
    displaces them, so silence changes nothing and a pause between words never cuts anyone."""

    def __init__(
        self, router: Router, n: int, threshold: int = -70, interval: int = 250, every_transport: bool = False
    ) -> None:
        """`every_transport`: apply to each transport of the router, now and to come (a room's
        policy); otherwise only to those passed to apply()."""
        if n < 1:
            raise ValueError("n must be >= 1")
        self.router = router
        self.n = n
        self.every_transport = every_transport
        self.recent: list[str] = []  # producer ids, most recently loud first
        self.transports: dict[str, Transport] = {}
        self._observer = router.create_audio_level_observer(
            max_entries=n, threshold=threshold, interval=interval
        )
        self._observer.on("volumes", self._volumes)
        for transport in list(router.transports.values()):
            self._watch(transport)
        router.observer.on("newtransport", self._watch)

    @property
    def forwarded(self) -> set[str]:
        return set(self.recent[: self.n])

    def apply(self, transport: Transport) -> None:
        """Hold back this transport's consumers of producers outside the loudest N."""
        self.transports[transport.id] = transport
        transport.observer.once("close", lambda: self.transports.pop(transport.id, None))
        for consumer in list(transport.consumers.values()):
            self._set(consumer)

    def remove(self, transport: Transport) -> None:
        """Forward everything to this transport again."""
        if self.transports.pop(transport.id, None) is not None:
            for consumer in list(transport.consumers.values()):
                consumer.set_suppressed(False)

    def close(self) -> None:
        for transport in list(self.transports.values()):
            self.remove(transport)
        self.router.observer.off("newtransport", self._watch)
        self._observer.close()

    def _watch(self, transport: Transport) -> None:
        if self.every_transport:
            self.apply(transport)
        transport.observer.on("newproducer", self._new_producer)
        transport.observer.on("newconsumer", self._new_consumer)
        for producer in list(transport.producers.values()):
            self._new_producer(producer)

    def _new_producer(self, producer: Producer) -> None:
        if not self._observer.closed and producer.id not in self._observer.producers:
            self._observer.add_producer(producer.id)
            producer.observer.once("close", lambda: self._forget(producer.id))

    def _forget(self, producer_id: str) -> None:
        if producer_id in self.recent:
            self.recent.remove(producer_id)
            self._apply_all()

    def _new_consumer(self, consumer: Consumer) -> None:
        if consumer.transport.id in self.transports:
            self._set(consumer)

    def _set(self, consumer: Consumer) -> None:
        consumer.set_suppressed(consumer.producer_id not in self.forwarded)

    def _volumes(self, volumes: list[Volume]) -> None:
        loud = [v["producer"].id for v in volumes]
        before = self.forwarded
        self.recent = loud + [p for p in self.recent if p not in loud]
        del self.recent[self.n * 4 :]  # enough history to refill after a leave
        if self.forwarded != before:
            self._apply_all()

    def _apply_all(self) -> None:
        for transport in list(self.transports.values()):
            for consumer in list(transport.consumers.values()):
                self._set(consumer)
