"""Recorder: producers of a router written to Ogg Opus files, one per speaker, without transcoding
(docs/recording.md). The datapath copies decrypted payloads into a tap; a timer drains it; files
are written by one thread per recorder, so a slow or full disk never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

from fastsfu.events import EventEmitter
from fastsfu.ogg import HEADER_FIXED, OggOpusStream
from fastsfu.opus_track import RATE, SpeakerTrack

if TYPE_CHECKING:
    from fastsfu.producer import Producer
    from fastsfu.router import Router
    from fastsfu.transport import Transport

log = logging.getLogger(__name__)

TAP_RECORD = struct.Struct("<iiIIqq")  # the datapath's tap record header (Datapath.take_tap)
# Each file starts with one empty 10 ms frame, which a decoder with no state yet turns into zeros,
# and a pre-skip that discards exactly those (RFC 7845 §4.2): players see the received audio from
# its first sample, and the header carries a non-zero pre-skip as readers expect.
PRE_SKIP = 480
LEAD_IN = bytes([30 << 3])  # config 30: CELT FB 10 ms, code 0, an empty frame (RFC 6716 §3.2.2)
MIN_FILE_BYTES = 8192  # room for the headers and a page: a smaller cap could never hold audio
OnCap = Literal["rotate", "stop"]


@dataclass
class RecorderOptions:
    """Limits of one recorder's files (0: no limit); `on_cap`: start a new file or stop that speaker."""

    max_file_bytes: int = 0
    max_file_seconds: float = 0.0
    on_cap: OnCap = "rotate"
    interval: float = 0.2  # seconds between drains of the tap
    tap_slots: int = 1024  # packets the tap holds between drains; more is a counted drop

    def __post_init__(self) -> None:
        if self.max_file_bytes and self.max_file_bytes < MIN_FILE_BYTES:
            raise ValueError(f"max_file_bytes must be 0 or at least {MIN_FILE_BYTES}")
        if self.max_file_seconds < 0 or not 0.01 <= self.interval <= 5:
            raise ValueError("max_file_seconds must be >= 0 and interval 0.01..5 s")
        if self.on_cap not in ("rotate", "stop"):
            raise ValueError("on_cap must be 'rotate' or 'stop'")


@dataclass
class _File:
    key: int
    path: str
    stream: OggOpusStream
    written: int = 0  # bytes handed to the writer thread


class _Speaker:
    def __init__(self, producer: Producer, consumer: int, label: str | None) -> None:
        self.producer = producer
        self.consumer = consumer
        self.label = label
        self.track = SpeakerTrack()
        self.file: _File | None = None
        self.part = 0
        self.capped = False  # on_cap "stop" was hit: the rest is not written
        self.out = bytearray()
        self.on_close: Callable[[], None] = lambda: None  # its listener on the producer's observer


class Recorder(EventEmitter):
    """Records producers of one router. Observer events: "close" (reason: "close", "routerclose",
    "error"), "newfile" (path), "filedone" (path)."""

    def __init__(
        self,
        router: Router,
        directory: str,
        options: RecorderOptions | None = None,
        record_all: bool = False,
        label: Callable[[Producer], str | None] | None = None,
        app_data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.id = str(uuid.uuid4())
        self.router = router
        self.directory = directory
        self.options = options or RecorderOptions()
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self.files: list[str] = []  # every file started, in order
        self.bytes_written = 0  # bytes the writer thread wrote
        self.error: OSError | None = None
        self.closed = False
        self.close_reason = ""
        self._label = label
        self._dp = router.engine.datapath
        self._loop = router.engine.loop
        self._speakers: dict[str, _Speaker] = {}  # by producer id
        self._by_consumer: dict[int, _Speaker] = {}
        self._next_key = 0
        self._late = self._malformed = self._concealed = 0  # of speakers already removed
        self._io = ThreadPoolExecutor(1, thread_name_prefix="fastsfu-recorder")
        self._handles: dict[int, IO[bytes]] = {}  # writer thread only
        self._last: Future[None] | None = None
        self.tap = self._dp.add_tap(self.options.tap_slots)
        self._tap_final: dict[str, int] = {}
        self._record_all = record_all
        # Bound once: EventEmitter.off() finds a listener by identity.
        self._router_closed = self._on_router_close
        self._new_transport = self._watch_transport
        self._new_producer = self._on_new_producer
        router.observer.once("close", self._router_closed)
        if record_all:
            router.observer.on("newtransport", self._new_transport)
            for transport in list(router.transports.values()):
                self._watch_transport(transport)
        self._timer = self._loop.call_later(self.options.interval, self._tick)

    # ------------------------------------------------------------------ control

    @property
    def producer_ids(self) -> list[str]:
        return list(self._speakers)

    def add_producer(self, producer: Producer, label: str | None = None) -> None:
        """Record `producer` (an Opus producer of this router) into files of its own."""
        if self.closed:
            raise RuntimeError("recorder closed")
        if producer.transport.router is not self.router:
            raise ValueError("the producer belongs to another router")
        if producer.id in self._speakers or producer.closed:
            return
        consumer = self._dp.add_direct_consumer(producer.slot, self.tap)
        speaker = _Speaker(producer, consumer, label)
        self._speakers[producer.id] = speaker
        self._by_consumer[consumer] = speaker
        speaker.on_close = lambda: self._producer_closed(producer.id)
        producer.observer.once("close", speaker.on_close)

    def remove_producer(self, producer: Producer) -> None:
        """Stop recording `producer`: its file ends (EOS page) with what was received."""
        speaker = self._speakers.get(producer.id)
        if speaker is None or self.closed:
            return
        # Removed first: no packet of it can enter the tap after the drain (its index may be reused).
        self._dp.remove_consumer(speaker.consumer)
        self._drain_tap(final=False)
        self._end_speaker(speaker)
        self._submit_outputs()

    def close(self) -> None:
        """Stop: every file ends with its EOS page; `wait_closed()` waits for the writes."""
        self._close("close")

    async def wait_closed(self) -> None:
        """Until the writer thread has written and closed every file."""
        last = self._last
        if last is not None:
            await asyncio.wrap_future(last)

    def stats(self) -> dict[str, Any]:
        tap = self._tap_final if self.closed else self._dp.tap_stats(self.tap)
        speakers = list(self._speakers.values())
        return {
            "id": self.id,
            "closed": self.closed,
            "producers": len(speakers),
            "files": list(self.files),
            "bytes_written": self.bytes_written,
            "tap_packets": tap.get("packets", 0),
            "ring_full": tap.get("ring_full", 0),
            "oversize": tap.get("oversize", 0),
            "late": self._late + sum(s.track.late for s in speakers),
            "malformed": self._malformed + sum(s.track.malformed for s in speakers),
            "concealed_seconds": (self._concealed + sum(s.track.concealed for s in speakers)) / RATE,
            "error": str(self.error) if self.error else None,
        }

    # ------------------------------------------------------------------ events

    def _watch_transport(self, transport: Transport) -> None:
        transport.observer.on("newproducer", self._new_producer)
        for producer in list(transport.producers.values()):
            self._on_new_producer(producer)

    def _on_new_producer(self, producer: Producer) -> None:
        if not self.closed:
            self.add_producer(producer)

    def _producer_closed(self, producer_id: str) -> None:
        # The datapath removed the direct consumer with the producer; its packets are still in the tap.
        speaker = self._speakers.get(producer_id)
        if speaker is None or self.closed:
            return
        self._drain_tap(final=False)
        self._end_speaker(speaker)
        self._submit_outputs()

    def _on_router_close(self) -> None:
        self._close("routerclose")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self._timer.cancel()
        if self.error is None:
            self._drain_tap(final=True)
        for speaker in list(self._speakers.values()):
            self._end_speaker(speaker)
        self._submit_outputs()
        self.closed = True
        self.close_reason = reason
        self._tap_final = self._dp.tap_stats(self.tap)
        self._dp.remove_tap(self.tap)
        self.router.observer.off("close", self._router_closed)
        if self._record_all:
            self.router.observer.off("newtransport", self._new_transport)
            for transport in list(self.router.transports.values()):
                transport.observer.off("newproducer", self._new_producer)
        self._io.shutdown(wait=False)  # the queued writes still run
        self.observer.emit("close", reason)

    # ------------------------------------------------------------------ the timer

    def _tick(self) -> None:
        self._drain_tap(final=False)
        self._submit_outputs()
        if not self.closed:
            self._timer = self._loop.call_later(self.options.interval, self._tick)

    def _drain_tap(self, final: bool) -> None:
        data = self._dp.take_tap(self.tap)
        off, end = 0, len(data)
        while off < end:
            consumer, size, ts, _, ext, arrival = TAP_RECORD.unpack_from(data, off)
            off += TAP_RECORD.size
            speaker = self._by_consumer.get(consumer)
            if speaker is not None:
                speaker.track.push(ext, ts, arrival, data[off : off + size])
            off += size
        now = time.monotonic_ns()
        for speaker in list(self._speakers.values()):
            self._write(speaker, speaker.track.pop(now, final))

    def _end_speaker(self, speaker: _Speaker) -> None:
        speaker.producer.observer.off("close", speaker.on_close)
        self._write(speaker, speaker.track.pop(0, final=True))
        self._finish_file(speaker)
        del self._speakers[speaker.producer.id]
        self._by_consumer.pop(speaker.consumer, None)
        self._late += speaker.track.late
        self._malformed += speaker.track.malformed
        self._concealed += speaker.track.concealed

    # ------------------------------------------------------------------ files

    def _write(self, speaker: _Speaker, packets: list[tuple[bytes, int]]) -> None:
        opts = self.options
        cap_samples = int(opts.max_file_seconds * RATE)
        for data, samples in packets:
            if speaker.capped or self.error is not None:
                return
            f = speaker.file or self._open_file(speaker)
            stream = f.stream
            over_time = cap_samples and stream.samples - PRE_SKIP + samples > cap_samples
            # Worst case after this packet: the buffered page, plus a new page if it overflows.
            worst = f.written + len(speaker.out) + stream.pending_bytes() + HEADER_FIXED
            over_size = opts.max_file_bytes and worst + len(data) + len(data) // 255 + 1 > opts.max_file_bytes
            if (over_time or over_size) and stream.samples > PRE_SKIP:
                self._finish_file(speaker)
                if opts.on_cap == "stop":
                    speaker.capped = True
                    log.info("recording of %s stopped at its cap", speaker.producer.id)
                    return
                f = self._open_file(speaker)
                stream = f.stream
            speaker.out += stream.packet(data, samples)

    def _open_file(self, speaker: _Speaker) -> _File:
        named = self._label(speaker.producer) if self._label else None
        label = speaker.label or named or speaker.producer.id
        speaker.label = label
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        speaker.part += 1
        path = os.path.join(self.directory, f"{safe}-{stamp}-{self.id[:8]}-{speaker.part:03d}.opus")
        self._next_key += 1
        f = _File(self._next_key, path, OggOpusStream(self._next_key, pre_skip=PRE_SKIP))
        first = speaker.track.first_arrival or time.monotonic_ns()
        start = time.time_ns() - (time.monotonic_ns() - first)
        comments = [
            "ENCODER=fastsfu (RTP payloads, no transcoding)",
            f"FASTSFU_PRODUCER={speaker.producer.id}",
            f"FASTSFU_LABEL={label}",
            f"FASTSFU_PART={speaker.part}",
            f"FASTSFU_FIRST_PACKET_UNIX_NS={start}",
        ]
        speaker.file = f
        speaker.out += f.stream.headers("fastsfu", comments)
        speaker.out += f.stream.packet(LEAD_IN, PRE_SKIP)
        self.files.append(path)
        self._queue(self._io_open, f.key, path)
        self.observer.emit("newfile", path)
        return f

    def _finish_file(self, speaker: _Speaker) -> None:
        f = speaker.file
        if f is None:
            return
        speaker.out += f.stream.finish()
        self._flush(speaker)
        self._queue(self._io_close, f.key)
        speaker.file = None
        self.observer.emit("filedone", f.path)

    def _flush(self, speaker: _Speaker) -> None:
        if speaker.file is not None and speaker.out:
            data = bytes(speaker.out)
            speaker.out.clear()
            speaker.file.written += len(data)
            self._queue(self._io_write, speaker.file.key, data)

    def _submit_outputs(self) -> None:
        for speaker in list(self._speakers.values()):
            self._flush(speaker)

    # ------------------------------------------------------------------ the writer thread

    def _queue(self, fn: Callable[..., None], *args: Any) -> None:
        if self.closed or (self.error is not None and fn != self._io_close):
            return
        self._last = self._io.submit(self._guard, fn, *args)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except OSError as exc:  # ENOSPC, EFBIG, EIO, EACCES: stop this recording, never the loop
            if self.error is None:
                self.error = exc
                self._loop.call_soon_threadsafe(self._failed, exc)

    def _io_open(self, key: int, path: str) -> None:
        if self.error is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._handles[key] = open(path, "xb", buffering=0)  # noqa: SIM115 (closed by _io_close)

    def _io_write(self, key: int, data: bytes) -> None:
        handle = self._handles.get(key)
        if handle is None or self.error is not None:
            return
        view = memoryview(data)
        while view:
            n = handle.write(view)
            self.bytes_written += n or 0
            view = view[n or 0 :]

    def _io_close(self, key: int) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.close()

    def _failed(self, exc: OSError) -> None:
        log.error("recording %s stopped: %s", self.id, exc)
        self.observer.emit("error", exc)
        self._close("error")
