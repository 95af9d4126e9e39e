"""The TCP edge of `fastsfu serve`'s aiohttp ports (hRPC + /metrics, Discord gateway), through the real
CLI in a subprocess: silent and dribbling connections are closed after the header timeout while real
clients keep working; the per-address connection cap; a flood past the open-file limit (bounded log,
/metrics answers afterwards); the soft open-file limit raised at start; and SIGTERM bounded by the
shutdown grace even when clients never answer the close frame."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from discord_clients import make_test_certificate
from helpers import OPUS_CAPS
from test_server_ops import parse_metrics

from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
SECRET = "edge-test-secret-0123456789abcdefghijklmnop"
AUTH = TokenAuth(SECRET)


class Server:
    """`fastsfu serve` on free loopback ports; settings through FASTSFU_* variables, stderr to a file."""

    def __init__(self, proc: subprocess.Popen[bytes], lines: dict[str, str], stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.base = lines["metrics"].removesuffix("/metrics")
        self.hrpc_url = lines["hRPC"]
        self.grpc = lines["gRPC"]
        self.hrpc_port = int(self.base.rsplit(":", 1)[1])
        self.discord_url = lines["Discord"].split()[-1]
        self.discord_port = int(self.discord_url.split(":")[2].split("/")[0])


def start_lines(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, str]:
    """The startup lines on stdout (`fastsfu: <kind> <value>`), read without blocking past `timeout`."""
    assert proc.stdout is not None
    fd, buffer, lines = proc.stdout.fileno(), b"", {}
    deadline = time.monotonic() + timeout
    while "Discord" not in lines:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(fd, 65536) if ready else b""
        assert chunk, f"fastsfu serve did not start (exit {proc.poll()})"
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            kind, _, value = line.decode().strip().removeprefix("fastsfu: ").partition(" ")
            lines[kind] = value
    return lines


@contextlib.contextmanager
def serve(tmp_path: Path, env: dict[str, str], nofile: tuple[int, int] | None = None) -> Iterator[Server]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    stderr = tmp_path / "stderr.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")}
    settings = {"FASTSFU_TOKEN_SECRET": SECRET, "FASTSFU_HRPC_PORT": "0", "FASTSFU_GRPC_PORT": "0"}
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastsfu.server.cli", "serve"],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**base, **settings, "FASTSFU_DISCORD_PORT": "0", **env},
            preexec_fn=limit,
        )
    try:
        yield Server(proc, start_lines(proc), stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


async def metrics(http: aiohttp.ClientSession, server: Server, timeout: float = 2.0) -> dict[str, float]:
    async with asyncio.timeout(timeout), http.get(server.base + "/metrics") as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text())


async def open_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5)


async def closed_at(reader: asyncio.StreamReader, limit: float) -> float | None:
    """The monotonic time the server closed the connection (EOF or reset), None if open at `limit` s."""
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic()


async def dribble(writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    """A slowloris: a request line, then one header byte every 0.2 s, never the blank line."""
    with contextlib.suppress(ConnectionError):
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Slow: " + b"a" * 200:
            if stop.is_set() or writer.is_closing():
                return
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)


async def hrpc_stream(
    http: aiohttp.ClientSession, server: Server, user: int
) -> aiohttp.ClientWebSocketResponse:
    """An hRPC voice stream through Initialize, as a Harmony client opens it."""
    ws = await http.ws_connect(server.hrpc_url, protocols=("hrpc1", AUTH.mint(user)), autoclose=False)
    await ws.send_bytes(Req(initialize=Req.Initialize(guild_id=3, channel_id=4)).SerializeToString())
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0
    assert Resp.FromString(msg.data[1:]).WhichOneof("message") == "initialized"
    return ws


async def discord_session(
    http: aiohttp.ClientSession, server: Server, user: int
) -> aiohttp.ClientWebSocketResponse:
    """A Discord voice WebSocket through HELLO, IDENTIFY and READY."""
    ws = await http.ws_connect(server.discord_url, autoclose=False)
    hello = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
    assert hello["op"] == 8
    identify = {"server_id": "77", "user_id": str(user), "session_id": f"s{user}", "token": AUTH.mint(user)}
    await ws.send_str(json.dumps({"op": 0, "d": identify}))
    ready = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
    assert ready["op"] == 2, ready
    return ws


@pytest.mark.timeout(90)
def test_idle_and_slow_connections_close_after_the_header_timeout(tmp_path: Path) -> None:
    """300 connections from six addresses, half silent, half dribbling header bytes, on both ports:
    each is closed between the header timeout and a margin after it; an hRPC stream, a Discord
    session and /metrics keep working all along."""
    timeout, margin = 2.0, 2.0

    async def main(server: Server) -> None:
        async with aiohttp.ClientSession() as http:
            stream = await hrpc_stream(http, server, 1)
            gateway = await discord_session(http, server, 2)
            stop = asyncio.Event()
            idle = []
            for i in range(300):
                port = server.hrpc_port if i % 3 else server.discord_port
                reader, writer = await open_from(f"127.0.0.{2 + i % 6}", port)
                idle.append((port, reader, writer, time.monotonic()))
            dribblers = [asyncio.ensure_future(dribble(w, stop)) for _, _, w, _ in idle[::2]]

            async def scrape_all_along() -> int:
                count = 0
                while not stop.is_set():
                    await metrics(http, server)  # answers at once, every time
                    count += 1
                    await asyncio.sleep(0.2)
                return count

            scraper = asyncio.ensure_future(scrape_all_along())
            ends = await asyncio.gather(*(closed_at(r, timeout + margin + 2) for _, r, _, _ in idle))
            stop.set()
            assert await scraper >= 5
            await asyncio.gather(*dribblers)
            still_open = sum(end is None for end in ends)
            assert still_open == 0, f"{still_open} of 300 connections were not closed"
            # Measured from connect: not before the timeout, and not long after it.
            lifetimes = [end - t0 for end, (_, _, _, t0) in zip(ends, idle, strict=True) if end is not None]
            print(f"300 idle connections closed after {min(lifetimes):.2f} to {max(lifetimes):.2f} s")
            assert timeout - 0.2 <= min(lifetimes) and max(lifetimes) <= timeout + margin
            for _, _, w, _ in idle:
                w.close()
            # The real clients were not disturbed: the hRPC stream goes on to Prepare, the Discord
            # session answers a heartbeat.
            prepare = Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(OPUS_CAPS))
            await stream.send_bytes(Req(prepare_for_join_channel=prepare).SerializeToString())
            msg = await asyncio.wait_for(stream.receive(), 10)
            assert Resp.FromString(msg.data[1:]).WhichOneof("message") == "prepared_for_join_channel"
            await gateway.send_str(json.dumps({"op": 3, "d": {"t": 1, "seq_ack": 0}}))
            ack = json.loads((await asyncio.wait_for(gateway.receive(), 10)).data)
            assert ack["op"] == 6
            m = await metrics(http, server)
            assert m['fastsfu_edge_closed_connections_total{listener="hrpc",reason="header_timeout"}'] == 200
            assert (
                m['fastsfu_edge_closed_connections_total{listener="discord",reason="header_timeout"}'] == 100
            )
            assert m['fastsfu_edge_connections{listener="discord"}'] == 1  # the gateway session
            await stream.close()
            await gateway.close()

    with serve(tmp_path, {"FASTSFU_HEADER_TIMEOUT": str(timeout)}) as server:
        asyncio.run(asyncio.wait_for(main(server), 60))


@pytest.mark.timeout(60)
def test_wss_handshakes_and_heads_are_bounded_by_the_header_timeout(tmp_path: Path) -> None:
    """The Discord gateway with TLS: connections that never send a ClientHello, and TLS connections
    that never send a request head, are closed after the header timeout (counted apart); a real wss
    client is served meanwhile."""
    timeout = 1.5
    cert, key = make_test_certificate(tmp_path)
    tls = ssl.create_default_context(cafile=str(cert))

    async def main(server: Server) -> None:
        silent = [await open_from("127.0.0.3", server.discord_port) for _ in range(20)]
        no_head = [
            await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", server.discord_port, ssl=tls, server_hostname="localhost"
                ),
                5,
            )
            for _ in range(10)
        ]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            gateway = await discord_session(http, server, 5)
            ends = await asyncio.gather(*(closed_at(r, timeout + 3) for r, _ in silent + no_head))
            assert all(end is not None for end in ends)
            m = await metrics(http, server)
            assert m['fastsfu_edge_closed_connections_total{listener="discord",reason="tls_handshake"}'] == 20
            assert (
                m['fastsfu_edge_closed_connections_total{listener="discord",reason="header_timeout"}'] == 10
            )
            await gateway.send_str(json.dumps({"op": 3, "d": {"t": 1, "seq_ack": 0}}))
            assert json.loads((await asyncio.wait_for(gateway.receive(), 10)).data)["op"] == 6
            await gateway.close()
        for _, writer in silent + no_head:
            writer.close()

    env = {
        "FASTSFU_HEADER_TIMEOUT": str(timeout),
        "FASTSFU_DISCORD_TLS_CERTIFICATE": str(cert),
        "FASTSFU_DISCORD_TLS_PRIVATE_KEY": str(key),
    }
    with serve(tmp_path, env) as server:
        asyncio.run(asyncio.wait_for(main(server), 45))


@pytest.mark.timeout(60)
def test_connections_over_the_per_address_cap_are_closed_at_accept(tmp_path: Path) -> None:
    """From one address, cap + N connections: exactly the last N are closed at once, counted; another
    address still connects; closing the held ones frees their slots."""
    cap = 8

    async def main(server: Server) -> None:
        async with aiohttp.ClientSession() as http:
            for port, extra, label in ((server.hrpc_port, 5, "hrpc"), (server.discord_port, 3, "discord")):
                held = [await open_from("127.0.0.9", port) for _ in range(cap + extra)]
                ends = await asyncio.gather(*(closed_at(r, 1.5) for r, _ in held))
                assert [end is not None for end in ends] == [False] * cap + [True] * extra
                # Another address is served while this one is at its cap.
                other = aiohttp.TCPConnector(local_addr=("127.0.0.10", 0))
                async with aiohttp.ClientSession(connector=other) as http2:
                    assert (await metrics(http2, server))["fastsfu_rooms"] == 0
                m = await metrics(http, server)
                refused = m[
                    f'fastsfu_edge_closed_connections_total{{listener="{label}",reason="address_cap"}}'
                ]
                assert refused == extra
                assert m[f'fastsfu_edge_connections{{listener="{label}"}}'] >= cap
                for _, writer in held:
                    writer.close()
                # The slots are free again: a full cap of new connections is accepted.
                await asyncio.sleep(0.3)
                again = [await open_from("127.0.0.9", port) for _ in range(cap)]
                assert all(
                    end is None for end in await asyncio.gather(*(closed_at(r, 0.5) for r, _ in again))
                )
                for _, writer in again:
                    writer.close()

    env = {"FASTSFU_MAX_CONNECTIONS_PER_ADDRESS": str(cap)}
    with serve(tmp_path, env) as server:
        asyncio.run(asyncio.wait_for(main(server), 45))


@pytest.mark.timeout(90)
def test_a_flood_past_the_open_file_limit_logs_little_and_metrics_recovers(tmp_path: Path) -> None:
    """Under a hard limit of 256 descriptors, 600 connections from ten addresses exhaust the process:
    accept() fails with EMFILE. The log stays small (rate-limited, backed off), and /metrics
    answers again soon after the flood ends."""

    async def main(server: Server) -> dict[str, float]:
        flood: list[asyncio.StreamWriter] = []

        async def one(source: str) -> None:
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await open_from(source, server.hrpc_port)
                flood.append(writer)

        await asyncio.gather(*(one(f"127.0.0.{20 + i % 10}") for i in range(600)))
        assert len(flood) > 300  # more than the server can hold: the kernel queues the rest
        await asyncio.sleep(3.0)  # the server meets EMFILE for a while
        for writer in flood:
            writer.close()
        flood_end = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    m = await metrics(http, server, timeout=1.0)
                    break
                except (TimeoutError, aiohttp.ClientError):
                    assert time.monotonic() - flood_end < 10, "/metrics did not recover"
                    await asyncio.sleep(0.2)
            print(f"/metrics answered {time.monotonic() - flood_end:.2f} s after the flood ended")
            return m

    with serve(tmp_path, {}, nofile=(256, 256)) as server:
        m = asyncio.run(asyncio.wait_for(main(server), 60))
        log = server.stderr.read_bytes()
    about_accept = [line for line in log.splitlines() if b"accept" in line.lower()]
    size = sum(len(line) + 1 for line in about_accept)
    print(f"stderr: {len(log)} bytes, {len(about_accept)} lines ({size} bytes) about accept")
    assert size < 2048, about_accept[:5]
    assert m['fastsfu_edge_accept_errors_total{listener="hrpc"}'] > 0  # the limit was hit


@pytest.mark.timeout(60)
def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start(tmp_path: Path) -> None:
    with serve(tmp_path, {}, nofile=(256, 4096)) as server:
        limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


@pytest.mark.timeout(60)
def test_sigterm_is_bounded_by_the_grace_when_clients_never_answer_the_close(tmp_path: Path) -> None:
    """An hRPC stream and a Discord session whose clients stop reading (so never answer the close
    frame), and a Discord client that made the server's writes block (it sends heartbeats with 60 KB
    nonces and reads none of the echoes): SIGTERM ends the process, exit 0, when the default 3 s
    grace is over, not later than 1.5 s after it; the first two find their close code in their
    buffers (hRPC 1001 going away, Discord 4015)."""
    grace = 3.0

    async def main(server: Server) -> float:
        async with aiohttp.ClientSession() as http:
            stream = await hrpc_stream(http, server, 1)
            gateway = await discord_session(http, server, 2)
            stuck = await discord_session(http, server, 3)

            async def flood() -> None:
                for _ in range(400):  # 24 MB of echoes: more than both sockets' buffers hold
                    await stuck.send_str(json.dumps({"op": 3, "d": "x" * 60000}))

            flooding = asyncio.ensure_future(flood())
            await asyncio.sleep(3.0)  # the server's writer to `stuck` blocks (measured: ~10 MB in)
            # None of the three clients reads from here on until the process has exited.
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(None, lambda: server.proc.wait(30))
            elapsed = time.monotonic() - start
            print(f"SIGTERM to exit: {elapsed:.2f} s (exit code {code})")
            flooding.cancel()
            assert code == 0
            hrpc_close = await asyncio.wait_for(stream.receive(), 5)
            assert (hrpc_close.type, hrpc_close.data) == (aiohttp.WSMsgType.CLOSE, 1001)
            discord_close = await asyncio.wait_for(gateway.receive(), 5)
            assert (discord_close.type, discord_close.data) == (aiohttp.WSMsgType.CLOSE, 4015)
            return elapsed

    with serve(tmp_path, {}) as server:
        elapsed = asyncio.run(asyncio.wait_for(main(server), 45))
        log = server.stderr.read_text()
    assert "shutdown grace of 3 s over: closed 1 connections" in log, log[-2000:]
    assert grace - 0.2 <= elapsed < grace + 1.5
