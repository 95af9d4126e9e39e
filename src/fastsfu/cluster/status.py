"""`fastsfu cluster status` (docs/cluster.md#fastsfu-cluster-status): listen to the nodes' heartbeats for a
moment, read the rooms bucket, and print the nodes and the room homes (text or JSON)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastsfu.cluster.bus import Bus, BusError
from fastsfu.cluster.placement import NodeLoad
from fastsfu.cluster.registry import NODES_SUBJECT, ROOMS_BUCKET

LISTEN = 1.5  # seconds of heartbeats (each node sends one a second)


async def gather(url: str, listen: float = LISTEN) -> dict[str, Any]:
    """Nodes heard within `listen` s and the rooms bucket's homes; BusError if NATS cannot answer."""
    bus = await Bus.connect(url, "fastsfu-cluster-status")
    heard: dict[str, tuple[float, NodeLoad]] = {}
    try:
        await bus.subscribe(NODES_SUBJECT, "heartbeat", lambda d: _heard(heard, d))
        kv = await bus.bucket(ROOMS_BUCKET)
        rooms: dict[str, str] = {}
        try:
            keys = await bus.call(kv.keys())
        except BusError as exc:
            if "no keys" not in str(exc):
                raise
            keys = []
        for key in keys:
            entry = await bus.call(kv.get(key))
            rooms[key] = (entry.value or b"").decode()
        await asyncio.sleep(max(0.0, listen))
    finally:
        await bus.close()
    now = time.monotonic()
    nodes = [
        {
            **vars(load),
            "served": list(load.served),
            "bridges": len(load.bridges),
            "last_heard": round(now - t, 2),
        }
        for t, load in sorted(heard.values(), key=lambda item: item[1].node)
    ]
    return {"nodes": nodes, "rooms": dict(sorted(rooms.items()))}


def _heard(heard: dict[str, tuple[float, NodeLoad]], data: object) -> None:
    load = NodeLoad.from_json(data)
    heard[load.node] = (time.monotonic(), load)


def render(status: dict[str, Any]) -> str:
    """The status as text: one line per node, then one per room."""
    lines = [f"{len(status['nodes'])} nodes"]
    for n in status["nodes"]:
        lines.append(
            f"  {n['node']}  media {n['media'] or '-'}  members {n['members']}  rooms {n['rooms']}"
            f"  {'draining' if n['draining'] else 'open'}  last heard {n['last_heard']:.1f} s ago"
        )
    live = {n["node"] for n in status["nodes"]}
    lines.append(f"{len(status['rooms'])} rooms")
    for key, home in status["rooms"].items():
        lines.append(f"  {key} -> {home}{'' if home in live else ' (not heard)'}")
    return "\n".join(lines)


def run(urls: list[str], as_json: bool, timeout: float = 10.0) -> int:
    """The command: 0 and the status on stdout, or 1 and one line on stderr when NATS fails."""
    import sys

    try:
        status = asyncio.run(asyncio.wait_for(gather(",".join(urls)), timeout))
    except (BusError, TimeoutError) as exc:
        why = str(exc) or f"NATS did not answer within {timeout:g} s"
        print(f"fastsfu cluster status: error: {why}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if as_json else render(status))
    return 0
