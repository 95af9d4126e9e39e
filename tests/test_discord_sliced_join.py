"""A Discord join into a big room made in slices (DiscordVoice.schedule), driven through the
gateway core in memory: the loop runs other work in between, each member hears of the joiner
once (op 11, 18, 20, 5 in that order) and the joiner of each member once, also when members go
while the join is under way."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from discord_helpers import AES
from test_discord_voice import AUTH, SERVER_ID

from fastsfu import Engine
from fastsfu.discord.gateway import Connection, Gateway, Send
from fastsfu.discord.opcodes import Op
from fastsfu.discord.voice import JOIN_SLICE_MEMBERS, DiscordMember, DiscordVoice
from fastsfu.harmony import VoiceRooms

pytestmark = [pytest.mark.timeout(60)]

ABOUT = (Op.CLIENTS_CONNECT, Op.CLIENT_DISCONNECT, Op.CLIENT_FLAGS, Op.CLIENT_PLATFORM, Op.SPEAKING)


def run(fn: Callable[[Gateway, DiscordVoice], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Engine() as engine:
            voice = DiscordVoice(VoiceRooms(engine), AUTH.authenticate)
            voice.schedule = asyncio.get_running_loop().call_soon
            await fn(Gateway(voice), voice)

    asyncio.run(asyncio.wait_for(main(), 40))


def start(gateway: Gateway, user: int) -> Connection:
    """IDENTIFY and SELECT_PROTOCOL (udp); a big room's join is then still under way."""
    conn = gateway.connect(8, time.monotonic())
    identify = {
        "server_id": SERVER_ID,
        "user_id": str(user),
        "session_id": f"s{user}",
        "token": AUTH.mint(user),
    }
    conn.receive(json.dumps({"op": 0, "d": identify}), time.monotonic())
    select = {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 40000 + user, "mode": AES}}
    conn.receive(json.dumps({"op": 1, "d": select}), time.monotonic())
    return conn


async def idle() -> None:
    for _ in range(200):  # bounded: every slice is one call_soon callback
        await asyncio.sleep(0)


def heard(conn: Connection) -> list[tuple[int, str]]:
    """(op, user) of what the connection was told about other users, in order."""
    out: list[tuple[int, str]] = []
    for o in conn.poll_output():
        if not isinstance(o, Send):
            continue
        m: dict[str, Any] = json.loads(o.text)
        if m["op"] == Op.CLIENTS_CONNECT:
            out += [(m["op"], u) for u in m["d"]["user_ids"]]
        elif m["op"] in ABOUT:
            out.append((m["op"], m["d"]["user_id"]))
    return out


def told_of(user: int) -> list[tuple[int, str]]:
    return [(op, str(user)) for op in (Op.CLIENTS_CONNECT, Op.CLIENT_FLAGS, Op.CLIENT_PLATFORM, Op.SPEAKING)]


async def fill(gateway: Gateway, n: int) -> list[Connection]:
    conns = []
    for user in range(1, n + 1):
        conns.append(start(gateway, user))
        await idle()
    for c in conns:
        c.poll_output()
    return conns


def member(voice: DiscordVoice, user: int) -> DiscordMember:
    (room,) = list(voice.rooms)
    m = room.members[user]
    assert isinstance(m, DiscordMember)
    return m


def test_a_join_into_a_big_room_yields_to_the_loop_and_tells_everyone_once() -> None:
    async def body(gateway: Gateway, voice: DiscordVoice) -> None:
        n = 2 * JOIN_SLICE_MEMBERS + 2
        conns = await fill(gateway, n)
        (room,) = list(voice.rooms)
        seen: list[bool] = []

        def tick() -> None:  # another task's callback, while the join is under way
            seen.append(999 in room.members)
            if len(seen) < 100:
                asyncio.get_running_loop().call_soon(tick)

        asyncio.get_running_loop().call_soon(tick)
        joiner = start(gateway, 999)
        assert 999 not in room.members and all(heard(c) == [] for c in conns)
        await idle()
        assert seen.count(False) >= n // JOIN_SLICE_MEMBERS, seen  # slices before the commit
        for c in conns:
            assert heard(c) == told_of(999)
        mine = heard(joiner)
        users = [str(u) for u in range(1, n + 1)]
        assert mine[:n] == [(Op.CLIENTS_CONNECT, u) for u in users]
        assert mine[n:] == [
            (op, u) for u in users for op in (Op.CLIENT_FLAGS, Op.CLIENT_PLATFORM, Op.SPEAKING)
        ]
        assert all(len(member(voice, u).consumers) == n for u in [*range(1, n + 1), 999])

    run(body)


def test_members_who_go_during_a_sliced_join_are_heard_of_consistently() -> None:
    async def body(gateway: Gateway, voice: DiscordVoice) -> None:
        n = 2 * JOIN_SLICE_MEMBERS + 2
        conns = await fill(gateway, n)
        joiner = start(gateway, 999)
        await asyncio.sleep(0)  # the first slice: consumers made ahead with the first members
        conns[0].transport_closed(time.monotonic(), 1000)  # user 1 goes before the commit
        for _ in range(3):
            await asyncio.sleep(0)  # the commit: the others are told; introductions under way
        assert 999 in voice.rooms.get(("discord", SERVER_ID)).members  # type: ignore[union-attr]
        conns[-1].transport_closed(time.monotonic(), 1000)  # user n goes during introductions
        await idle()
        assert heard(conns[0]) == []  # never heard of the joiner
        mine = heard(joiner)
        assert (Op.CLIENTS_CONNECT, "1") not in mine and all(u != "1" for _, u in mine)
        last = str(n)
        about_last = [op for op, u in mine if u == last]
        assert about_last[0] == Op.CLIENTS_CONNECT and about_last[-1] == Op.CLIENT_DISCONNECT
        assert about_last.count(Op.CLIENT_DISCONNECT) == 1  # nothing about it after its op 13
        for c in conns[1:-1]:
            assert heard(c) == [(Op.CLIENT_DISCONNECT, "1"), *told_of(999), (Op.CLIENT_DISCONNECT, last)]
        present = [u for u in range(2, n)] + [999]
        for u in present:
            assert len(member(voice, u).consumers) == len(present) - 1

    run(body)


def test_a_joiner_that_goes_before_its_commit_leaves_no_trace() -> None:
    async def body(gateway: Gateway, voice: DiscordVoice) -> None:
        n = 2 * JOIN_SLICE_MEMBERS + 2
        conns = await fill(gateway, n)
        joiner = start(gateway, 999)
        await asyncio.sleep(0)
        assert any(999 in member(voice, u).consumers for u in range(1, n + 1))  # made ahead
        joiner.transport_closed(time.monotonic(), 1000)
        await idle()
        assert all(heard(c) == [] for c in conns)
        assert all(len(member(voice, u).consumers) == n - 1 for u in range(1, n + 1))

    run(body)
