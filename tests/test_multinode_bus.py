"""The bus side of a 3-node cluster (docs/cluster.md#many-hosts): bad messages on every subject a
node listens to are counted and ignored, a home that never answers a bridge open is a clear error
within a bounded time, and `fastsfu cluster status` prints what the cluster holds."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cluster_helpers import MultiNode, NodeMember, error_identifier, multi_node, place, wait_metrics

from fastsfu.cluster.bridge import OPEN_TIMEOUT, open_subject
from fastsfu.cluster.bus import Bus
from fastsfu.cluster.harmony_bridge import UNAVAILABLE
from fastsfu.cluster.placement import NodeLoad
from fastsfu.cluster.registry import NODES_SUBJECT

pytestmark = [pytest.mark.loopback, pytest.mark.slow, pytest.mark.usefixtures("aiortc_loopback")]
DROPPED = 'fastsfu_cluster_bus_dropped_total{{subject_kind="{}"}}'
GOOD = NodeLoad("fake", media="127.0.0.9:1").to_json()
NOT_JSON = [b"", b"\xff\xfe", b"{", b"[" * 100_000]  # empty, not UTF-8, cut short, nested too deep
WRONG = [  # JSON, but not a message of this version with these types
    [1],
    {**GOOD, "v": 2},
    {**GOOD, "v": "1"},
]
BAD_HEARTBEATS = [
    *WRONG,
    {**GOOD, "node": "a.>"},
    {**GOOD, "node": 5},
    {**GOOD, "members": "3"},
    {**GOOD, "rooms": -1},
    {**GOOD, "served": "1.1"},
    {**GOOD, "bridges": [1]},
    {**GOOD, "draining": "yes"},
    {**GOOD, "media": None},
]
FIRST = base64.b64encode(bytes([0x0A, 0x04, 0x08, 0x01, 0x10, 0x02])).decode()  # Initialize{1, 2}
OPEN = {"v": 1, "sid": "0" * 32, "user": 7, "edge": "fake", "first": FIRST}
BAD_OPENS = [
    *WRONG,
    {**OPEN, "sid": "*"},
    {**OPEN, "sid": None},
    {**OPEN, "user": "7"},
    {**OPEN, "user": True},
    {**OPEN, "user": -1},
    {**OPEN, "edge": "a b"},
    {**OPEN, "first": "not base64!"},
    {**OPEN, "first": base64.b64encode(b"\xff\xff\xff").decode()},  # not protobuf
    {**OPEN, "first": ""},  # an empty request: not an Initialize
]
BAD_FRAMES_IN = [*WRONG, {"v": 1, "k": "?"}, {"v": 1, "k": "f", "d": 5}, {"v": 1, "k": "f", "d": "%%"}]
BAD_FRAMES_OUT = [
    *WRONG,
    {"v": 1, "k": "?"},
    {"v": 1, "k": "m", "d": "%%"},
    {"v": 1, "k": "m", "d": base64.b64encode(b"\xff\xff\xff").decode()},
    {"v": 1, "k": "e", "id": 5, "msg": "x"},
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[MultiNode]:
    with multi_node(tmp_path) as c:
        yield c


def raw(message: object) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message).encode()


@pytest.mark.timeout(120)
def test_bad_bus_messages_are_counted_and_ignored(cluster: MultiNode) -> None:
    """Malformed JSON, other versions and wrong types on the heartbeats (all nodes), a node's bridge
    open (answered ok false when asked), a bridged session's frames in (at the home) and out (at
    the edge): each counted once by the subject's kind, nothing else happens, and the call goes on."""
    a, b, c = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"5.1": a.node_id})
        members = [NodeMember(a, 11, 5, 1), NodeMember(b, 12, 5, 1)]
        for m in members:
            await m.join()
        await members[0].until_hears([12])
        bus = await Bus.connect(",".join(cluster.nats.urls), "test-bad")
        try:
            sids: set[str] = set()
            await bus.subscribe(NODES_SUBJECT, "heartbeat", lambda d: sids.update(d.get("bridges", [])))
            t0 = time.monotonic()
            while not sids:
                assert time.monotonic() - t0 < 5
                await asyncio.sleep(0.1)
            (sid,) = sids  # the one bridged session (B's stream to its home A)
            for message in NOT_JSON + BAD_HEARTBEATS:
                await bus.nc.publish(NODES_SUBJECT, raw(message))
            refused = []
            for message in NOT_JSON + BAD_OPENS:
                reply = await bus.nc.request(open_subject(a.node_id), raw(message), timeout=5)
                refused.append(json.loads(reply.data)["ok"])
            for message in NOT_JSON + BAD_FRAMES_IN:
                await bus.nc.publish(f"fastsfu.v1.bridge.{sid}.in", raw(message))
            for message in NOT_JSON + BAD_FRAMES_OUT:
                await bus.nc.publish(f"fastsfu.v1.bridge.{sid}.out", raw(message))
            await bus.nc.flush(timeout=5)
        finally:
            await bus.close()
        assert refused == [False] * len(NOT_JSON + BAD_OPENS)
        expected = [
            {"heartbeat": len(NOT_JSON + BAD_HEARTBEATS)}
            | (
                {"bridge_open": len(NOT_JSON + BAD_OPENS), "bridge_in": len(NOT_JSON + BAD_FRAMES_IN)}
                if i == 0
                else {}
            )
            | ({"bridge_out": len(NOT_JSON + BAD_FRAMES_OUT)} if i == 1 else {})
            for i in range(3)
        ]

        def counted(seen: list[dict[str, float]]) -> list[dict[str, float]]:
            kinds = ("heartbeat", "bridge_open", "bridge_in", "bridge_out")
            return [{k: m[DROPPED.format(k)] for k in kinds if m[DROPPED.format(k)]} for m in seen]

        async with aiohttp.ClientSession() as http:
            seen = await wait_metrics(http, cluster.nodes, lambda s: counted(s) == expected, timeout=10)
            assert all(m["fastsfu_cluster_nodes"] == 3 for m in seen)  # no bad heartbeat became a node
            assert [m["fastsfu_room_members"] for m in seen] == [2, 0, 0]
            # The call goes on, and the bridge still carries a new member's UserJoined.
            late = NodeMember(c, 13, 5, 1)
            await late.join()
            await late.until_hears([11, 12])
            await members[1].until_hears([11, 13])
            assert members[1].events("user_joined") == [13]
            for m in [*members, late]:
                await m.leave_cleanly()
            await wait_metrics(http, cluster.nodes, lambda s: all(m["fastsfu_room_members"] == 0 for m in s))

    asyncio.run(asyncio.wait_for(run(), 100))


@pytest.mark.timeout(120)
def test_a_home_that_never_answers_is_a_clear_error_in_bounded_time(cluster: MultiNode) -> None:
    """A fake node heartbeats (so it is live and homes a room) and listens on its bridge open
    subject but never answers: a client joining that room on A gets
    fastsfu.voice-cluster-unavailable after the open timeout, not a hang."""
    a = cluster.nodes[0]

    async def run() -> float:
        bus = await Bus.connect(",".join(cluster.nats.urls), "fake-home")
        heard: list[bytes] = []

        async def silent(msg: object) -> None:
            heard.append(msg.data)  # type: ignore[attr-defined]

        async def beat() -> None:
            while True:
                await bus.publish(NODES_SUBJECT, NodeLoad("zz-fake", media="127.0.0.9:1").to_json())
                await asyncio.sleep(0.5)

        await bus.nc.subscribe(open_subject("zz-fake"), cb=silent)
        beating = asyncio.create_task(beat())
        try:
            await place(cluster.nats.urls, {"6.1": "zz-fake"})
            await asyncio.sleep(1.5)  # every node hears the fake one
            member = NodeMember(a, 21, 6, 1)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(member.join(), OPEN_TIMEOUT + 10)
            took = time.monotonic() - t0
            assert error_identifier(err.value) == UNAVAILABLE
            assert len(heard) == 1  # the open reached the fake home once
            await member.channel.close()
            return took
        finally:
            beating.cancel()
            await bus.close()

    took = asyncio.run(asyncio.wait_for(run(), 60))
    print(f"unanswered bridge open: the client's error after {took:.2f} s")
    assert OPEN_TIMEOUT - 0.5 < took < OPEN_TIMEOUT + 3


def status(urls: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [arg for url in urls for arg in ("--nats", url)]
    return subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "cluster", "status", *flags, *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.timeout(120)
def test_cluster_status_prints_the_nodes_and_the_room_homes(cluster: MultiNode) -> None:
    """`fastsfu cluster status` against the real cluster: the 3 nodes (id, media address, members,
    rooms, draining, last heard) and the rooms bucket (key -> home), as JSON and as text; with NATS
    unreachable, exit code 1 and one clear line within a bounded time."""
    a, b, _ = cluster.nodes

    async def run() -> None:
        await place(cluster.nats.urls, {"7.1": b.node_id})
        members = [NodeMember(a, 11, 7, 1), NodeMember(b, 12, 7, 1)]
        for m in members:
            await m.join()
        await members[0].until_hears([12])
        await asyncio.sleep(1.2)  # a heartbeat after the joins
        out = await asyncio.to_thread(status, cluster.nats.urls, "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        nodes = {n["node"]: n for n in data["nodes"]}
        assert set(nodes) == {n.node_id for n in cluster.nodes}
        for node in cluster.nodes:
            n = nodes[node.node_id]
            assert n["media"] == node.media and n["draining"] is False and 0 <= n["last_heard"] < 1.6
        assert [nodes[n.node_id]["members"] for n in cluster.nodes] == [0, 2, 0]
        assert [nodes[n.node_id]["rooms"] for n in cluster.nodes] == [0, 1, 0]
        assert data["rooms"] == {"7.1": b.node_id}
        text = await asyncio.to_thread(status, cluster.nats.urls[1:2])
        assert text.returncode == 0 and "3 nodes" in text.stdout and f"7.1 -> {b.node_id}" in text.stdout
        assert f"{b.node_id}  media {b.media}  members 2  rooms 1  open" in text.stdout
        for m in members:
            await m.leave_cleanly()

    asyncio.run(asyncio.wait_for(run(), 60))
    t0 = time.monotonic()
    down = status(["nats://127.0.0.1:1"])
    assert down.returncode == 1 and down.stdout == ""
    assert "fastsfu cluster status: error: cannot connect to NATS" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr and time.monotonic() - t0 < 15


def test_nats_is_repeatable_in_every_layer(tmp_path: Path) -> None:
    """`--nats` given once per server, a TOML list and a comma-separated env variable all name the
    same servers (one string, split by the bus); `serve` with it alone is a node, not a supervisor."""
    from fastsfu.server.cli import parse_args
    from fastsfu.server.config import flag_values, load_config
    from fastsfu.server.worker import worker_role

    urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    args = parse_args(["serve", "--nats", urls[0], "--nats", urls[1]])
    assert load_config(None, {}, flag_values(args)).nats == ",".join(urls)
    toml = tmp_path / "fastsfu.toml"
    toml.write_text(f"nats = {json.dumps(urls)}\n")
    config = load_config(str(toml), {}, {})
    assert config.nats == ",".join(urls)
    assert load_config(None, {"FASTSFU_NATS": ",".join(urls)}, {}).nats == ",".join(urls)
    role = worker_role(config, {})
    assert role is not None and not role.supervised and config.worker_count == 1
    assert worker_role(load_config(None, {}, {}), {}) is None  # no NATS: a single server, as before
