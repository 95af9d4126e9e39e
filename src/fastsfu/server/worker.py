"""One worker of `fastsfu serve --workers N` (docs/cluster.md): its own /metrics listener (the shared
hRPC port reaches any worker), its node in the cluster registry, and the drain before shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.registry import Collector

from fastsfu.discord.ws_server import GatewayEndpoint
from fastsfu.engine import Engine
from fastsfu.harmony.session import VoiceRooms
from fastsfu.server.config import ServerConfig
from fastsfu.server.logs import announce
from fastsfu.server.metrics import METRICS_PATH

if TYPE_CHECKING:
    from fastsfu.cluster.node import Node

log = logging.getLogger(__name__)

WORKER_ENV = "FASTSFU_WORKER_INDEX"  # set by the supervisor in each worker's environment
CONNECT_WAIT = 5.0  # seconds a starting worker waits for NATS before announcing itself anyway
DRAIN_WAIT = ServerConfig.drain_grace  # the default seconds between draining and closing sessions


class WorkerRole:
    """What a worker process does beyond a single `fastsfu serve`: a worker of a supervisor
    (`supervised`: shared signaling ports, its own /metrics), or a lone node of a cluster."""

    def __init__(self, index: int, config: ServerConfig, supervised: bool = True) -> None:
        self.index = index
        self.config = config
        self.supervised = supervised
        self.metrics_port = 0
        self.node: Node | None = None
        self._runner: web.AppRunner | None = None
        self._node_task: asyncio.Task[None] | None = None

    def bind(
        self, rooms: VoiceRooms, engine: Engine, discord: GatewayEndpoint | None = None
    ) -> Sequence[Collector]:
        """This worker's node in the cluster registry (when a NATS URL is set), routing Harmony
        streams and Discord WebSockets to their rooms' homes; its metrics."""
        if self.config.nats is None:
            return ()
        from fastsfu.cluster.admin_relay import AdminRelayCollector
        from fastsfu.cluster.node import ClusterCollector, Node  # needs the cluster extra

        host, port = engine.media_socket().local_address[:2]
        node_id = f"{socket.gethostname()}-w{self.index}-{os.getpid()}"
        media = f"{self.config.announced_ip or host}:{port}"
        cap = self.config.cluster_room_members_per_node
        self.node = Node(node_id, self.config.nats, rooms, media, discord, cap, host)
        return (ClusterCollector(self.node), AdminRelayCollector(self.node.admin))

    async def start(self, metrics: Callable[[web.Application], None] | None) -> None:
        """Join the cluster in the background; serve this worker's own /metrics (when metrics are
        on) and announce where."""
        if self.node is not None:
            self._node_task = asyncio.create_task(self.node.run())
            # Announced ready once in the cluster (bounded: the worker serves without NATS too).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.node.connected.wait(), CONNECT_WAIT)
        if metrics is None or not self.supervised:  # a lone node's /metrics is on its hRPC port
            return
        app = web.Application()
        metrics(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_ip, self.config.worker_metrics_port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through its server's sockets
        assert isinstance(server, asyncio.Server)
        self.metrics_port = int(server.sockets[0].getsockname()[1])
        url = f"http://{self.config.listen_ip}:{self.metrics_port}{METRICS_PATH}"
        announce(
            log,
            self.config.log.format,
            f"worker {self.index} metrics {url}",
            worker=self.index,
            worker_metrics=url,
        )

    async def drain(self) -> None:
        """Before sessions close: draining in the registry (new sessions go to other nodes, the
        ones here go on), then `drain_grace` seconds for load balancers and edges to see it and
        NOT_SERVING, and for the rooms homed here to be placed again on open nodes."""
        log.info("worker %d draining for %g s", self.index, self.config.drain_grace)
        if self.node is not None:
            await self.node.drain()
        await asyncio.sleep(self.config.drain_grace)

    async def close(self) -> None:
        if self._node_task is not None:
            self._node_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._node_task
        if self.node is not None:
            await self.node.close()
        if self._runner is not None:
            await self._runner.cleanup()


def worker_role(config: ServerConfig, env: Mapping[str, str]) -> WorkerRole | None:
    """This process's worker role when the supervisor started it, a node's when it was given NATS
    servers (a host of a cluster, docs/cluster.md#many-hosts), else None (a single server)."""
    raw = env.get(WORKER_ENV)
    if raw is not None and raw.isdigit():
        return WorkerRole(int(raw), config)
    return WorkerRole(0, config, supervised=False) if config.nats is not None else None
