"""Spill through the real CLI (docs/cluster.md#spill): `fastsfu serve --workers 3` with a cap of 2
members per room and node, and a Harmony room of 6 aiortc gRPC clients. The room spreads 2/2/2 over
the three workers, joined by pipes; everyone hears everyone, member events come once each, a
leave closes the leaver's piped producers on every node, and a spill node whose members all left
drops out of the room's record and its pipes (checked in each worker's metrics and the bucket)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from cluster_helpers import MultiNode, NodeMember, multi_node, wait_metrics
from harmony_client import HarmonyMember
from test_server_ops import SECRET
from test_workers import Cluster, scrape

from fastsfu.cluster.bus import Bus
from fastsfu.cluster.placement import NodeLoad, RoomRecord
from fastsfu.cluster.registry import NODE_TTL, NODES_SUBJECT, ROOMS_BUCKET
from fastsfu.cluster.room_messages import RoomEvent, pipe_subject, room_subject
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback, pytest.mark.slow]
WORKERS, CAP, USERS = 3, 2, 6
Metrics = list[dict[str, float]]


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Each test's leftovers (aiortc and gRPC objects of its loop) are finalized at its end, not
    during a later test or pytest's own code."""
    yield
    gc.collect()


@pytest.fixture
def cluster3() -> Iterator[Cluster]:
    c = Cluster("--cluster-room-members-per-node", str(CAP), workers=WORKERS)
    try:
        c.ready()
        yield c
    finally:
        c.stop()


class Member(HarmonyMember):
    """A HarmonyMember that keeps its JoinedChannel (the members it was told of at join)."""

    async def read(self) -> object:
        msg = await super().read()
        if msg.WhichOneof("message") == "joined_channel":  # type: ignore[attr-defined]
            self.received.append(msg)  # type: ignore[arg-type]
        return msg

    def told_joined(self) -> Counter[int]:
        """Every user this member was told of: in JoinedChannel, then by UserJoined."""
        users: Counter[int] = Counter()
        for r in self.received:
            if r.WhichOneof("message") == "joined_channel":
                users.update(u.user_id for u in r.joined_channel.other_users)
            elif r.WhichOneof("message") == "user_joined":
                users[r.user_joined.data.user_id] += 1
        return users

    def told_left(self) -> Counter[int]:
        return Counter(r.user_left.user_id for r in self.received if r.WhichOneof("message") == "user_left")


async def metrics_when(
    http: aiohttp.ClientSession,
    cluster: Cluster,
    check: Callable[[Metrics], bool],
    timeout: float = 20,
    workers: list[int] | None = None,
) -> Metrics:
    """The metrics of every worker (or of `workers`) once `check` holds (or at the timeout: the
    caller's asserts say why)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [await scrape(http, cluster.metrics[i]) for i in workers or range(cluster.workers)]
        if check(seen) or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.2)


async def send_bad_messages(url: str) -> None:
    """On the room's subject: not JSON, an unknown version, a join without a member list; to each
    node's pipe subject: a request without an address. Each is counted by every node that hears it."""
    bus = await Bus.connect(url, "test")
    try:
        nodes: set[str] = set()
        await bus.subscribe(NODES_SUBJECT, "heartbeat", lambda d: nodes.add(d["node"]))
        deadline = time.monotonic() + 5
        while len(nodes) < WORKERS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        subject = room_subject("31.41")
        for data in (b"garbage", b'{"v": 9, "k": "bye", "node": "x"}', b'{"v": 1, "k": "join", "node": "x"}'):
            await bus.nc.publish(subject, data)
        for node in nodes:
            reply = await bus.nc.request(pipe_subject(node), b'{"v": 1, "room": "31.41"}', timeout=5)
            assert json.loads(reply.data)["ok"] is False
        await bus.nc.flush()
    finally:
        await bus.close()


def column(seen: Metrics, name: str) -> list[float]:
    return sorted(m[name] for m in seen)


def pipes(seen: Metrics) -> float:
    return sum(column(seen, "fastsfu_cluster_pipes"))


async def record(url: str, room: str) -> RoomRecord:
    """The room's record in the rooms bucket."""
    bus = await Bus.connect(url, "test-record")
    try:
        return RoomRecord.decode((await (await bus.bucket(ROOMS_BUCKET)).get(room)).value)
    finally:
        await bus.close()


async def a_bye_lost(http: aiohttp.ClientSession, cluster: Cluster, room: str) -> None:
    """A node whose bye was lost (its part of `room` ended while NATS was down, say), played by a
    bus client: it announces a member of the room, so the worker serving it opens a pipe from it;
    then it goes on heartbeating without the room, and never says bye. The worker must drop it and
    its pipe once a heartbeat heard 3 s after its last word on the room does not list the room."""
    bus = await Bus.connect(cluster.nats, "test-peer")
    serving = NodeLoad("test-peer", draining=True, served=(room,))  # draining: no room placed on it
    state = RoomEvent("state", "test-peer", ((99, "p-x"),), hello=True)

    async def beat(load: NodeLoad, event: RoomEvent | None, until: Callable[[Metrics], bool]) -> Metrics:
        """Heartbeat (and say `event`) every 0.5 s until the workers' metrics show `until`, 15 s at most."""
        deadline = time.monotonic() + 15
        while True:
            await bus.publish(NODES_SUBJECT, load.to_json())
            if event is not None:
                await bus.publish(room_subject(room), event.to_json())
            await asyncio.sleep(0.5)
            seen = [await scrape(http, cluster.metrics[i]) for i in range(cluster.workers)]
            if until(seen) or time.monotonic() > deadline:
                return seen

    try:
        seen = await beat(serving, state, lambda s: pipes(s) == 1)
        assert pipes(seen) == 1  # its inbound pipe (the pull itself finds no responder)
        seen = await beat(NodeLoad("test-peer", draining=True), None, lambda s: pipes(s) == 0)
        assert pipes(seen) == 0, (
            "a pipe from a node that left the room",
            column(seen, "fastsfu_cluster_pipes"),
        )
    finally:
        await bus.close()


async def spilled_room(http: aiohttp.ClientSession, cluster: Cluster) -> list[Member]:
    """USERS members joined one by one to one room once every worker sees the others; returned
    once each receives from every other (within 30 s: the asserts say who lacks whom)."""
    auth = TokenAuth(SECRET)
    seen = await metrics_when(
        http, cluster, lambda s: sum(m["fastsfu_cluster_nodes"] for m in s) == WORKERS**2
    )
    assert column(seen, "fastsfu_cluster_nodes") == [WORKERS] * WORKERS
    members = [Member(cluster.grpc, auth.mint(user), 31, 41) for user in range(1, USERS + 1)]
    users = list(range(1, USERS + 1))
    for member in members:
        await member.join()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(len(m.receivers) < USERS - 1 for m in members):
        await asyncio.sleep(0.1)
    for user, member in zip(users, members, strict=True):
        assert sorted(member.receivers) == [u for u in users if u != user], user
    return members


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("aiortc_loopback")
def test_a_room_over_the_cap_spills_to_every_worker_and_all_hear_all(cluster3: Cluster) -> None:

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            members = await spilled_room(http, cluster3)
            users = list(range(1, USERS + 1))
            # Everyone hears everyone: 5 decoded 20 ms frames from each of the 5 others.
            for member in members:
                for other in member.receivers:
                    assert await member.heard(other) == 5
            # 2 members on each worker; each presents the other 4 as remote members; a pipe each
            # way to each of the 2 other workers, carrying each producer once.
            full = await metrics_when(
                http,
                cluster3,
                lambda s: (
                    column(s, "fastsfu_cluster_remote_members") == [4] * WORKERS
                    and column(s, "fastsfu_cluster_pipe_producers") == [4] * WORKERS
                ),
            )
            assert column(full, "fastsfu_room_members") == [CAP] * WORKERS
            assert column(full, "fastsfu_cluster_remote_members") == [4] * WORKERS
            assert column(full, "fastsfu_cluster_pipes") == [4] * WORKERS
            assert column(full, "fastsfu_cluster_pipe_producers") == [4] * WORKERS
            assert column(full, "fastsfu_cluster_pipe_consumers") == [4] * WORKERS
            assert min(column(full, "fastsfu_cluster_pipe_packets_total")) > 0
            assert sum(column(full, "fastsfu_cluster_rooms_spilled_total")) == 2
            dropped = 'fastsfu_cluster_bus_dropped_total{subject_kind="room"}'
            piped = 'fastsfu_cluster_bus_dropped_total{subject_kind="pipe"}'
            assert sum(m[dropped] + m[piped] for m in full) == 0
            await send_bad_messages(cluster3.nats)
            bad = await metrics_when(http, cluster3, lambda s: column(s, dropped) == [3] * WORKERS)
            assert column(bad, dropped) == [3] * WORKERS  # on the room's subject
            assert column(bad, piped) == [1] * WORKERS  # the pipe request
            assert column(bad, "fastsfu_cluster_remote_members") == [4] * WORKERS  # nothing changed
            for user, member in zip(users, members, strict=True):
                assert member.told_joined() == Counter(u for u in users if u != user), user

            # One member leaves: each of the others is told once; its producer's pipe consumers
            # (one per other worker) and the piped producers on the other workers close.
            leaver, stayers = members[2], members[:2] + members[3:]
            await leaver.leave()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(m.told_left()[3] < 1 for m in stayers):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # a duplicate would come within this
            for member in stayers:
                assert member.told_left() == Counter({3: 1})
            after = await metrics_when(
                http,
                cluster3,
                lambda s: (
                    column(s, "fastsfu_cluster_remote_members") == [3, 3, 4]
                    and column(s, "fastsfu_cluster_pipe_producers") == [3, 3, 4]
                    and column(s, "fastsfu_cluster_pipe_consumers") == [2, 4, 4]
                ),
            )
            assert column(after, "fastsfu_room_members") == [1, 2, 2]
            assert column(after, "fastsfu_cluster_remote_members") == [3, 3, 4]
            assert column(after, "fastsfu_cluster_pipe_producers") == [3, 3, 4]
            assert column(after, "fastsfu_cluster_pipe_consumers") == [2, 4, 4]
            assert column(after, "fastsfu_cluster_pipes") == [4] * WORKERS

            # The other member of the leaver's node leaves: that spill node serves none of the room
            # now. It drops out of the room's record (so the record lists only nodes serving it)
            # and its pipes close, there and on the two others.
            spilled = await record(cluster3.nats, "31.41")
            assert len(spilled.spill) == 2
            await members[3].leave()
            stayers.remove(members[3])
            emptied = await metrics_when(
                http, cluster3, lambda s: column(s, "fastsfu_cluster_pipes") == [0, 2, 2]
            )
            for name in ("fastsfu_room_members", "fastsfu_cluster_pipes", "fastsfu_cluster_remote_members"):
                assert column(emptied, name) == [0, 2, 2], name
            deadline, shrunk = time.monotonic() + 10, RoomRecord(spilled.home, spilled.spill[1:])
            while (now := await record(cluster3.nats, "31.41")) != shrunk:
                assert time.monotonic() < deadline, (spilled, now)
                await asyncio.sleep(0.2)
            # A new member finds the home and the other spill node at their cap: the emptied node
            # is added again, at the end of the record, and everyone hears the newcomer.
            newcomer = Member(cluster3.grpc, TokenAuth(SECRET).mint(7), 31, 41)
            await newcomer.join()
            stayers.append(newcomer)
            assert await record(cluster3.nats, "31.41") == RoomRecord(spilled.home, spilled.spill[::-1])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (
                len(newcomer.receivers) < 4 or any(7 not in m.receivers for m in stayers[:-1])
            ):
                await asyncio.sleep(0.1)
            assert sorted(newcomer.receivers) == [1, 2, 5, 6]
            for member in stayers[:-1]:
                assert 7 in member.receivers, member.receivers
            back = await metrics_when(http, cluster3, lambda s: column(s, "fastsfu_cluster_pipes") == [4] * 3)
            assert column(back, "fastsfu_room_members") == [1, 2, 2]
            assert column(back, "fastsfu_cluster_pipes") == [4] * WORKERS
            assert sum(column(back, "fastsfu_cluster_rooms_spilled_total")) == 3

            for member in stayers:
                await member.leave()
            empty = await metrics_when(
                http,
                cluster3,
                lambda s: all(
                    m["fastsfu_rooms"] + m["fastsfu_cluster_pipes"] + m["fastsfu_transports"] == 0 for m in s
                ),
            )
            for name in ("fastsfu_rooms", "fastsfu_transports", "fastsfu_cluster_pipes"):
                assert column(empty, name) == [0] * WORKERS, name
            for name in ("fastsfu_cluster_remote_members", "fastsfu_cluster_pipe_producers"):
                assert column(empty, name) == [0] * WORKERS, name
            # Nobody heard a member twice or a leave of someone still there.
            for member in stayers:
                assert set(member.told_left()) <= set(users)
            # A node that stopped serving a room without a bye heard: its pipe closes all the same.
            lone = Member(cluster3.grpc, TokenAuth(SECRET).mint(8), 31, 42)
            await lone.join()
            await a_bye_lost(http, cluster3, "31.42")
            await lone.leave()

    asyncio.run(asyncio.wait_for(run(), 220))


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("aiortc_loopback")
def test_a_sigkilled_spill_worker_its_members_leave_once_and_its_pipes_close(cluster3: Cluster) -> None:
    """The room spread 2/2/2; a worker serving 2 of them (not the one the clients' connection
    reached) is SIGKILLed: within the heartbeat TTL the other two workers close their pipes to it
    and each of the 4 survivors is told once that each of its 2 members left; the survivors'
    workers then pipe only to each other."""
    grpc_streams = 'fastsfu_voice_streams_total{frontend="grpc"}'

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            members = await spilled_room(http, cluster3)
            seen = [await scrape(http, cluster3.metrics[i]) for i in range(WORKERS)]
            # gRPC shares one connection between the clients' equal channels: one edge worker.
            (edge,) = [i for i in range(WORKERS) if seen[i][grpc_streams] > 0]
            victim = next(i for i in range(WORKERS) if i != edge)
            assert seen[victim]["fastsfu_room_members"] == CAP
            survivors = [i for i in range(WORKERS) if i != victim]
            os.kill(cluster3.pids[victim], signal.SIGKILL)
            deadline = time.monotonic() + NODE_TTL + 10
            while time.monotonic() < deadline:
                ended = [m for m in members if m.reader is not None and m.reader.done()]
                alive = [m for m in members if m not in ended]
                if len(ended) == CAP and all(sum(m.told_left().values()) == CAP for m in alive):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # a duplicate would come within this
            gone = [u for u, m in enumerate(members, 1) if m in ended]
            assert len(gone) == CAP, gone
            for member in alive:
                assert member.told_left() == Counter(dict.fromkeys(gone, 1))
            after = await metrics_when(
                http,
                cluster3,
                lambda s: all(m["fastsfu_cluster_pipes"] == 2 for m in s),
                workers=survivors,
            )
            for m in after:
                assert m["fastsfu_room_members"] == CAP
                assert m["fastsfu_cluster_remote_members"] == CAP
                assert m["fastsfu_cluster_pipes"] == 2  # one each way to the other survivor
                assert m["fastsfu_cluster_pipe_producers"] == CAP
                assert m["fastsfu_cluster_pipe_consumers"] == CAP
            for member in alive:
                await member.leave()
            for member in ended:  # each receiver's decoder thread too: a live one holds the exit
                member.call.cancel()
                legs = [member.sender, *member.receivers.values(), member.producer, member.consumer]
                for leg in legs:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(leg.stop(), 5)
                await member.channel.close()

    asyncio.run(asyncio.wait_for(run(), 220))


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("aiortc_loopback")
def test_nodes_on_other_addresses_pipe_with_srtp(tmp_path: Path) -> None:
    """Three nodes on 127.0.0.2-4 (three hosts as far as addresses go) with a cap of 1: two members
    whose streams reach one node end up on two nodes, the pipes between those use SRTP
    (AEAD_AES_128_GCM), and the two members hear each other through them."""

    async def run(c: MultiNode) -> None:
        members = [NodeMember(c.nodes[0], user, 51, 61) for user in (1, 2)]
        for member in members:
            await member.join()
        await members[0].until_hears([2], 20)
        await members[1].until_hears([1], 20)
        async with aiohttp.ClientSession() as http:
            seen = await wait_metrics(
                http, c.nodes, lambda s: sum(m["fastsfu_cluster_remote_members"] for m in s) == 2
            )
            assert sorted(m["fastsfu_room_members"] for m in seen) == [0, 1, 1]
            assert sorted(m["fastsfu_cluster_pipes"] for m in seen) == [0, 2, 2]
            assert sorted(m["fastsfu_cluster_pipes_srtp"] for m in seen) == [0, 2, 2]
            assert sorted(m["fastsfu_cluster_pipe_packets_total"] for m in seen)[1] > 0
        for member in members:
            await member.leave_cleanly()

    with multi_node(tmp_path, ("--cluster-room-members-per-node", "1")) as c:
        asyncio.run(asyncio.wait_for(run(c), 150))
