"""Which node homes a room and where a full room spills (docs/cluster.md#placement, #spill): pure
functions over the nodes' loads and the rooms' records."""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping, Set
from dataclasses import dataclass

VERSION = 1  # of every message on the bus, so that a rolling upgrade can tell versions apart
_KEY_UNSAFE = re.compile(r"[^-/_=a-zA-Z0-9]")
# A node id or session id goes into NATS subjects: dot-separated words, no spaces or wildcards.
TOKEN = re.compile(r"(?=.{1,128}$)[-_A-Za-z0-9]+(\.[-_A-Za-z0-9]+)*")


def room_subject_key(key: tuple[Hashable, ...]) -> str:
    """A room key as a key of the rooms bucket: its parts joined by dots, other characters as _."""
    return ".".join(_KEY_UNSAFE.sub("_", str(part)) for part in key) or "_"


@dataclass(frozen=True)
class NodeLoad:
    """One node as its heartbeat describes it."""

    node: str
    members: int = 0  # users who completed the join, over the node's rooms
    rooms: int = 0
    draining: bool = False
    media: str = ""  # host:port of the node's media socket
    served: tuple[str, ...] = ()  # the rooms (bucket keys) with members or sessions on the node
    bridges: tuple[str, ...] = ()  # the bridged sessions open on the node (as edge or as home)

    def to_json(self) -> dict[str, object]:
        return {"v": VERSION, **vars(self), "served": list(self.served), "bridges": list(self.bridges)}

    @classmethod
    def from_json(cls, data: object) -> NodeLoad:
        """ValueError if `data` is not a heartbeat of a version this code reads."""
        if not isinstance(data, dict) or data.get("v") != VERSION:
            raise ValueError("not a v1 node heartbeat")
        node = data.get("node")
        if not isinstance(node, str) or not TOKEN.fullmatch(node):
            raise ValueError("bad node id in a node heartbeat")
        members, rooms = data.get("members", 0), data.get("rooms", 0)
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (members, rooms)):
            raise ValueError("bad load in a node heartbeat")
        served, bridges = data.get("served", []), data.get("bridges", [])
        for items in (served, bridges):
            if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
                raise ValueError("bad room or session list in a node heartbeat")
        draining, media = data.get("draining", False), data.get("media", "")
        if not isinstance(draining, bool) or not isinstance(media, str):
            raise ValueError("bad draining flag or media address in a node heartbeat")
        return cls(node, members, rooms, draining, media, tuple(served), tuple(bridges))


def choose_home(nodes: Mapping[str, NodeLoad]) -> str | None:
    """The least-loaded node that takes new rooms (fewest members, then fewest rooms, then the
    smallest id, so that every edge with the same view picks the same one); None if there is none."""
    open_nodes = [n for n in nodes.values() if not n.draining]
    if not open_nodes:
        return None
    return min(open_nodes, key=lambda n: (n.members, n.rooms, n.node)).node


def takes_sessions(node: str, nodes: Mapping[str, NodeLoad]) -> bool:
    """Whether `node` is alive and open (not draining): the only kind of node a new session of any
    room goes to, as its home or as a spill node."""
    load = nodes.get(node)
    return load is not None and not load.draining


def home_is_valid(home: str, nodes: Mapping[str, NodeLoad]) -> bool:
    """A recorded home counts for new sessions while its node is alive and open. A draining home
    keeps the sessions it has until its grace ends, but the room's next session places it again
    (on an open node, joined to the draining one by pipes meanwhile); a dead home's rooms are
    placed again when their members come back."""
    return takes_sessions(home, nodes)


@dataclass(frozen=True)
class RoomRecord:
    """A room's entry in the rooms bucket (docs/cluster.md#spill): its home, then the nodes it
    spilled to, in the order they were added (new members fill them in this order)."""

    home: str
    spill: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.home, *self.spill)

    def encode(self) -> bytes:
        """A room that never spilled is stored as its home's id alone, as before spill existed."""
        if not self.spill:
            return self.home.encode()
        return json.dumps({"v": VERSION, "home": self.home, "spill": list(self.spill)}).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> RoomRecord:
        """ValueError if `value` is neither a node id nor a v1 record."""
        text = (value or b"").decode("utf-8", "replace")
        if not text.startswith("{"):
            return cls(text)
        data = loads_shallow(text.encode())
        home = data.get("home") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("v") != VERSION or not isinstance(home, str):
            raise ValueError("not a v1 room record")
        spill = data.get("spill", [])
        if not isinstance(spill, list) or not all(isinstance(n, str) for n in spill):
            raise ValueError("bad spill list in a room record")
        return cls(home, tuple(n for n in dict.fromkeys(spill) if n != home))


MAX_DEPTH = 32  # nesting of JSON taken from the bus; deeper is refused before parsing


def loads_shallow(data: bytes) -> object:
    """JSON nested at most MAX_DEPTH deep (ValueError otherwise). The depth is checked before
    parsing: a RecursionError inside the parser leaves the interpreter's recursion accounting
    unreliable, so it must never be provoked by a message."""
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        depth, in_string, escaped = 0, False, False
        for byte in data:
            if in_string:
                if escaped:
                    escaped = False
                elif byte == 0x5C:  # backslash
                    escaped = True
                elif byte == 0x22:
                    in_string = False
            elif byte == 0x22:
                in_string = True
            elif byte in (0x5B, 0x7B):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ValueError("JSON nested too deeply")
            elif byte in (0x5D, 0x7D):
                depth -= 1
    return json.loads(data)


def serving_choice(record: RoomRecord, nodes: Mapping[str, NodeLoad], refused: Set[str]) -> str | None:
    """The node a new member of the room goes to: the first open one of its nodes (home first)
    that did not refuse it as full; None when each is gone, draining or full (then it spills)."""
    for node in record.nodes:
        if takes_sessions(node, nodes) and node not in refused:
            return node
    return None


def with_spill(record: RoomRecord, nodes: Mapping[str, NodeLoad], refused: Set[str]) -> RoomRecord | None:
    """The record with one more node: the least-loaded open node that is neither serving the room
    nor refused it; dead or draining spill nodes are dropped. None if no node is left to take it."""
    live_spill = tuple(n for n in record.spill if takes_sessions(n, nodes))
    taken = {record.home, *live_spill, *refused}
    choice = choose_home({n: load for n, load in nodes.items() if n not in taken})
    if choice is None:
        return None
    return RoomRecord(record.home, (*live_spill, choice))


def without_spill(record: RoomRecord, node: str) -> RoomRecord | None:
    """The record without `node` among its spill nodes (its last member there left), so that the
    record lists only nodes serving the room; None if `node` is not one of them (a home stays the
    home). A new member may add it again (`with_spill`)."""
    if node not in record.spill:
        return None
    return RoomRecord(record.home, tuple(n for n in record.spill if n != node))


def rehomed(record: RoomRecord | None, nodes: Mapping[str, NodeLoad]) -> RoomRecord | None:
    """A record whose home is gone or draining, given a new one: its first open spill node (its
    members stay where they are), else the least-loaded open node. None if no node takes rooms."""
    live_spill = tuple(n for n in record.spill if takes_sessions(n, nodes)) if record is not None else ()
    if live_spill:
        return RoomRecord(live_spill[0], live_spill[1:])
    home = choose_home(nodes)
    return RoomRecord(home) if home is not None else None
