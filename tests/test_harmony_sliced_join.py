"""A Harmony join into a big room made in slices (VoiceRooms.schedule): the event loop runs other
work in between, and every member still hears of every other exactly once, in order, also when
members come and go while a join is under way (docs/harmony.md#session-flow)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from test_harmony_session import CHANNEL, CLIENT_CAPS, GUILD, chromium_producer, join, messages

from fastsfu import Engine
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms, VoiceSession
from fastsfu.harmony.session import JOIN_SLICE_MEMBERS

Req = join.__globals__["Req"]

pytestmark = [pytest.mark.timeout(60)]


def run(fn: Callable[[VoiceRooms], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            rooms.schedule = asyncio.get_running_loop().call_soon
            await fn(rooms)

    asyncio.run(asyncio.wait_for(main(), 30))


def start_join(rooms: VoiceRooms, user: int) -> VoiceSession:
    """The three requests of a join; a big room's join is then still under way."""
    s = rooms.open_session(user)
    s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
    caps = json.dumps(CLIENT_CAPS)
    s.handle(Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)))
    dtls = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
    s.handle(
        Req(
            join_channel=Req.JoinChannel(
                rtp_paramaters=json.dumps(chromium_producer(1000 + user)),
                producer_dtls_paramaters=dtls,
                consumer_dtls_paramaters=dtls,
            )
        )
    )
    return s


async def settle(*sessions: VoiceSession) -> None:
    """Let the loop run until none of `sessions` is still joining (bounded)."""
    for _ in range(1000):
        if all(s.state != "joining" for s in sessions):
            return
        await asyncio.sleep(0)
    raise AssertionError("a sliced join did not finish")


async def fill(rooms: VoiceRooms, n: int) -> list[VoiceSession]:
    members = []
    for user in range(1, n + 1):
        s = start_join(rooms, user)
        await settle(s)
        members.append(s)
    for s in members:
        messages(s)  # what filling the room said
    return members


def heard(s: VoiceSession) -> list[tuple[str, int]]:
    """What a session was told about others, in order: joined_channel's list, then events."""
    out: list[tuple[str, int]] = []
    for m in messages(s):
        kind = m.WhichOneof("message")
        if kind == "joined_channel":
            out += [("joined", o.user_id) for o in m.joined_channel.other_users]
        elif kind == "user_joined":
            out.append(("joined", m.user_joined.data.user_id))
        elif kind == "user_left":
            out.append(("left", m.user_left.user_id))
    return out


def test_a_join_into_a_big_room_yields_to_the_loop_and_tells_each_member_once() -> None:
    async def body(rooms: VoiceRooms) -> None:
        n = 3 * JOIN_SLICE_MEMBERS + 2
        members = await fill(rooms, n)
        states: list[str] = []
        joiner: VoiceSession | None = None

        def tick() -> None:  # another task's callback: it runs while the join is under way
            states.append(joiner.state if joiner is not None else "-")
            if joiner is None or joiner.state == "joining":
                asyncio.get_running_loop().call_soon(tick)

        asyncio.get_running_loop().call_soon(tick)
        joiner = start_join(rooms, 999)
        assert joiner.state == "joining" and messages(joiner)[-1].WhichOneof("message") != "joined_channel"
        assert [heard(m) for m in members] == [[] for _ in members]  # nobody told anything yet
        await settle(joiner)
        await asyncio.sleep(0)
        # Slices of JOIN_SLICE_MEMBERS members, then the commit: the ticker ran in between.
        assert states.count("joining") >= n // JOIN_SLICE_MEMBERS, states
        assert heard(joiner) == [("joined", m.user_id) for m in members]
        for m in members:
            assert heard(m) == [("joined", 999)]
        assert len(joiner.consumers) == n and all(len(m.consumers) == n for m in members)
        assert joiner._premade == {} and all(m._premade == {} for m in members)

    run(body)


def test_members_who_leave_or_join_during_a_sliced_join_are_heard_of_exactly_once() -> None:
    async def body(rooms: VoiceRooms) -> None:
        members = await fill(rooms, 2 * JOIN_SLICE_MEMBERS + 1)
        x = start_join(rooms, 100)
        await asyncio.sleep(0)  # X's first slice: consumers made ahead with the first members
        gone = members.pop(0)
        gone.close()  # left before X's commit: X never hears of it, it never hears of X
        y = start_join(rooms, 200)  # a second join under way at the same time
        await settle(x, y)
        final = [*members, x, y]
        assert rooms.rooms[(GUILD, CHANNEL)].members.keys() == {s.user_id for s in final}
        assert heard(gone) == []
        for s in members:
            assert heard(s) == [("left", gone.user_id), ("joined", 100), ("joined", 200)]
        x_heard, y_heard = heard(x), heard(y)
        assert x_heard == [("joined", s.user_id) for s in members] + [("joined", 200)]
        assert y_heard == [("joined", s.user_id) for s in members] + [("joined", 100)]
        # Each member consumes each other member once; nothing made ahead is left over.
        for s in final:
            producers = sorted(c.producer_id for c in s.consumers.values())
            assert producers == sorted(o.producer.id for o in final if o is not s and o.producer)
            assert s._premade == {}

    run(body)


def test_a_joiner_that_goes_during_its_sliced_join_leaves_no_trace() -> None:
    async def body(rooms: VoiceRooms) -> None:
        members = await fill(rooms, 2 * JOIN_SLICE_MEMBERS + 1)
        x = start_join(rooms, 100)
        await asyncio.sleep(0)
        assert any(m._premade for m in members)  # made ahead, not announced
        x.close()
        for _ in range(10):
            await asyncio.sleep(0)
        assert all(heard(m) == [] for m in members)
        assert all(m._premade == {} and len(m.consumers) == len(members) - 1 for m in members)
        assert rooms.rooms[(GUILD, CHANNEL)].members.keys() == {m.user_id for m in members}

    run(body)


def test_a_small_room_still_joins_in_one_step() -> None:
    async def body(rooms: VoiceRooms) -> None:
        for user in range(1, JOIN_SLICE_MEMBERS + 2):
            s, joined = join(rooms, user)  # asserts JoinedChannel at once
            assert s.state == "joined" and len(joined.joined_channel.other_users) == user - 1

    run(body)
