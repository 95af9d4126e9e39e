"""Spill with Discord members (docs/cluster.md#spill) under `fastsfu serve --workers 2` with a low cap:
discord.py, djs and aiortc clients on both nodes of one spilled room, a full node passing bridged
opens on, and a producer paused on its node pausing its piped producers on the others."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_helpers import NodeMember, place
from discord_clients import (
    marker_index,
    opus_marker_frames,
    opus_tone_frames,
    start_djs_client,
    start_dpy_bot,
)
from discord_helpers import Client, Observer
from harmony_client import HarmonyMember
from test_server_ops import SECRET
from test_workers import scrape
from test_workers_discord import DiscordCluster, discord_ids, require_clients

from fastsfu.cluster.bus import Bus
from fastsfu.cluster.node import Node
from fastsfu.cluster.room_messages import room_subject
from fastsfu.discord.gateway import Gateway, GatewayConfig
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import GatewayEndpoint
from fastsfu.engine import Engine, Settings
from fastsfu.harmony.auth import TokenAuth
from fastsfu.harmony.session import VoiceRooms

pytestmark = [pytest.mark.loopback, pytest.mark.slow]
AUTH = TokenAuth(SECRET)
GUILD, CHANNEL, SERVER = 41, 42, "41"  # Discord server 41 is the Harmony channel (41, 42)
ROOM = "41.42"  # its key in the rooms bucket
H1, H2, DPY, DJS = 1, 2, 1001, 1002
Metrics = list[dict[str, float]]


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Each test's aiortc and gRPC leftovers are finalized at its end (as in test_spill.py)."""
    yield
    gc.collect()


def spill_cluster(tmp_path: Path, cap: int) -> Iterator[DiscordCluster]:
    c = DiscordCluster(tmp_path, "--cluster-room-members-per-node", str(cap), rooms='"41" = [41, 42]')
    try:
        c.ready()
        yield c
    finally:
        c.stop()
        with contextlib.suppress(AssertionError):
            c.wait_for(lambda: False, 1)  # the rest of the output, shown when a test fails
        print("".join(c.output[-200:]))


@pytest.fixture
def cap2(tmp_path: Path) -> Iterator[DiscordCluster]:
    yield from spill_cluster(tmp_path, 2)


@pytest.fixture
def cap1(tmp_path: Path) -> Iterator[DiscordCluster]:
    yield from spill_cluster(tmp_path, 1)


class Member(NodeMember):
    """A Harmony client (aiortc) in channel (41, 42) through the workers' shared gRPC port, which
    keeps its JoinedChannel (a member on a spill node may hear of the others only by UserJoined,
    as their node's members are presented there after its join)."""

    def __init__(self, port: int, user: int) -> None:
        HarmonyMember.__init__(self, port, AUTH.mint(user), GUILD, CHANNEL)
        self.user = user
        self.frames: Counter[int] = Counter()
        self._drains: list[asyncio.Task[None]] = []

    async def read(self) -> Any:
        msg = await super().read()
        if msg.WhichOneof("message") == "joined_channel":
            self.received.append(msg)
        return msg

    def told_joined(self) -> Counter[int]:
        """Every user this member was told of: in JoinedChannel, then by UserJoined."""
        users: Counter[int] = Counter(self.events("user_joined"))
        for r in self.received:
            if r.WhichOneof("message") == "joined_channel":
                users.update(u.user_id for u in r.joined_channel.other_users)
        return users


async def metrics_when(
    http: aiohttp.ClientSession,
    cluster: DiscordCluster,
    check: Callable[[Metrics], bool],
    timeout: float = 20,
) -> Metrics:
    """Both workers' metrics once `check` holds (or at the timeout: the caller's asserts say why)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
        if check(seen) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.2)


def column(seen: Metrics, name: str) -> list[float]:
    return [m[name] for m in seen]


def drained(seen: Metrics) -> bool:
    """No room, transport or pipe left on any worker."""
    return all(m["fastsfu_rooms"] + m["fastsfu_transports"] + m["fastsfu_cluster_pipes"] == 0 for m in seen)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def speaking_of(messages: list[dict[str, Any]], user: int) -> list[int]:
    """The `speaking` of every op 5 about `user`, in order."""
    return [m["d"]["speaking"] for m in messages if m["op"] == 5 and m["d"]["user_id"] == str(user)]


def one_talk_spurt(values: list[int]) -> bool:
    """Told once of each change of one talk spurt: [0, 1, 0], or [1, 0] when announced mid-spurt."""
    return values in ([0, 1, 0], [1, 0])


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("aiortc_loopback")
def test_discord_and_harmony_members_on_both_nodes_of_a_spilled_room(cap2: DiscordCluster) -> None:
    """A cap of 2 members per room and node: H1 (aiortc) and djs join first, at the room's home;
    H2 (aiortc) and the discord.py bot spill to the other worker. Everyone hears everyone (decoded
    frames, the djs frames byte for byte at the bot, the bot's numbered frames in order at djs);
    each Discord client gets CLIENTS_CONNECT once per member, op 5 about each Harmony member once,
    about the Discord member of the other node once per change of its client's speaking (relayed
    by its node: it is not measured, its client says it), and CLIENT_DISCONNECT once per leaver.
    When all have left, both workers have no room, transport or pipe left."""
    require_clients()
    cluster = cap2
    djs_frames = opus_tone_frames(400, 660.0)  # 8 s
    dpy_frames = opus_marker_frames(500)  # 10 s

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            seen = await metrics_when(http, cluster, lambda s: column(s, "fastsfu_cluster_nodes") == [2, 2])
            assert column(seen, "fastsfu_cluster_nodes") == [2, 2]
            h1, h2 = Member(cluster.grpc, H1), Member(cluster.grpc, H2)
            djs = bot = None
            try:
                await h1.join()
                djs = await start_djs_client(
                    cluster.endpoint,
                    **discord_ids(DJS),
                    frames=djs_frames,
                    receive_from=[H1, H2, DPY],
                    expect_frames={DPY: len(dpy_frames) - 5, H1: 25, H2: 25},
                    play_delay=5.0,
                    duration=90,
                    linger=1.5,
                    ready_timeout=20,
                    cafile=cluster.cert,
                    timeout=120,
                )
                await djs.wait_event("ready", 25)
                home = await metrics_when(
                    http, cluster, lambda s: sorted(column(s, "fastsfu_room_members")) == [0, 2]
                )
                assert sorted(column(home, "fastsfu_room_members")) == [0, 2]  # the home's cap
                await h2.join()
                bot = await start_dpy_bot(
                    cluster.endpoint,
                    **discord_ids(DPY),
                    frames=dpy_frames,
                    speaking=True,  # op 5 speaking 1 before its frames, 0 after
                    start_delay=2.0,
                    hold=120.0,  # until end_hold
                    cafile=cluster.cert,
                    timeout=180,
                )
                await bot.wait_event("connected", 25)
                await with_clients(http, h1, h2, djs, bot)
            finally:
                for client in (djs, bot):
                    if client is not None:
                        await client.aclose()
                for member in (h1, h2):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(member.drop(), 10)

    async def with_clients(http: aiohttp.ClientSession, h1: Member, h2: Member, djs: Any, bot: Any) -> None:
        users = {H1, H2, DPY, DJS}
        # Everyone hears everyone: each Harmony client decodes 20 ms frames of each of the others.
        for member in (h1, h2):
            await member.until_hears(sorted(users - {member.user}), 30)
        spread = await metrics_when(
            http,
            cluster,
            lambda s: (
                column(s, "fastsfu_cluster_remote_members") == [2, 2]
                and column(s, "fastsfu_cluster_pipe_producers") == [2, 2]
            ),
        )
        assert column(spread, "fastsfu_room_members") == [2, 2]  # 2 here, 2 on the other node
        assert column(spread, "fastsfu_cluster_remote_members") == [2, 2]
        assert column(spread, "fastsfu_cluster_pipes") == [2, 2]
        assert column(spread, "fastsfu_cluster_pipe_consumers") == [2, 2]

        # djs leaves first, once it has the bot's frames and played its own.
        result = await djs.result()
        await until(lambda: all(DJS in m.events("user_left") for m in (h1, h2)), 15, "UserLeft djs")
        await h1.leave_cleanly()
        await until(lambda: H1 in h2.events("user_left"), 15, "UserLeft H1")
        await asyncio.sleep(0.5)  # a duplicate would come within this
        await h2.leave_cleanly()
        await asyncio.sleep(1.0)  # the bot hears H2 leave
        bot.end_hold()
        dpy = await bot.result()

        assert h1.events("user_joined") == [DJS, H2, DPY] and h1.events("user_left") == [DJS]
        assert h2.told_joined() == Counter({H1: 1, DJS: 1, DPY: 1}) and h2.events("user_left") == [DJS, H1]

        # djs, at the home with H1: the bot's numbered frames in order (djs 0.19.2 garbles about
        # one packet in 65536, see test_workers_discord.py), the Harmony members' audio.
        assert result.ok, (result.errors, result.stderr[-3000:])
        got = [marker_index(f) for f in result.received_from(DPY)]
        start = next(i - k for k, i in enumerate(got) if i is not None)
        assert len(got) >= len(dpy_frames) - 5 and all(i in (None, start + k) for k, i in enumerate(got))
        assert sum(i is None for i in got) <= 2
        for user in (H1, H2):
            assert len(result.received_from(user)) >= 25, user
        assert result.ws_ops_received.count(11) == 3  # H1 at its join, then H2, then the bot
        djs_told = [{"op": 5, "d": d} for d in result.speaking]
        assert speaking_of(djs_told, H1) == [0] and speaking_of(djs_told, H2) == [0]
        assert one_talk_spurt(speaking_of(djs_told, DPY)), speaking_of(djs_told, DPY)

        # The bot, on the spill node with H2: djs's frames byte for byte, the Harmony members'.
        assert dpy.ok and dpy.frames_sent == len(dpy_frames), (dpy.error, dpy.stderr[-2000:])
        told = dpy.ws_received
        ssrcs = {d["user_id"]: d["ssrc"] for m in told if m["op"] == 5 for d in [m["d"]]}
        assert set(ssrcs) == {str(u) for u in users - {DPY}}, ssrcs
        from_djs = dpy.raw["received"][str(ssrcs[str(DJS)])]
        assert [base64.b64decode(f) for f in from_djs[: len(djs_frames)]] == djs_frames
        for user in (H1, H2):
            assert len(dpy.raw["received"].get(str(ssrcs[str(user)]), [])) > 50, user
        assert dpy.raw["receive_failures"] == 0
        connected = [u for m in told if m["op"] == 11 for u in m["d"]["user_ids"]]
        assert sorted(connected) == sorted(str(u) for u in users - {DPY}), connected
        assert speaking_of(told, H1) == [0] and speaking_of(told, H2) == [0]
        assert one_talk_spurt(speaking_of(told, DJS)), speaking_of(told, DJS)
        left = [m["d"]["user_id"] for m in told if m["op"] == 13]
        assert left == [str(DJS), str(H1), str(H2)], left

        empty = await metrics_when(http, cluster, drained)
        for name in ("fastsfu_rooms", "fastsfu_transports", "fastsfu_cluster_pipes"):
            assert column(empty, name) == [0, 0], name
        for name in ("fastsfu_cluster_remote_members", "fastsfu_cluster_pipe_producers"):
            assert column(empty, name) == [0, 0], name

    asyncio.run(asyncio.wait_for(run(), 280))


class LocalNode:
    """A node of the cluster in this process (the engine, rooms, Discord handler and `Node` of a
    worker, without listeners: it serves sessions bridged to it), so that the test can call the
    control API on its producers, e.g. `producer.pause()`."""

    NODE_ID = "test-local"

    def __init__(self, engine: Engine, nats: str, cap: int) -> None:
        self.rooms = VoiceRooms(engine)
        voice = DiscordVoice(self.rooms, AUTH.authenticate, {SERVER: (GUILD, CHANNEL)})
        self.gateway = Gateway(voice, GatewayConfig())
        host, port = engine.media_socket().local_address[:2]
        self.node = Node(
            self.NODE_ID, nats, self.rooms, f"{host}:{port}", GatewayEndpoint(self.gateway), cap, host
        )
        self.task = asyncio.create_task(self.node.run())

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.node.close()


BAD_MEDIA = (
    b'{"v": 1, "k": "media", "node": "x", "media": [[1, "yes", null]]}',
    b'{"v": 1, "k": "media", "node": "x", "media": [[1, true, null], [2, true, null]]}',
    b'{"v": 1, "k": "media", "node": "x", "media": [[1, true, -5]]}',
)


async def send_bad_media(url: str) -> None:
    """Media events that do not validate, on room (41, 42)'s subject (docs/cluster.md#remote-members)."""
    bus = await Bus.connect(url, "test-bad-media")
    try:
        for data in BAD_MEDIA:
            await bus.nc.publish(room_subject(ROOM), data)
        await bus.nc.flush()
    finally:
        await bus.close()


async def rtp_of(client: Client, into: list[tuple[int, int]]) -> None:
    """(SSRC, sequence number) of every RTP packet the Discord client's socket receives (the RTP
    header is in the clear in Discord's rtpsize modes)."""
    while True:
        with contextlib.suppress(TimeoutError):
            data = await client.recv(30)
            if len(data) >= 12 and data[0] >> 6 == 2:
                into.append((int.from_bytes(data[8:12], "big"), int.from_bytes(data[2:4], "big")))


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("aiortc_loopback")
def test_a_full_node_passes_opens_on_and_a_paused_producer_pauses_on_every_node(cap1: DiscordCluster) -> None:
    """Three nodes with a cap of 1: the two workers and a node in this process, the room's home.
    H1 (aiortc) is bridged to the home. H2's bridged open is answered `full` by the home and its
    edge goes on to a worker; a Discord client's IDENTIFY is answered `full` by the home too and
    lands on the other worker (each refusal counted in fastsfu_cluster_sessions_full_total). Both
    hear H1 through the pipes. H1's producer is paused on its node (the control API): the others
    get nothing while it is paused, and after the resume they receive again with no gap in the
    sequence numbers (the piped producers paused and resumed with it, so their consumers resynced
    as a local producer's do; without that, each receiver sees the pause as ~200 lost packets).
    Media events that do not validate are counted once by each node and change nothing."""
    cluster = cap1

    async def run() -> None:
        async with Engine(Settings()) as engine, aiohttp.ClientSession() as http:
            local = LocalNode(engine, cluster.nats, 1)
            try:
                await with_local(http, local)
            finally:
                await local.close()

    async def with_local(http: aiohttp.ClientSession, local: LocalNode) -> None:
        await asyncio.wait_for(local.node.connected.wait(), 30)
        seen = await metrics_when(http, cluster, lambda s: column(s, "fastsfu_cluster_nodes") == [3, 3])
        assert column(seen, "fastsfu_cluster_nodes") == [3, 3]
        await place([cluster.nats], {ROOM: LocalNode.NODE_ID})
        h1, h2 = Member(cluster.grpc, H1), Member(cluster.grpc, H2)
        observer = None
        reader = None
        try:
            await h1.join()
            room = local.rooms.get((GUILD, CHANNEL))
            assert room is not None and [m.user_id for m in room.local_members()] == [H1]
            host = local.node.host
            assert host is not None and host.hosted["harmony"] == 1
            await h2.join()  # the home is full: its edge goes on to a worker
            assert host.full["harmony"] == 1 and host.hosted["harmony"] == 1
            spread = await metrics_when(
                http, cluster, lambda s: sorted(column(s, "fastsfu_room_members")) == [0, 1]
            )
            assert sorted(column(spread, "fastsfu_room_members")) == [0, 1]
            observer = await Observer.join(
                http, cluster.url, server_id=SERVER, user_id=3, token=AUTH.mint(3), ssl=cluster.tls
            )
            assert host.full["discord"] == 1 and host.hosted["discord"] == 0
            spread = await metrics_when(http, cluster, lambda s: column(s, "fastsfu_room_members") == [1, 1])
            assert column(spread, "fastsfu_room_members") == [1, 1]  # one on each worker
            assert [m.user_id for m in room.local_members()] == [H1]
            packets: list[tuple[int, int]] = []
            reader = asyncio.create_task(rtp_of(observer.udp, packets))
            await observer.wait_op(5, H1, 15)
            (ssrc,) = {
                m["d"]["ssrc"] for _, m in observer.received if m["op"] == 5 and m["d"]["user_id"] == "1"
            }

            def from_h1() -> int:
                return sum(s == ssrc for s, _ in packets)

            await h2.until_hears([H1], 20)
            await until(lambda: h2.frames[H1] > 25 and from_h1() > 25, 20, "H1 heard on both workers")

            producer = room.members[H1].producer
            assert producer is not None
            producer.pause()
            await asyncio.sleep(1.0)  # what was on its way
            frames, count = h2.frames[H1], from_h1()
            await asyncio.sleep(3.0)
            assert (h2.frames[H1], from_h1()) == (frames, count), "received while paused"
            producer.resume()
            await until(
                lambda: h2.frames[H1] > frames + 50 and from_h1() > count + 50, 15, "nothing after the resume"
            )
            received, lost = (await h2.packets())[H1]
            assert lost <= 2, (received, lost)
            seqs = [seq for s, seq in packets if s == ssrc]
            jumps = Counter((b - a) % 65536 for a, b in zip(seqs, seqs[1:], strict=False))
            assert max(jumps) <= 2, jumps

            # Bad media events on the room's subject: each node counts each once, nothing changes.
            await send_bad_media(cluster.nats)
            dropped = 'fastsfu_cluster_bus_dropped_total{subject_kind="room"}'
            bad = await metrics_when(http, cluster, lambda s: column(s, dropped) == [len(BAD_MEDIA)] * 2)
            assert column(bad, dropped) == [len(BAD_MEDIA)] * 2
            assert local.node.bus is not None and local.node.bus.dropped["room"] == len(BAD_MEDIA)
            assert not producer.paused and column(bad, "fastsfu_cluster_remote_members") == [2, 2]
            frames = h2.frames[H1]
            await until(lambda: h2.frames[H1] > frames + 25, 10, "H1 no longer heard")

            await h1.leave_cleanly()
            await until(lambda: H1 in h2.events("user_left"), 15, "UserLeft H1")
            await observer.wait_op(13, H1, 15)
            await asyncio.sleep(0.5)  # a duplicate would come within this
            assert h2.events("user_left") == [H1]
            assert [m["d"]["user_id"] for _, m in observer.received if m["op"] == 13] == ["1"]
            await h2.leave_cleanly()
            reader.cancel()
            await observer.close()
            observer = None
            empty = await metrics_when(http, cluster, drained)
            for name in ("fastsfu_rooms", "fastsfu_transports", "fastsfu_cluster_pipes"):
                assert column(empty, name) == [0, 0], name
            await until(lambda: len(local.rooms) == 0, 10, "the home's room closed")
            assert not local.node.spill or not local.node.spill.pipes.open
        finally:
            if reader is not None:
                reader.cancel()
            if observer is not None:
                await observer.close()
            for member in (h1, h2):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(member.drop(), 10)

    asyncio.run(asyncio.wait_for(run(), 220))
