"""Three fastsfu nodes on 127.0.0.2-4 over a 3-server NATS cluster (docs/cluster.md#faults-as-tested), with
aiortc gRPC clients on different nodes in rooms homed on different nodes (bridged sessions): a node
SIGKILLed, one NATS server killed, all of NATS stopped; what the survivors hear and lose, and that
the cluster's state converges afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
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
    scrape,
    wait_metrics,
)

from fastsfu.cluster.bus import Bus
from fastsfu.cluster.harmony_bridge import UNAVAILABLE
from fastsfu.cluster.registry import NODE_TTL, ROOMS_BUCKET

pytestmark = [pytest.mark.loopback, pytest.mark.slow, pytest.mark.usefixtures("aiortc_loopback")]
PPS = 50  # aiortc's audio track: one 20 ms frame per packet
GAUGES = ("fastsfu_room_members", "fastsfu_transports", "fastsfu_producers", "fastsfu_consumers")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[MultiNode]:
    with multi_node(tmp_path) as c:
        yield c


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


async def try_join(member: NodeMember, timeout: float) -> tuple[str, float]:
    """A join's Initialize: the error identifier it ends with (or "" once initialized), and how long
    it took; never longer than `timeout`."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(member.join(), timeout)
    except grpc.aio.AioRpcError as exc:
        return error_identifier(exc), time.monotonic() - t0
    return "", time.monotonic() - t0


@pytest.mark.timeout(120)
def test_sigkilled_node_members_leave_within_the_ttl_and_survivors_lose_nothing(cluster: MultiNode) -> None:
    """Rooms homed on A (127.0.0.2), B (.3) and C (.4), each with members whose streams reached other
    nodes (bridged). SIGKILL C: the members whose edge was C leave the rooms on A and B (UserLeft
    once, within the TTL); the member whose room was homed on C gets fastsfu.voice-cluster-unavailable
    and, joining again, is placed on a live node; the survivors' calls lose no packet."""
    a, b, c = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"1.1": a.node_id, "1.2": b.node_id, "1.3": c.node_id})
        room1 = [NodeMember(a, 11, 1, 1), NodeMember(b, 12, 1, 1), NodeMember(c, 13, 1, 1)]
        room2 = [NodeMember(b, 21, 1, 2), NodeMember(a, 22, 1, 2), NodeMember(c, 23, 1, 2)]
        orphan = NodeMember(a, 31, 1, 3)  # on A, its room homed on C
        async with aiohttp.ClientSession() as http:
            await join_all(room1 + room2)
            await orphan.join()
            seen = await wait_metrics(http, cluster.nodes, lambda s: s[2]["fastsfu_room_members"] == 1)
            # Each room at its home only: A has 1.1, B 1.2, C 1.3; the others' sessions bridged there.
            assert [m["fastsfu_room_members"] for m in seen] == [3, 3, 1]
            hosted = 'fastsfu_cluster_sessions_total{protocol="harmony",where="hosted"}'
            assert [m[hosted] for m in seen] == [2, 2, 1]
            survivors = [m for m in room1 + room2 if m.user not in (13, 23)]
            await asyncio.sleep(1.0)
            before = {m.user: await m.packets() for m in survivors}
            t0 = time.monotonic()
            c.kill()
            detect = {}  # seconds from the kill to each survivor's UserLeft (checked as it comes)
            for m in survivors:
                gone = 13 if m in room1 else 23
                await until(lambda m=m, gone=gone: gone in m.events("user_left"), NODE_TTL + 5, "UserLeft")
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
                gone = 13 if m in room1 else 23
                assert m.events("user_left") == [gone], (m.user, m.events("user_left"))
                for peer, (received, lost) in after[m.user].items():
                    if peer == gone:
                        continue
                    got = received - before[m.user][peer][0]
                    assert lost == before[m.user][peer][1], (m.user, peer, "lost packets")
                    assert got >= PPS * (window - 1.5), (m.user, peer, got, window)
            seen = await wait_metrics(
                http, [a, b], lambda s: [m["fastsfu_room_members"] for m in s] == [2, 2]
            )
            assert [m["fastsfu_cluster_nodes"] for m in seen] == [2, 2]
            # The orphan comes back: its room is placed on a live node.
            again = NodeMember(a, 31, 1, 3)
            await again.join()
            # C restarts: at once a member whose stream reaches it joins room 1.1 at its home (A),
            # which C has not heard yet when it starts.
            c2 = FastsfuNode(c.ip, cluster.nats.urls)
            cluster.nodes[2] = c2
            c2.wait_ready()
            back = NodeMember(c2, 14, 1, 1)
            await back.join()
            await back.until_hears([11, 12])
            print(f"UserLeft after SIGKILL: {detect} s; home lost seen after {home_lost:.2f} s")
            for m in [*survivors, again, back]:
                await m.leave_cleanly()
            for m in (room1[2], room2[2], orphan):
                await m.drop()
            await wait_metrics(http, [a, b, c2], lambda s: all(m[g] == 0 for m in s for g in GAUGES))

    asyncio.run(asyncio.wait_for(run(), 100))


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


@pytest.mark.timeout(120)
def test_one_nats_server_killed_is_not_visible(cluster: MultiNode) -> None:
    """The rooms bucket is replicated on the 3 servers. SIGKILL the server leading it: a new room
    placed at once still joins (its write waits for the new leader), calls keep flowing every
    second with no packet lost, the bridged session keeps working (a new member's UserJoined
    reaches it), and every node says connected and sees 3 nodes again."""
    a, b, c = cluster.nodes

    async def run() -> None:
        count, leader = await bucket_servers(cluster.nats.urls)
        assert count == 3
        await place(cluster.nats.urls, {"2.1": a.node_id})
        members = [NodeMember(a, 11, 2, 1), NodeMember(b, 12, 2, 1)]
        async with aiohttp.ClientSession() as http:
            await join_all(members)
            on_victim = [n.ip for n in cluster.nodes if cluster.nats.server_of(n.node_id) == leader]
            t0 = time.monotonic()
            cluster.nats.kill(leader)
            other = [NodeMember(b, 21, 2, 2), NodeMember(c, 22, 2, 2)]  # a new room, placed now
            fewest, placed = await asyncio.gather(flowing(members, 4.0), timed(join_all(other)))
            assert min(fewest) >= PPS // 2, fewest
            seen = await wait_metrics(http, cluster.nodes, nodes_see_all)
            reconnected = time.monotonic() - t0
            late = NodeMember(c, 13, 2, 1)
            await late.join()
            await late.until_hears([11, 12])
            for m in members:
                await m.until_hears([o for o in (11, 12, 13) if o != m.user])
                assert m.events("user_joined") == ([12, 13] if m.user == 11 else [13])
            seen = await wait_metrics(http, cluster.nodes, lambda s: sum(m["fastsfu_rooms"] for m in s) == 2)
            assert nodes_see_all(seen) and sum(m["fastsfu_room_members"] for m in seen) == 5
            print(
                f"NATS server n{leader} (the bucket's leader; nodes on it: {on_victim}) killed: a new "
                f"room joined in {placed:.2f} s, nodes connected and seeing 3 after {reconnected:.2f} s"
            )
            for m in [*members, late, *other]:
                await m.leave_cleanly()
            await wait_metrics(http, cluster.nodes, lambda s: all(m[g] == 0 for m in s for g in GAUGES))

    asyncio.run(asyncio.wait_for(run(), 100))


OUTAGE = 30.0  # seconds all of NATS is down (docs/cluster.md#faults-as-tested): three TTLs of silence


@pytest.mark.timeout(150)
def test_all_nats_down_calls_flow_joins_fail_clearly_then_state_converges(cluster: MultiNode) -> None:
    """A room homed on A with members whose streams are on A, B and C (two bridged). All three NATS
    servers stop for OUTAGE s: every receiver gets packets every second, none lost; the bridged
    sessions stay (silence while a node is cut off is no node's death); a new join ends with
    fastsfu.voice-cluster-unavailable within a bounded time; a member leaves meanwhile. NATS comes
    back (same stores): every node reconnects and sees 3 nodes, the member who left is gone
    everywhere (UserLeft once, no ghost), a new join works, and when all leave every node's rooms,
    members, transports, producers and consumers are back to 0."""
    a, b, c = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"3.1": a.node_id})
        members = [NodeMember(a, 11, 3, 1), NodeMember(b, 12, 3, 1), NodeMember(c, 13, 3, 1)]
        stay, goner = members[:2], members[2]
        async with aiohttp.ClientSession() as http:
            await join_all(members)
            t0 = time.monotonic()
            cluster.nats.stop()
            await wait_metrics(
                http, cluster.nodes, lambda s: all(m["fastsfu_cluster_connected"] == 0 for m in s)
            )
            cut = time.monotonic() - t0
            fewest = await flowing(members, 2.0)
            identifier, took = await try_join(NodeMember(b, 14, 3, 1), 15.0)
            assert identifier == UNAVAILABLE, identifier
            # A member's stream ends at its edge (C) while its media goes on: the edge's word to the
            # home cannot cross now (a DTLS close would: media goes straight to the home).
            goner.call.cancel()
            fewest += await flowing(stay, OUTAGE - (time.monotonic() - t0))
            assert min(fewest) >= PPS // 2, fewest
            seen = [await scrape(http, n.metrics) for n in cluster.nodes]
            assert [m["fastsfu_room_members"] for m in seen] == [3, 0, 0]  # none dropped, none told
            t1 = time.monotonic()
            cluster.nats.start()
            seen = await wait_metrics(http, cluster.nodes, nodes_see_all, timeout=30)
            back = time.monotonic() - t1
            for m in stay:
                await until(lambda m=m: 13 in m.events("user_left"), 15, "UserLeft after the outage")
            gone = time.monotonic() - t1
            seen = await wait_metrics(http, cluster.nodes, lambda s: s[0]["fastsfu_room_members"] == 2)
            assert [m["fastsfu_transports"] for m in seen] == [4, 0, 0]  # 2 members, 2 each, at the home
            assert [(m["fastsfu_producers"], m["fastsfu_consumers"]) for m in seen] == [
                (2, 2),
                (0, 0),
                (0, 0),
            ]
            again = NodeMember(c, 15, 3, 1)
            await again.join()
            await again.until_hears([11, 12])
            await asyncio.sleep(0.5)  # a duplicate UserLeft would come by now
            for m in stay:
                assert m.events("user_left") == [13], m.events("user_left")
                await m.until_hears([o for o in (11, 12, 15) if o != m.user])
            print(
                f"NATS down {OUTAGE:g} s: nodes saw it after {cut:.2f} s; a join failed in {took:.2f} s; "
                f"after restart nodes saw 3 after {back:.2f} s and the member who left during the "
                f"outage was gone after {gone:.2f} s; fewest packets per receiver per second {min(fewest)}"
            )
            for m in [*stay, again]:
                await m.leave_cleanly()
            await goner.drop()
            await wait_metrics(
                http, cluster.nodes, lambda s: all(m[g] == 0 for m in s for g in (*GAUGES, "fastsfu_rooms"))
            )

    asyncio.run(asyncio.wait_for(run(), 140))
