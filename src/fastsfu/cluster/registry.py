"""The cluster registry (docs/cluster.md#the-registry): nodes by heartbeat with a local expiry, and
each room's home in a NATS key-value bucket, placed with compare-and-set so that the first writer
wins and every node then reads the same home."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Set
from dataclasses import dataclass
from typing import TypeVar

from fastsfu.cluster.bus import Bus, BusError, KeyNotFoundError, KeyValue, KeyWrongLastSequenceError
from fastsfu.cluster.placement import (
    NodeLoad,
    RoomRecord,
    home_is_valid,
    rehomed,
    serving_choice,
    with_spill,
    without_spill,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

NODES_SUBJECT = "fastsfu.v1.nodes"  # every node's heartbeats
ROOMS_BUCKET = "fastsfu_rooms"  # room key -> home node id, or a RoomRecord with spill nodes
NODE_TTL = 10.0  # seconds without a heartbeat after which a node counts as gone
PLACE_ATTEMPTS = 3  # compare-and-set rounds before giving up (each lost round means another won)
# Seconds a placement retries while the bus is connected but JetStream does not answer: after a
# NATS server's crash the rooms bucket's new leader is elected in about 5 s. A bus that stays
# disconnected for RECONNECT_WAIT after a failure is an outage: the placement fails then.
PLACE_BUDGET = 8.0
RECONNECT_WAIT = 1.0
RETRY_PAUSE = 0.25
# Seconds a node listens to heartbeats after (re)connecting before it judges a recorded home dead:
# every live node is heard within one heartbeat interval (1 s), and an unheard home is not a dead one.
WARMUP = 1.5


class NoNodeError(BusError):
    """No live node takes new rooms (all draining)."""


class RoomFullError(BusError):
    """Every live node serving a room is at its cap and no other node takes it."""


@dataclass(frozen=True)
class Placement:
    home: str
    created: bool  # this call placed the room (it had no valid home)


class Registry:
    """One node's view of the cluster: the live nodes (by their heartbeats) and the room homes."""

    def __init__(self, bus: Bus, node: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.node = node
        self.clock = clock
        self._seen: dict[str, tuple[float, NodeLoad]] = {}
        self._rooms: KeyValue | None = None
        self.placed = 0  # rooms this node placed (it won the compare-and-set)
        self.spilled = 0  # spill nodes this node added to rooms' records
        self._outages = 0  # the bus's count of lost connections when last looked at
        self._resumed = -math.inf  # when this node could last have started hearing again

    async def open(self) -> None:
        """Listen to heartbeats and open the rooms bucket (BusError if NATS cannot)."""
        self._rooms = await self.bus.bucket(ROOMS_BUCKET)
        await self.bus.subscribe(NODES_SUBJECT, "heartbeat", self._heard)

    def _heard(self, data: object) -> None:
        load = NodeLoad.from_json(data)  # ValueError: the bus counts it as a drop
        self._seen[load.node] = (self.clock(), load)

    async def heartbeat(self, load: NodeLoad) -> None:
        """Publish this node's load (others hear it through NATS; this node knows it at once)."""
        self._seen[load.node] = (self.clock(), load)
        await self.bus.publish(NODES_SUBJECT, load.to_json())

    def nodes(self) -> dict[str, NodeLoad]:
        """The nodes heard from within NODE_TTL (the expired ones are forgotten). Silence while this
        node's own connection was down says nothing of the others: no node expires then, and each
        has a full TTL from the reconnection to be heard again."""
        now = self.clock()
        if not self.bus.connected or self.bus.outages != self._outages:
            self._outages = self.bus.outages
            self._resumed = now
        for node in [n for n, (t, _) in self._seen.items() if now - max(t, self._resumed) > NODE_TTL]:
            del self._seen[node]
        return {node: load for node, (_, load) in self._seen.items()}

    def heard_at(self, node: str) -> float | None:
        """When the last heartbeat of `node` arrived (this node's clock), if it is known."""
        seen = self._seen.get(node)
        return seen[0] if seen is not None else None

    async def home(self, room: str) -> Placement:
        """The room's home for a new session: the recorded one while its node lives and is not
        draining, else its first open spill node or the least-loaded open node, written with
        compare-and-set (a lost race reads the winner's). BusError if NATS fails (retried within
        PLACE_BUDGET while connected) or no node takes new rooms."""
        return await self._retried(lambda: self._place(room))

    async def serving(self, room: str, refused: Set[str]) -> str:
        """The node a new member of `room` goes to (docs/cluster.md#spill): its home, else the
        first of its spill nodes that did not refuse it as full (`refused`), else a new spill node
        added to the room's record with compare-and-set. RoomFullError when no node is left;
        BusError as for `home`."""
        return await self._retried(lambda: self._serve(room, refused))

    async def _retried(self, op: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + PLACE_BUDGET  # real time: the wait is real
        while True:
            try:
                return await op()
            except (NoNodeError, RoomFullError):
                raise
            except BusError:
                if not await self._may_retry(deadline):
                    raise
            await asyncio.sleep(RETRY_PAUSE)

    async def _may_retry(self, deadline: float) -> bool:
        """After a failed operation: whether there is time left and the bus is (again) connected."""
        reconnect_by = min(deadline, time.monotonic() + RECONNECT_WAIT)
        while not self.bus.connected and time.monotonic() < reconnect_by:
            await asyncio.sleep(0.05)
        return self.bus.connected and time.monotonic() + RETRY_PAUSE < deadline

    async def _place(self, room: str) -> Placement:
        wait = self.bus.resumed_at + WARMUP - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        for _ in range(PLACE_ATTEMPTS):
            record, revision = await self._read(room)
            nodes = self.nodes()
            if record is not None and home_is_valid(record.home, nodes):
                return Placement(record.home, False)
            placed = await self._write(room, rehomed(record, nodes), revision)
            if placed is not None:
                self._count_room(placed.home)
                self.placed += 1
                return Placement(placed.home, True)
        raise BusError(f"room {room}: placement kept racing")

    async def _serve(self, room: str, refused: Set[str]) -> str:
        for _ in range(PLACE_ATTEMPTS):
            home = (await self._place(room)).home
            record, revision = await self._read(room)
            if record is None or record.home != home:
                continue  # changed meanwhile: read again
            nodes = self.nodes()
            choice = serving_choice(record, nodes, refused)
            if choice is not None:
                return choice
            grown = with_spill(record, nodes, refused)
            if grown is None:
                raise RoomFullError(f"room {room}: every node is full")
            if await self._write(room, grown, revision) is not None:
                self._count_room(grown.spill[-1])
                self.spilled += 1
                return grown.spill[-1]
        raise BusError(f"room {room}: placement kept racing")

    async def _read(self, room: str) -> tuple[RoomRecord | None, int]:
        """The room's record (None: none, or one this version cannot read) and its revision."""
        try:
            entry = await self.bus.call(self._kv().get(room))
        except KeyNotFoundError:  # KeyDeletedError too: a released room
            return None, 0
        try:
            return RoomRecord.decode(entry.value), entry.revision or 0
        except ValueError:
            log.warning("room %s: unreadable record replaced", room)
            return None, entry.revision or 0

    async def _write(self, room: str, record: RoomRecord | None, revision: int) -> RoomRecord | None:
        """Compare-and-set `record` over `revision` (0: create); None if another node wrote first."""
        if record is None:
            raise NoNodeError("no node takes new rooms")
        kv = self._kv()
        try:
            if revision:
                await self.bus.call(kv.update(room, record.encode(), last=revision))
            else:
                await self.bus.call(kv.create(room, record.encode()))
        except KeyWrongLastSequenceError:
            return None
        return record

    async def lookup(self, room: str) -> str | None:
        """The recorded home of `room` while its node lives (draining or not: its members are
        there), without placing it (None: no home). BusError if NATS fails."""
        record, _ = await self._read(room)
        if record is None:
            return None
        return record.home if record.home in self.nodes() else None

    def _count_room(self, node: str) -> None:
        """Count a room just placed on `node` in this view until its next heartbeat, so that rooms
        placed within one heartbeat interval spread instead of all going to the same node."""
        seen = self._seen.get(node)
        if seen is not None:
            self._seen[node] = (seen[0], dataclasses.replace(seen[1], rooms=seen[1].rooms + 1))

    def served_elsewhere(self, room: str) -> bool:
        """Whether another live node's last heartbeat lists `room` as served there."""
        return any(room in load.served for node, load in self.nodes().items() if node != self.node)

    async def release(self, room: str) -> bool:
        """Forget the home of a room that ended here and is served nowhere else (compare-and-set on
        the revision read, so a placement made meanwhile stays); whether it was removed. A room
        still served elsewhere stays, without this node among its spill nodes."""
        kv = self._kv()
        if self.served_elsewhere(room):
            await self.leave_spill(room)
            return False
        try:
            entry = await self.bus.call(kv.get(room))
        except KeyNotFoundError:
            return False
        try:
            await self.bus.call(kv.delete(room, last=entry.revision))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def leave_spill(self, room: str) -> bool:
        """Take this node out of the spill nodes of `room` (its last member here left), with
        compare-and-set, so that the record does not keep nodes that no longer serve the room
        (docs/cluster.md#spill); whether it did. BusError if NATS fails."""
        for _ in range(PLACE_ATTEMPTS):
            record, revision = await self._read(room)
            shrunk = without_spill(record, self.node) if record is not None else None
            if shrunk is None:
                return False
            if await self._write(room, shrunk, revision) is not None:
                return True
        raise BusError(f"room {room}: leaving its spill nodes kept racing")

    def _kv(self) -> KeyValue:
        if self._rooms is None:
            raise BusError("the registry is not open")
        return self._rooms
