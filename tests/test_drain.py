"""SIGTERM to a node of a cluster (docs/cluster.md#workers), three nodes on 127.0.0.2-4: during its
drain grace a new member of a room homed there is placed on an open node and hears the draining
node's members through pipes; after the grace those leave once each, and members who come back
(Harmony, Discord RESUME then IDENTIFY) land on open nodes at once. The drain_grace knob."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cluster_helpers import (
    FastsfuNode,
    MultiNode,
    NodeMember,
    error_identifier,
    multi_node,
    place,
    wait_metrics,
)
from discord_helpers import Observer
from test_server_ops import SECRET

from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.cluster.bus import Bus
from fastsfu.cluster.registry import NODES_SUBJECT
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.config import ConfigError, load_config

Req = voice_pb2.StreamMessageRequest
GRACE = 4.0  # --drain-grace of every node: long enough for a join and its pipes on a loaded machine
GAUGES = ("fastsfu_room_members", "fastsfu_transports", "fastsfu_producers", "fastsfu_consumers")
DISCORD = re.compile(r"fastsfu: Discord voice gateway (ws://\S+)")
AUTH = TokenAuth(SECRET)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[MultiNode]:
    with multi_node(tmp_path, ("--drain-grace", str(GRACE), "--discord-port", "0")) as c:
        yield c


def discord_url(node: FastsfuNode) -> str:
    """The node's Discord gateway URL (announced just after its metrics URL)."""
    deadline = time.monotonic() + 10
    while True:
        for line in node.rest():
            if m := DISCORD.search(line):
                return m[1]
        assert time.monotonic() < deadline, "no Discord gateway announced"
        time.sleep(0.1)


async def until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


class Holder:
    """A gRPC voice stream past Initialize only: it holds its room on the node that serves it."""

    def __init__(self, node: FastsfuNode, user: int, guild_id: int, channel_id: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"{node.ip}:{node.grpc}")
        self.call = voice_pb2_grpc.VoiceServiceStub(self.channel).StreamMessage(
            metadata=(("authorization", AUTH.mint(user)),)
        )
        self.room = Req.Initialize(guild_id=guild_id, channel_id=channel_id)

    async def initialize(self) -> tuple[str, float]:
        """The first answer ("initialized", or the error identifier the stream ended with) and
        how long it took."""
        t0 = time.monotonic()
        await self.call.write(Req(initialize=self.room))
        try:
            answer = await asyncio.wait_for(self.call.read(), 10)
        except grpc.aio.AioRpcError as exc:
            return error_identifier(exc), time.monotonic() - t0
        assert answer is not grpc.aio.EOF
        return answer.WhichOneof("message") or "", time.monotonic() - t0

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def sigterm_until_draining(urls: list[str], node: FastsfuNode, timeout: float = 5.0) -> float:
    """SIGTERM `node`, then wait for its heartbeat that says draining (every node hears it then);
    when the signal was sent."""
    bus = await Bus.connect(",".join(urls), "test-drain")
    seen = asyncio.Event()
    try:
        await bus.subscribe(
            NODES_SUBJECT,
            "heartbeat",
            lambda d: seen.set() if d.get("node") == node.node_id and d.get("draining") else None,
        )
        await bus.nc.flush(timeout=5)
        node.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        await asyncio.wait_for(seen.wait(), timeout)
        return t0
    finally:
        await bus.close()


@pytest.mark.loopback
@pytest.mark.slow
@pytest.mark.usefixtures("aiortc_loopback")
@pytest.mark.timeout(150)
def test_a_draining_home_hands_its_rooms_to_open_nodes(cluster: MultiNode) -> None:
    """Rooms homed on A: 61.1 with a member at A and one bridged from C, 61.2 with a stream holding
    it at A, Discord server 62 with a member at A. SIGTERM A (drain grace 4 s): a new member of
    61.1 that reaches B is served by an open node (not A), hears both of A's members and they hear
    it, until the grace ends (a stream reaching A itself then is bridged to an open node); then it
    hears each of them leave once, and A exits. Coming back
    within A's heartbeat TTL, every one lands on an open node at once: the member of 61.1 (through
    C) joins the newcomer's node and both hear each other; 61.2's member is placed; the Discord
    member's RESUME finds no session (4006) and its IDENTIFY is READY, in the room of a new member.
    At the end no member, transport or remote member is left on the open nodes."""
    a, b, c = cluster.nodes
    urls = [discord_url(node) for node in cluster.nodes]

    async def run() -> None:
        await place(cluster.nats.urls, {"61.1": a.node_id, "61.2": a.node_id, "discord.62": a.node_id})
        at_home, bridged = NodeMember(a, 1, 61, 1), NodeMember(c, 2, 61, 1)
        lone = Holder(a, 4, 61, 2)
        async with aiohttp.ClientSession() as http:
            for m in (at_home, bridged):
                await m.join()
            await at_home.until_hears([2])
            await bridged.until_hears([1])
            assert (await lone.initialize())[0] == "initialized"
            talker = await Observer.join(http, urls[0], server_id="62", user_id=5, token=AUTH.mint(5))
            # Every room at A only (the bridged member's session runs there).
            seen = await wait_metrics(
                http, cluster.nodes, lambda s: (s[0]["fastsfu_rooms"], s[0]["fastsfu_room_members"]) == (3, 3)
            )
            assert [m["fastsfu_rooms"] for m in seen] == [3, 0, 0]
            t0 = await sigterm_until_draining(cluster.nats.urls, a)

            newcomer = NodeMember(b, 3, 61, 1)
            await newcomer.join()
            await newcomer.until_hears([1, 2], GRACE)
            await at_home.until_hears([3], GRACE)
            await bridged.until_hears([3], GRACE)
            late = Holder(a, 7, 61, 1)  # reaches the draining node itself: bridged to an open one
            assert (await late.initialize())[0] == "initialized"
            seen = await wait_metrics(http, cluster.nodes, lambda s: True)
            during = time.monotonic() - t0
            assert seen[0]['fastsfu_cluster_sessions_total{protocol="harmony",where="bridged"}'] == 1
            # The newcomer is served on B or C; A still serves its members (the grace is not over).
            assert seen[0]["fastsfu_room_members"] == 3
            assert sum(m["fastsfu_room_members"] for m in seen[1:]) == 1, seen
            assert seen[0]["fastsfu_cluster_remote_members"] == 1
            assert sum(m["fastsfu_cluster_remote_members"] for m in seen[1:]) == 2

            # The grace ends: A's sessions end, each leaves the newcomer's room once, A exits.
            await until(lambda: sorted(newcomer.events("user_left")) == [1, 2], GRACE + 5, "UserLeft")
            assert await asyncio.to_thread(a.proc.wait, 10) == 0
            stopped = time.monotonic() - t0
            for m in (at_home, bridged):
                await until(lambda m=m: m.reader is not None and m.reader.done(), 5, "stream end")
            await asyncio.wait_for(asyncio.shield(talker._reader), 5)
            assert talker.close_code == 4015

            # Back within A's heartbeat TTL (its last heartbeat says draining): open nodes only. A
            # releases the rooms that ended there if it can before it exits; as if it could not, the
            # rooms nobody joined during the grace still name it.
            await place(cluster.nats.urls, {"61.2": a.node_id, "discord.62": a.node_id})
            newcomer.frames[1] = 0
            joined = newcomer.events("user_joined")  # A's members, if they came after JoinedChannel
            assert set(joined) <= {1, 2} and len(set(joined)) == len(joined), joined
            back = NodeMember(c, 1, 61, 1)
            await back.join()
            await back.until_hears([3])
            await newcomer.until_hears([1])
            again = Holder(b, 4, 61, 2)
            answer, took = await again.initialize()
            assert answer == "initialized" and took < 2.5, (answer, took)
            ws = await http.ws_connect(urls[1])
            assert (await ws.receive_json(timeout=5))["op"] == 8
            gone, token = talker, talker.token
            resume = {"server_id": "62", "session_id": "obs-5", "token": token, "seq_ack": gone._seq}
            t1 = time.monotonic()
            await ws.send_json({"op": 7, "d": resume})
            closed = await ws.receive(timeout=10)
            assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 4006), closed
            assert time.monotonic() - t1 < 2.5
            t1 = time.monotonic()
            talker = await Observer.join(http, urls[1], server_id="62", user_id=5, token=AUTH.mint(5))
            assert time.monotonic() - t1 < 2.5
            listener = await Observer.join(http, urls[2], server_id="62", user_id=6, token=AUTH.mint(6))
            await talker.wait_op(11, 6, 5)
            await asyncio.sleep(0.5)  # a duplicate UserLeft would show by now
            assert sorted(newcomer.events("user_left")) == [1, 2]
            assert newcomer.events("user_joined")[len(joined) :] == [1], newcomer.events("user_joined")
            assert not back.events("user_left")
            print(f"drain: newcomer heard both {during:.2f} s after SIGTERM; A exited after {stopped:.2f} s")

            for m in (back, newcomer):
                await m.leave_cleanly()
            for m in (at_home, bridged):
                await m.drop()
            for h in (lone, late, again):
                await h.close()
            for o in (gone, talker, listener):
                await asyncio.wait_for(o.close(), 5)
            await wait_metrics(
                http,
                [b, c],
                lambda s: all(m[g] == 0 for m in s for g in (*GAUGES, "fastsfu_cluster_remote_members")),
            )

    asyncio.run(asyncio.wait_for(run(), 130))


def test_drain_grace_knob_layers_and_bounds(tmp_path: Path) -> None:
    """`drain_grace`: embedded 1 s < TOML < env < flag; negative is refused."""
    assert load_config(None, {}, {}).drain_grace == 1.0
    toml = tmp_path / "fastsfu.toml"
    toml.write_text("drain_grace = 20\n")
    assert load_config(str(toml), {}, {}).drain_grace == 20.0
    assert load_config(str(toml), {"FASTSFU_DRAIN_GRACE": "7.5"}, {}).drain_grace == 7.5
    assert load_config(str(toml), {"FASTSFU_DRAIN_GRACE": "7.5"}, {"drain_grace": "0"}).drain_grace == 0.0
    with pytest.raises(ConfigError, match="must be at least"):
        load_config(None, {"FASTSFU_DRAIN_GRACE": "-1"}, {})
