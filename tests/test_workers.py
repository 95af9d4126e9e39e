"""`fastsfu serve --workers 2` through the real CLI: an embedded nats-server, two worker processes
sharing the signaling ports (the kernel spreads connections over both), each worker's own /metrics,
a SIGKILLed worker restarted, and SIGTERM draining (health NOT_SERVING) then everything exiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cluster_helpers import ServeSubprocess, scrape, wait_scraped
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harmony_client import HarmonyMember
from nats.js.errors import KeyNotFoundError
from test_server_ops import SECRET

from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.cluster.bus import Bus
from fastsfu.cluster.registry import NODE_TTL, NODES_SUBJECT, ROOMS_BUCKET
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.config import ConfigError, load_config
from fastsfu.server.worker import DRAIN_WAIT

pytestmark = [pytest.mark.loopback, pytest.mark.slow]
Req = voice_pb2.StreamMessageRequest
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE = 2.0  # --shutdown-grace given to the supervisor (and so to each worker)
STARTED = re.compile(r"worker (\d+) started: pid (\d+)")
METRICS = re.compile(r"fastsfu: worker (\d+) metrics (\S+)")
PORTS = re.compile(r"fastsfu: \d+ workers on hRPC (\d+), gRPC (\d+), Discord (-?\d+)")
NATS = re.compile(r"fastsfu: nats (nats://\S+) \(embedded\)")


class Cluster(ServeSubprocess):
    """A `fastsfu serve --workers N` process (2 unless told) and what its output says (read by a
    thread)."""

    def __init__(self, *extra: str, workers: int = 2) -> None:
        self.workers = workers
        self.pids: dict[int, int] = {}
        self.metrics: dict[int, str] = {}
        self.hrpc = self.grpc = self.discord = 0
        self.nats = ""
        super().__init__(GRACE, "--workers", str(workers), *extra)

    def take(self, line: str) -> None:
        if m := STARTED.search(line):
            self.pids[int(m[1])] = int(m[2])
        if m := METRICS.search(line):
            self.metrics[int(m[1])] = m[2]
        if m := PORTS.search(line):
            self.hrpc, self.grpc, self.discord = int(m[1]), int(m[2]), int(m[3])
        if m := NATS.search(line):
            self.nats = m[1]

    def wait_for(self, done: Callable[[], object], timeout: float = 30.0) -> None:
        """Read output lines until `done()` holds (an AssertionError with the output after timeout)."""
        self.read_until(done, timeout)

    def ready(self) -> None:
        self.wait_for(lambda: len(self.metrics) == self.workers and self.hrpc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            for pid in self.pids.values():
                kill(pid)
        self.proc.wait(10)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the supervisor) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.ready()
        yield c
    finally:
        c.stop()


async def wait_metrics(
    http: aiohttp.ClientSession, cluster: Cluster, check: Callable[[list[dict[str, float]]], bool]
) -> list[dict[str, float]]:
    """Both workers' metrics once `check` holds of them (an AssertionError with them after 15 s:
    heartbeats are every second)."""
    return await wait_scraped(http, [cluster.metrics[i] for i in (0, 1)], check, 15)


def total(seen: list[dict[str, float]], name: str) -> float:
    return sum(m[name] for m in seen)


@pytest.mark.timeout(90)
def test_two_workers_share_the_signaling_port_and_place_every_room_once(cluster: Cluster) -> None:
    """40 hRPC sessions (past Initialize, two per room) to the one shared port: both workers get
    streams (the kernel's SO_REUSEPORT spread); each of the 20 rooms is placed exactly once in the
    registry, spread over both workers, and every session runs at its room's home (bridged there
    when its stream landed on the other worker). When the sessions end, the homes are released."""
    auth = TokenAuth(SECRET)
    url = f"ws://127.0.0.1:{cluster.hrpc}/protocol.voice.v1.VoiceService/StreamMessage"
    room_keys = [f"5.{channel}" for channel in range(1, 21)]

    def placed(seen: list[dict[str, float]]) -> bool:
        return (
            all(
                m["fastsfu_cluster_rooms_homed"] + m["fastsfu_cluster_rooms_elsewhere"] == m["fastsfu_rooms"]
                for m in seen
            )
            and total(seen, "fastsfu_cluster_rooms_placed_total") == 20
        )

    async def run() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        async with aiohttp.ClientSession() as http:
            await wait_metrics(http, cluster, lambda seen: total(seen, "fastsfu_cluster_nodes") == 4)
            sockets = []
            for user in range(1, 41):
                ws = await http.ws_connect(url, protocols=("hrpc1", auth.mint(user)))
                init = Req.Initialize(guild_id=5, channel_id=(user + 1) // 2)
                await ws.send_bytes(Req(initialize=init).SerializeToString())
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0, msg
                sockets.append(ws)
            during = await wait_metrics(http, cluster, placed)
            for ws in sockets:
                await ws.close()
            after = await wait_metrics(
                http,
                cluster,
                lambda seen: (
                    total(seen, "fastsfu_rooms") == 0
                    and total(seen, "fastsfu_cluster_rooms_homed")
                    + total(seen, "fastsfu_cluster_rooms_elsewhere")
                    == 0
                ),
            )
            return during, after

    during, after = asyncio.run(asyncio.wait_for(run(), 60))
    # The kernel spread the streams over both workers (the edges) ...
    edges = [m['fastsfu_voice_streams_total{frontend="hrpc"}'] for m in during]
    assert sum(edges) == 40 and min(edges) >= 1, edges
    # ... and each session runs at its room's home: some bridged there from the other worker.
    assert total(during, "fastsfu_voice_sessions") == 40
    bridged = total(during, 'fastsfu_cluster_sessions_total{protocol="harmony",where="bridged"}')
    here = total(during, 'fastsfu_cluster_sessions_total{protocol="harmony",where="here"}')
    assert bridged + here == 40 and bridged >= 1, (bridged, here)
    assert total(during, 'fastsfu_cluster_sessions_total{protocol="harmony",where="hosted"}') == bridged
    assert [m["fastsfu_cluster_nodes"] for m in during] == [2, 2]
    assert [m["fastsfu_cluster_connected"] for m in during] == [1, 1]
    assert placed(during), during
    # Every room is served at its home only, and the homes are spread over both workers.
    assert total(during, "fastsfu_rooms") == 20 and total(during, "fastsfu_cluster_rooms_elsewhere") == 0
    assert min(m["fastsfu_rooms"] for m in during) >= 1, [m["fastsfu_rooms"] for m in during]
    assert total(during, "fastsfu_cluster_bus_failures_total") == 0
    assert total(during, "fastsfu_cluster_bus_requests_total") > 0
    assert total(after, "fastsfu_rooms") == 0

    async def homes_left() -> list[str]:
        bus = await Bus.connect(cluster.nats, "test")
        try:
            kv = await bus.bucket(ROOMS_BUCKET)
            left = []
            for key in room_keys:
                with contextlib.suppress(KeyNotFoundError):
                    left.append((await kv.get(key)).value)
            return left
        finally:
            await bus.close()

    assert asyncio.run(asyncio.wait_for(homes_left(), 20)) == []  # released by their homes


@pytest.mark.timeout(90)
def test_a_sigkilled_worker_is_restarted(cluster: Cluster) -> None:
    old = cluster.pids[0]
    os.kill(old, signal.SIGKILL)
    cluster.metrics.pop(0)
    cluster.wait_for(lambda: cluster.pids[0] != old and 0 in cluster.metrics)
    assert cluster.proc.poll() is None and alive(cluster.pids[1])

    async def run() -> dict[str, float]:
        async with aiohttp.ClientSession() as http:
            return await scrape(http, cluster.metrics[0])

    assert asyncio.run(run())["fastsfu_voice_sessions"] == 0  # the new worker 0 answers


@pytest.mark.timeout(90)
def test_sigterm_drains_then_every_process_exits(cluster: Cluster) -> None:
    """SIGTERM to the supervisor: both workers say draining in the registry and report NOT_SERVING
    during the drain, then the supervisor, the workers and the embedded nats-server are all gone
    within the grace."""
    host, port = cluster.nats.removeprefix("nats://").rsplit(":", 1)

    async def run() -> tuple[list[int], set[str], float]:
        bus = await Bus.connect(cluster.nats, "test")
        draining: set[str] = set()
        await bus.subscribe(
            NODES_SUBJECT, "heartbeat", lambda d: draining.add(d["node"]) if d.get("draining") else None
        )
        # Health watches opened before SIGTERM, each on a connection of its own (either worker):
        # every one is told NOT_SERVING, however long the checks take on a loaded machine.
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{cluster.grpc}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(4)
        ]
        watches = [
            health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(service="")) for c in channels
        ]
        for watch in watches:
            assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
        cluster.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        states = [(await asyncio.wait_for(watch.read(), 10)).status for watch in watches]
        for channel in channels:
            await channel.close()
        deadline = time.monotonic() + DRAIN_WAIT
        while len(draining) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await bus.close()
        return states, draining, t0

    states, draining, t0 = asyncio.run(asyncio.wait_for(run(), 30))
    assert states == [NOT_SERVING] * 4
    assert len(draining) == 2, draining  # both nodes, before their sessions end
    assert cluster.proc.wait(DRAIN_WAIT + GRACE + 10) == 0
    assert time.monotonic() - t0 < DRAIN_WAIT + GRACE + 5
    assert not any(alive(pid) for pid in cluster.pids.values())
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_workers_knob_layers_and_bounds(tmp_path: Path) -> None:
    """`workers`: embedded 1 < TOML < env < flag; auto is one per core; anything else is refused."""
    assert (load_config(None, {}, {}).worker_count, load_config(None, {}, {}).nats) == (1, None)
    toml = tmp_path / "fastsfu.toml"
    toml.write_text('workers = "3"\nnats = "nats://10.0.0.1:4222"\nworker_metrics_port = 9100\n')
    config = load_config(str(toml), {}, {})
    assert (config.worker_count, config.nats, config.worker_metrics_port) == (3, "nats://10.0.0.1:4222", 9100)
    assert load_config(str(toml), {"FASTSFU_WORKERS": "2"}, {}).worker_count == 2
    assert load_config(str(toml), {"FASTSFU_WORKERS": "2"}, {"workers": "AUTO"}).worker_count == (
        os.cpu_count() or 1
    )
    for bad in ("0", "-1", "two", "1025"):
        with pytest.raises(ConfigError, match="workers: expected a number 1..1024 or auto"):
            load_config(None, {}, {"workers": bad})
    out = subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "serve", "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")},
    )
    assert out.returncode == 2 and "workers: expected" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(90)
def test_grpc_streams_are_spread_over_both_workers(cluster: Cluster) -> None:
    """20 gRPC voice streams, each on its own channel (connection) to the one shared gRPC port:
    both workers serve some, and their counters add up to 20."""
    auth = TokenAuth(SECRET)

    async def run() -> list[dict[str, float]]:
        channels, calls = [], []
        try:
            for user in range(1, 21):
                # Its own subchannel: gRPC otherwise shares one connection between equal channels.
                channel = grpc.aio.insecure_channel(
                    f"127.0.0.1:{cluster.grpc}", options=[("grpc.use_local_subchannel_pool", 1)]
                )
                channels.append(channel)
                call = voice_pb2_grpc.VoiceServiceStub(channel).StreamMessage(
                    metadata=(("authorization", auth.mint(user)),)
                )
                await call.write(Req(initialize=Req.Initialize(guild_id=6, channel_id=user)))
                assert (await asyncio.wait_for(call.read(), 10)).WhichOneof("message") == "initialized"
                calls.append(call)
            async with aiohttp.ClientSession() as http:
                return [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()

    seen = asyncio.run(asyncio.wait_for(run(), 60))
    grpc_streams = [m['fastsfu_voice_streams_total{frontend="grpc"}'] for m in seen]
    assert sum(grpc_streams) == 20 and min(grpc_streams) >= 1, grpc_streams


class OwnConnectionMember(HarmonyMember):
    """A Harmony client on a gRPC connection of its own (gRPC otherwise shares one between equal
    channels), so the kernel picks its worker independently of the others."""

    def __init__(self, port: int, token: str, guild_id: int, channel_id: int) -> None:
        super().__init__(port, token, guild_id, channel_id)
        self.user = 0
        self.call.cancel()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.call = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", token),)
        )

    async def edge(self, cluster: Cluster, http: aiohttp.ClientSession, probe_token: str) -> int:
        """The worker this client's connection reached: a short probe stream on it, in a room of its
        own, counted by exactly one worker's gRPC stream counter."""
        key = 'fastsfu_voice_streams_total{frontend="grpc"}'
        before = [(await scrape(http, cluster.metrics[i]))[key] for i in (0, 1)]
        probe = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", probe_token),)
        )
        await probe.write(Req(initialize=Req.Initialize(guild_id=99, channel_id=99)))
        assert (await asyncio.wait_for(probe.read(), 10)).WhichOneof("message") == "initialized"
        probe.cancel()
        after = [(await scrape(http, cluster.metrics[i]))[key] for i in (0, 1)]
        (edge,) = [i for i in (0, 1) if after[i] > before[i]]
        return edge


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("aiortc_loopback")
@pytest.mark.parametrize("ending", ["leave", "edge_killed"])
def test_members_on_different_workers_hear_each_other_through_the_bridge(
    cluster: Cluster, ending: str
) -> None:
    """Two aiortc clients whose gRPC connections reached different workers join one room: the
    session of the one not on the room's home is bridged there, so both hear each other (media
    straight to the home's port), UserJoined and UserLeft arrive exactly once: when the bridged
    member leaves, or when its edge worker is SIGKILLed (within the heartbeat TTL)."""
    auth = TokenAuth(SECRET)

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await wait_metrics(http, cluster, lambda seen: total(seen, "fastsfu_cluster_nodes") == 4)
            members: dict[int, OwnConnectionMember] = {}  # by edge worker
            for attempt in range(12):  # each lands on either worker: 12 tries miss one with p = 2^-11
                user = 1 + len(members)
                member = OwnConnectionMember(cluster.grpc, auth.mint(user), 7, 8)
                member.user = user
                edge = await member.edge(cluster, http, auth.mint(100 + attempt))
                if edge in members:
                    member.call.cancel()
                    await member.channel.close()
                    continue
                members[edge] = member
                if len(members) == 2:
                    break
            assert len(members) == 2, "every connection reached the same worker"
            a, b = members[0], members[1]
            first, second = a, b
            base = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]  # after the probes
            await first.join()
            await second.join()
            for _ in range(100):
                if len(first.receivers) == 1 and len(second.receivers) == 1:
                    break
                await asyncio.sleep(0.05)
            ids = {first: first.user, second: second.user}
            assert list(first.receivers) == [ids[second]] and list(second.receivers) == [ids[first]]
            assert await first.heard(ids[second]) == 5 and await second.heard(ids[first]) == 5
            seen = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
            for where in ("bridged", "hosted"):  # exactly one of the two sessions went over the bus
                key = f'fastsfu_cluster_sessions_total{{protocol="harmony",where="{where}"}}'
                assert total(seen, key) - total(base, key) == 1, where
            assert (
                total(seen, "fastsfu_room_members") == 2 and min(m["fastsfu_room_members"] for m in seen) == 0
            )
            home = 0 if seen[0]["fastsfu_room_members"] == 2 else 1
            stayer, goner = first, second
            if ending == "edge_killed":  # the bridged member's edge dies; its media still reaches the home
                stayer, goner = members[home], members[1 - home]
                os.kill(cluster.pids[1 - home], signal.SIGKILL)
            else:
                await goner.leave()
            deadline = time.monotonic() + NODE_TTL + 5
            while time.monotonic() < deadline:
                if any(r.WhichOneof("message") == "user_left" for r in stayer.received):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a duplicate would come within this
            joined = [
                r.user_joined.data.user_id for r in first.received if r.WhichOneof("message") == "user_joined"
            ]
            left = [r.user_left.user_id for r in stayer.received if r.WhichOneof("message") == "user_left"]
            assert joined == [second.user] and left == [goner.user], (joined, left)
            # The later joiner had the first in JoinedChannel, never as UserJoined; only the stayer
            # hears a UserLeft.
            assert not [r for r in second.received if r.WhichOneof("message") == "user_joined"]
            assert not [r for r in goner.received if r.WhichOneof("message") == "user_left"]
            await stayer.leave()
            if ending == "edge_killed":
                goner.call.cancel()
                await goner.sender.stop()
                for leg in (goner.producer, goner.consumer):
                    await leg.stop()
                if goner.reader:
                    goner.reader.cancel()
            for m in (first, second):
                await m.channel.close()

    asyncio.run(asyncio.wait_for(run(), 100))
