"""Protocol-neutral voice rooms: a router per room, its members of any protocol, and the registry.

Front-ends (harmony/, discord/) hold a room while a session prepares, join it as a RoomMember,
and leave it; member events fan out to the other members whatever protocol they speak.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Protocol

from fastsfu import ortc
from fastsfu.last_n import LastN
from fastsfu.router import RouterLimitError
from fastsfu.transport import TransportError

if TYPE_CHECKING:
    from fastsfu.engine import Engine
    from fastsfu.observers import SpeakingObserver
    from fastsfu.producer import Producer
    from fastsfu.router import Router
    from fastsfu.types import RtpCodecCapability

# A room's key: Harmony's (guild_id, channel_id), or e.g. ("discord", server_id) for a room of its own.
RoomKey = tuple[Hashable, ...]

# Called before a user joins a (guild_id, channel_id) room: raise a RoomError (Harmony h.* identifiers,
# e.g. NotAllowedError or fastsfu.harmony.VoiceError) to refuse.
Authorize = Callable[[int, int, int], None]

# Why a producer or consumer cannot be created: bad parameters, or a router or datapath table full.
CREATE_ERRORS = (ortc.OrtcError, TransportError, RouterLimitError, OverflowError)


class RoomError(Exception):
    """A refusal with a Harmony-style identifier; each front-end maps it to its own wire error."""

    def __init__(self, identifier: str, human_message: str) -> None:
        super().__init__(f"{identifier}: {human_message}")
        self.identifier = identifier
        self.human_message = human_message


class RoomFullError(RoomError):
    def __init__(self) -> None:
        super().__init__("fastsfu.voice-room-full", "the voice channel is full")


class NotAllowedError(RoomError):
    def __init__(self, human_message: str = "not allowed in this voice channel") -> None:
        super().__init__("h.not-enough-permissions", human_message)


class ConsumeError(RoomError):
    """A member cannot consume a newcomer's producer (member_joined)."""

    def __init__(self, human_message: str) -> None:
        super().__init__("fastsfu.voice-create-consumer", human_message)


class RoomMember(Protocol):
    """A user in a room, whatever protocol it speaks (Harmony session, Discord gateway session):
    rooms shared across protocols fan out through these two calls."""

    @property
    def user_id(self) -> int: ...

    @property
    def producer(self) -> Producer | None: ...

    @property
    def reports_speaking(self) -> bool:
        """Its client says when it speaks (Discord's op 5): no need to measure it."""
        ...

    def member_joined(self, user_id: int, producer: Producer) -> None:
        """Another user joined: consume `producer` on your own transport and tell your client.
        Raise a RoomError (e.g. ConsumeError) if that is impossible."""
        ...

    def member_left(self, user_id: int) -> None:
        """A user who joined (and of whom you were told) left: tell your client."""
        ...

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        """Another member started or stopped speaking (measured from its audio levels, for
        members whose clients do not say so themselves): tell your client if it can show it."""
        ...


class RemoteMember:
    """A member of this room served by another node (docs/cluster.md#spill): its producer is the
    far end of a pipe. Its own node tells it about the others, so the calls to it do nothing here."""

    def __init__(self, user_id: int, producer: Producer, node: str, speaking: int | None = None) -> None:
        self._user_id = user_id
        self._producer = producer
        self.node = node
        # What its client said of its speaking last (Discord's op 5 bitmask), relayed by its node;
        # None for a member whose speaking is measured (here, from the piped audio levels).
        self.speaking = speaking

    @property
    def user_id(self) -> int:
        return self._user_id

    @property
    def producer(self) -> Producer | None:
        return self._producer

    @property
    def reports_speaking(self) -> bool:
        """Whether its client says when it speaks (relayed by its node); else it is measured here
        from the piped producer's audio levels."""
        return self.speaking is not None

    def member_joined(self, user_id: int, producer: Producer) -> None:
        pass

    def member_left(self, user_id: int) -> None:
        pass

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        pass


class RoomsListener(Protocol):
    """Told of a node's rooms opening and closing and of their local members (the cluster's spill
    follows rooms that span nodes through this)."""

    def room_opened(self, room: Room) -> None: ...
    def room_closed(self, room: Room) -> None: ...
    def member_added(self, room: Room, member: RoomMember) -> None: ...
    def member_removed(self, room: Room, member: RoomMember) -> None: ...
    def member_reported(self, room: Room, member: RoomMember) -> None:
        """A local member's client changed what it says of its speaking (`Room.reported`)."""
        ...


class Room:
    """One voice channel: its router, its members by user, and holders (sessions between taking
    the room and joining it, which keep it alive)."""

    def __init__(
        self,
        key: RoomKey,
        router: Router,
        max_members: int,
        speaking_detection: bool = True,
        last_n: int = 0,
        listener: RoomsListener | None = None,
    ) -> None:
        self.key = key
        self.router = router
        self.max_members = max_members
        self.members: dict[int, RoomMember] = {}
        self.holders: set[object] = set()
        self.speaking_detection = speaking_detection
        self.listener = listener
        self.speaking_users: set[int] = set()  # measured (SpeakingObserver), for members tracked
        # What local members' clients said of their speaking last (Discord's op 5), by user.
        self.reported: dict[int, int] = {}
        self._speaking: SpeakingObserver | None = None  # made with the first tracked producer
        self._speakers: dict[str, int] = {}  # tracked producer id -> user id
        self.last_n = LastN(router, last_n, every_transport=True) if last_n > 0 else None

    def track_speaking(self, member: RoomMember) -> None:
        """Measure whether `member` speaks (its client does not say it: a browser, a Harmony
        client) and tell the others through member_speaking (docs/observers.md#speaking)."""
        producer = member.producer
        if member.reports_speaking or not self.speaking_detection:
            return
        if producer is None or producer.id in self._speakers:
            return
        if self._speaking is None or self._speaking.closed:
            self._speaking = self.router.create_speaking_observer()
            self._speaking.on("speaking", self._on_speaking)
        self._speakers[producer.id] = member.user_id
        self._speaking.add_producer(producer.id)
        # After the observer's own close listener: its last "speaking" False still finds the user.
        producer.observer.once("close", lambda: self._speakers.pop(producer.id, None))

    def _on_speaking(self, producer: Producer, speaking: bool) -> None:
        user_id = self._speakers.get(producer.id)
        if user_id is None:
            return
        if speaking:
            self.speaking_users.add(user_id)
        else:
            self.speaking_users.discard(user_id)
        for other in list(self.members.values()):
            if other.user_id != user_id:
                other.member_speaking(user_id, speaking)

    @property
    def empty(self) -> bool:
        """Nobody here holds or is in it (members served by other nodes do not keep it alive)."""
        return not self.holders and not self.local_members()

    def local_members(self) -> list[RoomMember]:
        return [m for m in self.members.values() if not isinstance(m, RemoteMember)]

    def local_load(self) -> int:
        """Members and holders on this node: what a node's cap on a room counts."""
        local = self.local_members()
        return len(local) + len(self.holders - set(local))

    def hold(self, holder: object) -> None:
        self.holders.add(holder)

    def unhold(self, holder: object) -> None:
        self.holders.discard(holder)

    def check_capacity(self) -> None:
        if len(self.members) >= self.max_members:
            raise RoomFullError

    def announce_joined(
        self,
        newcomer: RoomMember,
        others: list[RoomMember],
        before: Callable[[RoomMember], None] | None = None,
    ) -> None:
        """member_joined to each of `others` (after `before(other)`, e.g. the newcomer consuming
        it), all or none: on a RoomError whoever heard of the newcomer hears it left, so no member
        keeps a consumer of a producer about to close."""
        assert newcomer.producer is not None
        notified: list[RoomMember] = []
        try:
            for other in others:
                if before is not None:
                    before(other)
                other.member_joined(newcomer.user_id, newcomer.producer)
                notified.append(other)
        except RoomError:
            for other in notified:
                other.member_left(newcomer.user_id)
            raise
        if self.members.get(newcomer.user_id) is newcomer:  # a producer made after the join
            self.track_speaking(newcomer)

    def add(self, member: RoomMember) -> None:
        """The join commit: `member` is in, and no longer only a holder."""
        self.holders.discard(member)
        self.members[member.user_id] = member
        if member.producer is not None:
            self.track_speaking(member)
        if self.listener is not None and not isinstance(member, RemoteMember):
            self.listener.member_added(self, member)

    def report_speaking(self, member: RoomMember, flags: int) -> None:
        """A local member's client says it speaks (`flags`, a bitmask such as Discord's op 5) or
        not: a change is recorded and told to the listener (the cluster relays it to the room's
        other nodes, docs/cluster.md#remote-members)."""
        flags = int(flags)  # a pre-v4 Discord client's boolean
        if self.members.get(member.user_id) is not member or self.reported.get(member.user_id) == flags:
            return
        self.reported[member.user_id] = flags
        if self.listener is not None and not isinstance(member, RemoteMember):
            self.listener.member_reported(self, member)

    def remote_speaking(self, member: RemoteMember, flags: int) -> None:
        """What a remote member's client said of its speaking, relayed by its node: the members
        here are told as of a local member's report (Discord members get op 5), once per change."""
        told = member.speaking
        if told is None:  # measured until now: what the members here were told of it
            told = int(member.user_id in self.speaking_users or not self.speaking_detection)
        member.speaking = flags
        if flags == told or self.members.get(member.user_id) is not member:
            return
        if flags:
            self.speaking_users.add(member.user_id)
        else:
            self.speaking_users.discard(member.user_id)
        for other in self.local_members():
            other.member_speaking(member.user_id, bool(flags))

    def remove(self, member: RoomMember) -> bool:
        """Take `member` out (not its holding); True if it was the member of its user."""
        if self.members.get(member.user_id) is member:
            del self.members[member.user_id]
            self.speaking_users.discard(member.user_id)
            self.reported.pop(member.user_id, None)
            if self.listener is not None and not isinstance(member, RemoteMember):
                self.listener.member_removed(self, member)
            return True
        return False

    def announce_left(self, user_id: int) -> None:
        for other in list(self.members.values()):
            other.member_left(user_id)


class Rooms:
    """The registry of one node's rooms: created on first use, freed (router closed) when empty."""

    def __init__(
        self,
        engine: Engine,
        max_members: int = 50,
        authorize: Authorize | None = None,
        speaking_detection: bool = True,
        last_n: int = 0,
        opus_red: bool = False,
    ) -> None:
        if max_members < 1 or last_n < 0:
            raise ValueError("max_members must be >= 1 and last_n >= 0")
        self.speaking_detection = speaking_detection
        self.last_n = last_n  # 0: every member hears everyone
        # Routers route Opus RED beside Opus (docs/transports.md#opus-red).
        self.media_codecs: list[RtpCodecCapability] | None = (
            [
                {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2},
                {"kind": "audio", "mimeType": "audio/red", "clockRate": 48000, "channels": 2},
            ]
            if opus_red
            else None
        )
        self.engine = engine
        self.max_members = max_members
        self.authorize = authorize
        self.rooms: dict[RoomKey, Room] = {}
        self.listener: RoomsListener | None = None  # a cluster node's spill

    def get(self, key: RoomKey) -> Room | None:
        return self.rooms.get(key)

    def acquire(self, key: RoomKey) -> Room:
        """The room of `key`, created with a router if it has none. Hold or join it, or release() it."""
        room = self.rooms.get(key)
        if room is None:
            router = self.engine.create_router(self.media_codecs, app_data={"voice": key})
            room = Room(key, router, self.max_members, self.speaking_detection, self.last_n, self.listener)
            self.rooms[key] = room
            if self.listener is not None:
                self.listener.room_opened(room)
        return room

    def release(self, room: Room) -> None:
        """Free `room` (close its router) if nobody holds it or is in it any more."""
        if room.empty and self.rooms.get(room.key) is room:
            del self.rooms[room.key]
            room.router.close()
            if self.listener is not None:
                self.listener.room_closed(room)

    def check_authorized(self, user_id: int, key: RoomKey) -> None:
        """Run the authorization hook for a (guild_id, channel_id) room; other rooms have no hook."""
        if self.authorize is not None and len(key) == 2 and all(type(k) is int for k in key):
            guild_id, channel_id = key
            assert isinstance(guild_id, int) and isinstance(channel_id, int)
            self.authorize(user_id, guild_id, channel_id)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self.rooms.values()))

    def __len__(self) -> int:
        return len(self.rooms)
