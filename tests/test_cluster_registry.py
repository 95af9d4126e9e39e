"""Placement (pure) and the registry against a real nats-server on loopback: heartbeats seen by every
node, a room placed exactly once however many nodes race for it (compare-and-set), the least-loaded
node chosen, a dead home replaced, and a home released only by its own node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsfu.cluster.bus import Bus
from fastsfu.cluster.placement import (
    NodeLoad,
    RoomRecord,
    choose_home,
    home_is_valid,
    rehomed,
    serving_choice,
    with_spill,
)
from fastsfu.cluster.registry import NODE_TTL, Registry
from fastsfu.server.supervisor import STORE_OWNER, STORE_PREFIX, EmbeddedNats, sweep_stale_stores

pytestmark = [pytest.mark.loopback]


def test_choose_home_is_the_least_loaded_open_node() -> None:
    nodes = {
        "a": NodeLoad("a", members=5, rooms=1),
        "b": NodeLoad("b", members=2, rooms=3),
        "c": NodeLoad("c", members=0, rooms=0, draining=True),
        "d": NodeLoad("d", members=2, rooms=1),
    }
    assert choose_home(nodes) == "d"  # c is empty but draining; b and d tie on members, d has fewer rooms
    assert choose_home({"x": NodeLoad("x", 1), "w": NodeLoad("w", 1)}) == "w"  # the same pick everywhere
    assert choose_home({"c": nodes["c"]}) is None
    assert choose_home({}) is None


def test_a_draining_node_is_no_home_or_spill_node_for_new_sessions() -> None:
    """A draining home keeps its sessions but not its rooms (docs/cluster.md#workers): the next
    session of a room homed there places it again, on its first open spill node or the least-loaded
    open node; a draining spill node gets no new member and is dropped when the room spills."""
    nodes = {
        "a": NodeLoad("a", members=9, draining=True),
        "b": NodeLoad("b", members=3),
        "c": NodeLoad("c", members=1),
        "d": NodeLoad("d", members=0, draining=True),
    }
    assert [home_is_valid(n, nodes) for n in ("a", "b", "d", "gone")] == [False, True, False, False]
    assert rehomed(RoomRecord("a"), nodes) == RoomRecord("c")
    assert rehomed(RoomRecord("a", ("d", "b", "c")), nodes) == RoomRecord("b", ("c",))
    assert serving_choice(RoomRecord("a", ("d", "b")), nodes, set()) == "b"
    assert serving_choice(RoomRecord("b", ("d", "c")), nodes, {"b"}) == "c"
    assert serving_choice(RoomRecord("b", ("d",)), nodes, {"b"}) is None
    assert with_spill(RoomRecord("b", ("d",)), nodes, {"b"}) == RoomRecord("b", ("c",))
    # Every live node drains: no node takes the room.
    assert rehomed(RoomRecord("a"), {n: nodes[n] for n in "ad"}) is None


def test_heartbeats_of_another_version_or_bad_load_are_refused() -> None:
    good = NodeLoad("n", 3, 1, False, "127.0.0.1:5000", ("5.1", "5.2"))
    assert NodeLoad.from_json(good.to_json()) == good
    bad_rooms = {**good.to_json(), "served": [1]}
    for bad in ({**good.to_json(), "v": 2}, {"v": 1}, {**good.to_json(), "members": -1}, bad_rooms, [1], "x"):
        with pytest.raises(ValueError):
            NodeLoad.from_json(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def nats_server() -> AsyncIterator[str]:
    server = EmbeddedNats()
    try:
        yield await server.start()
    finally:
        await server.stop()


async def open_registry(url: str, node: str, clock: Clock) -> Registry:
    registry = Registry(await Bus.connect(url, node), node, clock)
    await registry.open()
    return registry


async def until(check: object, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_nodes_race_to_place_rooms_and_exactly_one_wins_each() -> None:
    async def run() -> None:
        async for url in nats_server():
            clock = Clock()
            regs = [await open_registry(url, f"n{i}", clock) for i in range(3)]
            try:
                loads = [NodeLoad("n0", 4), NodeLoad("n1", 1), NodeLoad("n2", 9)]
                for reg, load in zip(regs, loads, strict=True):
                    await reg.heartbeat(load)
                await until(lambda: all(len(r.nodes()) == 3 for r in regs))  # noqa: B023
                # 20 rooms, each asked for by all three nodes at once.
                rooms = [f"g5.c{i}" for i in range(20)]
                results = await asyncio.gather(*(r.home(room) for room in rooms for r in regs))
                for i, room in enumerate(rooms):
                    answers = results[i * 3 : i * 3 + 3]
                    assert {a.home for a in answers} == {"n1"}, (room, answers)  # the least loaded
                    assert sum(a.created for a in answers) == 1, (room, answers)  # placed once
                assert all(r.bus.failures == 0 for r in regs)
                # The home goes away (no heartbeat within the TTL): the next ask places it again.
                clock.now += NODE_TTL + 1
                await regs[0].heartbeat(NodeLoad("n0", 4))
                await regs[2].heartbeat(NodeLoad("n2", 9))
                await until(lambda: set(regs[0].nodes()) == {"n0", "n2"})  # noqa: B023
                await until(lambda: set(regs[2].nodes()) == {"n0", "n2"})  # noqa: B023
                again = await asyncio.gather(regs[0].home("g5.c0"), regs[2].home("g5.c0"))
                assert {a.home for a in again} == {"n0"} and sum(a.created for a in again) == 1
                # A room ended on one node is released only if no other node serves it.
                await regs[2].heartbeat(NodeLoad("n2", 9, served=("g5.c0",)))
                await until(lambda: regs[0].nodes()["n2"].served == ("g5.c0",))  # noqa: B023
                assert not await regs[0].release("g5.c0")
                await regs[2].heartbeat(NodeLoad("n2", 9))
                await until(lambda: regs[0].nodes()["n2"].served == ())  # noqa: B023
                assert await regs[0].release("g5.c0")
                assert (await regs[2].home("g5.c0")).created  # then it is placed anew
            finally:
                for r in regs:
                    await r.bus.close()

    asyncio.run(asyncio.wait_for(run(), 50))


@pytest.mark.timeout(60)
def test_a_subscription_hears_what_another_node_publishes_right_after_it() -> None:
    """Bus.subscribe returns once the server has the interest: nats-py's flush() alone could come
    back before the queued SUB reached the server, and a heartbeat another node sent then was lost
    to the new subscriber for good (about one attempt in eight here)."""

    async def run() -> None:
        async for url in nats_server():
            listener, speaker = await Bus.connect(url, "listener"), await Bus.connect(url, "speaker")
            try:
                for attempt in range(40):
                    heard: list[object] = []
                    subject = f"test.race.{attempt}"
                    await listener.subscribe(subject, "test", heard.append)
                    await speaker.publish(subject, {"v": 1, "attempt": attempt})
                    await until(lambda: heard, timeout=2.0)  # noqa: B023
                    assert heard == [{"v": 1, "attempt": attempt}]
            finally:
                await listener.close()
                await speaker.close()

    asyncio.run(asyncio.wait_for(run(), 50))


@pytest.mark.timeout(60)
def test_draining_nodes_get_no_new_rooms_and_a_nats_outage_is_a_clear_error() -> None:
    from fastsfu.cluster.bus import BusError

    async def run() -> None:
        server = EmbeddedNats()
        url = await server.start()
        try:
            clock = Clock()
            a, b = [await open_registry(url, n, clock) for n in ("a", "b")]
            try:
                await a.heartbeat(NodeLoad("a", 0, draining=True))
                await b.heartbeat(NodeLoad("b", 50))
                await until(lambda: len(a.nodes()) == 2)
                assert (await a.home("r1")).home == "b"
                # b drains, a opens: r1's next session places it on a (once, whoever asks).
                await a.heartbeat(NodeLoad("a", 0))
                await b.heartbeat(NodeLoad("b", 50, draining=True))
                await until(lambda: a.nodes()["b"].draining and not b.nodes()["a"].draining)
                moved = await asyncio.gather(a.home("r1"), b.home("r1"))
                assert {p.home for p in moved} == {"a"} and sum(p.created for p in moved) == 1
                assert await a.lookup("r1") == "a"
                # Every node drains: no node takes a room, not even one homed on a live node.
                await a.heartbeat(NodeLoad("a", 0, draining=True))
                await until(lambda: b.nodes()["a"].draining)
                for room in ("r1", "r2"):
                    with pytest.raises(BusError, match="no node takes new rooms"):
                        await b.home(room)
                assert await b.lookup("r1") == "a"  # its members are still there
                # NATS goes away: placement is a clear, counted error within the request timeout.
                await server.stop()
                t0 = asyncio.get_running_loop().time()
                with pytest.raises(BusError):
                    await a.home("r1")
                assert asyncio.get_running_loop().time() - t0 < 5 and a.bus.failures >= 1
            finally:
                await a.bus.close()
                await b.bus.close()
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(run(), 50))


KILLED_SUPERVISOR = """
import asyncio, sys
from fastsfu.server.supervisor import EmbeddedNats

async def main() -> None:
    server = EmbeddedNats()  # held: its TemporaryDirectory is removed when collected
    await server.start()
    print("started", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def stores_of(pid: int) -> list[Path]:
    return [
        p
        for p in Path(tempfile.gettempdir()).glob(STORE_PREFIX + "*")
        if (p / STORE_OWNER).is_file() and (p / STORE_OWNER).read_text() == str(pid)
    ]


def test_a_killed_supervisors_nats_store_is_removed_by_the_next_start() -> None:
    """SIGKILL leaves the embedded nats-server's store behind (no `stop()` runs); the next
    start on the host removes it, and never a store whose owner still runs."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_SUPERVISOR], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
        assert len(stores_of(child.pid)) == 1
    finally:
        child.kill()
        child.wait(10)
    left = stores_of(child.pid)
    assert len(left) == 1  # the crash left it

    async def run() -> None:
        async for _ in nats_server():
            assert not left[0].exists()
            assert len(stores_of(os.getpid())) == 1  # its own, alive: kept

    asyncio.run(asyncio.wait_for(run(), 30))
    assert stores_of(os.getpid()) == []  # removed at stop


def test_the_sweep_keeps_stores_without_an_owner_file_or_with_a_live_owner(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    for name, owner in (("dead", gone.stdout.strip()), ("live", str(os.getpid())), ("junk", "x")):
        (tmp_path / (STORE_PREFIX + name)).mkdir()
        (tmp_path / (STORE_PREFIX + name) / STORE_OWNER).write_text(owner)
    (tmp_path / (STORE_PREFIX + "unowned")).mkdir()
    assert sweep_stale_stores(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        STORE_PREFIX + n for n in ("junk", "live", "unowned")
    ]
