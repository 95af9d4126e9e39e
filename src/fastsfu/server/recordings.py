"""The server's recordings of rooms (docs/recording.md): started and stopped through the admin
endpoint (`/admin/recordings`, its own bearer token), ended with the room and at shutdown, counted
for /metrics. Protocol-neutral: a room is its key, whichever front-end its members use."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fastsfu.producer import Producer
from fastsfu.recorder import OnCap, Recorder, RecorderOptions
from fastsfu.rooms import Room, RoomKey, Rooms
from fastsfu.server.config import ServerConfig

log = logging.getLogger(__name__)

ADMIN_PATH = "/admin/recordings"
Answer = tuple[int, Any]  # an HTTP status and its JSON body
DROP_KINDS = ("ring_full", "oversize", "late", "malformed")


class Recordings:
    """One recorder per recorded room, by recorder ID."""

    def __init__(self, rooms: Rooms, directory: str, options: RecorderOptions) -> None:
        self.rooms = rooms
        self.directory = directory
        self.options = options
        self.active: dict[str, Recorder] = {}
        self._keys: dict[RoomKey, str] = {}
        # Totals of recorders that ended, for the counters (live ones are read at scrape time).
        self.ended = Counter[str]()
        self.started = 0
        self.errors = 0
        self._closing: set[Recorder] = set()  # ended, the writer thread still finishing
        self.node: str | None = None  # this node's id in a cluster, named in each recording

    def start(self, key: RoomKey) -> Recorder:
        """Record every speaker of the room `key` (KeyError: no such room; ValueError: recorded)."""
        room = self.rooms.get(key)
        if room is None:
            raise KeyError(key)
        if key in self._keys:
            raise ValueError("this room is being recorded")
        recorder = room.router.create_recorder(
            self.directory,
            self.options,
            record_all=True,
            label=_member_label(room),
            app_data={"room": key, "node": self.node},
        )
        self.active[recorder.id] = recorder
        self._keys[key] = recorder.id
        self.started += 1
        recorder.observer.once("close", lambda reason: self._ended(recorder, key, reason))
        log.info("recording room %s as %s", list(key), recorder.id)
        return recorder

    def stop(self, recorder_id: str) -> Recorder | None:
        recorder = self.active.get(recorder_id)
        if recorder is not None:
            recorder.close()
        return recorder

    async def close(self) -> None:
        """Stop every recording and wait until its files are written and closed (shutdown)."""
        for recorder in list(self.active.values()):
            recorder.close()
        if self._closing:
            await asyncio.gather(*(r.wait_closed() for r in list(self._closing)))

    def _ended(self, recorder: Recorder, key: RoomKey, reason: str) -> None:
        self.active.pop(recorder.id, None)
        self._keys.pop(key, None)
        self._closing.add(recorder)
        asyncio.ensure_future(self._settle(recorder))
        stats = recorder.stats()
        for kind in DROP_KINDS:
            self.ended[kind] += stats[kind]
        self.ended["files"] += len(stats["files"])
        if reason == "error":
            self.errors += 1
        log.info("recording %s of room %s ended (%s)", recorder.id, list(key), reason)

    async def _settle(self, recorder: Recorder) -> None:
        await recorder.wait_closed()
        if recorder in self._closing:
            self._closing.discard(recorder)
            self.ended["bytes"] += recorder.bytes_written

    def collectors(self) -> tuple[Collector, ...]:
        return (RecordingCollector(self),)

    def bytes_written(self) -> int:
        # Written by the writer threads; read at scrape time (closing ones included until shutdown).
        return self.ended["bytes"] + sum(r.bytes_written for r in [*self.active.values(), *self._closing])



def _member_label(room: Room) -> Callable[[Producer], str | None]:
    """Files are named after the user whose producer they record."""

    def label(producer: Producer) -> str | None:
        for user_id, member in room.members.items():
            if member.producer is producer:
                return f"user{user_id}"
        return None

    return label


def describe(recorder: Recorder) -> dict[str, Any]:
    stats = recorder.stats()
    node = recorder.app_data.get("node")
    where = {"node": node} if node is not None else {}
    return {"id": recorder.id, "room": list(recorder.app_data.get("room", ())), **where, **stats}


def recordings_for(
    config: ServerConfig, rooms: Rooms, relay: Relay | None = None
) -> tuple[Recordings | None, Callable[[web.Application], None] | None]:
    """The server's recordings and the mount of their admin endpoint, when [recording] is enabled;
    in a cluster, `relay` forwards what another node must answer (docs/cluster.md#recording)."""
    r = config.recording
    if not r.enabled or config.admin_token is None:
        return None, None
    on_cap: OnCap = "stop" if r.on_cap == "stop" else "rotate"
    options = RecorderOptions(r.max_file_bytes, r.max_file_seconds, on_cap)
    recordings = Recordings(rooms, r.directory, options)
    if relay is not None:
        recordings.node = relay.node
        relay.local = LocalRecordings(recordings)
    return recordings, admin_mount(recordings, config.admin_token, relay)


# ---------------------------------------------------------------------- the admin endpoint


class LocalRecordings:
    """This node's answers to the admin requests (also to those another node forwards here)."""

    def __init__(self, recordings: Recordings) -> None:
        self.recordings = recordings

    def start(self, key: RoomKey) -> Answer:
        try:
            recorder = self.recordings.start(key)
        except KeyError:
            return 404, {"error": "no such room"}
        except ValueError as exc:
            return 409, {"error": str(exc)}
        return 201, describe(recorder)

    def listing(self) -> list[Any]:
        return [describe(r) for r in self.recordings.active.values()]

    async def stop(self, recorder_id: str) -> Answer:
        recorder = self.recordings.stop(recorder_id)
        if recorder is None:
            return 404, {"error": "no such recording"}
        await recorder.wait_closed()
        return 200, describe(recorder)


class Relay(Protocol):
    """Forwards to the node that holds the room or the recording (fastsfu.cluster.admin_relay)."""

    node: str
    local: Any

    async def start(self, key: tuple[int | str, ...]) -> Answer | None: ...

    async def listing(self, local: list[Any]) -> Answer: ...

    async def stop(self, recorder_id: str) -> Answer: ...


def admin_mount(
    recordings: Recordings, token: str, relay: Relay | None = None
) -> Callable[[web.Application], None]:
    """POST /admin/recordings {"room": [...]} starts, GET lists, DELETE /admin/recordings/{id}
    stops; each needs `Authorization: Bearer <token>` (401 otherwise). With a relay, what this
    node cannot answer goes to the node that can."""
    expected = f"Bearer {token}".encode()
    local = LocalRecordings(recordings)

    def guarded(
        handler: Callable[[web.Request], Awaitable[Answer]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def check(request: web.Request) -> web.Response:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no guessing by timing
                return web.json_response(
                    {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
                )
            status, body = await handler(request)
            return web.json_response(body, status=status)

        return check

    async def create(request: web.Request) -> Answer:
        try:
            body = await request.json()
            key = tuple(body["room"])
            if not key or not all(type(k) in (int, str) for k in key):
                raise ValueError
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return 400, {"error": 'expected {"room": [guild_id, channel_id]}'}
        if relay is not None and recordings.rooms.get(key) is None:
            forwarded = await relay.start(key)  # None: no live home elsewhere, answered here
            if forwarded is not None:
                return forwarded
        return local.start(key)

    async def listing(request: web.Request) -> Answer:
        if relay is not None:
            return await relay.listing(local.listing())
        return 200, local.listing()

    async def delete(request: web.Request) -> Answer:
        recorder_id = request.match_info["id"]
        answer = await local.stop(recorder_id)
        if answer[0] == 404 and relay is not None:
            return await relay.stop(recorder_id)
        return answer

    def mount(app: web.Application) -> None:
        app.router.add_post(ADMIN_PATH, guarded(create))
        app.router.add_get(ADMIN_PATH, guarded(listing))
        app.router.add_delete(ADMIN_PATH + "/{id}", guarded(delete))

    return mount


# ---------------------------------------------------------------------- metrics


class RecordingCollector(Collector):
    def __init__(self, recordings: Recordings) -> None:
        self.recordings = recordings

    def collect(self) -> Iterator[Metric]:
        r = self.recordings
        live = [rec.stats() for rec in r.active.values()]
        yield GaugeMetricFamily("fastsfu_recordings", "Rooms being recorded", value=len(live))
        yield CounterMetricFamily("fastsfu_recordings_started", "Recordings started", value=r.started)
        yield CounterMetricFamily(
            "fastsfu_recording_errors", "Recordings stopped by a write error (disk full, ...)", value=r.errors
        )
        yield CounterMetricFamily(
            "fastsfu_recording_bytes_written", "Bytes of Ogg Opus written", value=r.bytes_written()
        )
        files = r.ended["files"] + sum(len(s["files"]) for s in live)
        yield CounterMetricFamily("fastsfu_recording_files", "Recording files started", value=files)
        drops = CounterMetricFamily(
            "fastsfu_recording_dropped_packets",
            "Packets not recorded: ring_full (the timer was behind), oversize, late (after a later "
            "one was written, or duplicate), malformed (not Opus)",
            labels=["reason"],
        )
        for kind in DROP_KINDS:
            drops.add_metric([kind], r.ended[kind] + sum(s[kind] for s in live))
        yield drops
