"""Event-loop time of one join, the cost every other session on the process waits out: a Harmony
member (Initialize, PrepareForJoinChannel, JoinChannel) and a Discord member (IDENTIFY,
SELECT_PROTOCOL) joining rooms that fill up to N, timed around the protocol cores in memory.

    python benchmarks/join_loop_time.py --members 50 --repeat 3 [--flood 50]

Prints, per protocol and room size, the median and largest loop time of a join (all its slices:
each request's handling, the slices a big room's join is cut into, and each stream's
serialization of its replies, which the servers do in that stream's own task) and of its longest
slice, the time the loop cannot run anything else; wall time and the loop thread's CPU time (on a
shared machine the wall time also counts waits for the core). DTLS handshakes are measured apart
in bench_dtls.py. With --flood F, the same again while another process blasts plain RTP at a
producer forwarded to F transports, so that the datapath thread is always busy and the control
plane's table writes wait for it (docs/datapath.md#the-datapath-thread); this process is pinned to
one core and the blaster to the other, as in run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
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
from fastsfu.harmony.session import VoiceSession  # noqa: E402
from fastsfu.rtp import RtpPacket  # noqa: E402

Req = voice_pb2.StreamMessageRequest
AUTH = TokenAuth("join-loop-time-secret-of-at-least-32-bytes")

BLASTER = """
import socket, sys, time
dest = (sys.argv[1], int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[4])))
packets = [bytes.fromhex(h) for h in sys.argv[5:]]
while time.monotonic() < end:
    for p in packets:
        s.sendto(p, dest)
"""


# A loop slice: (wall seconds, seconds of this thread's CPU). On a shared machine the wall time
# also counts waits for the core (other processes, the datapath thread); the CPU time does not.
Slice = tuple[float, float]


def clock() -> Slice:
    return time.perf_counter(), time.thread_time()


def since(start: Slice) -> Slice:
    return time.perf_counter() - start[0], time.thread_time() - start[1]


def start_flood(engine: Engine, fanout: int, seconds: float) -> subprocess.Popen[str]:
    """A producer on a PlainTransport forwarded to `fanout` transports, and a process that blasts
    it for `seconds`: the datapath thread never idles while it runs."""
    router = engine.create_router()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # overflows: the kernel drops
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    blaster_port = probe.getsockname()[1]
    probe.close()
    source = router.create_plain_transport()
    source.connect(ip="127.0.0.1", port=blaster_port)
    producer = source.produce(chromium_producer(1))
    for _ in range(fanout):
        out = router.create_plain_transport()
        out.connect(ip="127.0.0.1", port=sink.getsockname()[1])
        out.consume(producer.id, router.rtp_capabilities)
    packets = [bytes(RtpPacket(111, seq, seq * 960, 1, payload=bytes(100))).hex() for seq in range(64)]
    host, port = source.tuple["localIp"], source.tuple["localPort"]
    argv = [sys.executable, "-c", BLASTER, host, str(port), str(seconds), str(blaster_port), *packets]
    return subprocess.Popen(
        argv,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if os.cpu_count() and os.cpu_count() != 1 else None,
    )


def harmony_joins(rooms: VoiceRooms, members: int, guild: int) -> list[list[Slice]]:
    """Per joiner, the seconds each of its three requests kept the loop busy."""
    caps = json.dumps(CLIENT_CAPS)
    dtls = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
    steps: list[list[Slice]] = []
    room: list[VoiceSession] = []
    pending: deque[Callable[[], None]] = deque()
    rooms.schedule = pending.append  # the server's is the loop's call_soon
    for user in range(1, members + 1):
        session = rooms.open_session(user + guild * 1000)
        room.append(session)
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
        times: list[Slice] = []
        for request in requests:
            # What the front-end does per request: parse and handle it (one loop slice), run the
            # slices a big room's join was cut into, then each stream's writer serializes its
            # replies (a slice per stream: each runs in its own task).
            t = clock()
            session.handle(Req.FromString(request.SerializeToString()))
            times.append(since(t))
            while pending:
                callback = pending.popleft()
                t = clock()
                callback()
                times.append(since(t))
            for other in room:
                t = clock()
                out = other.take_outgoing()
                for message in out:
                    if not isinstance(message, Exception):
                        message.SerializeToString()
                if out:
                    times.append(since(t))
        steps.append(times)
    return steps


def discord_joins(gateway: Gateway, members: int, server: str) -> list[list[Slice]]:
    steps: list[list[Slice]] = []
    connections = []
    pending: deque[Callable[[], None]] = deque()
    voice = gateway.handler
    assert isinstance(voice, DiscordVoice)
    voice.schedule = pending.append  # the server's is the loop's call_soon
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
        times: list[Slice] = []
        for frame in frames:
            # One slice for the frame (the JSON of every message is made as it is sent), the
            # slices a big room's join was cut into, then one per connection whose output its
            # task takes.
            t = clock()
            conn.receive(json.dumps(frame), time.monotonic())
            times.append(since(t))
            while pending:
                callback = pending.popleft()
                t = clock()
                callback()
                times.append(since(t))
            for c in (*connections, conn):
                t = clock()
                if c.poll_output():
                    times.append(since(t))
        connections.append(conn)
        steps.append(times)
    return steps


def summary(label: str, runs: list[list[list[Slice]]], members: int) -> dict[str, Any]:
    # The last joiners of each run: the ones whose join fans out to a full room.
    tail = [steps for run in runs for steps in run[-max(1, members // 10) :]]
    row: dict[str, Any] = {"protocol": label, "room": members}
    for i, name in ((0, ""), (1, "cpu_")):
        total = [sum(s[i] for s in steps) * 1e3 for steps in tail]
        worst = [max(s[i] for s in steps) * 1e3 for steps in tail]
        row[f"{name}join_ms_median"] = round(statistics.median(total), 3)
        row[f"{name}join_ms_max"] = round(max(total), 3)
        row[f"{name}slice_ms_median"] = round(statistics.median(worst), 3)
        row[f"{name}slice_ms_max"] = round(max(worst), 3)
    row["slices_median"] = statistics.median(len(s) for s in tail)
    print(
        f"{label:8} room of {members:3}: join {row['join_ms_median']:7.3f} ms median"
        f" ({row['join_ms_max']:.3f} max), longest slice {row['slice_ms_median']:.3f} ms median"
        f" ({row['slice_ms_max']:.3f} max), {row['slices_median']} slices; CPU: join"
        f" {row['cpu_join_ms_median']:.3f}, longest slice {row['cpu_slice_ms_median']:.3f} ms median"
    )
    return row


async def measure(members: list[int], repeat: int, flood: int) -> list[dict[str, Any]]:
    rows = []
    async with Engine() as engine:
        rooms = VoiceRooms(engine)
        gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate))
        blaster = None
        if flood:
            blaster = start_flood(engine, flood, 600.0)
            time.sleep(0.5)
            before = engine.datapath.stats()["forwarded_packets"]
            t0 = time.monotonic()
        try:
            for n in members:
                h = [harmony_joins(rooms, n, guild=1 + r + 100 * n) for r in range(repeat)]
                d = [discord_joins(gateway, n, server=f"{n}-{r}") for r in range(repeat)]
                rows.append(summary("harmony", h, n))
                rows.append(summary("discord", d, n))
        finally:
            if blaster is not None:
                pps = (engine.datapath.stats()["forwarded_packets"] - before) / (time.monotonic() - t0)
                print(f"flood: fan-out {flood}, {pps / 1e3:.0f} k forwarded packets/s during the joins")
                for row in rows:
                    row["flood_fanout"], row["flood_pps"] = flood, round(pps)
                blaster.kill()
                blaster.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flood", type=int, default=0, help="fan-out of a blasted producer (0: idle)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.flood and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # both threads of the SFU on one core, the blaster on the other
    rows = asyncio.run(measure(args.members, args.repeat, args.flood))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
