"""NATS messages per Harmony join and per leave in a `fastsfu serve --workers 2` cluster.

Starts a nats-server with its monitoring port, the cluster on it (`--nats`), and a tap subscribed
to every subject. Then members join one room one by one over gRPC, each on a connection of its own
(the kernel picks the worker), and leave one by one. Each join or leave is counted by the messages
published from its start until the bus has been quiet for a while (heartbeats on
`fastsfu.v1.nodes` are counted apart: they do not depend on joins), classified by whether the
session ran at the room's home (`here`) or was bridged there from the other worker (`bridged`),
from the workers' `fastsfu_cluster_sessions_total`. The nats-server's /varz in_msgs and out_msgs
over the same windows cross-check the tap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from soak_clients import GrpcStream, Target  # noqa: E402
from test_server_ops import parse_metrics  # noqa: E402

from fastsfu._proto.protocol.voice.v1 import voice_pb2_grpc  # noqa: E402
from fastsfu.cluster.bus import Bus  # noqa: E402
from fastsfu.cluster.registry import NODES_SUBJECT  # noqa: E402
from fastsfu.dtls import DtlsCertificate  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402
from fastsfu.server.supervisor import free_port, nats_server_binary  # noqa: E402

SECRET = "bus-messages-benchmark-secret-0123456789"
METRICS = re.compile(r"fastsfu: worker (\d+) metrics (\S+)")
PORTS = re.compile(r"fastsfu: 2 workers on hRPC (\d+), gRPC (\d+)")
START_TIMEOUT = 30.0
STEP_TIMEOUT = 10.0
GUILD, CHANNEL = 42, 7


def subject_class(subject: str) -> str:
    """What a message is for, by its subject (docs/cluster.md#the-bus)."""
    if subject == NODES_SUBJECT:
        return "heartbeat"
    if subject.startswith("fastsfu.v1.bridge."):
        return "bridge " + subject.rsplit(".", 1)[1]  # open, in, out, ...
    if subject.startswith(("$JS.API.", "$KV.")):
        return "registry (KV request)"
    if subject.startswith("$JS.EVENT."):
        return "JetStream advisory"
    if subject.startswith("_INBOX."):
        return "reply"
    return "other: " + subject.split(".", 2)[0]


@dataclass
class Tap:
    """Every message published on the bus, with its arrival time."""

    seen: list[tuple[float, str]] = field(default_factory=list)

    def on(self, subject: str) -> None:
        self.seen.append((time.monotonic(), subject))

    def since(self, t0: float) -> list[tuple[float, str]]:
        return [(t, s) for t, s in self.seen if t >= t0]

    async def quiet(self, t0: float, quiet: float, limit: float) -> float:
        """Wait until no message but heartbeats arrived for `quiet` s (at most `limit` s after t0);
        returns the end of the window."""
        while True:
            last = max([t0, *(t for t, s in self.since(t0) if subject_class(s) != "heartbeat")])
            now = time.monotonic()
            if now - last >= quiet or now - t0 >= limit:
                return now
            await asyncio.sleep(0.05)


class Cluster:
    """nats-server (with -m) and `fastsfu serve --workers 2 --nats` as subprocesses."""

    def __init__(self) -> None:
        self.store = tempfile.TemporaryDirectory(prefix="fastsfu-bus-")
        self.nats_port, self.mon_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.nats: asyncio.subprocess.Process | None = None
        self.serve: asyncio.subprocess.Process | None = None
        self.metrics: dict[int, str] = {}
        self.grpc = 0
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    async def start(self) -> None:
        self.nats = await asyncio.create_subprocess_exec(
            nats_server_binary(),
            *("-a", "127.0.0.1", "-p", str(self.nats_port), "-m", str(self.mon_port)),
            *("-js", "-sd", self.store.name),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")}
        env["FASTSFU_TOKEN_SECRET"] = SECRET
        self.serve = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "fastsfu.server.cli", "serve", "--workers", "2", "--nats", self.url),
            *("--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "-1", "--rate-limit-burst", "0"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        await asyncio.wait_for(self._read_until_ready(), START_TIMEOUT)
        asyncio.ensure_future(self._drain_output())

    async def _read_until_ready(self) -> None:
        assert self.serve is not None and self.serve.stdout is not None
        while len(self.metrics) < 2 or not self.grpc:
            line = (await self.serve.stdout.readline()).decode()
            if not line:
                raise RuntimeError("the cluster exited:\n" + "".join(self.output))
            self.output.append(line)
            if m := METRICS.search(line):
                self.metrics[int(m[1])] = m[2]
            if m := PORTS.search(line):
                self.grpc = int(m[2])

    async def _drain_output(self) -> None:
        assert self.serve is not None and self.serve.stdout is not None
        while line := await self.serve.stdout.readline():
            self.output.append(line.decode())

    async def scrape(self, http: aiohttp.ClientSession) -> list[dict[str, float]]:
        out = []
        for i in (0, 1):
            async with http.get(self.metrics[i], timeout=aiohttp.ClientTimeout(total=10)) as resp:
                out.append(parse_metrics(await resp.text()))
        return out

    async def varz(self, http: aiohttp.ClientSession) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.mon_port}/varz"
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            v = await resp.json()
        return {"in_msgs": int(v["in_msgs"]), "out_msgs": int(v["out_msgs"])}

    async def stop(self) -> None:
        for proc in (self.serve, self.nats):  # the workers first, NATS last
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        self.store.cleanup()


def total(seen: list[dict[str, float]], name: str) -> float:
    return sum(m.get(name, 0.0) for m in seen)


HERE = 'fastsfu_cluster_sessions_total{protocol="harmony",where="here"}'
BRIDGED = 'fastsfu_cluster_sessions_total{protocol="harmony",where="bridged"}'
REQUESTS = "fastsfu_cluster_bus_requests_total"


class Member:
    """A Harmony member at the signaling level over gRPC, on a connection of its own."""

    def __init__(self, cluster: Cluster, user: int) -> None:
        self.user = user
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{cluster.grpc}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        token = TokenAuth(SECRET).mint(user)
        self.call = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", token),)
        )
        self.where = ""

    async def join(self, target: Target, cert: DtlsCertificate, media: bool) -> None:
        await GrpcStream(self.call).flow(target, self.user, cert, media)

    async def leave(self) -> None:
        await self.call.done_writing()
        while await asyncio.wait_for(self.call.read(), STEP_TIMEOUT) is not grpc.aio.EOF:
            pass  # UserJoined / UserLeft of the others
        await self.channel.close()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster()
    tap = Tap()
    records: list[dict[str, Any]] = []
    try:
        await cluster.start()
        bus = await Bus.connect(cluster.url, "bus-messages-tap")

        async def tapped(msg: Any) -> None:
            tap.on(msg.subject)

        await bus.nc.subscribe(">", cb=tapped)
        await bus.nc.flush(timeout=2)
        target = Target("", "", "", TokenAuth(SECRET), GUILD, CHANNEL, "")
        cert = DtlsCertificate.generate()
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + START_TIMEOUT
            while total(await cluster.scrape(http), "fastsfu_cluster_nodes") < 4:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not hear each other")
                await asyncio.sleep(0.2)
            await tap.quiet(time.monotonic(), args.quiet, 10)
            members: list[Member] = []

            async def op(kind: str, member: Member) -> None:
                before, v0 = await cluster.scrape(http), await cluster.varz(http)
                present = len(members) - (kind == "leave")
                bridged_present = sum(1 for m in members if m.where == "bridged" and m is not member)
                t0 = time.monotonic()
                if kind == "join":
                    await asyncio.wait_for(member.join(target, cert, args.media), 3 * STEP_TIMEOUT)
                else:
                    await asyncio.wait_for(member.leave(), 3 * STEP_TIMEOUT)
                t1 = await tap.quiet(t0, args.quiet, 15)
                after, v1 = await cluster.scrape(http), await cluster.varz(http)
                if kind == "join":
                    d_here = total(after, HERE) - total(before, HERE)
                    d_bridged = total(after, BRIDGED) - total(before, BRIDGED)
                    if (d_here, d_bridged) not in ((1, 0), (0, 1)):
                        raise RuntimeError(
                            f"join of user {member.user}: here +{d_here}, bridged +{d_bridged}"
                        )
                    member.where = "here" if d_here else "bridged"
                window = [(t, s) for t, s in tap.since(t0) if t <= t1]
                by_class = Counter(subject_class(s) for _, s in window)
                beats = by_class.pop("heartbeat", 0)
                taps = len([1 for t, _ in tap.since(t0)])  # deliveries to the tap up to the varz read
                records.append(
                    {
                        "op": kind,
                        "user": member.user,
                        "where": member.where,
                        "members_before": present if kind == "join" else present + 1,
                        "bridged_others": bridged_present,
                        "first": kind == "join" and not members,
                        "messages": sum(by_class.values()),
                        "by_class": dict(by_class),
                        "heartbeats": beats,
                        "window_s": round(t1 - t0, 2),
                        "bus_requests": total(after, REQUESTS) - total(before, REQUESTS),
                        "varz_in": v1["in_msgs"] - v0["in_msgs"],
                        "varz_out_minus_tap": v1["out_msgs"] - v0["out_msgs"] - taps,
                    }
                )
                r = records[-1]
                print(
                    f"[bus] {kind} user {member.user} ({r['where']}, {r['members_before']} members, "
                    f"{bridged_present} bridged): {r['messages']} messages {r['by_class']}, "
                    f"+{beats} heartbeats, varz in +{r['varz_in']}",
                    file=sys.stderr,
                    flush=True,
                )

            user = 0
            while len(members) < args.max_joins:
                whered = Counter(m.where for m in members[1:])
                if len(members) > args.joins and min(whered["here"], whered["bridged"]) >= args.each:
                    break
                user += 1
                member = Member(cluster, user)
                await op("join", member)
                members.append(member)
            for member in reversed(members):
                await op("leave", member)
                members.remove(member)
        await bus.close()
    finally:
        await cluster.stop()
    return {
        "records": records,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def summarize(result: dict[str, Any]) -> str:
    recs = result["records"]
    lines = [
        "| op | where the session ran | n | bus messages (median, min–max) | of which: by subject "
        "| per bridged member present | bus requests (workers' counter) | varz in_msgs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in recs:
        label = r["where"]
        if r["first"]:
            label += ", first join (places the room)"
        if r["op"] == "leave" and r["members_before"] == 1:
            label += ", last leave (releases the room)"
        groups.setdefault((r["op"], label), []).append(r)
    for (op, label), rs in groups.items():
        msgs = [r["messages"] for r in rs]
        classes = sorted({c for r in rs for c in r["by_class"]})
        parts = ", ".join(
            f"{c} {statistics.median([r['by_class'].get(c, 0) for r in rs]):g}" for c in classes
        )
        # Messages beyond the fewest, per bridged member present (their UserJoined/UserLeft frames).
        slope = "-"
        pts = [(r["bridged_others"], r["messages"]) for r in rs]
        if len({b for b, _ in pts}) > 1:
            mb, mm = statistics.mean(b for b, _ in pts), statistics.mean(m for _, m in pts)
            var = sum((b - mb) ** 2 for b, _ in pts)
            slope = f"{sum((b - mb) * (m - mm) for b, m in pts) / var:.2f}"
        lines.append(
            f"| {op} | {label} | {len(rs)} | {statistics.median(msgs):g} ({min(msgs)}–{max(msgs)}) | {parts} "
            f"| {slope} | {statistics.median([r['bus_requests'] for r in rs]):g} "
            f"| {statistics.median([r['varz_in'] for r in rs]):g} |"
        )
    beats = sum(r["heartbeats"] for r in recs) / max(1e-9, sum(r["window_s"] for r in recs))
    lines += [
        "",
        f"Heartbeats (not counted above): {beats:.2f} per second for the 2 workers. A window lasts from the "
        f"op's start until the bus was quiet for {result['args']['quiet']} s (a worker records and releases "
        "homes on its 1 s heartbeat tick). varz in_msgs counts the same window's messages at the server, "
        "heartbeats included.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--joins", type=int, default=8, help="members to join at least [8]")
    ap.add_argument("--each", type=int, default=3, help="joins at least this many here and bridged [3]")
    ap.add_argument("--max-joins", type=int, default=20, help="members to join at most [20]")
    ap.add_argument(
        "--quiet", type=float, default=1.5, help="seconds without a message that end a window [1.5]"
    )
    ap.add_argument(
        "--media", action="store_true", help="join with aiortc ICE + DTLS legs (media never uses the bus)"
    )
    ap.add_argument("--json", type=Path, help="write the records here")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole measurement (bounded: 10 minutes); its records and arguments."""
    if args.media:
        from soak_clients import loopback_only_aiortc

        loopback_only_aiortc()
    result: dict[str, Any] = asyncio.run(asyncio.wait_for(measure(args), 600))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(summarize(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
