"""A worker as a node of the cluster (docs/cluster.md#the-registry): connects to NATS in the
background (the server serves without it), publishes its load every second, records the home of
each room it serves, and forgets the homes of rooms that ended here. Its counters are metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fastsfu.cluster import discord_bridge
from fastsfu.cluster.admin_relay import AdminRelay
from fastsfu.cluster.bridge import BridgeHost, Edge, HostedFactory
from fastsfu.cluster.bus import Bus, BusError
from fastsfu.cluster.harmony_bridge import HostedVoice, RoutedSession
from fastsfu.cluster.placement import NodeLoad, room_subject_key
from fastsfu.cluster.registry import Registry
from fastsfu.cluster.spill import Spill
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import GatewayEndpoint
from fastsfu.harmony.session import VoiceRooms, VoiceSession

log = logging.getLogger(__name__)

# The subjects a node listens to.
DROP_KINDS = ("heartbeat", "bridge_open", "bridge_in", "bridge_out", "room", "pipe", "admin")
HEARTBEAT_INTERVAL = 1.0  # seconds between two load heartbeats (NODE_TTL is ten of them)
RETRY_INTERVAL = 1.0  # seconds between two attempts to reach NATS
PROTOCOLS = ("harmony", "discord")

__all__ = ["ClusterCollector", "Node", "room_subject_key"]


class Node:
    """This worker in the registry: `run` until cancelled; `drain` publishes draining at once."""

    def __init__(
        self,
        node_id: str,
        url: str,
        rooms: VoiceRooms,
        media: str,
        discord: GatewayEndpoint | None = None,
        cap: int = 0,
        listen_ip: str = "",
    ) -> None:
        self.node_id = node_id
        self.cap = cap  # members of a room on this node before the room spills (docs/cluster.md#spill)
        self.listen_ip = listen_ip or media.rsplit(":", 1)[0]  # where pipes to other nodes listen
        self.spill: Spill | None = None
        self.url = url
        self.rooms = rooms
        self.media = media
        self.draining = False
        self.bus: Bus | None = None
        self.registry: Registry | None = None
        self.homes: dict[str, str] = {}  # rooms served here -> their home node
        self.served: set[str] = set()  # rooms seen served here, until their record is settled
        self.connected = asyncio.Event()
        self.host: BridgeHost | None = None
        self.admin = AdminRelay(node_id, lambda: self.registry)  # recording requests (docs/recording.md)
        self.edge = Edge(lambda: self.registry, self.connected)  # sessions run here or bridged elsewhere
        self.edge.admit = self._admit
        rooms.session_factory = self._session
        self.kinds: dict[str, HostedFactory] = {"harmony": lambda req, wake: HostedVoice(rooms, req, wake)}
        self.discord = discord
        if discord is not None and isinstance(discord.gateway.handler, DiscordVoice):
            gateway = discord.gateway
            discord.connect = discord_bridge.connection_factory(gateway, discord.gateway.handler, self.edge)
            self.kinds["discord"] = discord_bridge.hosted_factory(gateway)

    def _admit(self, key: str) -> bool:
        """Whether this node takes one more session of room `key`: not while draining (an edge that
        has not heard it yet then tries another node), and only below its cap."""
        return not self.draining and (self.spill is None or self.spill.admit(key))

    def _session(self, rooms: VoiceRooms, user_id: int, frontend: str, remote: str) -> VoiceSession:
        return RoutedSession(rooms, user_id, frontend, remote, self.edge)

    def load(self) -> NodeLoad:
        # Members, and sessions holding a room before they join: both will cost media soon.
        members = sum(room.local_load() for room in self.rooms)
        served = tuple(sorted({room_subject_key(room.key) for room in self.rooms}))
        bridges = [link.sid for link in self.edge.links]  # both protocols' bridges open from here
        if self.host is not None:
            bridges.extend(self.host.sessions)
        return NodeLoad(
            self.node_id, members, len(self.rooms), self.draining, self.media, served, tuple(bridges)
        )

    async def run(self) -> None:
        while self.registry is None:
            try:
                bus = await Bus.connect(self.url, self.node_id)
                registry = Registry(bus, self.node_id)
                await registry.open()
                host = BridgeHost(registry, self.kinds)
                host.admit = self._admit
                await host.start()
                spill = Spill(self.rooms, registry, self.cap, self.media.rsplit(":", 1)[0], self.listen_ip)
                await spill.start()
                await self.admin.serve(bus)
                if self.discord is not None:
                    await bus.subscribe(
                        discord_bridge.CLOSE_SUBJECT,
                        "discord_close",
                        discord_bridge.DiscordCloses(self.discord.gateway),
                    )
            except BusError as exc:
                log.warning("cluster: %s; retrying", exc)
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            self.bus, self.registry, self.host, self.spill = bus, registry, host, spill
        self.connected.set()
        log.info("cluster: node %s on %s", self.node_id, self.url)
        reconcile: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    await self.registry.heartbeat(self.load())
                    self._check_bridges(self.registry)
                    if self.spill is not None:
                        self.spill.tick()
                except BusError as exc:
                    log.debug("cluster: %s", exc)
                # Beside the heartbeats, which a slow bus (a placement retrying) must not delay.
                if reconcile is None or reconcile.done():
                    reconcile = asyncio.create_task(self._reconcile(self.registry))
                await asyncio.sleep(HEARTBEAT_INTERVAL)
        finally:
            if reconcile is not None:
                reconcile.cancel()

    def _check_bridges(self, registry: Registry) -> None:
        """Bridged sessions whose other end's node is gone (no heartbeat within the TTL) end."""
        live = set(registry.nodes())
        if self.host is not None:
            self.host.drop_orphans(live)
        self.edge.check_homes(live)

    async def _reconcile(self, registry: Registry) -> None:
        """Record the home of every room served here (a placement a dead node held is made again, so
        its rooms move to a live one); release the ones that ended here and are served nowhere else."""
        local = {room_subject_key(room.key) for room in self.rooms}
        # Kept apart from `homes`: a room that ends before its home could be read (NATS down) is
        # released all the same, so a spill node leaves the room's record.
        self.served |= local
        nodes = registry.nodes()
        try:
            for key in local:
                if self.homes.get(key) not in nodes:
                    self.homes[key] = (await registry.home(key)).home
            for key in [k for k in self.served if k not in local]:
                await registry.release(key)
                self.served.discard(key)
                self.homes.pop(key, None)
        except BusError as exc:  # tried again at the next heartbeat
            log.debug("cluster: %s", exc)

    async def drain(self) -> None:
        """Mark this node draining in the registry now: no new session comes here (its rooms are
        placed again on open nodes for their next sessions); the sessions it has go on."""
        self.draining = True
        if self.registry is not None:
            with contextlib.suppress(BusError):
                await self.registry.heartbeat(self.load())
                assert self.bus is not None
                await self.bus.flush(1)

    async def close(self) -> None:
        if self.spill is not None:
            await self.spill.close()
        if self.bus is not None:
            with contextlib.suppress(Exception):  # closing on a dead connection is not an error
                await asyncio.wait_for(self.bus.close(), 2.0)


class ClusterCollector(Collector):
    """`fastsfu_cluster_*`: what this worker sees of the cluster and what it asked of the bus."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        n = self.node
        nodes = n.registry.nodes() if n.registry is not None else {}
        yield GaugeMetricFamily("fastsfu_cluster_connected", "1 while connected to NATS", value=_up(n))
        yield GaugeMetricFamily(
            "fastsfu_cluster_nodes", "Nodes heard from within the heartbeat TTL", value=len(nodes)
        )
        yield GaugeMetricFamily(
            "fastsfu_cluster_draining", "1 once this node is draining (no new rooms)", value=int(n.draining)
        )
        homed = sum(1 for home in n.homes.values() if home == n.node_id)
        yield GaugeMetricFamily(
            "fastsfu_cluster_rooms_homed", "Rooms served here whose home is here", value=homed
        )
        yield GaugeMetricFamily(
            "fastsfu_cluster_rooms_elsewhere",
            "Rooms served here whose home is another node (their members here are not bridged yet)",
            value=len(n.homes) - homed,
        )
        yield CounterMetricFamily(
            "fastsfu_cluster_rooms_placed",
            "Rooms this node placed",
            value=n.registry.placed if n.registry else 0,
        )
        yield from spill_metrics(n)
        sessions = CounterMetricFamily(
            "fastsfu_cluster_sessions",
            "Sessions (Harmony streams, Discord WebSockets past IDENTIFY or RESUME) by where they ran: "
            "here (this node is the room's home), bridged (to the home elsewhere), hosted (bridged here "
            "from another node)",
            labels=["protocol", "where"],
        )
        for protocol in PROTOCOLS:
            for where in ("here", "bridged"):
                sessions.add_metric([protocol, where], n.edge.counts[protocol, where])
            sessions.add_metric([protocol, "hosted"], n.host.hosted[protocol] if n.host is not None else 0)
        yield sessions
        full = CounterMetricFamily(
            "fastsfu_cluster_sessions_full",
            "Bridged sessions refused here because this node has their room at its cap (their edge "
            "then tried the room's next node)",
            labels=["protocol"],
        )
        for protocol in PROTOCOLS:
            full.add_metric([protocol], n.host.full[protocol] if n.host is not None else 0)
        yield full
        bus = n.bus
        yield CounterMetricFamily(
            "fastsfu_cluster_bus_requests",
            "Bus operations that need an answer",
            value=bus.requests if bus else 0,
        )
        yield CounterMetricFamily(
            "fastsfu_cluster_bus_failures",
            "Bus operations that failed or timed out",
            value=bus.failures if bus else 0,
        )
        dropped = CounterMetricFamily(
            "fastsfu_cluster_bus_dropped",
            "Bus messages ignored (malformed, another version, wrong types), by the subject they came on",
            labels=["subject_kind"],
        )
        for kind in DROP_KINDS:
            dropped.add_metric([kind], bus.dropped[kind] if bus else 0)
        yield dropped


def _up(node: Node) -> int:
    return int(node.bus is not None and node.bus.nc.is_connected)


def spill_metrics(n: Node) -> Iterator[Metric]:
    """Rooms spanning nodes (docs/cluster.md#spill): pipes, what crosses them, remote members."""
    spill = n.spill
    yield GaugeMetricFamily(
        "fastsfu_cluster_pipes",
        "Pipe transports open to other nodes",
        value=len(spill.pipes.open) if spill else 0,
    )
    yield GaugeMetricFamily(
        "fastsfu_cluster_pipes_srtp",
        "Pipe transports open to other nodes that use SRTP (nodes on another IP)",
        value=sum(p.srtp_parameters is not None for p in spill.pipes.open.values()) if spill else 0,
    )
    yield CounterMetricFamily(
        "fastsfu_cluster_pipe_packets",
        "RTP packets sent and received over pipes to other nodes",
        value=spill.pipes.packets() if spill else 0,
    )
    yield GaugeMetricFamily(
        "fastsfu_cluster_remote_members",
        "Members of rooms served here who are on other nodes (presented here through pipes)",
        value=spill.remote_members() if spill else 0,
    )
    yield GaugeMetricFamily(
        "fastsfu_cluster_pipe_producers",
        "Producers received from other nodes over pipes",
        value=spill.pipe_producers() if spill else 0,
    )
    yield GaugeMetricFamily(
        "fastsfu_cluster_pipe_consumers",
        "Producers of members here sent to other nodes over pipes",
        value=spill.pipe_consumers() if spill else 0,
    )
    yield CounterMetricFamily(
        "fastsfu_cluster_rooms_spilled",
        "Spill nodes this node added to rooms at their cap",
        value=n.registry.spilled if n.registry else 0,
    )
