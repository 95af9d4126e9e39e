"""The operational side of `fastsfu serve`, through the real CLI: Prometheus /metrics after real
traffic, gRPC health (SERVING, then NOT_SERVING on SIGTERM before the process ends), JSON log lines
with their fields and no tokens; and the datapath's forwarded packet and byte counters on /metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import OPUS_CAPS, serve_app

import fastsfu
from fastsfu import Engine
from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import StaticTokens
from fastsfu.harmony.hrpc_server import make_app
from fastsfu.rtp import RtpPacket
from fastsfu.server.logs import setup_logging
from fastsfu.server.metrics import METRICS_PATH, metrics_mount
from fastsfu.srtp import SrtpContext, generate_key, srtp_parameters

pytestmark = [pytest.mark.loopback]
Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
SECRET = "ops-test-secret-0123456789abcdefghijklmnop"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CAPS = OPUS_CAPS
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format: `name{labels}` -> value (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(base + METRICS_PATH) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(await resp.text())


async def recv(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, bytes]:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return msg.data[0], msg.data[1:]


def json_banner(proc: subprocess.Popen[str]) -> tuple[dict[str, object], str]:
    """The start-up fields of a `--log-format json` server, read from its log (stderr) up to the
    metrics line (every line must be JSON), and the lines read."""
    fields: dict[str, object] = {}
    head = ""
    while "metrics" not in fields:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        assert line, head + proc.stderr.read()  # type: ignore[union-attr]
        head += line
        record = json.loads(line)
        if record["logger"] == "fastsfu.server.harmony_server":
            fields.update(record)
    return fields, head


@pytest.mark.timeout(60)
def test_json_log_format_makes_every_output_line_json() -> None:
    """`fastsfu serve --log-format json` with a generated secret and the Discord gateway: the
    start-up lines are log records with their fields, and nothing else reaches stdout or stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "serve", "--log-format", "json"]
        + ["--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "0", "--duration", "0.5"],
        capture_output=True,
        text=True,
        timeout=40,
        env={k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    records = [json.loads(line) for line in out.stderr.splitlines()]  # each line, none skipped
    fields = {k: v for r in records if r["logger"] == "fastsfu.server.harmony_server" for k, v in r.items()}
    assert fields["hrpc_url"].startswith("ws://127.0.0.1:") and fields["grpc"].startswith("127.0.0.1:")
    assert fields["media"].startswith("127.0.0.1:") and fields["metrics"].endswith(METRICS_PATH)
    assert fields["discord"].startswith("ws://127.0.0.1:") and "demo" in fields
    assert len(str(fields["token"]).split(".")) == 3  # a JWT, minted with the generated secret
    assert [r["msg"] for r in records if r["msg"] == "shutting down"] == ["shutting down"]


@pytest.mark.timeout(90)
def test_metrics_health_json_logs_and_sigterm_through_the_cli() -> None:
    token, token8 = (
        subprocess.run(
            [sys.executable, "-m", "fastsfu.server.cli", "token", "--user", user, "--secret", SECRET],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        for user in ("7", "8")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastsfu.server.cli",
            "serve",
            "--hrpc-port",
            "0",
            "--grpc-port",
            "0",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--rate-limit-burst",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")},
            "FASTSFU_TOKEN_SECRET": SECRET,
        },
    )
    try:
        banner, head = json_banner(proc)
        base = banner["metrics"].removesuffix(METRICS_PATH)
        hrpc_url = banner["hrpc_url"]
        grpc_addr = banner["grpc"]
        media_ip, media_port = banner["media"].rsplit(":", 1)
        assert base.startswith("http://127.0.0.1:") and hrpc_url.startswith(base.replace("http", "ws"))
        watch_states: list[int] = []
        sigterm_at: list[float] = []

        async def clients() -> None:
            channel = grpc.aio.insecure_channel(grpc_addr)
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "protocol.voice.v1.VoiceService"):
                reply = await asyncio.wait_for(
                    health.Check(health_pb2.HealthCheckRequest(service=service)), 10
                )
                assert reply.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            watch_states.append((await asyncio.wait_for(watch.read(), 10)).status)
            # A gRPC voice stream past Initialize, still open at SIGTERM.
            voice = voice_pb2_grpc.VoiceServiceStub(channel).StreamMessage(
                metadata=(("authorization", token8),)
            )
            await voice.write(Req(initialize=Req.Initialize(guild_id=5, channel_id=7)))
            assert (await asyncio.wait_for(voice.read(), 10)).WhichOneof("message") == "initialized"

            async with aiohttp.ClientSession() as http:
                # An hRPC session through Initialize and Prepare (a room, two transports).
                ws = await http.ws_connect(hrpc_url, protocols=("hrpc1", token))
                await ws.send_bytes(
                    Req(initialize=Req.Initialize(guild_id=5, channel_id=6)).SerializeToString()
                )
                assert (await recv(ws))[0] == 0
                prepare = Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CAPS))
                await ws.send_bytes(Req(prepare_for_join_channel=prepare).SerializeToString())
                op, body = await recv(ws)
                assert op == 0 and Resp.FromString(body).WhichOneof("message") == "prepared_for_join_channel"
                # A stream with a bad token: an error by identifier.
                bad = await http.ws_connect(hrpc_url, protocols=("hrpc1", "not-a-token"))
                op, body = await recv(bad)
                assert op == 1 and hrpc_pb2.Error.FromString(body).identifier == "h.blank-session"
                await bad.close()
                # Garbage to the media port: dropped and counted by the datapath.
                before = await scrape(http, base)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    for i in range(20):
                        udp.sendto(bytes([0x80 + i % 2]) + b"junk" * 10, (media_ip, int(media_port)))
                for _ in range(100):  # the datagrams are read asynchronously
                    metrics = await scrape(http, base)
                    if metrics["fastsfu_received_packets_total"] >= 20:
                        break
                    await asyncio.sleep(0.05)
                dropped = "fastsfu_dropped_datagrams_total{"
                drops = sum(v for k, v in metrics.items() if k.startswith(dropped))
                assert metrics["fastsfu_received_packets_total"] >= 20
                assert metrics["fastsfu_received_bytes_total"] >= 20 * 41
                assert drops >= 20 > sum(v for k, v in before.items() if k.startswith(dropped))
                assert metrics["fastsfu_rooms"] == 2 and metrics["fastsfu_routers"] == 2
                # `fastsfu serve` runs the datapath thread 19 nice levels ahead of its loop
                # (raised, as root; docs/datapath.md, "Thread priority").
                loop_nice = metrics['fastsfu_thread_nice{thread="loop"}']
                assert metrics['fastsfu_thread_nice{thread="datapath"}'] == max(-20, loop_nice - 19)
                assert metrics["fastsfu_voice_sessions"] == 2 and metrics["fastsfu_voice_streams_open"] == 2
                assert metrics["fastsfu_room_members"] == 0 and metrics["fastsfu_transports"] == 2
                assert metrics["fastsfu_producers"] == 0 and metrics["fastsfu_consumers"] == 0
                assert metrics['fastsfu_voice_streams_total{frontend="hrpc"}'] == 1
                assert metrics['fastsfu_voice_streams_total{frontend="grpc"}'] == 1
                assert metrics['fastsfu_voice_stream_errors_total{identifier="h.blank-session"}'] == 1
                assert metrics["fastsfu_dtls_failures_total"] == 0
                build = f'python="{platform.python_version()}",version="{fastsfu.__version__}"'
                assert metrics[f"fastsfu_build_info{{{build}}}"] == 1
                assert metrics["process_open_fds"] > 5 and metrics["process_resident_memory_bytes"] > 1e6
                assert 'python_gc_collections_total{generation="0"}' in metrics
                assert metrics["fastsfu_ice_consent_expiries_total"] == 0
                assert "fastsfu_late_packets_total" in metrics  # exported (its value depends on load)
                assert "fastsfu_forwarded_bytes_total" in metrics
                # The start-up heap is frozen out of every collection, and each pause is measured.
                assert metrics["fastsfu_gc_frozen_objects"] > 10_000
                young = metrics['fastsfu_gc_pause_seconds_count{generation="0"}']
                assert young >= 1
                assert metrics['fastsfu_gc_pause_seconds_bucket{generation="0",le="+Inf"}'] == young
                assert 0 < metrics['fastsfu_gc_pause_max_seconds{generation="0"}'] < 1

                sigterm_at.append(time.monotonic())
                proc.send_signal(signal.SIGTERM)
                # Health reports NOT_SERVING, then its stream ends; the voice streams end cleanly.
                while (reply := await asyncio.wait_for(watch.read(), 10)) is not grpc.aio.EOF:
                    watch_states.append(reply.status)
                closing = await asyncio.wait_for(ws.receive(), 10)
                assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001  # going away
                assert await asyncio.wait_for(voice.read(), 10) is grpc.aio.EOF
                assert await voice.code() == grpc.StatusCode.OK
            await channel.close()

        asyncio.run(asyncio.wait_for(clients(), 60))
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and out == ""  # with json, every line goes to the log
        err = head + err
        assert time.monotonic() - sigterm_at[0] < 5  # graceful, and quick
        assert watch_states == [SERVING, NOT_SERVING]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert "shutting down" in [r["msg"] for r in records]
    ended = [r for r in records if r["msg"].startswith("voice stream ends")]
    assert {"identifier": "h.blank-session", "remote": "127.0.0.1", "frontend": "hrpc"}.items() <= ended[
        0
    ].items()
    opened = [r for r in records if r["msg"] == "voice stream opened"]
    assert {(r["user_id"], r["frontend"]) for r in opened} == {(8, "grpc"), (7, "hrpc")}
    assert token not in err and token8 not in err and SECRET not in err and SECRET not in out


def test_json_formatter_one_object_per_line_with_extra_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug", "json", stream)
        logging.getLogger("fastsfu.test").info("hello %s", "world", extra={"user_id": 3, "remote": "::1"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("fastsfu.test").exception("failed")
        setup_logging("info", "text", stream)
        logging.getLogger("fastsfu.test").debug("not shown at info")
        logging.getLogger("fastsfu.test").warning("plain")
    finally:  # give pytest its handlers back
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second, text = stream.getvalue().splitlines()[:2] + stream.getvalue().splitlines()[-1:]
    one = json.loads(first)
    assert (one["level"], one["logger"], one["msg"], one["user_id"], one["remote"]) == (
        "info",
        "fastsfu.test",
        "hello world",
        3,
        "::1",
    )
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", one["ts"])
    two = json.loads(second)
    assert two["level"] == "error" and "ValueError: boom" in two["exc"]
    assert text.endswith("WARNING fastsfu.test: plain") and "not shown" not in stream.getvalue()


@pytest.mark.timeout(60)
def test_forwarded_packets_and_bytes_on_metrics() -> None:
    """Real SRTP through two PlainTransports; /metrics reports what the datapath counted."""
    opus = {"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}
    caps = {"codecs": [{**CAPS["codecs"][0], "preferredPayloadType": 100}]}  # type: ignore[dict-item]

    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            async with serve_app(
                make_app(rooms, StaticTokens({}).authenticate, [metrics_mount(rooms)])
            ) as port:
                base = f"http://127.0.0.1:{port}"
                router = engine.create_router()
                alice, bob = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
                try:
                    for s in (alice, bob):
                        s.bind(("127.0.0.1", 0))
                        s.settimeout(5)
                    suite = "AEAD_AES_128_GCM"
                    key = generate_key(suite)
                    a = router.create_plain_transport(enable_srtp=True, srtp_crypto_suite=suite)
                    b = router.create_plain_transport(enable_srtp=True, srtp_crypto_suite=suite)
                    a.connect("127.0.0.1", alice.getsockname()[1], srtp_parameters(suite, key))
                    b.connect("127.0.0.1", bob.getsockname()[1], srtp_parameters(suite, generate_key(suite)))
                    producer = a.produce(
                        {"codecs": [opus], "encodings": [{"ssrc": 4242}], "rtcp": {"cname": "a"}}
                    )
                    consumer = b.consume(producer.id, caps)
                    sender = SrtpContext(suite, key, inbound=False)
                    for seq in range(1, 6):
                        packet = RtpPacket(111, seq, 960 * seq, 4242, payload=b"opus" * 20)
                        alice.sendto(
                            sender.protect(bytes(packet)), (a.tuple["localIp"], a.tuple["localPort"])
                        )
                    sent = 0
                    async with aiohttp.ClientSession() as http:
                        for _ in range(100):
                            metrics = await scrape(http, base)
                            if metrics["fastsfu_forwarded_packets_total"] >= 5:
                                break
                            await asyncio.sleep(0.05)
                        for _ in range(5):  # already in bob's socket buffer: forwarded means sent
                            sent += len(bob.recv(2048))
                    stats = consumer.get_stats()[0]
                    assert metrics["fastsfu_forwarded_packets_total"] == 5 == stats["packetCount"]
                    assert metrics["fastsfu_forwarded_bytes_total"] == sent == stats["byteCount"]
                    assert metrics["fastsfu_received_bytes_total"] >= sent
                    assert metrics["fastsfu_transports"] == 2 and metrics["fastsfu_rooms"] == 0
                    assert metrics["fastsfu_producers"] == 1 and metrics["fastsfu_consumers"] == 1
                finally:
                    alice.close()
                    bob.close()

    asyncio.run(asyncio.wait_for(main(), 45))
