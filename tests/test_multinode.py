"""Three fastsfu nodes on 127.0.0.2-4 over a 3-server NATS cluster (docs/cluster.md#faults-as-tested), with
aiortc gRPC clients on different nodes in rooms homed on different nodes (bridged sessions) and, beside
them, a room spilled over all three nodes (a cap of 3 members per room and node; SRTP pipes between
the nodes' addresses): a node SIGKILLed, one NATS server killed, all of NATS stopped; what the
survivors hear and lose, and that the cluster's state converges afterwards."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
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
    records,
    scrape,
    wait_metrics,
)

from fastsfu.cluster.bus import Bus, BusError
from fastsfu.cluster.harmony_bridge import UNAVAILABLE
from fastsfu.cluster.placement import RoomRecord
from fastsfu.cluster.registry import NODE_TTL, ROOMS_BUCKET

pytestmark = [pytest.mark.loopback, pytest.mark.slow, pytest.mark.usefixtures("aiortc_loopback")]
PPS = 50  # aiortc's audio track: one 20 ms frame per packet
GAUGES = ("fastsfu_room_members", "fastsfu_transports", "fastsfu_producers", "fastsfu_consumers")
PIPE_GAUGES = (
    "fastsfu_cluster_pipes",
    "fastsfu_cluster_pipes_srtp",
    "fastsfu_cluster_remote_members",
    "fastsfu_cluster_pipe_producers",
    "fastsfu_cluster_pipe_consumers",
)
ALL_GAUGES = ("fastsfu_rooms", *GAUGES, *PIPE_GAUGES)
# Members of one room per node (docs/cluster.md#spill): a bridged room (3 members at most here) stays
# whole at its home; the spilled room's 7 are 3 on A, 3 on B (each then at the cap) and 1 on C.
CAP = 3
SPILLED = (3, 3, 1)
Layout = dict[str, tuple[int, int, int]]  # room -> its members served by A, B and C


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[MultiNode]:
    with multi_node(tmp_path, ("--cluster-room-members-per-node", str(CAP))) as c:
        yield c


async def spilled_room(cluster: MultiNode, guild: int, channel: int) -> list[NodeMember]:
    """The members (users 41-47) of a room recorded as homed on A and spilled to B, then C (the
    record two spills write): SPILLED[i] of them reach node i. Joined one after the other, each is
    served by the node its stream reached (the nodes before it in the record refuse it at their
    cap), so none is bridged and a node's fault is only its own members'."""
    a, b, c = cluster.nodes
    record = RoomRecord(a.node_id, (b.node_id, c.node_id))
    await place(cluster.nats.urls, {f"{guild}.{channel}": record})
    edges = [node for node, count in zip(cluster.nodes, SPILLED, strict=True) for _ in range(count)]
    return [NodeMember(node, 41 + i, guild, channel) for i, node in enumerate(edges)]


def gauges(layout: Layout) -> list[dict[str, float]]:
    """What each node's metrics say of rooms laid out so: per member 2 transports, its producer and
    a consumer of each other member of its room; per other node serving the room a pipe each way
    (SRTP: other addresses), carrying in the producers of that node's members (presented here as
    remote members: producers each member here consumes) and out ours (one pipe consumer each)."""
    out = []
    for i in range(3):
        g = dict.fromkeys(ALL_GAUGES, 0.0)
        for counts in layout.values():
            here, total = counts[i], sum(counts)
            if not here:
                continue
            others = sum(1 for j, n in enumerate(counts) if n and j != i)
            g["fastsfu_rooms"] += 1
            g["fastsfu_room_members"] += here
            g["fastsfu_transports"] += 2 * here + 2 * others
            g["fastsfu_producers"] += total
            g["fastsfu_consumers"] += here * (total - 1) + here * others
            g["fastsfu_cluster_pipes"] += 2 * others
            g["fastsfu_cluster_pipes_srtp"] += 2 * others
            g["fastsfu_cluster_remote_members"] += total - here
            g["fastsfu_cluster_pipe_producers"] += total - here
            g["fastsfu_cluster_pipe_consumers"] += here * others
        out.append(g)
    return out


async def until_laid_out(
    http: aiohttp.ClientSession,
    nodes: Sequence[FastsfuNode],
    layout: Layout,
    which: Sequence[int] = (0, 1, 2),
    timeout: float = 20.0,
) -> None:
    """Until the nodes (A, B, C or those `which` of them) report exactly the gauges of `layout`: no
    ghost member, no pipe, transport, producer or consumer more or less (AssertionError: both)."""
    expected = [gauges(layout)[i] for i in which]
    deadline = time.monotonic() + timeout
    while True:
        scraped = [await scrape(http, n.metrics) for n in nodes]
        seen = [{g: m.get(g, -1.0) for g in ALL_GAUGES} for m in scraped]
        if seen == expected:
            return
        assert time.monotonic() < deadline, f"\nseen:     {seen}\nexpected: {expected}"
        await asyncio.sleep(0.2)


def nodes_see_all(seen: list[dict[str, float]], count: int = 3) -> bool:
    return all(m["fastsfu_cluster_nodes"] == count and m["fastsfu_cluster_connected"] == 1 for m in seen)


async def join_all(members: list[NodeMember]) -> None:
    """Join one after the other (each join's UserJoined reaches the earlier ones), then until
    everyone hears everyone else in its room."""
    for m in members:
        await m.join()
    for m in members:
        others = [o.user for o in members if o is not m and o.channel_id == m.channel_id]
        await m.until_hears(others)


async def until(check: object, timeout: float, what: str) -> float:
    """Seconds until `check()` holds (AssertionError naming `what` after `timeout`)."""
    t0 = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def timed(op: Awaitable[object]) -> float:
    t0 = time.monotonic()
    await op
    return time.monotonic() - t0


async def until_recorded(urls: list[str], room: str, want: RoomRecord, timeout: float = 20.0) -> None:
    """Until the rooms bucket holds `want` for `room` (a read that fails, JetStream still electing
    its leaders after a restart, is made again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen: object = (await records(urls, [room]))[room]
        except BusError as exc:
            seen = exc
        if seen == want:
            return
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.5)


async def record_of(urls: list[str], room: str, timeout: float = 20.0) -> RoomRecord | None:
    """The room's record (a read that fails, JetStream electing a leader after a server died, is
    made again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await records(urls, [room]))[room]
        except BusError:
            assert time.monotonic() < deadline, f"the record of {room} cannot be read"
            await asyncio.sleep(0.5)


async def try_join(member: NodeMember, timeout: float) -> tuple[str, float]:
    """A join's Initialize: the error identifier it ends with (or "" once initialized), and how long
    it took; never longer than `timeout`."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(member.join(), timeout)
    except grpc.aio.AioRpcError as exc:
        return error_identifier(exc), time.monotonic() - t0
    return "", time.monotonic() - t0


@pytest.mark.timeout(150)
def test_sigkilled_node_members_leave_within_the_ttl_and_survivors_lose_nothing(cluster: MultiNode) -> None:
    """Rooms homed on A (127.0.0.2), B (.3) and C (.4), each with members whose streams reached other
    nodes (bridged), and a room spilled over A, B and C (3, 3 and 1 members, all hear all through
    the pipes). SIGKILL C: the members whose edge was C leave the rooms on A and B, and the spilled
    room's member on C leaves it on A and B (UserLeft once, within the TTL; A's and B's pipes to C
    close); the member whose room was homed on C gets fastsfu.voice-cluster-unavailable and, joining
    again, is placed on a live node; the survivors' calls lose no packet."""
    a, b, c = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"1.1": a.node_id, "1.2": b.node_id, "1.3": c.node_id})
        room1 = [NodeMember(a, 11, 1, 1), NodeMember(b, 12, 1, 1), NodeMember(c, 13, 1, 1)]
        room2 = [NodeMember(b, 21, 1, 2), NodeMember(a, 22, 1, 2), NodeMember(c, 23, 1, 2)]
        orphan = NodeMember(a, 31, 1, 3)  # on A, its room homed on C
        spilled = await spilled_room(cluster, 1, 4)
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(join_all(room1 + room2), join_all(spilled))
            await orphan.join()
            # Each bridged room at its home only: A has 1.1, B 1.2, C 1.3; the others' sessions
            # bridged there. The spilled room on all three, joined by a mesh of SRTP pipes.
            await until_laid_out(
                http, cluster.nodes, {"1.1": (3, 0, 0), "1.2": (0, 3, 0), "1.3": (0, 0, 1), "1.4": SPILLED}
            )
            seen = [await scrape(http, n.metrics) for n in cluster.nodes]
            hosted = 'fastsfu_cluster_sessions_total{protocol="harmony",where="hosted"}'
            assert [m[hosted] for m in seen] == [2, 2, 1]
            gone = {m.user: lost for room, lost in ((room1, 13), (room2, 23), (spilled, 47)) for m in room}
            survivors = [m for m in room1 + room2 + spilled if m.user not in (13, 23, 47)]
            await asyncio.sleep(1.0)
            before = {m.user: await m.packets() for m in survivors}
            t0 = time.monotonic()
            c.kill()
            detect = {}  # seconds from the kill to each survivor's UserLeft (checked as it comes)
            for m in survivors:
                await until(lambda m=m: gone[m.user] in m.events("user_left"), NODE_TTL + 5, "UserLeft")
                detect[m.user] = round(time.monotonic() - t0, 2)
            try:
                await asyncio.wait_for(orphan.read(), NODE_TTL + 5)
                raise AssertionError("the stream of a member whose home died did not end")
            except grpc.aio.AioRpcError as exc:
                assert error_identifier(exc) == UNAVAILABLE
                home_lost = time.monotonic() - t0
            await asyncio.sleep(1.0)  # a duplicate UserLeft, or a late loss, would show by now
            window = time.monotonic() - t0
            after = {m.user: await m.packets() for m in survivors}
            for m in survivors:
                assert m.events("user_left") == [gone[m.user]], (m.user, m.events("user_left"))
                for peer, (received, lost) in after[m.user].items():
                    if peer == gone[m.user]:
                        continue
                    got = received - before[m.user][peer][0]
                    assert lost == before[m.user][peer][1], (m.user, peer, "lost packets")
                    assert got >= PPS * (window - 1.5), (m.user, peer, got, window)
            # What C served is gone from A and B: its members, and their pipes to C.
            await until_laid_out(
                http, [a, b], {"1.1": (2, 0, 0), "1.2": (0, 2, 0), "1.4": (3, 3, 0)}, which=(0, 1)
            )
            seen = [await scrape(http, n.metrics) for n in (a, b)]
            assert [m["fastsfu_cluster_nodes"] for m in seen] == [2, 2]
            # The orphan comes back: its room is placed on a live node.
            again = NodeMember(a, 31, 1, 3)
            await again.join()
            # C restarts: at once a member whose stream reaches it joins room 1.1 at its home (A),
            # which C has not heard yet when it starts.
            c2 = FastsfuNode(c.ip, cluster.nats.urls, *cluster.node_args)
            cluster.nodes[2] = c2
            c2.wait_ready()
            back = NodeMember(c2, 14, 1, 1)
            await back.join()
            await back.until_hears([11, 12])
            print(f"UserLeft after SIGKILL: {detect} s; home lost seen after {home_lost:.2f} s")
            for m in [*survivors, again, back]:
                await m.leave_cleanly()
            for m in (room1[2], room2[2], orphan, spilled[-1]):
                await m.drop()
            await wait_metrics(http, [a, b, c2], lambda s: all(m[g] == 0 for m in s for g in ALL_GAUGES))

    asyncio.run(asyncio.wait_for(run(), 130))


async def bucket_servers(urls: list[str]) -> tuple[int, int]:
    """The rooms bucket's replicas, and the index of the server leading it (n0, n1, n2)."""
    bus = await Bus.connect(",".join(urls), "test-replicas")
    try:
        info = await bus.js.stream_info(f"KV_{ROOMS_BUCKET}")
        assert info.cluster is not None and info.cluster.leader is not None
        return int(info.config.num_replicas or 0), int(info.cluster.leader.removeprefix("n"))
    finally:
        await bus.close()


async def flowing(members: list[NodeMember], seconds: float, step: float = 1.0) -> list[int]:
    """Sample the receivers of `members`' streams (each from another of `members`) every `step`
    seconds for `seconds`: the packets each got in each step (none may be lost)."""
    speakers = {m.user for m in members}
    last = {m.user: await m.packets() for m in members}
    fewest = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(step)
        now = {m.user: await m.packets() for m in members}
        for user, peers in now.items():
            for peer, (received, lost) in peers.items():
                if peer in last[user] and peer in speakers:
                    fewest.append(received - last[user][peer][0])
                    assert lost == last[user][peer][1], (user, peer, "lost packets")
        last = now
    return fewest


@pytest.mark.timeout(150)
def test_one_nats_server_killed_is_not_visible(cluster: MultiNode) -> None:
    """The rooms bucket is replicated on the 3 servers. SIGKILL the server leading it: a new room
    placed at once still joins (its write waits for the new leader), calls keep flowing every
    second with no packet lost, in the bridged room and in the room spilled over the 3 nodes, the
    bridged session keeps working (a new member's UserJoined reaches it), the spilled room sees
    nothing (no member leaves or is announced again, the same pipes), and every node says
    connected and sees 3 nodes again."""
    a, b, c = cluster.nodes

    async def run() -> None:
        count, leader = await bucket_servers(cluster.nats.urls)
        assert count == 3
        await place(cluster.nats.urls, {"2.1": a.node_id})
        members = [NodeMember(a, 11, 2, 1), NodeMember(b, 12, 2, 1)]
        spilled = await spilled_room(cluster, 2, 4)
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(join_all(members), join_all(spilled))
            await until_laid_out(http, cluster.nodes, {"2.1": (2, 0, 0), "2.4": SPILLED})
            on_victim = [n.ip for n in cluster.nodes if cluster.nats.server_of(n.node_id) == leader]
            t0 = time.monotonic()
            cluster.nats.kill(leader)
            other = [NodeMember(b, 21, 2, 2), NodeMember(c, 22, 2, 2)]  # a new room, placed now
            fewest, placed = await asyncio.gather(flowing(members + spilled, 4.0), timed(join_all(other)))
            assert min(fewest) >= PPS // 2, fewest
            seen = await wait_metrics(http, cluster.nodes, nodes_see_all)
            reconnected = time.monotonic() - t0
            late = NodeMember(c, 13, 2, 1)
            await late.join()
            await late.until_hears([11, 12])
            for m in members:
                await m.until_hears([o for o in (11, 12, 13) if o != m.user])
                assert m.events("user_joined") == ([12, 13] if m.user == 11 else [13])
            for m in spilled:
                assert m.events("user_left") == [], (m.user, m.events("user_left"))
                assert max(Counter(m.events("user_joined")).values(), default=1) == 1, m.events("user_joined")
                assert sorted(m.receivers) == [o.user for o in spilled if o is not m], m.user
            home = await record_of(cluster.nats.urls, "2.2")
            assert home is not None and not home.spill
            x, y, z = (2 * (n.node_id == home.home) for n in cluster.nodes)  # its 2 members there
            await until_laid_out(http, cluster.nodes, {"2.1": (3, 0, 0), "2.2": (x, y, z), "2.4": SPILLED})
            seen = [await scrape(http, n.metrics) for n in cluster.nodes]
            assert nodes_see_all(seen)
            print(
                f"NATS server n{leader} (the bucket's leader; nodes on it: {on_victim}) killed: a new "
                f"room joined in {placed:.2f} s, nodes connected and seeing 3 after {reconnected:.2f} s"
            )
            for m in [*members, late, *other, *spilled]:
                await m.leave_cleanly()
            await wait_metrics(http, cluster.nodes, lambda s: all(m[g] == 0 for m in s for g in ALL_GAUGES))

    asyncio.run(asyncio.wait_for(run(), 130))


OUTAGE = 30.0  # seconds all of NATS is down (docs/cluster.md#faults-as-tested): three TTLs of silence


@pytest.mark.timeout(170)
def test_all_nats_down_calls_flow_joins_fail_clearly_then_state_converges(cluster: MultiNode) -> None:
    """A room homed on A with members whose streams are on A, B and C (two bridged), and a room
    spilled over A, B and C (3, 3 and 1 members). All three NATS servers stop for OUTAGE s: every
    receiver of both rooms gets packets every second, none lost (the spilled room's cross the
    pipes); the bridged sessions stay (silence while a node is cut off is no node's death); a new
    join ends with fastsfu.voice-cluster-unavailable within a bounded time; a member of each room
    leaves meanwhile (the spilled room's one on C, so C's part of it ends). NATS comes back (same
    stores): every node reconnects and sees 3 nodes, the members who left are gone everywhere
    (UserLeft once, no ghost member, no pipe to C left, C out of the room's record), a new join
    works, and when all leave every node's rooms, members, transports, producers, consumers, pipes
    and remote members are back to 0."""
    a, b, c = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"3.1": a.node_id})
        members = [NodeMember(a, 11, 3, 1), NodeMember(b, 12, 3, 1), NodeMember(c, 13, 3, 1)]
        stay, goner = members[:2], members[2]
        spilled = await spilled_room(cluster, 3, 4)
        stay_spilled, leaver = spilled[:-1], spilled[-1]
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(join_all(members), join_all(spilled))
            await until_laid_out(http, cluster.nodes, {"3.1": (3, 0, 0), "3.4": SPILLED})
            t0 = time.monotonic()
            cluster.nats.stop()
            await wait_metrics(
                http, cluster.nodes, lambda s: all(m["fastsfu_cluster_connected"] == 0 for m in s)
            )
            cut = time.monotonic() - t0
            fewest = await flowing(members + spilled, 2.0)
            identifier, took = await try_join(NodeMember(b, 14, 3, 1), 15.0)
            assert identifier == UNAVAILABLE, identifier
            # A member's stream ends at its edge (C) while its media goes on: the edge's word to the
            # home cannot cross now (a DTLS close would: media goes straight to the home).
            goner.call.cancel()
            # The spilled room's member on C leaves: C closes its part of the room (router, pipes);
            # its word to A and B cannot cross now.
            await leaver.leave_cleanly()
            fewest += await flowing(stay + stay_spilled, OUTAGE - (time.monotonic() - t0))
            assert min(fewest) >= PPS // 2, fewest
            seen = [await scrape(http, n.metrics) for n in cluster.nodes]
            assert [m["fastsfu_room_members"] for m in seen] == [6, 3, 0]  # none dropped, none told
            assert [m["fastsfu_cluster_remote_members"] for m in seen] == [4, 4, 0]
            t1 = time.monotonic()
            cluster.nats.start()
            seen = await wait_metrics(http, cluster.nodes, nodes_see_all, timeout=30)
            back = time.monotonic() - t1
            for m in stay:
                await until(lambda m=m: 13 in m.events("user_left"), 15, "UserLeft after the outage")
            gone = time.monotonic() - t1
            for m in stay_spilled:
                await until(lambda m=m: leaver.user in m.events("user_left"), 15, "UserLeft after the outage")
            gone_spilled = time.monotonic() - t1
            # 2 members at the home of 3.1; 3.4 on A and B only, piped to each other, none to C.
            await until_laid_out(http, cluster.nodes, {"3.1": (2, 0, 0), "3.4": (3, 3, 0)})
            # C serves none of the spilled room now: it leaves the room's record.
            await until_recorded(cluster.nats.urls, "3.4", RoomRecord(a.node_id, (b.node_id,)))
            again = NodeMember(c, 15, 3, 1)
            await again.join()
            await again.until_hears([11, 12])
            await asyncio.sleep(0.5)  # a duplicate UserLeft would come by now
            for m in stay:
                assert m.events("user_left") == [13], m.events("user_left")
                await m.until_hears([o for o in (11, 12, 15) if o != m.user])
            for m in stay_spilled:
                assert m.events("user_left") == [leaver.user], m.events("user_left")
            print(
                f"NATS down {OUTAGE:g} s: nodes saw it after {cut:.2f} s; a join failed in {took:.2f} s; "
                f"after restart nodes saw 3 after {back:.2f} s and the members who left during the "
                f"outage were gone after {gone:.2f} s (bridged) and {gone_spilled:.2f} s (spilled); "
                f"fewest packets per receiver per second {min(fewest)}"
            )
            for m in [*stay, again, *stay_spilled]:
                await m.leave_cleanly()
            await goner.drop()
            await wait_metrics(http, cluster.nodes, lambda s: all(m[g] == 0 for m in s for g in ALL_GAUGES))

    asyncio.run(asyncio.wait_for(run(), 160))
