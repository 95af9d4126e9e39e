"""`fastsfu serve --workers 2` through the real CLI: an embedded nats-server, two worker processes
sharing the signaling ports (the kernel spreads connections over both), each worker's own /metrics,
a SIGKILLed worker restarted, and SIGTERM draining (health NOT_SERVING) then everything exiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_ops import SECRET, parse_metrics

from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.worker import DRAIN_WAIT

pytestmark = [pytest.mark.loopback, pytest.mark.slow]
Req = voice_pb2.StreamMessageRequest
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE = 2.0  # --shutdown-grace given to the supervisor (and so to each worker)
STARTED = re.compile(r"worker (\d+) started: pid (\d+)")
METRICS = re.compile(r"fastsfu: worker (\d+) metrics (\S+)")
PORTS = re.compile(r"fastsfu: 2 workers on hRPC (\d+), gRPC (\d+)")
NATS = re.compile(r"fastsfu: nats (nats://\S+) \(embedded\)")


class Cluster:
    """A `fastsfu serve --workers 2` process and what its output says (read by a thread)."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsfu.server.cli", "serve", "--workers", "2"]
            + ["--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "-1", "--rate-limit-burst", "0"]
            + ["--shutdown-grace", str(GRACE), *extra],
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
        self.pids: dict[int, int] = {}
        self.metrics: dict[int, str] = {}
        self.hrpc = self.grpc = 0
        self.nats = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, done: object, timeout: float = 30.0) -> None:
        """Read output lines until `done()` holds (an AssertionError with the output after timeout)."""
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("".join(self.output)) from None
            self.output.append(line)
            if m := STARTED.search(line):
                self.pids[int(m[1])] = int(m[2])
            if m := METRICS.search(line):
                self.metrics[int(m[1])] = m[2]
            if m := PORTS.search(line):
                self.hrpc, self.grpc = int(m[1]), int(m[2])
            if m := NATS.search(line):
                self.nats = m[1]

    def ready(self) -> None:
        self.wait_for(lambda: len(self.metrics) == 2 and self.hrpc)

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


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text())


@pytest.mark.timeout(90)
def test_two_workers_share_the_signaling_port_and_each_has_its_own_metrics(cluster: Cluster) -> None:
    """40 hRPC sessions (past Initialize) to the one shared port: both workers get some (the kernel's
    SO_REUSEPORT spread), and the workers' own /metrics add up to all 40."""
    auth = TokenAuth(SECRET)
    url = f"ws://127.0.0.1:{cluster.hrpc}/protocol.voice.v1.VoiceService/StreamMessage"

    async def run() -> list[dict[str, float]]:
        async with aiohttp.ClientSession() as http:
            sockets = []
            for user in range(1, 41):
                ws = await http.ws_connect(url, protocols=("hrpc1", auth.mint(user)))
                await ws.send_bytes(
                    Req(initialize=Req.Initialize(guild_id=5, channel_id=user)).SerializeToString()
                )
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0, msg
                sockets.append(ws)
            seen = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
            for ws in sockets:
                await ws.close()
            return seen

    seen = asyncio.run(asyncio.wait_for(run(), 60))
    sessions = [m["fastsfu_voice_sessions"] for m in seen]
    assert sum(sessions) == 40 and min(sessions) >= 1, sessions


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
    """SIGTERM to the supervisor: both workers report NOT_SERVING during the drain, then the
    supervisor, the workers and the embedded nats-server are all gone within the grace."""
    host, port = cluster.nats.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        pass  # the embedded NATS is up
    cluster.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()

    async def health() -> list[int]:
        states = []
        for _ in range(4):  # new connections: the kernel may pick either worker
            async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.grpc}") as channel:
                reply = await asyncio.wait_for(
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")), 5
                )
                states.append(reply.status)
        return states

    assert asyncio.run(health()) == [NOT_SERVING] * 4
    assert time.monotonic() - t0 < DRAIN_WAIT  # all read within the drain
    assert cluster.proc.wait(DRAIN_WAIT + GRACE + 10) == 0
    assert time.monotonic() - t0 < DRAIN_WAIT + GRACE + 5
    assert not any(alive(pid) for pid in cluster.pids.values())
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
