"""Prometheus metrics (`GET /metrics`): a collector that reads the live state at scrape time (the
engine's datapath totals, the rooms, the front-ends' counters), so nothing is done per packet.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

import fastsfu
from fastsfu.discord.ws_server import GatewayEndpoint
from fastsfu.harmony.rate_limit import RateLimiter
from fastsfu.harmony.session import VoiceRooms
from fastsfu.server.edge import ConnectionGuard
from fastsfu.server.gc_health import PAUSE_BUCKETS, GcMonitor

METRICS_PATH = "/metrics"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class ServerCollector(Collector):
    """Every `fastsfu_*` metric of one server."""

    def __init__(
        self,
        rooms: VoiceRooms,
        rate_limit: RateLimiter | None = None,
        discord: GatewayEndpoint | None = None,
        edges: Sequence[ConnectionGuard] = (),
        gc_monitor: GcMonitor | None = None,
    ) -> None:
        self.rooms = rooms
        self.rate_limit = rate_limit
        self.discord = discord
        self.edges = edges
        self.gc_monitor = gc_monitor

    def collect(self) -> Iterator[Metric]:
        rooms, engine = self.rooms, self.rooms.engine
        info = GaugeMetricFamily(
            "fastsfu_build_info", "The running fastsfu: version and Python", labels=["version", "python"]
        )
        info.add_metric([fastsfu.__version__, platform.python_version()], 1)
        yield info
        yield _gauge("fastsfu_rooms", "Voice channels with a router", len(rooms.rooms))
        members = sum(len(room.local_members()) for room in rooms.rooms.values())
        yield _gauge("fastsfu_room_members", "Users who completed the join here, over all rooms", members)
        speaking = sum(len(room.speaking_users) for room in rooms.rooms.values())
        yield _gauge("fastsfu_speaking_members", "Members speaking now (measured, or their op 5)", speaking)
        yield _gauge("fastsfu_voice_sessions", "Users with a session past Initialize", len(rooms.sessions))
        yield _gauge("fastsfu_voice_streams_open", "Open voice streams (any state)", len(rooms.open_sessions))
        streams = CounterMetricFamily(
            "fastsfu_voice_streams", "Authenticated voice streams opened", labels=["frontend"]
        )
        for frontend in ("hrpc", "grpc"):
            streams.add_metric([frontend], rooms.streams_opened[frontend])
        yield streams
        errors = CounterMetricFamily(
            "fastsfu_voice_stream_errors", "Voice streams ended by an error", labels=["identifier"]
        )
        for identifier, count in sorted(rooms.stream_errors.items()):
            errors.add_metric([identifier], count)
        yield errors
        if self.rate_limit is not None:
            yield _counter(
                "fastsfu_rate_limited_streams",
                "Voice streams refused by the rate limit (both front-ends)",
                self.rate_limit.rejected,
            )
            yield _gauge(
                "fastsfu_rate_limit_addresses", "Addresses the rate limit tracks", len(self.rate_limit)
            )
        if self.discord is not None:
            yield from self._discord(self.discord)
        if self.edges:
            yield from self._edges(self.edges)
        if self.gc_monitor is not None:
            yield from self._gc(self.gc_monitor)
        if engine.closed:
            return
        s = engine.stats()
        yield _gauge("fastsfu_routers", "Routers", s["routers"])
        yield _gauge("fastsfu_transports", "Transports (WebRTC and plain)", s["transports"])
        if engine.thread_nice is not None:
            nice = GaugeMetricFamily(
                "fastsfu_thread_nice", "Nice value of the datapath and event-loop threads", labels=["thread"]
            )
            nice.add_metric(["datapath"], engine.thread_nice.datapath)
            nice.add_metric(["loop"], engine.thread_nice.loop)
            yield nice
        producers = [p for router in engine.routers.values() for p in router.producers.values()]
        yield _gauge("fastsfu_producers", "Producers, over all routers", len(producers))
        consumers = sum(len(p.consumers) for p in producers)
        yield _gauge("fastsfu_consumers", "Consumers, over all producers", consumers)
        yield _counter("fastsfu_received_packets", "Datagrams received on media sockets", s["rx_packets"])
        yield _counter("fastsfu_received_bytes", "Bytes received on media sockets", s["rx_bytes"])
        yield _counter("fastsfu_forwarded_packets", "RTP packets sent to consumers", s["forwarded_packets"])
        yield _counter("fastsfu_forwarded_bytes", "SRTP bytes sent to consumers", s["forwarded_bytes"])
        yield _counter("fastsfu_slow_path_packets", "Datagrams handled in Python", s["slow_path_packets"])
        yield _counter(
            "fastsfu_late_packets",
            "RTP forwarded after waiting over 20 ms in the socket queue",
            s["late_packets"],
        )
        drops = CounterMetricFamily(
            "fastsfu_dropped_datagrams", "Media datagrams dropped, by reason", labels=["reason"]
        )
        for reason, count in s["drops"].items():
            drops.add_metric([reason], count)
        yield drops
        # Two different events: a handshake that failed, and a peer that went silent after one.
        yield _counter(
            "fastsfu_dtls_failures", "WebRTC transports whose DTLS handshake failed", s["dtls_failures"]
        )
        yield _counter(
            "fastsfu_ice_consent_expiries",
            "WebRTC transports closed because ICE consent expired (RFC 7675)",
            s["ice_consent_expiries"],
        )
        if s["ice_tcp"]:  # ICE over TCP is on (docs/transports.md, "ICE over TCP")
            tcp = dict(s["ice_tcp"])
            yield _gauge("fastsfu_ice_tcp_connections", "Open ICE-TCP connections", tcp.pop("connections"))
            yield _counter("fastsfu_ice_tcp_accepted", "ICE-TCP connections accepted", tcp.pop("accepted"))
            closes = CounterMetricFamily(
                "fastsfu_ice_tcp_closes", "ICE-TCP connections closed, by reason", labels=["reason"]
            )
            for reason, count in tcp.items():
                closes.add_metric([reason], count)
            yield closes
        if self.discord is not None:
            yield _counter(
                "fastsfu_discord_discoveries_refused",
                "Discord IP discoveries refused: the SSRC's session is bound to another address",
                s["discord_discoveries_refused"],
            )
            yield _counter(
                "fastsfu_discord_remote_moves",
                "Discord sessions moved to a new address by an authenticated packet (NAT rebinding)",
                s["discord_remote_moves"],
            )

    @staticmethod
    def _gc(monitor: GcMonitor) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "fastsfu_gc_pause_seconds",
            "Pauses of the event loop's thread for Python's cyclic garbage collector, by generation",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "fastsfu_gc_pause_max_seconds", "The longest collection pause so far", labels=["generation"]
        )
        for generation in range(3):
            buckets = [(str(bound), monitor.buckets[generation][i]) for i, bound in enumerate(PAUSE_BUCKETS)]
            buckets.append(("+Inf", monitor.collections[generation]))
            pauses.add_metric([str(generation)], buckets, monitor.pause_total[generation])
            longest.add_metric([str(generation)], monitor.pause_max[generation])
        yield pauses
        yield longest
        yield _gauge(
            "fastsfu_gc_frozen_objects", "Start-up objects kept out of every collection", monitor.frozen
        )

    @staticmethod
    def _discord(endpoint: GatewayEndpoint) -> Iterator[Metric]:
        gateway = endpoint.gateway
        sessions = GaugeMetricFamily("fastsfu_discord_sessions", "Discord voice sessions", labels=["state"])
        states = Counter(session.state for session in gateway.sessions.values())
        for state in ("identifying", "active", "suspended"):
            sessions.add_metric([state], states[state])
        yield sessions
        yield _gauge(
            "fastsfu_discord_connections", "Open Discord gateway WebSockets", gateway.connection_count
        )
        closes = CounterMetricFamily(
            "fastsfu_discord_closes", "Discord gateway closes sent, by code", labels=["code"]
        )
        for code, count in sorted(endpoint.closes.items()):
            closes.add_metric([str(code)], count)
        yield closes

    @staticmethod
    def _edges(edges: Sequence[ConnectionGuard]) -> Iterator[Metric]:
        opened = GaugeMetricFamily(
            "fastsfu_edge_connections", "Open TCP connections, by listener", labels=["listener"]
        )
        closed = CounterMetricFamily(
            "fastsfu_edge_closed_connections",
            "TCP connections closed by the edge: address_cap (refused at accept), header_timeout, "
            "tls_handshake",
            labels=["listener", "reason"],
        )
        errors = CounterMetricFamily(
            "fastsfu_edge_accept_errors", "Failed accept() calls (e.g. EMFILE)", labels=["listener"]
        )
        for edge in edges:
            opened.add_metric([edge.name], edge.open_connections)
            for reason in ("address_cap", "header_timeout", "tls_handshake"):
                closed.add_metric([edge.name, reason], edge.closed[reason])
            errors.add_metric([edge.name], edge.accept_errors)
        yield from (opened, closed, errors)


def metrics_mount(
    rooms: VoiceRooms,
    rate_limit: RateLimiter | None = None,
    discord: GatewayEndpoint | None = None,
    edges: Sequence[ConnectionGuard] = (),
    gc_monitor: GcMonitor | None = None,
    extra: Sequence[Collector] = (),
) -> Callable[[web.Application], None]:
    """A `make_app` mount adding GET /metrics; its own registry, so servers in one process never clash.
    `extra`: more collectors (a worker's cluster metrics)."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(rooms, rate_limit, discord, edges, gc_monitor))
    for collector in extra:
        registry.register(collector)
    # The conventional process_* (CPU, memory, fds, start time) and python_* families, so the
    # usual dashboards and alerts work unchanged.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def mount(app: web.Application) -> None:
        app.router.add_get(METRICS_PATH, metrics)

    return mount
