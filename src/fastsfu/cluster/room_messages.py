"""The messages of a room served by several nodes (docs/cluster.md#spill): membership on the room's
subject and pipe requests between two nodes, validated here (pure: no bus, no router)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastsfu.cluster.placement import VERSION, loads_shallow

KINDS = ("state", "join", "leave", "bye", "media")
MAX_FLAGS = 2**31 - 1  # the largest speaking bitmask carried (Discord's op 5 flags are 1, 2 and 4)

# One member's media state: (user id, its producer paused, the speaking flags its client reported
# last, e.g. Discord's op 5 bitmask, or None when its speaking is measured from its audio levels).
Media = tuple[int, bool, int | None]


def room_subject(key: str) -> str:
    """Where the nodes serving room `key` (a rooms-bucket key) tell each other their members."""
    return f"fastsfu.v1.room.{key}"


def pipe_subject(node: str) -> str:
    """Where `node` answers pipe requests (create its end, connect, consume producers)."""
    return f"fastsfu.v1.pipe.{node}"


class MessageError(ValueError):
    """A bus message this code does not take; `reason` labels the drop counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # "malformed" or "version"


@dataclass(frozen=True)
class RoomEvent:
    """One node's news about its own members of a room.

    - state: all of them (`members`); `hello` asks the others to answer with theirs at once;
    - join / leave: one member (`members` has the one joiner);
    - media: one member's producer paused or resumed, or its client's speaking changed (`media`
      has that member's entry; state and join carry entries too, for members not in the default
      state: not paused, speaking measured);
    - bye: the node no longer serves the room.
    """

    kind: str
    node: str
    members: tuple[tuple[int, str], ...] = ()  # (user id, producer id)
    user: int = 0  # leave
    hello: bool = False
    media: tuple[Media, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"v": VERSION, "k": self.kind, "node": self.node}
        if self.kind in ("state", "join"):
            out["members"] = [[u, p] for u, p in self.members]
        if self.kind == "leave":
            out["user"] = self.user
        if self.media:
            out["media"] = [[u, p, s] for u, p, s in self.media]
        if self.hello:
            out["hello"] = True
        return out


def _json(data: bytes) -> dict[str, Any]:
    try:
        message = loads_shallow(data)
    except ValueError:
        raise MessageError("malformed", "not JSON") from None
    if not isinstance(message, dict):
        raise MessageError("malformed", "not a JSON object")
    if message.get("v") != VERSION:
        raise MessageError("version", f"version {message.get('v')!r}")
    return message


def _user(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise MessageError("malformed", "bad user id")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise MessageError("malformed", f"bad {what}")
    return value


def _media(item: object) -> Media:
    if not isinstance(item, list) or len(item) != 3 or not isinstance(item[1], bool):
        raise MessageError("malformed", "bad media entry")
    flags = item[2]
    if flags is not None and (
        not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= MAX_FLAGS
    ):
        raise MessageError("malformed", "bad speaking flags")
    return _user(item[0]), item[1], flags


def parse_room_event(data: bytes) -> RoomEvent:
    """A room event, or MessageError (malformed, or of another version)."""
    message = _json(data)
    kind, node = message.get("k"), _text(message.get("node"), "node")
    if kind not in KINDS:
        raise MessageError("malformed", f"unknown kind {kind!r}")
    members: tuple[tuple[int, str], ...] = ()
    if kind in ("state", "join"):
        raw = message.get("members")
        if not isinstance(raw, list) or (kind == "join" and len(raw) != 1):
            raise MessageError("malformed", "bad member list")
        pairs = []
        for item in raw:
            if not isinstance(item, list) or len(item) != 2:
                raise MessageError("malformed", "bad member")
            pairs.append((_user(item[0]), _text(item[1], "producer id")))
        members = tuple(pairs)
    user = _user(message.get("user")) if kind == "leave" else 0
    media: tuple[Media, ...] = ()
    raw_media = message.get("media")
    if kind == "media" or (kind in ("state", "join") and raw_media is not None):
        # Bounded: one entry for a media event, at most one per member in a state or a join.
        if not isinstance(raw_media, list) or not (
            len(raw_media) == 1 if kind == "media" else len(raw_media) <= len(members)
        ):
            raise MessageError("malformed", "bad media list")
        media = tuple(_media(item) for item in raw_media)
    return RoomEvent(kind, node, members, user, message.get("hello") is True, media)


@dataclass(frozen=True)
class PipeRequest:
    """A node asking another for producers of a room it serves: the asker's end of the pipe
    (address, SRTP parameters or None for plain RTP) and the producer ids."""

    room: str
    node: str
    ip: str
    port: int
    srtp: dict[str, Any] | None
    producers: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "v": VERSION,
            "room": self.room,
            "node": self.node,
            "ip": self.ip,
            "port": self.port,
            "srtp": self.srtp,
            "producers": list(self.producers),
        }


def parse_pipe_request(data: bytes) -> PipeRequest:
    message = _json(data)
    port = message.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MessageError("malformed", "bad port")
    srtp = message.get("srtp")
    if srtp is not None and not isinstance(srtp, dict):
        raise MessageError("malformed", "bad srtp parameters")
    producers = message.get("producers")
    if not isinstance(producers, list) or len(producers) > 1024:
        raise MessageError("malformed", "bad producer list")
    return PipeRequest(
        _text(message.get("room"), "room"),
        _text(message.get("node"), "node"),
        _text(message.get("ip"), "ip"),
        port,
        srtp,
        tuple(_text(p, "producer id") for p in producers),
    )


@dataclass(frozen=True)
class PipeReply:
    """The answer: the far end of the pipe and, per producer it sends, its rtp_parameters."""

    ip: str
    port: int
    srtp: dict[str, Any] | None
    consumers: dict[str, dict[str, Any]]


def parse_pipe_reply(data: bytes) -> PipeReply:
    """A positive reply, or MessageError (also for a refusal, with its reason)."""
    message = _json(data)
    if message.get("ok") is not True:
        raise MessageError("refused", str(message.get("why", "refused"))[:200])
    port, srtp, consumers = message.get("port"), message.get("srtp"), message.get("consumers")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MessageError("malformed", "bad port")
    if srtp is not None and not isinstance(srtp, dict):
        raise MessageError("malformed", "bad srtp parameters")
    if not isinstance(consumers, dict) or not all(isinstance(v, dict) for v in consumers.values()):
        raise MessageError("malformed", "bad consumers")
    return PipeReply(_text(message.get("ip"), "ip"), port, srtp, consumers)
