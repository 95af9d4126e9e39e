"""The protocol-neutral rooms layer (fastsfu.rooms) on its own, with members that record what they
hear; the engine's claimer hook on a real socket; and a Harmony and a Discord member in one room."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from discord_helpers import AES
from helpers import producer_params
from test_discord_voice import SERVER_ID, connect, serve
from test_harmony_session import CHANNEL, GUILD, join, messages

from fastsfu import Engine
from fastsfu.discord.voice import DiscordVoice
from fastsfu.harmony import VoiceRooms
from fastsfu.producer import Producer
from fastsfu.rooms import (
    ConsumeError,
    NotAllowedError,
    RemoteMember,
    Room,
    RoomFullError,
    RoomMember,
    Rooms,
)

pytestmark = [pytest.mark.timeout(60)]


class Recorder:
    """A RoomMember of no protocol: it records member_joined / member_left in order."""

    def __init__(self, user_id: int, producer: Producer | None, fail_on_join: bool = False) -> None:
        self.user_id = user_id
        self.producer = producer
        self.events: list[tuple[str, int]] = []
        self.fail_on_join = fail_on_join
        self.reports_speaking = False

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        self.events.append(("speaking" if speaking else "quiet", user_id))

    def member_joined(self, user_id: int, producer: Producer) -> None:
        if self.fail_on_join:
            raise ConsumeError("this member cannot consume")
        assert producer.id  # a live producer, handed over as is
        self.events.append(("joined", user_id))

    def member_left(self, user_id: int) -> None:
        self.events.append(("left", user_id))


def run(fn: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Engine() as engine:
            await fn(engine)

    asyncio.run(asyncio.wait_for(main(), 30))


def producer_in(room: Room, ssrc: int) -> Producer:
    return room.router.create_plain_transport().produce(producer_params(ssrc))


def enter(room: Room, member: Recorder) -> None:
    """What a front-end's join commit does: check, announce to the others all or none, add."""
    room.check_capacity()
    others: list[RoomMember] = list(room.members.values())
    room.announce_joined(member, others)
    room.add(member)


def leave(rooms: Rooms, room: Room, member: Recorder) -> None:
    if room.remove(member):
        room.announce_left(member.user_id)
    rooms.release(room)


def test_rooms_are_created_once_and_freed_when_nobody_holds_or_joins_them() -> None:
    async def body(engine: Engine) -> None:
        rooms = Rooms(engine)
        room = rooms.acquire((GUILD, CHANNEL))
        assert rooms.acquire((GUILD, CHANNEL)) is room and rooms.get((GUILD, CHANNEL)) is room
        assert room.router.id in engine.routers and room.router.app_data == {"voice": (GUILD, CHANNEL)}
        holder = object()
        room.hold(holder)
        rooms.release(room)  # held: stays
        assert rooms.get((GUILD, CHANNEL)) is room and not room.router.closed
        member = Recorder(1, producer_in(room, 1111))
        enter(room, member)
        room.unhold(holder)
        rooms.release(room)  # a member: stays
        assert len(rooms) == 1 and list(rooms) == [room]
        leave(rooms, room, member)
        assert rooms.get((GUILD, CHANNEL)) is None and len(rooms) == 0
        assert room.router.closed and room.router.id not in engine.routers  # the engine forgot it
        assert rooms.acquire((GUILD, CHANNEL)) is not room  # a fresh room with a fresh router

    run(body)


class Listener:
    """A RoomsListener that records what it is told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def room_opened(self, room: Room) -> None:
        self.events.append(("opened", 0))

    def room_closed(self, room: Room) -> None:
        self.events.append(("closed", 0))

    def member_added(self, room: Room, member: RoomMember) -> None:
        self.events.append(("added", member.user_id))

    def member_removed(self, room: Room, member: RoomMember) -> None:
        self.events.append(("removed", member.user_id))

    def member_reported(self, room: Room, member: RoomMember) -> None:
        self.events.append(("reported", room.reported[member.user_id]))


def test_remote_members_look_local_but_neither_keep_the_room_nor_count_for_its_node() -> None:
    """A member served by another node (docs/cluster.md#spill) is announced to the local members like
    any other, but the room's listener (the cluster's spill) hears only of local members, the
    node's cap counts only local members and holders, and remote members alone do not keep the
    room (its router) alive."""

    async def body(engine: Engine) -> None:
        rooms = Rooms(engine)
        listener = Listener()
        rooms.listener = listener
        room = rooms.acquire((GUILD, CHANNEL))
        holder = object()
        room.hold(holder)
        local = Recorder(1, producer_in(room, 1111))
        enter(room, local)
        room.unhold(holder)
        remote = RemoteMember(2, producer_in(room, 2222), "n2")
        room.check_capacity()
        room.announce_joined(remote, list(room.members.values()))
        room.add(remote)
        assert local.events == [("joined", 2)]  # heard as a local member would be
        assert [m.user_id for m in room.local_members()] == [1] and room.local_load() == 1
        joining = object()
        room.hold(joining)  # a session past Initialize, not joined yet, counts too
        assert room.local_load() == 2
        assert listener.events == [("opened", 0), ("added", 1)]  # not of the remote member
        room.unhold(joining)
        leave(rooms, room, local)
        # The last local member left: the room closes though a remote member is still in it.
        assert rooms.get((GUILD, CHANNEL)) is None and room.router.closed
        assert listener.events == [("opened", 0), ("added", 1), ("removed", 1), ("closed", 0)]

    run(body)


def test_reported_speaking_goes_to_the_listener_and_comes_back_as_a_remote_members() -> None:
    """What a local member's client says of its speaking reaches the room's listener (the cluster's
    spill) once per change; what a remote member's client said, relayed by its node, reaches the
    local members once per change (docs/cluster.md#remote-members)."""

    async def body(engine: Engine) -> None:
        rooms = Rooms(engine)
        listener = Listener()
        rooms.listener = listener
        room = rooms.acquire((GUILD, CHANNEL))
        local = Recorder(1, producer_in(room, 1111))
        room.report_speaking(local, 1)  # not in the room yet: nothing
        enter(room, local)
        for flags in (0, 0, 1, True, 5, 0):  # a pre-v4 client's boolean is its integer
            room.report_speaking(local, flags)
        assert listener.events[2:] == [("reported", 0), ("reported", 1), ("reported", 5), ("reported", 0)]
        remote = RemoteMember(2, producer_in(room, 2222), "n2", speaking=0)
        assert remote.reports_speaking  # not measured here: its client says it
        room.announce_joined(remote, room.local_members())
        room.add(remote)
        for flags in (0, 1, 1, 0):
            room.remote_speaking(remote, flags)
        assert local.events == [("joined", 2), ("speaking", 2), ("quiet", 2)]
        assert [e for e in listener.events if e[0] == "reported"][-1] == ("reported", 0)  # not of it
        leave(rooms, room, local)
        assert room.reported == {}

    run(body)


def test_member_events_are_ordered_and_exactly_once() -> None:
    async def body(engine: Engine) -> None:
        rooms = Rooms(engine)
        room = rooms.acquire(("test", "r"))
        a, b, c = (Recorder(u, producer_in(room, 1000 + u)) for u in (1, 2, 3))
        for member in (a, b, c):
            enter(room, member)
        leave(rooms, room, b)
        leave(rooms, room, b)  # a second leave is no event
        assert a.events == [("joined", 2), ("joined", 3), ("left", 2)]
        assert b.events == [("joined", 3)]  # never told of itself
        assert c.events == [("left", 2)]
        leave(rooms, room, a)
        leave(rooms, room, c)
        assert c.events == [("left", 2), ("left", 1)] and rooms.get(("test", "r")) is None

    run(body)


def test_capacity_and_a_join_that_fails_half_way() -> None:
    async def body(engine: Engine) -> None:
        rooms = Rooms(engine, max_members=3)
        room = rooms.acquire(("test", "full"))
        a = Recorder(1, producer_in(room, 1001))
        b = Recorder(2, producer_in(room, 1002), fail_on_join=True)
        c = Recorder(3, producer_in(room, 1003))
        enter(room, a)
        enter(room, b)
        assert a.events == [("joined", 2)]
        # b cannot consume c: a, who heard of c first, hears it left; c is not in the room.
        with pytest.raises(ConsumeError) as failed:
            enter(room, c)
        assert failed.value.identifier == "fastsfu.voice-create-consumer"
        assert a.events == [("joined", 2), ("joined", 3), ("left", 3)] and b.events == []
        assert sorted(room.members) == [1, 2]
        b.fail_on_join = False
        enter(room, c)
        with pytest.raises(RoomFullError) as full:
            enter(room, Recorder(4, producer_in(room, 1004)))
        assert full.value.identifier == "fastsfu.voice-room-full" and sorted(room.members) == [1, 2, 3]

    run(body)


def test_authorization_hook_runs_for_guild_channel_rooms_only() -> None:
    async def body(engine: Engine) -> None:
        asked: list[tuple[int, int, int]] = []

        def authorize(user_id: int, guild_id: int, channel_id: int) -> None:
            asked.append((user_id, guild_id, channel_id))
            if user_id == 666:
                raise NotAllowedError("banned here")

        rooms = Rooms(engine, authorize=authorize)
        rooms.check_authorized(1, (GUILD, CHANNEL))
        with pytest.raises(NotAllowedError) as refused:
            rooms.check_authorized(666, (GUILD, CHANNEL))
        assert refused.value.identifier == "h.not-enough-permissions"
        rooms.check_authorized(666, ("discord", SERVER_ID))  # a room of Discord's own: no hook
        assert asked == [(1, GUILD, CHANNEL), (666, GUILD, CHANNEL)]
        with pytest.raises(ValueError):
            Rooms(engine, max_members=0)

    run(body)


def test_a_claimer_gets_slow_path_datagrams_from_new_tuples_on_the_real_socket() -> None:
    """The engine's hook: registered claimers are asked about datagrams from unknown tuples, and
    one that raises is counted, not fatal to the read path."""

    class Claims:
        def __init__(self) -> None:
            self.seen: list[tuple[int, bytes]] = []

        def claim(self, kind: int, data: bytes) -> Any:
            self.seen.append((kind, data))
            return None  # not ours: the engine counts it as unhandled

    class Broken:
        def claim(self, kind: int, data: bytes) -> Any:
            raise RuntimeError("a bug in a claimer")

    async def body(engine: Engine) -> None:
        claims = Claims()
        engine.register_claimer("broken", Broken())  # asked first: counted, the others still asked
        engine.register_claimer("test", claims)
        assert engine.claimer("test") is claims
        with pytest.raises(ValueError):
            engine.register_claimer("test", Claims())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(b"\x00\x01\x00\x00probe", engine.media_socket().local_address)
            for _ in range(100):
                if claims.seen:
                    break
                await asyncio.sleep(0.01)
        finally:
            sock.close()
        assert [data for _, data in claims.seen] == [b"\x00\x01\x00\x00probe"]
        assert engine.unhandled_datagrams == 1 and engine.slow_path_errors == 1

    run(body)


def test_a_harmony_and_a_discord_member_in_one_room_through_the_real_front_ends() -> None:
    """[discord.rooms] maps the Discord server onto the Harmony room: each side hears the other
    join and leave once, in its own protocol, and the room is freed when both are gone."""
    voices: list[DiscordVoice] = []

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        harmony, _ = join(rooms, 1)
        discord = await connect(url, http, 1001, AES)
        # Discord hears of the Harmony user (CLIENTS_CONNECT, then its SSRC in SPEAKING).
        assert (await discord.expect(11))["d"]["user_ids"] == ["1"]
        assert (await discord.expect(5))["d"]["user_id"] == "1"
        assert sorted(rooms.rooms[(GUILD, CHANNEL)].members) == [1, 1001]
        heard = messages(harmony)
        assert [m.WhichOneof("message") for m in heard] == ["user_joined"]
        assert heard[0].user_joined.data.user_id == 1001
        # A second Harmony user joins and leaves: Discord hears both, the leave once.
        other, _ = join(rooms, 2)
        assert (await discord.expect(11))["d"]["user_ids"] == ["2"]
        other.close()
        other.close()
        assert (await discord.expect(13))["d"] == {"user_id": "2"}
        assert [m.WhichOneof("message") for m in messages(harmony)] == ["user_joined", "user_left"]
        # The gateway ends the Discord session: the Harmony user hears UserLeft exactly once.
        assert voices[0].disconnect(1001) == 1
        for _ in range(100):
            if 1001 not in rooms.rooms[(GUILD, CHANNEL)].members:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # a second UserLeft would be queued by now
        left = [m.user_left.user_id for m in messages(harmony) if m.WhichOneof("message") == "user_left"]
        assert left == [1001]
        harmony.close()
        assert rooms.rooms == {} and rooms.sessions == {}

    serve(body, room_map={SERVER_ID: (GUILD, CHANNEL)}, voices=voices)
