"""The Discord voice gateway under `fastsfu serve --workers 2` (docs/cluster.md#discord):
a WebSocket that lands on a worker other than its room's home is relayed there, so Discord members
on different workers hear each other, a RESUME works whichever worker its socket reaches, and the
faults end with clear close codes. Uses the `Cluster` of test_workers.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from discord_clients import (
    djs_available,
    dpy_available,
    make_test_certificate,
    marker_index,
    opus_marker_frames,
    opus_tone_frames,
    start_djs_client,
    start_dpy_bot,
)
from discord_helpers import Observer
from test_server_ops import SECRET
from test_workers import Cluster, OwnConnectionMember, kill, scrape, total, wait_metrics

from fastsfu.cluster.bus import Bus
from fastsfu.cluster.discord_bridge import CLOSE_SUBJECT
from fastsfu.cluster.node import HEARTBEAT_INTERVAL
from fastsfu.cluster.registry import NODE_TTL
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.worker import DRAIN_WAIT

pytestmark = [pytest.mark.loopback, pytest.mark.slow]
AUTH = TokenAuth(SECRET)
UNAVAILABLE = 4000  # CloseCode.CLUSTER_UNAVAILABLE


def sessions(where: str, protocol: str = "discord") -> str:
    return f'fastsfu_cluster_sessions_total{{protocol="{protocol}",where="{where}"}}'


class DiscordCluster(Cluster):
    """`--workers 2` with the Discord gateway on wss (a test certificate) and a room map."""

    def __init__(self, tmp_path: Path, *extra: str, rooms: str = "") -> None:
        cert, key = make_test_certificate(tmp_path)
        config = tmp_path / "fastsfu.toml"
        config.write_text(
            f'[discord]\ntls_certificate = "{cert}"\ntls_private_key = "{key}"\nresume_grace = 10\n'
            f"[discord.rooms]\n{rooms}\n"
        )
        super().__init__("--config", str(config), "--discord-port", "0", *extra)
        self.cert = cert
        self.tls = ssl.create_default_context(cafile=str(cert))

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.discord}/?v=8"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.discord}"


@pytest.fixture
def discord_cluster(tmp_path: Path) -> Iterator[DiscordCluster]:
    c = DiscordCluster(tmp_path, rooms='"41" = [41, 42]')
    try:
        c.ready()
        yield c
    finally:
        c.stop()
        with contextlib.suppress(AssertionError):
            c.wait_for(lambda: False, 1)  # the rest of the output, shown when a test fails
        print("".join(c.output[-200:]))


async def both_nodes(http: aiohttp.ClientSession, cluster: Cluster) -> None:
    seen = await wait_metrics(http, cluster, lambda seen: total(seen, "fastsfu_cluster_nodes") == 4)
    assert total(seen, "fastsfu_cluster_nodes") == 4, seen


async def bridged_observer(
    http: aiohttp.ClientSession, cluster: DiscordCluster, server_id: str, user: int
) -> tuple[Observer, int, int]:
    """An Observer in `server_id` whose socket landed on the worker that is not the room's home
    (each try lands on either: 12 tries miss with p = 2^-12); (it, its edge, the home)."""
    for _ in range(12):
        before = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
        observer = await Observer.join(
            http, cluster.url, server_id=server_id, user_id=user, token=AUTH.mint(user), ssl=cluster.tls
        )
        after = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
        bridged = [i for i in (0, 1) if after[i][sessions("bridged")] > before[i][sessions("bridged")]]
        if bridged:
            return observer, bridged[0], 1 - bridged[0]
        await observer.close()  # 1000: a leave, the session ends at once
    raise AssertionError("every socket reached the room's home")


async def observer_at_home(
    http: aiohttp.ClientSession, cluster: DiscordCluster, server_id: str, user: int, home: int
) -> Observer:
    """An Observer in `server_id` whose socket reached worker `home` (the room's home)."""
    for _ in range(12):
        before = (await scrape(http, cluster.metrics[home]))[sessions("here")]
        observer = await Observer.join(
            http, cluster.url, server_id=server_id, user_id=user, token=AUTH.mint(user), ssl=cluster.tls
        )
        if (await scrape(http, cluster.metrics[home]))[sessions("here")] > before:
            return observer
        await observer.close()
    raise AssertionError("no socket reached the home")


async def observer_closed(observer: Observer, timeout: float) -> int | None:
    """The close code the server ends an Observer's socket with, within `timeout`."""
    await asyncio.wait_for(asyncio.shield(observer._reader), timeout)
    return observer.close_code


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> int | None:
    """The close code the server ends `ws` with (reading past its other messages), within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await ws.receive(timeout=max(deadline - loop.time(), 0.01))
        if msg.type == aiohttp.WSMsgType.CLOSE:  # the server's code (aiohttp may log 1006 after)
            return int(msg.data)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code


async def identify(http: aiohttp.ClientSession, cluster: DiscordCluster, server_id: str, user: int) -> Any:
    ws = await http.ws_connect(cluster.url, ssl=cluster.tls)
    hello = await ws.receive_json(timeout=5)
    assert hello["op"] == 8, hello
    d = {"server_id": server_id, "user_id": str(user), "session_id": f"s-{user}", "token": AUTH.mint(user)}
    await ws.send_json({"op": 0, "d": d})
    return ws


@pytest.mark.timeout(120)
@pytest.mark.parametrize("gone", ["home", "edge"])
def test_a_dead_home_or_edge_ends_a_bridged_discord_session_cleanly(
    discord_cluster: DiscordCluster, gone: str
) -> None:
    """A Discord member at the room's home and one bridged from the other worker hear each other.
    SIGKILL the home: the bridged member's socket is closed with 4015 within the heartbeat TTL (its
    client reconnects and is placed on a live node). SIGKILL the edge: the member at the home gets
    CLIENT_DISCONNECT for the bridged one exactly once, within the TTL."""
    cluster = discord_cluster

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await both_nodes(http, cluster)
            bridged, edge, home = await bridged_observer(http, cluster, "77", 1)
            local = await observer_at_home(http, cluster, "77", 2, home)
            # They hear each other: media straight to the home (READY named its media port).
            await bridged.wait_op(11, 2, 10)
            await local.wait_op(11, 1, 10)
            seen = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
            assert seen[home]["fastsfu_room_members"] == 2 and seen[edge]["fastsfu_room_members"] == 0
            t0 = time.monotonic()
            if gone == "home":
                kill(cluster.pids[home])
                code = await observer_closed(bridged, NODE_TTL + 5)
                assert code == 4015, code
                assert time.monotonic() - t0 < NODE_TTL + 5
            else:
                kill(cluster.pids[edge])
                await local.wait_op(13, 1, NODE_TTL + 5)
                await asyncio.sleep(0.5)  # a duplicate would come within this
                left = [m for _, m in local.received if m["op"] == 13]
                assert left == [{"op": 13, "seq": left[0]["seq"], "d": {"user_id": "1"}}], left
            for observer in (bridged, local):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(observer.close(), 5)

    asyncio.run(asyncio.wait_for(run(), 100))


@pytest.mark.timeout(90)
def test_a_draining_edge_hands_its_discord_sockets_to_the_other_worker(
    discord_cluster: DiscordCluster,
) -> None:
    """SIGTERM to the worker a bridged Discord member's socket reached (not its room's home): the
    socket is closed with 4015, and the session, kept at the home, RESUMEs through the other worker
    (op 9, the messages after seq_ack replayed); the member at the home never hears it leave."""
    cluster = discord_cluster

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await both_nodes(http, cluster)
            bridged, edge, home = await bridged_observer(http, cluster, "79", 1)
            other = await observer_at_home(http, cluster, "79", 2, home)
            await bridged.wait_op(11, 2, 10)
            os.kill(cluster.pids[edge], signal.SIGTERM)
            assert await observer_closed(bridged, DRAIN_WAIT + 5) == 4015
            resume = {
                "server_id": "79",
                "session_id": "obs-1",
                "token": bridged.token,
                "seq_ack": bridged._seq,
            }
            resumed = None
            for _ in range(20):  # the draining worker's listener may still take a socket (4015 again)
                ws = await http.ws_connect(cluster.url, ssl=cluster.tls)
                msg = await ws.receive(timeout=5)
                if msg.type == aiohttp.WSMsgType.TEXT and msg.json()["op"] == 8:
                    await ws.send_json({"op": 7, "d": resume})
                    msg = await ws.receive(timeout=5)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        resumed = msg.json()
                        break
                await ws.close()
                await asyncio.sleep(0.2)
            assert resumed == {"op": 9, "d": None}, resumed
            await asyncio.sleep(0.5)
            assert not [m for _, m in other.received if m["op"] == 13], other.received
            await ws.close()  # 1000: now it leaves
            await other.wait_op(13, 1, 5)
            await other.close()

    asyncio.run(asyncio.wait_for(run(), 80))


# The IDENTIFY goes out by then after the SIGSTOP: the home's last heartbeat is at most a
# HEARTBEAT_INTERVAL older, so the home is still alive in the registry when the edge looks.
IDENTIFY_BY = NODE_TTL - 2 * HEARTBEAT_INTERVAL


@pytest.mark.timeout(90)
def test_a_bridge_open_that_times_out_closes_with_4000(discord_cluster: DiscordCluster) -> None:
    """The room's home is alive in the registry but does not answer (SIGSTOP): an IDENTIFY that
    lands on the other worker is closed with 4000 once the open request times out (3 s), not hung."""
    cluster = discord_cluster

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await both_nodes(http, cluster)
            first, edge, home = await bridged_observer(http, cluster, "78", 1)
            os.kill(cluster.pids[home], signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                ws = None
                # Sockets queued at the stopped worker get no HELLO (their TLS handshake waits for
                # it too): short tries, each a new socket that lands on either worker, and all of
                # them well within NODE_TTL, after which the stopped home would count as gone and
                # the room be placed again (on the running worker: no bridge, no 4000).
                while ws is None and time.monotonic() < stopped + IDENTIFY_BY - 1:
                    try:
                        candidate = await asyncio.wait_for(http.ws_connect(cluster.url, ssl=cluster.tls), 0.6)
                        hello = await candidate.receive_json(timeout=0.6)
                    except (TimeoutError, aiohttp.ClientError):
                        continue
                    assert hello["op"] == 8
                    ws = candidate
                assert ws is not None, "no socket reached the running worker"
                d = {"server_id": "78", "user_id": "3", "session_id": "s-3", "token": AUTH.mint(3)}
                t0 = time.monotonic()
                assert t0 < stopped + IDENTIFY_BY, "too late: the stopped home may count as gone"
                await ws.send_json({"op": 0, "d": d})
                assert await closed_with(ws, 10) == UNAVAILABLE
                assert 2.5 < time.monotonic() - t0 < 6
            finally:
                os.kill(cluster.pids[home], signal.SIGCONT)
            await first.close()

    asyncio.run(asyncio.wait_for(run(), 80))


@pytest.mark.timeout(90)
def test_without_the_bus_an_identify_is_closed_with_4000(tmp_path: Path) -> None:
    """Workers whose NATS is down (nothing listens at --nats): an IDENTIFY is closed with 4000
    within seconds instead of hanging; a plain single-server session needs no bus at all."""
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cluster = DiscordCluster(tmp_path, "--nats", f"nats://127.0.0.1:{dead}")
    try:
        cluster.ready()

        async def run() -> None:
            async with aiohttp.ClientSession() as http:
                for user in (1, 2):  # either worker
                    ws = await identify(http, cluster, str(80 + user), user)
                    t0 = time.monotonic()
                    assert await closed_with(ws, 10) == UNAVAILABLE
                    assert time.monotonic() - t0 < 6
                closes = [(await scrape(http, cluster.metrics[i])) for i in (0, 1)]
                assert sum(m.get('fastsfu_discord_closes_total{code="4000"}', 0) for m in closes) == 2

        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        cluster.stop()


GUILD, CHANNEL = 41, 42  # Discord server 41 is mapped to the Harmony channel (41, 42)
DPY, DJS = 1001, 1002
RESUMES, WINDOW = 10, 2.2  # 4015s in a row; seconds between two (>= 200 of the bot's frames)
DPY_INTERVAL = 0.01  # seconds between the bot's frames: 200 frames take 2 s
# The bot's frames djs must receive: more than it gets by the resume loop's end (about 8 s of setup
# and playing, then RESUMES x (WINDOW + the resume), some 30 s), so it is still listening then.
DJS_EXPECT = 4000


def require_clients() -> None:
    if not dpy_available():
        pytest.fail("discord.py[voice]==2.7.1 is not installed (pip install -e '.[test]')")
    if not djs_available():
        pytest.fail("tests/discord/node_modules is missing: run scripts/discord_clients_setup.sh")


def discord_ids(user: int) -> dict[str, Any]:
    token = AUTH.mint(user)
    return {
        "guild_id": GUILD,
        "channel_id": CHANNEL,
        "user_id": user,
        "session_id": f"s-{user}",
        "token": token,
    }


async def harmony_members_on_both_workers(
    http: aiohttp.ClientSession, cluster: Cluster
) -> list[OwnConnectionMember]:
    """Four Harmony clients on connections of their own, two of them on each worker."""
    edges: dict[int, list[OwnConnectionMember]] = {0: [], 1: []}
    for attempt in range(24):  # each lands on either worker
        if min(len(v) for v in edges.values()) == 2:
            break
        user = 1 + len(edges[0]) + len(edges[1])
        member = OwnConnectionMember(cluster.grpc, AUTH.mint(user), GUILD, CHANNEL)
        member.user = user
        edge = await member.edge(cluster, http, AUTH.mint(100 + attempt))
        if len(edges[edge]) == 2:
            member.call.cancel()
            await member.channel.close()
            continue
        edges[edge].append(member)
    assert min(len(v) for v in edges.values()) == 2, "the connections did not reach both workers"
    return sorted(edges[0] + edges[1], key=lambda m: m.user)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("aiortc_loopback")
def test_harmony_and_discord_clients_on_both_workers_share_one_channel(
    discord_cluster: DiscordCluster,
) -> None:
    """Issue 11's proof with `--workers 2`: 4 aiortc gRPC clients (two on each worker), a
    discord.py bot and an @discordjs/voice client in one channel (Discord server 41 mapped to
    Harmony channel (41, 42)). Every session runs at the room's home, bridged there from the other
    worker (metrics of both). Everyone hears everyone; joins and leaves are told once each. Then a
    server-sent 4015 ten times in a row: each time djs resumes, on whichever worker its new
    socket reaches (the RESUME is bridged to the home when it is the other), and receives every one
    of the bot's frames (200 between two 4015s, none lost)."""
    require_clients()
    cluster = discord_cluster
    dpy_frames = opus_marker_frames(DJS_EXPECT + 1000)  # and those sent before djs listens
    djs_frames = opus_tone_frames(250, 880.0)

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            await both_nodes(http, cluster)
            harmony = await harmony_members_on_both_workers(http, cluster)
            try:
                await with_harmony(http, harmony)
            finally:  # an unclosed gRPC channel would hold the interpreter at exit
                for member in harmony:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(member.leave(), 10)
                    with contextlib.suppress(Exception):
                        await member.channel.close()

    async def with_harmony(http: aiohttp.ClientSession, harmony: list[OwnConnectionMember]) -> None:
        base = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]  # after the probes
        for member in harmony:
            await member.join()
        bot = await start_dpy_bot(
            cluster.endpoint,
            **discord_ids(DPY),
            frames=dpy_frames,
            frame_interval=DPY_INTERVAL,
            start_delay=0.5,
            hold=3.0,
            cafile=cluster.cert,
            timeout=200,
        )
        djs = None
        try:
            await bot.wait_event("connected", 20)
            djs = await start_djs_client(
                cluster.endpoint,
                **discord_ids(DJS),
                frames=djs_frames,
                receive_from=[*(m.user for m in harmony), DPY],
                expect_frames={DPY: DJS_EXPECT, **{m.user: 25 for m in harmony}},
                expect_resume=True,
                play_delay=1.0,
                duration=180,
                ready_timeout=20,
                cafile=cluster.cert,
                timeout=200,
            )
            await djs.wait_event("ready", 25)
            users = {m.user for m in harmony} | {DPY, DJS}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if all(set(m.receivers) == users - {m.user} for m in harmony):
                    break
                await asyncio.sleep(0.05)
            # Everyone hears everyone: each Harmony client decodes 20 ms frames of each of
            # the others (Harmony and Discord), while djs plays.
            heard = await asyncio.gather(*(m.heard(u) for m in harmony for u in users - {m.user}))
            assert heard == [5] * len(heard), heard
            await djs.wait_event("played", 20)
            seen = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
            assert sorted(m["fastsfu_room_members"] for m in seen) == [0, 6], seen
            # The server-sent 4015s (through the bus, to the node holding the session).
            bus = await Bus.connect(cluster.nats, "test")
            try:
                took = []  # seconds from each 4015 request to djs's Ready again
                for i in range(1, RESUMES + 1):
                    await asyncio.sleep(WINDOW)
                    request = {"v": 1, "user_id": str(DJS), "server_id": str(GUILD), "code": 4015}
                    t0 = time.monotonic()
                    await bus.publish(CLOSE_SUBJECT, request)
                    while sum(e.get("event") == "resumed" for e in djs.events) < i:
                        assert time.monotonic() < t0 + 15, f"no resume {i}: {djs.events[-5:]}"
                        await asyncio.sleep(0.01)
                    took.append(time.monotonic() - t0)
                print(f"4015 to resumed: median {sorted(took)[len(took) // 2]:.3f} s, max {max(took):.3f} s")
            finally:
                await bus.close()
            during = [await scrape(http, cluster.metrics[i]) for i in (0, 1)]
            result = await djs.result()
            dpy = await bot.result()
        finally:
            for client in (djs, bot):
                if client is not None:
                    await client.aclose()
        # djs: a resume after each 4015, and every one of the bot's frames from its first on.
        assert result.ok, (result.errors, result.stderr[-3000:])
        assert result.ws_close_codes[:RESUMES] == [4015] * RESUMES, result.ws_close_codes
        assert result.resumes == RESUMES, result.networking_states[-6:]
        # Every one of the bot's frames from djs's first on, in order. djs 0.19.2 strips a "header
        # extension" from any packet whose encrypted payload starts with 0xBEDE (it does not look
        # at the X bit), so about one packet in 65536 reaches it garbled: such a frame counts as
        # received at its place when the frames around it are in sequence.
        got = [marker_index(f) for f in result.received_from(DPY)]
        start = next(i - k for k, i in enumerate(got) if i is not None)
        garbled = [k for k, i in enumerate(got) if i is None]
        assert len(got) >= DJS_EXPECT and all(i in (None, start + k) for k, i in enumerate(got)), got[:5]
        assert len(garbled) <= 2, garbled
        for member in harmony:
            assert len(result.received_from(member.user)) >= 25
        assert result.ws_ops_received.count(11) == 1  # CLIENTS_CONNECT once, none replayed twice
        # discord.py: sent everything, heard djs (every frame) and the Harmony clients.
        assert dpy.ok and dpy.frames_sent == len(dpy_frames), (dpy.error, dpy.stderr[-2000:])
        ops = [(m["op"], m["d"]) for m in dpy.ws_received]
        ssrcs = {d["user_id"]: d["ssrc"] for op, d in ops if op == 5}
        assert set(ssrcs) == {str(u) for u in users - {DPY}}, ssrcs
        from_djs = [base64.b64decode(f) for f in dpy.raw["received"][str(ssrcs[str(DJS)])]]
        assert from_djs[: len(djs_frames)] == djs_frames  # then djs's silence frames
        for member in harmony:
            assert len(dpy.raw["received"].get(str(ssrcs[str(member.user)]), [])) > 50
        assert dpy.raw["receive_failures"] == 0
        connected = [u for op, d in ops if op == 11 for u in d["user_ids"]]
        assert sorted(connected) == sorted(str(u) for u in users - {DPY}), connected
        assert [d["user_id"] for op, d in ops if op == 13] == [str(DJS)]  # djs left first
        # Sessions ran at the home, from both workers' sockets.
        delta = {
            (p, w): [during[i][sessions(w, p)] - base[i][sessions(w, p)] for i in (0, 1)]
            for p in ("harmony", "discord")
            for w in ("here", "bridged", "hosted")
        }
        assert sum(delta["harmony", "here"]) == 2 and sum(delta["harmony", "bridged"]) == 2, delta
        assert sum(delta["harmony", "hosted"]) == 2, delta
        sockets = [delta["discord", "here"][i] + delta["discord", "bridged"][i] for i in (0, 1)]
        assert sum(sockets) == 2 + RESUMES and min(sockets) >= 1, delta  # both workers took some
        assert sum(delta["discord", "hosted"]) == sum(delta["discord", "bridged"]) >= 1, delta
        # Harmony clients: each later joiner once, then the Discord users' leaves once.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [
                [r.user_left.user_id for r in m.received if r.WhichOneof("message") == "user_left"]
                for m in harmony
            ]
            if all(len(x) >= 2 for x in left):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a duplicate would come within this
        for k, member in enumerate(harmony):
            joined = [
                r.user_joined.data.user_id
                for r in member.received
                if r.WhichOneof("message") == "user_joined"
            ]
            assert sorted(joined) == sorted([m.user for m in harmony[k + 1 :]] + [DPY, DJS]), joined
            left = [r.user_left.user_id for r in member.received if r.WhichOneof("message") == "user_left"]
            assert sorted(left) == [DPY, DJS], left

    asyncio.run(asyncio.wait_for(run(), 280))
