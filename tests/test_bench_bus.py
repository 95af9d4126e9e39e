"""benchmarks/bus_messages.py against a real `fastsfu serve --workers 2 --nats` cluster: it sees every
message a join and a leave put on the bus, and tells sessions run at the room's home from bridged
ones, so its per-join and per-leave counts stay true as the cluster code changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bus_messages  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.slow, pytest.mark.timeout(150)]


def test_bus_messages_per_join_and_leave() -> None:
    """Members join one room until one session ran at the home and one was bridged, then all leave:
    the first join places the room (registry requests), a bridged join opens a bridge and carries
    its frames over the bus, a join at the home sends nothing but a registry read and the frames to
    bridged members, and the last leave releases the room."""
    args = bus_messages.parse_args(["--joins", "2", "--each", "1", "--max-joins", "10"])
    records = bus_messages.run(args)["records"]
    joins = [r for r in records if r["op"] == "join"]
    leaves = [r for r in records if r["op"] == "leave"]
    assert len(joins) == len(leaves) >= 3
    assert {r["where"] for r in joins[1:]} == {"here", "bridged"}
    first = joins[0]
    assert first["first"] and first["by_class"].get("registry (KV request)", 0) >= 2  # read, create
    for r in joins:
        c = r["by_class"]
        assert c.get("bridge open", 0) == (r["where"] == "bridged"), r
        # Frames reach bridged members only through the bus: one UserJoined each, at least.
        assert c.get("bridge out", 0) >= r["bridged_others"], r
        if r["where"] == "bridged":  # the client's frames in, the home's answers out
            assert c.get("bridge in", 0) >= 2 and c["bridge out"] >= 3 + r["bridged_others"], r
        assert r["bus_requests"] >= 1 and c.get("registry (KV request)", 0) >= 1, r  # the home read
    # A bridged join costs more bus messages than one at the home (beyond the UserJoined frames).
    assert min(r["messages"] for r in joins[1:] if r["where"] == "bridged") > max(
        r["messages"] - r["bridged_others"] for r in joins[1:] if r["where"] == "here"
    )
    last = leaves[-1]
    assert last["members_before"] == 1 and last["by_class"].get("registry (KV request)", 0) == 2, last
    for r in leaves[:-1]:
        assert r["by_class"].get("registry (KV request)", 0) == 0, r  # the room stays placed
    text = bus_messages.summarize({"records": records, "args": vars(args)})
    assert "| join | bridged |" in text and "| join | here |" in text
