"""Recording admin requests with `fastsfu serve --workers 2` (docs/recording.md, docs/cluster.md):
whichever worker the shared hRPC port gives a request, a start reaches the room's home, a listing
names every worker's recordings, a stop finds the recording; a home that does not answer is a 503
within the timeout, and bad bus messages are counted and ignored."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harmony_client import HarmonyMember
from recording_helpers import ToneTrack, check_structure, decode, dominant_hz, needs_opusdec
from test_server_ops import SECRET
from test_workers import Cluster, scrape, total, wait_metrics

from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.cluster.admin_relay import STOP_TIMEOUT, TIMEOUT, admin_subject
from fastsfu.cluster.bus import Bus
from fastsfu.cluster.registry import NODES_SUBJECT
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback, pytest.mark.slow, needs_opusdec]
ADMIN = "admin-token-for-the-cluster-recording-test"
GUILD, CHANNEL = 71, 72
AUTH = TokenAuth(SECRET)
RELAYED = 'fastsfu_cluster_admin_relayed_total{{op="{}",way="{}"}}'
DROPPED = 'fastsfu_cluster_bus_dropped_total{subject_kind="admin"}'


def start_cluster(tmp_path: Path) -> Cluster:
    flags = ["--admin-token", ADMIN, "--recording-enabled", "--recording-directory", str(tmp_path / "rec")]
    cluster = Cluster(*flags)
    try:
        cluster.ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def node_id(cluster: Cluster, worker: int) -> str:
    return f"{socket.gethostname()}-w{worker}-{cluster.pids[worker]}"


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def pinned_sessions(cluster: Cluster, http: aiohttp.ClientSession) -> dict[int, aiohttp.ClientSession]:
    """One HTTP session per worker, each keeping its one connection to the shared hRPC port: the
    worker it reached is the one whose listing asked the other (its `list` `sent` counter)."""
    url = f"http://127.0.0.1:{cluster.hrpc}/admin/recordings"
    key = RELAYED.format("list", "sent")
    found: dict[int, aiohttp.ClientSession] = {}
    for _ in range(16):  # each connection reaches either worker: 16 tries miss one with p = 2^-15
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        before = [(await scrape(http, cluster.metrics[i]))[key] for i in (0, 1)]
        async with session.get(url, headers=auth()) as resp:
            assert resp.status == 200, await resp.text()
        after = [(await scrape(http, cluster.metrics[i]))[key] for i in (0, 1)]
        (worker,) = [i for i in (0, 1) if after[i] > before[i]]
        if worker in found:
            await session.close()
            continue
        found[worker] = session
        if len(found) == 2:
            return found
    for session in found.values():
        await session.close()
    raise AssertionError("every connection reached the same worker")


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("aiortc_loopback")
def test_a_recording_is_started_listed_and_stopped_through_either_worker(tmp_path: Path) -> None:
    """A member's room is homed on one worker; the start sent to the other worker is forwarded to
    the home (201 there, counted by both), one to the home is its own (409: one recording per
    room); both list it; the stop through the other worker finds it at the home and answers once
    the file is closed; the file decodes to the 440 Hz the member sent, for as long as it sent."""
    cluster = start_cluster(tmp_path)
    url = f"http://127.0.0.1:{cluster.hrpc}/admin/recordings"

    async def run() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            await wait_metrics(http, cluster, lambda seen: total(seen, "fastsfu_cluster_nodes") == 4)
            go = asyncio.Event()
            track = ToneTrack([(440.0, 2.0)], go)
            member = HarmonyMember(cluster.grpc, AUTH.mint(5001), GUILD, CHANNEL, track)
            await member.join()
            try:
                seen = await wait_metrics(http, cluster, lambda s: total(s, "fastsfu_room_members") == 1)
                home = 0 if seen[0]["fastsfu_room_members"] == 1 else 1
                other = 1 - home
                sessions = await pinned_sessions(cluster, http)
                try:
                    room = {"room": [GUILD, CHANNEL]}
                    async with sessions[other].post(url, json=room, headers=auth()) as resp:
                        assert resp.status == 201, await resp.text()
                        recording = await resp.json()
                    assert recording["node"] == node_id(cluster, home)
                    assert recording["room"] == [GUILD, CHANNEL]
                    async with sessions[home].post(url, json=room, headers=auth()) as resp:
                        assert resp.status == 409, await resp.text()
                    m = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
                    assert m[other][RELAYED.format("start", "sent")] == 1
                    assert m[home][RELAYED.format("start", "served")] == 1
                    assert m[home][RELAYED.format("start", "sent")] == 0  # the home answered itself
                    go.set()
                    for worker in (home, other):
                        async with sessions[worker].get(url, headers=auth()) as resp:
                            assert resp.status == 200
                            listed = await resp.json()
                        assert [r["id"] for r in listed] == [recording["id"]], listed
                    await asyncio.sleep(track.sent_seconds + 0.6)  # the tone was sent and taken
                    async with sessions[other].delete(f"{url}/{recording['id']}", headers=auth()) as resp:
                        assert resp.status == 200, await resp.text()
                        done: dict[str, Any] = await resp.json()
                    assert done["closed"] and done["node"] == node_id(cluster, home)
                    async with sessions[other].delete(f"{url}/{recording['id']}", headers=auth()) as resp:
                        assert resp.status == 404  # every node answered that it has none
                    m = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
                    assert m[other][RELAYED.format("stop", "sent")] == 2
                    assert m[home][RELAYED.format("stop", "served")] == 2
                    assert total(m, DROPPED) == 0
                finally:
                    for session in sessions.values():
                        await session.close()
            finally:
                await member.leave()
            done["sent"] = track.sent_seconds
            return done

    try:
        done = asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        cluster.stop()
    (path,) = [Path(f) for f in done["files"]]
    check_structure(path)
    pcm = decode(path, tmp_path)
    seconds = len(pcm) / 48000
    assert abs(seconds - done["sent"]) <= 0.01 * done["sent"], (seconds, done["sent"])
    assert dominant_hz(pcm, 0.5) == 440 and dominant_hz(pcm, 1.5) == 440


@pytest.mark.timeout(150)
def test_a_silent_home_is_a_503_within_the_timeout_and_bad_bus_messages_are_counted(tmp_path: Path) -> None:
    """Without the admin token every request is 401 on both workers. Bad messages on a worker's admin
    subject are counted and ignored (it still answers). A node that heartbeats but never answers is
    named missing in a listing, and makes a stop of an unknown ID a 503 (each within its timeout).
    With the room's home stopped (SIGSTOP), a start and a listing through the other worker are each
    a 503 within the timeout."""
    cluster = start_cluster(tmp_path)
    url = f"http://127.0.0.1:{cluster.hrpc}/admin/recordings"
    stopped: list[int] = []

    async def timed(call: Any) -> tuple[int, Any, float]:
        begin = time.monotonic()
        async with call as resp:
            return resp.status, await resp.json(), time.monotonic() - begin

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await wait_metrics(http, cluster, lambda seen: total(seen, "fastsfu_cluster_nodes") == 4)
            ws_url = f"ws://127.0.0.1:{cluster.hrpc}/protocol.voice.v1.VoiceService/StreamMessage"
            ws = await http.ws_connect(ws_url, protocols=("hrpc1", AUTH.mint(6001)))
            init = voice_pb2.StreamMessageRequest.Initialize(guild_id=GUILD, channel_id=CHANNEL)
            await ws.send_bytes(voice_pb2.StreamMessageRequest(initialize=init).SerializeToString())
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0, msg
            seen = await wait_metrics(http, cluster, lambda s: total(s, "fastsfu_cluster_rooms_homed") == 1)
            home = 0 if seen[0]["fastsfu_cluster_rooms_homed"] == 1 else 1
            other = 1 - home
            sessions = await pinned_sessions(cluster, http)
            bus = await Bus.connect(cluster.nats, "test")
            try:
                for worker, session in sessions.items():
                    for h in ({}, auth("wrong"), auth(ADMIN + "x"), {"Authorization": ADMIN}):
                        async with session.post(url, json={"room": [GUILD, CHANNEL]}, headers=h) as resp:
                            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer", worker
                        async with session.get(url, headers=h) as resp:
                            assert resp.status == 401
                        async with session.delete(url + "/x", headers=h) as resp:
                            assert resp.status == 401
                    # An unknown room is a 404 wherever the request lands (it has no home to ask).
                    async with session.post(url, json={"room": [GUILD, 999]}, headers=auth()) as resp:
                        assert resp.status == 404, await resp.text()

                bad = [b"not json", b"[1]", b'{"v": 2, "op": "list"}', b'{"v": 1, "op": "format"}']
                bad += [b'{"v": 1, "op": "start", "room": 5}', b'{"v": 1, "op": "stop", "id": 7}']
                for worker in (0, 1):
                    for data in bad:
                        with contextlib.suppress(Exception):  # no answer comes: the request times out
                            await bus.nc.request(admin_subject(node_id(cluster, worker)), data, timeout=0.3)
                    await bus.nc.publish(admin_subject(node_id(cluster, worker)), b'{"v": 1, "op": "list"}')
                await bus.nc.flush()
                seen = await wait_metrics(http, cluster, lambda s: all(m[DROPPED] == len(bad) + 1 for m in s))
                assert [m[DROPPED] for m in seen] == [len(bad) + 1] * 2  # no reply subject: dropped too
                # Counted with every other bus subject's drops, under no counter of its own.
                assert not [k for m in seen for k in m if k.startswith("fastsfu_cluster_admin_dropped")]

                # A node that heartbeats (draining: it gets no rooms) but never answers.
                ghost = {"v": 1, "node": "ghost", "draining": True}
                await bus.nc.publish(NODES_SUBJECT, Bus.encode(ghost))
                await bus.nc.flush()
                await wait_metrics(http, cluster, lambda s: total(s, "fastsfu_cluster_nodes") == 6)
                status, body, took = await timed(sessions[home].get(url, headers=auth()))
                assert status == 503 and body["missing"] == ["ghost"] and body["recordings"] == [], body
                assert took < TIMEOUT + 1.5, took
                # A stop asks every node: one that does not answer may hold the recording.
                status, body, took = await timed(sessions[home].delete(url + "/no-such-id", headers=auth()))
                assert status == 503 and "did not answer" in body["error"], body
                assert took < STOP_TIMEOUT + 1.5, took

                os.kill(cluster.pids[home], signal.SIGSTOP)  # within the heartbeat TTL: still a node
                stopped.append(cluster.pids[home])
                room = {"room": [GUILD, CHANNEL]}
                start = await timed(sessions[other].post(url, json=room, headers=auth()))
                listing = await timed(sessions[other].get(url, headers=auth()))
                os.kill(cluster.pids[home], signal.SIGCONT)
                stopped.clear()
                assert start[0] == 503 and node_id(cluster, home) in start[1]["error"], start
                assert listing[0] == 503 and node_id(cluster, home) in listing[1]["missing"], listing
                assert max(start[2], listing[2]) < TIMEOUT + 1.5, (start, listing)
                # The resumed home finds the requests past their deadline: no recording starts late.
                seen = await wait_metrics(
                    http, cluster, lambda s: s[home][RELAYED.format("start", "expired")] == 1
                )
                assert seen[home][RELAYED.format("start", "expired")] == 1
                assert seen[home][RELAYED.format("start", "served")] == 0
                async with sessions[other].get(url, headers=auth()) as resp:
                    body = await resp.json()  # the ghost may still be within its TTL
                    ok = resp.status == 200 or (resp.status == 503 and body["missing"] == ["ghost"])
                    assert ok and (body if resp.status == 200 else body["recordings"]) == [], body
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
                await ws.close()
                await bus.close()
                for session in sessions.values():
                    await session.close()

    try:
        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        cluster.stop()
