"""Prometheus metrics (`GET /metrics`): a collector that reads the live state at scrape time (the
engine's datapath totals, the rooms, the front-ends' counters), so nothing is done per packet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fastsfu.discord.ws_server import GatewayEndpoint
from fastsfu.harmony.rate_limit import RateLimiter
from fastsfu.harmony.session import VoiceRooms

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
    ) -> None:
        self.rooms = rooms
        self.rate_limit = rate_limit
        self.discord = discord

    def collect(self) -> Iterator[Metric]:
        rooms, engine = self.rooms, self.rooms.engine
        yield _gauge("fastsfu_rooms", "Voice channels with a router", len(rooms.rooms))
        members = sum(len(room.members) for room in rooms.rooms.values())
        yield _gauge("fastsfu_room_members", "Users who completed the join, over all rooms", members)
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
                "fastsfu_rate_limited_connections",
                "Streams refused by the rate limit",
                self.rate_limit.rejected,
            )
            yield _gauge(
                "fastsfu_rate_limit_addresses", "Addresses the rate limit tracks", len(self.rate_limit)
            )
        if self.discord is not None:
            yield from self._discord(self.discord)
        if engine.closed:
            return
        s = engine.stats()
        yield _gauge("fastsfu_routers", "Routers", s["routers"])
        yield _gauge("fastsfu_transports", "Transports (WebRTC and plain)", s["transports"])
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
        drops = CounterMetricFamily("fastsfu_drops", "Datagrams dropped, by reason", labels=["reason"])
        for reason, count in s["drops"].items():
            drops.add_metric([reason], count)
        yield drops
        failures = CounterMetricFamily(
            "fastsfu_handshake_failures", "WebRTC transport failures, by kind", labels=["kind"]
        )
        failures.add_metric(["dtls"], s["dtls_failures"])
        failures.add_metric(["ice_consent"], s["ice_consent_expiries"])
        yield failures

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


def metrics_mount(
    rooms: VoiceRooms, rate_limit: RateLimiter | None = None, discord: GatewayEndpoint | None = None
) -> Callable[[web.Application], None]:
    """A `make_app` mount adding GET /metrics; its own registry, so servers in one process never clash."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(rooms, rate_limit, discord))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def mount(app: web.Application) -> None:
        app.router.add_get(METRICS_PATH, metrics)

    return mount
