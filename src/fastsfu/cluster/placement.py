"""Which node homes a room (docs/cluster.md#placement): pure functions over the nodes' loads."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
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


def home_is_valid(home: str, nodes: Mapping[str, NodeLoad]) -> bool:
    """A recorded home still counts while its node is alive (a draining node keeps its rooms until
    they end; a dead one's rooms are placed again when their members come back)."""
    return home in nodes
