"""Event-loop time of one join, the cost every other session on the process waits out: a Harmony
member (Initialize, PrepareForJoinChannel, JoinChannel) and a Discord member (IDENTIFY,
SELECT_PROTOCOL) joining rooms that fill up to N, timed around the protocol cores in memory.

    python benchmarks/join_loop_time.py --members 50 --repeat 3

Prints, per protocol and room size, the median and largest loop time of a join (all its steps) and
of its most expensive single step; DTLS handshakes are measured apart in bench_dtls.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_harmony_session import CLIENT_CAPS, chromium_producer  # noqa: E402

from fastsfu import Engine  # noqa: E402
from fastsfu._proto.protocol.voice.v1 import voice_pb2  # noqa: E402
from fastsfu.discord.gateway import Gateway  # noqa: E402
from fastsfu.discord.voice import DiscordVoice  # noqa: E402
from fastsfu.dtls import DtlsCertificate  # noqa: E402
from fastsfu.harmony import VoiceRooms  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402

Req = voice_pb2.StreamMessageRequest
AUTH = TokenAuth("join-loop-time-secret-of-at-least-32-bytes")


def harmony_joins(rooms: VoiceRooms, members: int, guild: int) -> list[list[float]]:
    """Per joiner, the seconds each of its three requests kept the loop busy."""
    caps = json.dumps(CLIENT_CAPS)
    dtls = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
    steps: list[list[float]] = []
    for user in range(1, members + 1):
        session = rooms.open_session(user + guild * 1000)
        requests = [
            Req(initialize=Req.Initialize(guild_id=guild, channel_id=1)),
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)),
            Req(
                join_channel=Req.JoinChannel(
                    rtp_paramaters=json.dumps(chromium_producer(10_000 + user)),
                    producer_dtls_paramaters=dtls,
                    consumer_dtls_paramaters=dtls,
                )
            ),
        ]
        times = []
        for request in requests:
            # What the front-end does per request: parse, handle, serialize the replies.
            t = time.perf_counter()
            session.handle(Req.FromString(request.SerializeToString()))
            for other in rooms.open_sessions:
                for message in other.take_outgoing():
                    if not isinstance(message, Exception):
                        message.SerializeToString()
            times.append(time.perf_counter() - t)
        steps.append(times)
    return steps


def discord_joins(gateway: Gateway, members: int, server: str) -> list[list[float]]:
    steps: list[list[float]] = []
    connections = []
    for user in range(1, members + 1):
        now = time.monotonic()
        conn = gateway.connect(8, now)
        conn.poll_output()
        frames = [
            {
                "op": 0,
                "d": {
                    "server_id": server,
                    "user_id": str(user),
                    "session_id": f"{server}-{user}",
                    "token": AUTH.mint(user),
                },
            },
            {
                "op": 1,
                "d": {
                    "protocol": "udp",
                    "data": {"address": "127.0.0.1", "port": 40000 + user, "mode": "aead_aes256_gcm_rtpsize"},
                },
            },
        ]
        times = []
        for frame in frames:
            t = time.perf_counter()
            conn.receive(json.dumps(frame), time.monotonic())
            for c in (*connections, conn):
                c.poll_output()
            times.append(time.perf_counter() - t)
        connections.append(conn)
        steps.append(times)
    return steps


def summary(label: str, runs: list[list[list[float]]], members: int) -> dict[str, Any]:
    # The last joiners of each run: the ones whose join fans out to a full room.
    tail = [steps for run in runs for steps in run[-max(1, members // 10) :]]
    total = [sum(s) * 1e3 for s in tail]
    worst = [max(s) * 1e3 for s in tail]
    row = {
        "protocol": label,
        "room": members,
        "join_ms_median": round(statistics.median(total), 3),
        "join_ms_max": round(max(total), 3),
        "step_ms_median": round(statistics.median(worst), 3),
        "step_ms_max": round(max(worst), 3),
    }
    print(
        f"{label:8} room of {members:3}: join {row['join_ms_median']:7.3f} ms median"
        f" ({row['join_ms_max']:.3f} max), largest step {row['step_ms_median']:.3f} ms median"
        f" ({row['step_ms_max']:.3f} max)"
    )
    return row


async def measure(members: list[int], repeat: int) -> list[dict[str, Any]]:
    rows = []
    async with Engine() as engine:
        rooms = VoiceRooms(engine)
        gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate))
        for n in members:
            h = [harmony_joins(rooms, n, guild=1 + r + 100 * n) for r in range(repeat)]
            d = [discord_joins(gateway, n, server=f"{n}-{r}") for r in range(repeat)]
            rows.append(summary("harmony", h, n))
            rows.append(summary("discord", d, n))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.members, args.repeat))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
