"""The cluster registry (docs/cluster.md#the-registry): nodes by heartbeat with a local expiry, and
each room's home in a NATS key-value bucket, placed with compare-and-set so that the first writer
wins and every node then reads the same home."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastsfu.cluster.bus import Bus, BusError, KeyNotFoundError, KeyValue, KeyWrongLastSequenceError
from fastsfu.cluster.placement import NodeLoad, choose_home, home_is_valid

log = logging.getLogger(__name__)

NODES_SUBJECT = "fastsfu.v1.nodes"  # every node's heartbeats
ROOMS_BUCKET = "fastsfu_rooms"  # room key -> home node id
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
        """The room's home: the recorded one while its node lives, else the least-loaded node,
        written with compare-and-set (a lost race reads the winner's). BusError if NATS fails
        (retried within PLACE_BUDGET while connected) or no node takes new rooms."""
        deadline = time.monotonic() + PLACE_BUDGET  # real time: the wait is real
        while True:
            try:
                return await self._place(room)
            except NoNodeError:
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
        kv = self._kv()
        wait = self.bus.resumed_at + WARMUP - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        for _ in range(PLACE_ATTEMPTS):
            revision = 0
            try:
                entry = await self.bus.call(kv.get(room))
                current = (entry.value or b"").decode()
                revision = entry.revision or 0
                nodes = self.nodes()
                if home_is_valid(current, nodes):
                    return Placement(current, False)
            except KeyNotFoundError:  # KeyDeletedError too: a released room
                nodes = self.nodes()
            choice = choose_home(nodes)
            if choice is None:
                raise NoNodeError("no node takes new rooms")
            try:
                if revision:
                    await self.bus.call(kv.update(room, choice.encode(), last=revision))
                else:
                    await self.bus.call(kv.create(room, choice.encode()))
            except KeyWrongLastSequenceError:
                continue  # another node placed it first: read its choice
            self._count_room(choice)
            self.placed += 1
            return Placement(choice, True)
        raise BusError(f"room {room}: placement kept racing")

    async def lookup(self, room: str) -> str | None:
        """The recorded home of `room` while its node lives, without placing it (None: no home).
        BusError if NATS fails."""
        kv = self._kv()
        try:
            entry = await self.bus.call(kv.get(room))
        except KeyNotFoundError:
            return None
        home = (entry.value or b"").decode()
        return home if home_is_valid(home, self.nodes()) else None

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
        the revision read, so a placement made meanwhile stays); whether it was removed."""
        kv = self._kv()
        if self.served_elsewhere(room):
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

    def _kv(self) -> KeyValue:
        if self._rooms is None:
            raise BusError("the registry is not open")
        return self._rooms
