"""Spill's pure parts (docs/cluster.md#spill): the room record and where a new member goes (no NATS),
the validation of room and pipe messages, and the registry's spill against a real nats-server
(nodes racing to spill one room agree on one spill node, by compare-and-set)."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_cluster_registry import Clock, nats_server, open_registry, until

from fastsfu.cluster.placement import (
    NodeLoad,
    RoomRecord,
    rehomed,
    serving_choice,
    with_spill,
    without_spill,
)
from fastsfu.cluster.registry import ROOMS_BUCKET, RoomFullError
from fastsfu.cluster.room_messages import (
    MessageError,
    PipeRequest,
    RoomEvent,
    parse_pipe_reply,
    parse_pipe_request,
    parse_room_event,
)

NODES = {
    "a": NodeLoad("a", members=2),
    "b": NodeLoad("b", members=7),
    "c": NodeLoad("c", members=1),
    "d": NodeLoad("d", members=0, draining=True),
    "e": NodeLoad("e", members=3),
}


def test_a_room_record_reads_the_old_form_and_its_own() -> None:
    assert RoomRecord.decode(b"n1") == RoomRecord("n1")  # written before spill existed
    assert RoomRecord("n1").encode() == b"n1"  # and still written so while the room never spilled
    grown = RoomRecord("n1", ("n2", "n3"))
    assert RoomRecord.decode(grown.encode()) == grown
    # A repeated node, or the home listed again, counts once.
    repeated = json.dumps({"v": 1, "home": "n1", "spill": ["n2", "n1", "n2", "n3"]}).encode()
    assert RoomRecord.decode(repeated) == grown
    for bad in (b'{"v": 2, "home": "n1"}', b'{"v": 1}', b'{"v": 1, "home": "n1", "spill": [1]}', b"{x"):
        with pytest.raises(ValueError):
            RoomRecord.decode(bad)


def test_a_new_member_goes_home_first_then_to_the_spill_nodes_in_order() -> None:
    record = RoomRecord("b", ("a", "e"))
    assert serving_choice(record, NODES, set()) == "b"  # the home, however loaded
    assert serving_choice(record, NODES, {"b"}) == "a"  # the home said it is full
    assert serving_choice(record, NODES, {"b", "a"}) == "e"
    assert serving_choice(record, NODES, {"b", "a", "e"}) is None  # all full: spill further
    gone = {k: v for k, v in NODES.items() if k != "a"}
    assert serving_choice(record, gone, {"b"}) == "e"  # a dead spill node is skipped


def test_a_room_spills_to_the_least_loaded_open_node_it_does_not_use() -> None:
    assert with_spill(RoomRecord("b"), NODES, {"b"}) == RoomRecord("b", ("c",))
    # c refused too (at its cap): the next least loaded; d is draining, never chosen.
    assert with_spill(RoomRecord("b", ("c",)), NODES, {"b", "c"}) == RoomRecord("b", ("c", "a"))
    # A dead spill node is dropped from the record as it grows.
    gone = {k: v for k, v in NODES.items() if k != "c"}
    assert with_spill(RoomRecord("b", ("c",)), gone, {"b"}) == RoomRecord("b", ("a",))
    assert with_spill(RoomRecord("b", ("c", "a", "e")), NODES, {"b", "c", "a", "e"}) is None


def test_an_emptied_spill_node_leaves_the_record_and_may_be_added_again() -> None:
    record = RoomRecord("b", ("a", "e"))
    assert without_spill(record, "a") == RoomRecord("b", ("e",))
    assert without_spill(RoomRecord("b", ("e",)), "e") == RoomRecord("b")  # stored as "b" again
    assert without_spill(record, "b") is None  # the home stays the home
    assert without_spill(record, "x") is None  # not in it: nothing to write
    # A new member finds the others full: the emptied node may be chosen again, at the end.
    three = {n: NODES[n] for n in ("a", "b", "e")}
    assert with_spill(RoomRecord("b", ("e",)), three, {"b", "e"}) == RoomRecord("b", ("e", "a"))


def test_a_room_whose_home_died_keeps_its_live_spill_nodes() -> None:
    gone = {k: v for k, v in NODES.items() if k != "b"}
    assert rehomed(RoomRecord("b", ("x", "e", "a")), gone) == RoomRecord("e", ("a",))
    assert rehomed(RoomRecord("b"), gone) == RoomRecord("c")  # no spill: the least loaded
    assert rehomed(None, NODES) == RoomRecord("c")
    assert rehomed(None, {"d": NODES["d"]}) is None


def test_room_messages_round_trip_and_bad_ones_are_refused_with_a_reason() -> None:
    for event in (
        RoomEvent("state", "n1", ((1, "p1"), (2, "p2")), hello=True),
        RoomEvent("join", "n1", ((3, "p3"),)),
        RoomEvent("leave", "n1", user=3),
        RoomEvent("bye", "n1"),
    ):
        assert parse_room_event(json.dumps(event.to_json()).encode()) == event
    bad = {
        b"not json": "malformed",
        b"[1]": "malformed",
        b'{"v": 2, "k": "bye", "node": "n1"}': "version",
        b'{"k": "bye", "node": "n1"}': "version",
        b'{"v": 1, "k": "dance", "node": "n1"}': "malformed",
        b'{"v": 1, "k": "bye"}': "malformed",
        b'{"v": 1, "k": "join", "node": "n1", "members": [[1, "a"], [2, "b"]]}': "malformed",
        b'{"v": 1, "k": "state", "node": "n1", "members": [[true, "a"]]}': "malformed",
        b'{"v": 1, "k": "state", "node": "n1", "members": [[-1, "a"]]}': "malformed",
        b'{"v": 1, "k": "state", "node": "n1", "members": [[1, ""]]}': "malformed",
        b'{"v": 1, "k": "leave", "node": "n1", "user": "3"}': "malformed",
    }
    for data, reason in bad.items():
        with pytest.raises(MessageError) as info:
            parse_room_event(data)
        assert info.value.reason == reason, data[:60]


def test_media_events_round_trip_and_bad_ones_are_refused() -> None:
    """A member's pause and its client's speaking (docs/cluster.md#remote-members): one entry in a
    media event, at most one per member in a state or a join; each entry a user id, a boolean and
    flags (or null: measured); anything else is refused, so the node counts it as a drop."""
    for event in (
        RoomEvent("media", "n1", media=((7, True, None),)),
        RoomEvent("media", "n1", media=((7, False, 5),)),
        RoomEvent("state", "n1", ((1, "p1"), (2, "p2")), media=((1, True, 0), (2, False, 1))),
        RoomEvent("join", "n1", ((3, "p3"),), media=((3, False, 0),)),
        RoomEvent("state", "n1", ((1, "p1"),)),  # no entries: everyone not paused, measured
    ):
        data = json.dumps(event.to_json()).encode()
        assert parse_room_event(data) == event
    assert "media" not in RoomEvent("state", "n1", ((1, "p1"),)).to_json()
    members = '"members": [[1, "p1"]]'
    bad = [
        '"k": "media"',  # no entry
        '"k": "media", "media": []',
        '"k": "media", "media": [[1, true, null], [2, true, null]]',  # one per event
        '"k": "media", "media": [[1, 1, null]]',  # paused must be a boolean
        '"k": "media", "media": [[1, true, true]]',  # flags: an integer or null
        '"k": "media", "media": [[1, true, -1]]',
        '"k": "media", "media": [[1, true, 2147483648]]',
        '"k": "media", "media": [[-1, true, null]]',
        '"k": "media", "media": [[1, true]]',
        '"k": "media", "media": {"1": [true, null]}',
        f'"k": "state", {members}, "media": [[1, true, null], [1, false, null]]',  # more than members
        f'"k": "join", {members}, "media": "paused"',
    ]
    for fields in bad:
        with pytest.raises(MessageError) as info:
            parse_room_event(f'{{"v": 1, "node": "n1", {fields}}}'.encode())
        assert info.value.reason == "malformed", fields


def test_pipe_requests_and_replies_are_validated() -> None:
    request = PipeRequest("5.1", "n1", "127.0.0.1", 40000, None, ("p1",))
    assert parse_pipe_request(json.dumps(request.to_json()).encode()) == request
    good = request.to_json()
    for change in ({"port": 0}, {"port": "1"}, {"srtp": "k"}, {"producers": "p1"}, {"room": ""}, {"v": 3}):
        with pytest.raises(MessageError):
            parse_pipe_request(json.dumps({**good, **change}).encode())
    reply = {"v": 1, "ok": True, "ip": "127.0.0.1", "port": 40001, "srtp": None, "consumers": {"p1": {}}}
    assert parse_pipe_reply(json.dumps(reply).encode()).consumers == {"p1": {}}
    with pytest.raises(MessageError, match="room not served"):
        parse_pipe_reply(b'{"v": 1, "ok": false, "why": "room not served here"}')
    for change in ({"port": 70000}, {"consumers": {"p1": 1}}, {"ip": None}):
        with pytest.raises(MessageError):
            parse_pipe_reply(json.dumps({**reply, **change}).encode())


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_nodes_racing_to_spill_a_full_room_agree_on_one_spill_node() -> None:
    """Three registries on one nats-server: the room's home is n1; when it refuses (full), all
    three ask at once and get the same spill node (the least loaded), written once; when that one
    is full too, the next; when every node refused, RoomFullError. Spill nodes whose part of the
    room ended leave the record (two at once: both, by compare-and-set), the home stays, and a node
    that left is added again when a new member needs it."""

    async def run() -> None:
        async for url in nats_server():
            clock = Clock()
            regs = [await open_registry(url, f"n{i}", clock) for i in range(4)]
            try:
                loads = [NodeLoad("n0", 9), NodeLoad("n1", 0), NodeLoad("n2", 3), NodeLoad("n3", 5)]
                for reg, load in zip(regs, loads, strict=True):
                    await reg.heartbeat(load)
                await asyncio.sleep(0.3)  # every registry heard every heartbeat
                assert await regs[0].serving("7.7", set()) == "n1"  # placed home: the least loaded
                spills = await asyncio.gather(*(reg.serving("7.7", {"n1"}) for reg in regs[1:]))
                assert spills == ["n2"] * 3
                assert sum(reg.spilled for reg in regs) == 1  # one compare-and-set won
                assert await regs[0].serving("7.7", {"n1", "n2"}) == "n3"
                kv = await regs[0].bus.bucket(ROOMS_BUCKET)
                assert RoomRecord.decode((await kv.get("7.7")).value) == RoomRecord("n1", ("n2", "n3"))
                assert await regs[1].serving("7.7", {"n1"}) == "n2"  # filled in order
                with pytest.raises(RoomFullError):
                    await regs[2].serving("7.7", {"n0", "n1", "n2", "n3"})

                # The room ends on n2 and n3 at once while its home (n1) still serves it: both
                # leave the record (compare-and-set: the one that lost the race reads and retries).
                await regs[1].heartbeat(NodeLoad("n1", 2, served=("7.7",)))
                await until(lambda: all("7.7" in r.nodes()["n1"].served for r in regs))  # noqa: B023
                assert await asyncio.gather(regs[2].release("7.7"), regs[3].release("7.7")) == [False] * 2
                assert RoomRecord.decode((await kv.get("7.7")).value) == RoomRecord("n1")
                assert not await regs[1].leave_spill("7.7")  # the home is no spill node
                assert await regs[3].serving("7.7", {"n1"}) == "n2"  # the least loaded, added again
                assert RoomRecord.decode((await kv.get("7.7")).value) == RoomRecord("n1", ("n2",))
            finally:
                for reg in regs:
                    await reg.bus.close()

    asyncio.run(asyncio.wait_for(run(), 50))


def test_deeply_nested_messages_are_refused_before_parsing() -> None:
    """Nesting is refused by counting brackets, never by a RecursionError inside the parser (which
    leaves the interpreter's recursion accounting unreliable for the rest of the process)."""
    deep = b"[" * 100_000
    with pytest.raises(MessageError) as info:
        parse_room_event(deep)
    assert info.value.reason == "malformed"
    with pytest.raises(ValueError, match="nested too deeply"):
        RoomRecord.decode(b'{"v": 1, "home": "n1", "spill": ' + deep + b"}")
    # Brackets inside strings do not count: a shallow message full of them is read.
    quoted = json.dumps({"v": 1, "home": "n1", "spill": ["[" * 100, "{" * 100]}).encode()
    assert RoomRecord.decode(quoted) == RoomRecord("n1", ("[" * 100, "{" * 100))
