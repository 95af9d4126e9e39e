"""Many hosts on one machine (docs/cluster.md#many-hosts): a 3-server NATS cluster with JetStream on
127.0.0.1 and `fastsfu serve` nodes on their own loopback addresses (127.0.0.2-4), each pointed at
every NATS server; bounded start and stop, everything killed at the end whatever happened. Also
what tests/test_workers.py shares: a `fastsfu serve` subprocess whose output a thread reads, and
the metrics of several processes scraped until they agree."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiortc.mediastreams import MediaStreamError
from harmony_client import HarmonyMember
from test_server_ops import SECRET, parse_metrics

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu.cluster.bus import Bus, KeyNotFoundError
from fastsfu.cluster.placement import RoomRecord
from fastsfu.cluster.registry import NODES_SUBJECT, ROOMS_BUCKET
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.supervisor import free_port, nats_server_binary

NATS_HOST = "127.0.0.1"
NODE_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
START_TIMEOUT = 30.0  # seconds for a server or a node to be up (a loaded 2-core machine)
GRPC = re.compile(r"fastsfu: gRPC (\S+):(\d+)")
METRICS = re.compile(r"fastsfu: metrics (\S+)")
MEDIA = re.compile(r"fastsfu: media udp (\S+)")


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nats-server on {host}:{port} did not start") from None
            time.sleep(0.05)


class NatsCluster:
    """`size` nats-servers routed to each other, each with JetStream and its own store directory
    (kept across a restart, as a real server's disk is), client, route and monitoring ports on
    127.0.0.1."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.ports = [free_port(NATS_HOST) for _ in range(size)]
        self.routes = [free_port(NATS_HOST) for _ in range(size)]
        self.monitor = [free_port(NATS_HOST) for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        return [f"nats://{NATS_HOST}:{p}" for p in self.ports]

    def _config(self, i: int) -> Path:
        store = self.root / f"nats{i}"
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://{NATS_HOST}:{p}" for j, p in enumerate(self.routes) if j != i)
        conf = store / "server.conf"
        conf.write_text(
            f"server_name: n{i}\n"
            f"listen: {NATS_HOST}:{self.ports[i]}\n"
            f"http: {NATS_HOST}:{self.monitor[i]}\n"
            f'jetstream {{ store_dir: "{store}" }}\n'
            f"cluster {{ name: fastsfu-test, listen: {NATS_HOST}:{self.routes[i]}, routes: [{routes}] }}\n"
        )
        return conf

    def start(self, *which: int) -> None:
        """Start the servers `which` (default all) and wait until each accepts connections."""
        for i in which or range(self.size):
            log = open(self.root / f"nats{i}.log", "ab")  # noqa: SIM115 - the process keeps it
            self.procs[i] = subprocess.Popen(
                [nats_server_binary(), "-c", str(self._config(i))], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
        for i in which or range(self.size):
            proc = self.procs[i]
            assert proc is not None
            _wait_tcp(NATS_HOST, self.ports[i], proc, START_TIMEOUT)

    async def wait_jetstream(self, timeout: float = START_TIMEOUT) -> None:
        """Until the cluster's JetStream answers (a meta leader is elected)."""
        bus = await Bus.connect(",".join(self.urls), "test-ready")
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    await bus.js.account_info()
                    return
                except Exception:
                    assert time.monotonic() < deadline, "JetStream did not become ready"
                    await asyncio.sleep(0.2)
        finally:
            await bus.close()

    def kill(self, i: int) -> None:
        """SIGKILL one server (a crash: no goodbye to the clients or the routes)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self, *which: int) -> None:
        for i in which or range(self.size):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def server_of(self, name: str) -> int | None:
        """Which server the client connection named `name` is on (the monitoring /connz)."""
        import urllib.request

        for i, port in enumerate(self.monitor):
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                continue
            with urllib.request.urlopen(f"http://{NATS_HOST}:{port}/connz?limit=1024", timeout=5) as r:
                conns = json.load(r).get("connections") or []
            if any(c.get("name") == name for c in conns):
                return i
        return None


class ServeSubprocess:
    """`fastsfu serve` with the signaling ports chosen by the kernel, no Discord port, no rate
    limit, the token secret of test_server_ops (no other FASTSFU_* variable), this shutdown grace
    and `args`; its output (stdout and stderr) is read by a thread."""

    def __init__(self, grace: float, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsfu.server.cli", "serve"]
            + ["--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "-1", "--rate-limit-burst", "0"]
            + ["--shutdown-grace", str(grace), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")},
                "FASTSFU_TOKEN_SECRET": SECRET,
            },
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def read_until(self, done: Callable[[], object], timeout: float, failure: str = "") -> None:
        """Read output lines, each through `take`, until `done()` holds (an AssertionError with
        `failure` and the output after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while not done():
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(failure + "".join(self.output)) from None
            self.output.append(line)
            self.take(line)

    def take(self, line: str) -> None:
        """Note what an output line announces (an address, a pid...)."""


class FastsfuNode(ServeSubprocess):
    """One `fastsfu serve --nats ... --nats ...` process on its own loopback address, and what its
    output says (read by a thread)."""

    def __init__(self, ip: str, nats_urls: Sequence[str], *extra: str) -> None:
        nats_flags = [arg for url in nats_urls for arg in ("--nats", url)]
        super().__init__(1, "--listen-ip", ip, *nats_flags, *extra)
        self.ip = ip
        self.grpc = 0
        self.metrics = ""
        self.media = ""
        self.node_id = ""

    def take(self, line: str) -> None:
        if m := GRPC.search(line):
            self.grpc = int(m[2])
        if m := MEDIA.search(line):
            self.media = m[1]
        if m := METRICS.search(line):
            self.metrics = m[1]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Read output lines until the metrics URL is announced (the last of the addresses)."""
        self.read_until(lambda: self.metrics, timeout, f"node {self.ip} did not start:\n")

    def rest(self) -> list[str]:
        """The output lines not read yet (after the process ended: all of them)."""
        while True:
            try:
                self.output.append(self.lines.get(timeout=0.5 if self.proc.poll() is not None else 0))
            except queue.Empty:
                return self.output

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class MultiNode:
    """A NATS cluster of 3 servers and 3 fastsfu nodes on 127.0.0.2-4."""

    def __init__(self, root: Path, node_args: Sequence[str] = ()) -> None:
        self.nats = NatsCluster(root)
        self.node_args = list(node_args)
        self.nodes: list[FastsfuNode] = []

    def start(self) -> None:
        self.nats.start()
        asyncio.run(self.nats.wait_jetstream())
        self.nodes = [FastsfuNode(ip, self.nats.urls, *self.node_args) for ip in NODE_IPS]
        for node in self.nodes:
            node.wait_ready()
        ids = asyncio.run(asyncio.wait_for(node_ids(self.nats.urls), START_TIMEOUT))
        for node in self.nodes:
            node.node_id = ids[node.media]
        asyncio.run(self.until_all_see(len(self.nodes)))

    async def until_all_see(self, count: int) -> None:
        """Until every node is connected and hears `count` nodes."""

        def check(seen: list[dict[str, float]]) -> bool:
            return all(m["fastsfu_cluster_nodes"] == count and m["fastsfu_cluster_connected"] for m in seen)

        async with aiohttp.ClientSession() as http:
            await wait_metrics(http, self.nodes, check, START_TIMEOUT)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nats.stop()
        for i in range(self.nats.size):
            self.nats.kill(i)


@contextlib.contextmanager
def multi_node(root: Path, node_args: Sequence[str] = ()) -> Iterator[MultiNode]:
    cluster = MultiNode(root, node_args)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        for node in cluster.nodes:  # what each node said (pytest shows it when a test fails)
            print(f"--- node {node.ip} ({node.node_id}):", *node.rest(), sep="\n", end="")


async def node_ids(urls: Sequence[str], count: int = 3, timeout: float = START_TIMEOUT) -> dict[str, str]:
    """Media address -> node id, from the nodes' heartbeats (once `count` nodes were heard)."""
    bus = await Bus.connect(",".join(urls), "test-ids")
    ids: dict[str, str] = {}
    try:
        await bus.subscribe(NODES_SUBJECT, "heartbeat", lambda d: ids.update({d["media"]: d["node"]}))
        deadline = time.monotonic() + timeout
        while len(ids) < count:
            assert time.monotonic() < deadline, f"heard only {ids}"
            await asyncio.sleep(0.1)
        return ids
    finally:
        await bus.close()


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text())


async def wait_scraped(
    http: aiohttp.ClientSession,
    urls: Sequence[str],
    check: Callable[[list[dict[str, float]]], bool],
    timeout: float,
) -> list[dict[str, float]]:
    """The metrics at `urls` once `check` holds of them (AssertionError with them after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [await scrape(http, url) for url in urls]
        if check(seen):
            return seen
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.2)


async def wait_metrics(
    http: aiohttp.ClientSession,
    nodes: Sequence[FastsfuNode],
    check: Callable[[list[dict[str, float]]], bool],
    timeout: float = 20.0,
) -> list[dict[str, float]]:
    """The nodes' metrics once `check` holds of them (AssertionError with them after `timeout`)."""
    return await wait_scraped(http, [node.metrics for node in nodes], check, timeout)


class NodeMember(HarmonyMember):
    """A Harmony client (aiortc media) whose gRPC stream goes to one node; every consumer's track
    is drained (frames counted) so that a long call holds no decoded audio."""

    def __init__(self, node: FastsfuNode, user: int, guild_id: int, channel_id: int) -> None:
        super().__init__(node.grpc, TokenAuth(SECRET).mint(user), guild_id, channel_id, host=node.ip)
        self.user = user
        self.frames: Counter[int] = Counter()
        self._drains: list[asyncio.Task[None]] = []

    async def consume(self, data: Any) -> None:
        await super().consume(data)
        self._drains.append(asyncio.create_task(self._drain(data.user_id)))

    async def _drain(self, user: int) -> None:
        track = self.receivers[user].track
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self.frames[user] += 1

    async def packets(self) -> dict[int, tuple[int, int]]:
        """Per member heard: (RTP packets received, packets lost) as aiortc's receiver counts them."""
        out = {}
        for user, receiver in self.receivers.items():
            for stats in (await receiver.getStats()).values():
                if stats.type == "inbound-rtp":
                    out[user] = (stats.packetsReceived, stats.packetsLost)
        return out

    def events(self, kind: str) -> list[int]:
        """The user ids of the UserJoined or UserLeft messages received so far, in order."""
        if kind == "user_joined":
            return [r.user_joined.data.user_id for r in self.received if r.WhichOneof("message") == kind]
        return [r.user_left.user_id for r in self.received if r.WhichOneof("message") == kind]

    async def until_hears(self, users: Sequence[int], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not set(users) <= set(self.receivers) or any(self.frames[u] < 5 for u in users):
            assert time.monotonic() < deadline, (self.user, sorted(self.receivers), dict(self.frames))
            await asyncio.sleep(0.05)

    async def drop(self) -> None:
        """Gone without a goodbye (its edge died, or it ends here): stop everything, bounded."""
        self.call.cancel()
        for task in [*self._drains, *([self.reader] if self.reader else [])]:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sender.stop(), 5)
        for receiver in self.receivers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(receiver.stop(), 5)
        for leg in (self.producer, self.consumer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(leg.stop(), 5)
        await self.channel.close()

    async def leave_cleanly(self) -> None:
        """The client ends its stream (a leave), then its media."""
        await self.call.done_writing()
        await self.drop()


def error_identifier(exc: grpc.aio.AioRpcError) -> str:
    """The Harmony error identifier a gRPC stream ended with (its hrpc-error-bin trailer)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "hrpc-error-bin":
            return str(hrpc_pb2.Error.FromString(value).identifier)
    return ""


async def place(urls: Sequence[str], homes: Mapping[str, str | RoomRecord]) -> None:
    """Record room homes (a node id, or a record with spill nodes) in the rooms bucket, as a
    placement (or a spill) would: to choose them in a test."""
    bus = await Bus.connect(",".join(urls), "test-place")
    try:
        kv = await bus.bucket(ROOMS_BUCKET)
        for room, node in homes.items():
            await kv.put(room, node.encode())
    finally:
        await bus.close()


async def records(urls: Sequence[str], rooms: Sequence[str]) -> dict[str, RoomRecord | None]:
    """The rooms' records in the rooms bucket (None: the room has none)."""
    bus = await Bus.connect(",".join(urls), "test-records")
    out: dict[str, RoomRecord | None] = {}
    try:
        kv = await bus.bucket(ROOMS_BUCKET)
        for room in rooms:
            try:
                out[room] = RoomRecord.decode((await bus.call(kv.get(room))).value)
            except KeyNotFoundError:
                out[room] = None
        return out
    finally:
        await bus.close()
