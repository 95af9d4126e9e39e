"""RTP observers with mediasoup's names and events (AudioLevelObserver, ActiveSpeakerObserver): the
datapath sums each producer's ssrc-audio-level (RFC 6464) in C; an asyncio timer reads the sums
and decides, never per packet (docs/observers.md)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from fastsfu.dominant_speaker import DominantSpeakerIdentification, Speaker
from fastsfu.events import EventEmitter
from fastsfu.rtp import LEVEL_RECENT

if TYPE_CHECKING:
    from fastsfu.producer import Producer
    from fastsfu.router import Router

SILENT = 127  # RFC 6464 §3: 127 is -127 dBov, digital silence
# Fewer level samples than this in an interval (Opus DTX in silence sends one per 400 ms) is
# no speech: such a producer is left out of "volumes".
MIN_SAMPLES = 10


class Volume(TypedDict):
    """One "volumes" entry: the producer and its mean level over the interval, in dBov (-127..0)."""

    producer: Producer
    volume: int


@dataclass(eq=False)  # identity: each observer's own sums
class Levels:
    """One observer's running sums of one producer's levels since its last evaluation."""

    count: int = 0
    total: int = 0
    loudest: int = SILENT
    voiced: int = 0
    recent: bytearray = field(default_factory=bytearray)  # the last LEVEL_RECENT levels, in order

    def add(self, count: int, total: int, loudest: int, voiced: int, recent: bytes) -> None:
        self.count += count
        self.total += total
        self.loudest = min(self.loudest, loudest)
        self.voiced += voiced
        self.recent += recent
        del self.recent[:-LEVEL_RECENT]

    def take(self) -> Levels:
        out = Levels(self.count, self.total, self.loudest, self.voiced, self.recent)
        self.count = self.total = self.voiced = 0
        self.loudest = SILENT
        self.recent = bytearray()
        return out

    @property
    def mean_dbov(self) -> int:
        """The mean level as mediasoup reports it: negative dBov, rounded."""
        return -round(self.total / self.count) if self.count else -SILENT


def collect(producers: list[Producer]) -> None:
    """Move the datapath's sums for `producers` (one table hold) into every observer's Levels of
    each: a producer in two observers is read once and counted by both."""
    live = [p for p in producers if not p.closed and p.level_subscribers]
    if not live:
        return
    rows = live[0].transport.engine.datapath.take_levels([p.slot for p in live])
    for producer, (count, total, loudest, voiced, recent) in zip(live, rows, strict=True):
        if count:
            for levels in producer.level_subscribers:
                levels.add(count, total, loudest, voiced, recent)


class RtpObserver(EventEmitter):
    """Base of the observers. Events: "routerclose". Observer events: "close", "pause", "resume",
    "addproducer", "removeproducer". Evaluated every `interval` ms on the engine's event loop."""

    def __init__(self, router: Router, interval_ms: int, app_data: dict[str, Any] | None) -> None:
        super().__init__()
        self.id = str(uuid.uuid4())
        self.router = router
        self.interval_ms = interval_ms
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self.producers: dict[str, Producer] = {}
        self._levels: dict[str, Levels] = {}
        self._paused = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = router.engine.loop.call_later(
            interval_ms / 1000, self._tick
        )

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def add_producer(self, producer_id: str) -> None:
        """Observe a producer of this router (mediasoup `addProducer`); KeyError if unknown."""
        if self._closed:
            raise RuntimeError("observer closed")
        producer = self.router.producers.get(producer_id)
        if producer is None:
            raise KeyError(f"no producer {producer_id} in this router")
        if producer_id in self.producers:
            return
        levels = Levels()
        self.producers[producer_id] = producer
        self._levels[producer_id] = levels
        producer.add_level_subscriber(levels)
        producer.observer.once("close", lambda: self.remove_producer(producer_id))
        self.observer.emit("addproducer", producer)

    def remove_producer(self, producer_id: str) -> None:
        producer = self.producers.pop(producer_id, None)
        if producer is None:
            return
        producer.remove_level_subscriber(self._levels.pop(producer_id))
        self._producer_removed(producer)
        self.observer.emit("removeproducer", producer)

    def pause(self) -> None:
        if self._closed or self._paused:
            return
        self._paused = True
        self._on_pause()
        self.observer.emit("pause")

    def resume(self) -> None:
        if self._closed or not self._paused:
            return
        self._paused = False
        for levels in self._levels.values():
            levels.take()  # what arrived while paused is not this interval's
        self._on_resume()
        self.observer.emit("resume")

    def close(self) -> None:
        if self._close():
            self._drop_listeners()

    def _router_closed(self) -> None:
        if self._close():
            self.emit("routerclose")
            self._drop_listeners()

    def _drop_listeners(self) -> None:
        # A closed observer emits nothing more. Its listeners are often bound methods of an owner
        # that holds the observer (a Room): kept, they would be a cycle only the collector frees.
        self.remove_all_listeners()
        self.observer.remove_all_listeners()

    def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for producer_id in list(self.producers):
            self.remove_producer(producer_id)
        self.router.on_observer_closed(self)
        self.observer.emit("close")
        return True

    def _tick(self) -> None:
        if self._closed:
            return
        self._timer = self.router.engine.loop.call_later(self.interval_ms / 1000, self._tick)
        collect(list(self.producers.values()))
        if self._paused:
            return
        taken = [(self.producers[pid], levels.take()) for pid, levels in self._levels.items()]
        self._evaluate(taken)

    # ------------------------------------------------------------------ subclasses

    def _evaluate(self, taken: list[tuple[Producer, Levels]]) -> None:
        raise NotImplementedError

    def _producer_removed(self, producer: Producer) -> None:
        pass

    def _on_pause(self) -> None:
        pass

    def _on_resume(self) -> None:
        pass


class AudioLevelObserver(RtpObserver):
    """mediasoup's AudioLevelObserver: every `interval` ms, "volumes" with the `max_entries`
    loudest producers whose mean level reached `threshold` dBov (loudest first), or "silence"
    once when none did. Events are emitted on the observer and on `observer`."""

    def __init__(
        self,
        router: Router,
        max_entries: int = 1,
        threshold: int = -80,
        interval: int = 1000,
        app_data: dict[str, Any] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if not -127 <= threshold <= 0:
            raise ValueError("threshold must be -127..0 dBov")
        self.max_entries = max_entries
        self.threshold = threshold
        self._silent = True  # nothing reported yet: the first silent interval says nothing
        super().__init__(router, min(max(interval, 250), 5000), app_data)  # mediasoup's bounds

    def _evaluate(self, taken: list[tuple[Producer, Levels]]) -> None:
        volumes: list[Volume] = [
            {"producer": producer, "volume": levels.mean_dbov}
            for producer, levels in taken
            if levels.count >= MIN_SAMPLES and levels.mean_dbov >= self.threshold
        ]
        if volumes:
            volumes.sort(key=lambda v: -v["volume"])
            del volumes[self.max_entries :]
            self._silent = False
            self.emit("volumes", volumes)
            self.observer.emit("volumes", volumes)
        elif not self._silent:
            self._silent = True
            self.emit("silence")
            self.observer.emit("silence")

    def _on_pause(self) -> None:
        self._silent = True


class ActiveSpeakerObserver(RtpObserver):
    """mediasoup's ActiveSpeakerObserver: "dominantspeaker" ({producer}) when the dominant speaker
    changes, by the dominant speaker identification of Volfin and Cohen (fastsfu.dominant_speaker)
    over every packet's level, one frame each; silence keeps the last dominant speaker
    (docs/observers.md#active-speaker)."""

    FRAME_MS = 20  # the packet time the frames are counted in (Opus's usual 20 ms)

    def __init__(self, router: Router, interval: int = 300, app_data: dict[str, Any] | None = None) -> None:
        self.dominant: Producer | None = None
        self._dsi: DominantSpeakerIdentification[str] = DominantSpeakerIdentification()
        super().__init__(router, min(max(interval, 100), 5000), app_data)
        self._last = router.engine.loop.time()

    def add_producer(self, producer_id: str) -> None:
        super().add_producer(producer_id)
        self._dsi.add(producer_id)

    def _evaluate(self, taken: list[tuple[Producer, Levels]]) -> None:
        now = self.router.engine.loop.time()
        frames = int((now - self._last) * 1000 / self.FRAME_MS)
        self._last = now
        for producer, levels in taken:
            self._dsi.feed(producer.id, bytes(levels.recent), frames)
        winner = self._dsi.decide()
        if winner is not None and (self.dominant is None or winner != self.dominant.id):
            self.dominant = self.producers[winner]
            self.emit("dominantspeaker", {"producer": self.dominant})
            self.observer.emit("dominantspeaker", {"producer": self.dominant})

    def _producer_removed(self, producer: Producer) -> None:
        self._dsi.remove(producer.id)
        if self.dominant is producer:
            self.dominant = None

    def _on_pause(self) -> None:
        # What was heard before the pause is stale after it: everyone starts from silence, and
        # the dominant speaker stays until someone speaks (as after any silence).
        for producer_id in self._dsi.speakers:
            self._dsi.speakers[producer_id] = Speaker()

    def _on_resume(self) -> None:
        self._last = self.router.engine.loop.time()  # the paused time is not silence to count


class SpeakingObserver(RtpObserver):
    """Who is speaking, for speaking indicators (fastsfu's own; docs/observers.md#speaking): a
    producer starts speaking in the first interval whose mean level reaches `threshold` dBov and
    stops after `hold` intervals under it, so a pause between words does not flap the indicator.
    Event: "speaking" (producer, bool), on changes only."""

    def __init__(
        self,
        router: Router,
        threshold: int = -50,
        interval: int = 250,
        hold: int = 3,
        app_data: dict[str, Any] | None = None,
    ) -> None:
        if not -127 <= threshold <= 0 or hold < 1:
            raise ValueError("threshold must be -127..0 dBov and hold >= 1")
        self.threshold = threshold
        self.hold = hold
        self.speaking: set[str] = set()
        self._quiet: dict[str, int] = {}
        super().__init__(router, min(max(interval, 100), 5000), app_data)

    def _evaluate(self, taken: list[tuple[Producer, Levels]]) -> None:
        for producer, levels in taken:
            loud = levels.count >= max(1, MIN_SAMPLES * self.interval_ms // 2000) and (
                levels.mean_dbov >= self.threshold
            )
            if loud:
                self._quiet[producer.id] = 0
                if producer.id not in self.speaking:
                    self.speaking.add(producer.id)
                    self.emit("speaking", producer, True)
            elif producer.id in self.speaking:
                self._quiet[producer.id] = self._quiet.get(producer.id, 0) + 1
                if self._quiet[producer.id] >= self.hold:
                    self.speaking.discard(producer.id)
                    self.emit("speaking", producer, False)

    def _producer_removed(self, producer: Producer) -> None:
        self._quiet.pop(producer.id, None)
        if producer.id in self.speaking:
            self.speaking.discard(producer.id)
            self.emit("speaking", producer, False)

    def _on_pause(self) -> None:
        for producer_id in list(self.speaking):
            self._producer_removed(self.producers[producer_id])
