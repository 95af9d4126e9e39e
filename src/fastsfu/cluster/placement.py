"""Which node homes a room (docs/cluster.md#placement): pure functions over the nodes' loads."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

VERSION = 1  # of every message on the bus, so that a rolling upgrade can tell versions apart
_KEY_UNSAFE = re.compile(r"[^-/_=a-zA-Z0-9]")


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

    def to_json(self) -> dict[str, object]:
        return {"v": VERSION, **vars(self), "served": list(self.served)}

    @classmethod
    def from_json(cls, data: object) -> NodeLoad:
        """ValueError if `data` is not a heartbeat of a version this code reads."""
        if not isinstance(data, dict) or data.get("v") != VERSION or not isinstance(data.get("node"), str):
            raise ValueError("not a v1 node heartbeat")
        members, rooms = data.get("members", 0), data.get("rooms", 0)
        if not isinstance(members, int) or not isinstance(rooms, int) or members < 0 or rooms < 0:
            raise ValueError("bad load in a node heartbeat")
        served = data.get("served", [])
        if not isinstance(served, list) or not all(isinstance(k, str) for k in served):
            raise ValueError("bad room list in a node heartbeat")
        draining, media = bool(data.get("draining")), str(data.get("media", ""))
        return cls(data["node"], members, rooms, draining, media, tuple(served))


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
