"""The /demo page in headless Chromium: two browser contexts join one Harmony voice channel over
hRPC with mediasoup-client (@harmony-dev/transport-hrpc, the shared-certificate flow of
docs/harmony.md#client-side), each hears the other (inbound-rtp packets and audio level in getStats), and a
leave reaches the other as UserLeft. A bad token surfaces in the page as the h.blank-session error.

Runs in a loopback-only network namespace (scripts/test.sh); the page's bundle comes from
scripts/web_build.sh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

aiohttp_web = pytest.importorskip("aiohttp.web")
pytest.importorskip("playwright.async_api")

from chromium_helpers import (  # noqa: E402
    chromium_args,
    find_chromium,
    launched_chromium,
    require_bundle,
    require_loopback_namespace,
)
from helpers import serve_app  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402
from fastsfu.harmony import VoiceRooms  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402
from fastsfu.harmony.hrpc_server import make_app  # noqa: E402
from fastsfu.server.demo_page import BUNDLE, mount_demo, speaking_mount  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.loopback, pytest.mark.timeout(180)]

GUILD, CHANNEL = 7, 9
MEASURE_SECONDS = 3
ALONE_SECONDS = 60


def test_demo_page_two_browsers_hear_each_other(tmp_path: Path) -> None:
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(BUNDLE)
    asyncio.run(asyncio.wait_for(run_demo(chromium, chromium_args(tmp_path)), 100))


def test_demo_page_member_alone_for_a_minute_then_hears_the_next(tmp_path: Path) -> None:
    """mediasoup-client connects its receive transport only when it first consumes, so a member
    alone in a channel sends no DTLS on it: with the server's default settings it stays joined
    for 60 s (the DTLS handshake timeout is 30 s and counts from the first DTLS datagram), then a
    second member joins and both hear each other."""
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(BUNDLE)
    asyncio.run(asyncio.wait_for(run_alone_then_pair(chromium, chromium_args(tmp_path)), 150))


def test_demo_page_tab_close_reaches_the_other_within_a_second(tmp_path: Path) -> None:
    """A member's tab closes (no Leave click): the other page gets UserLeft within a second (the
    hRPC socket closes and the peer connection's DTLS close_notify closes its transports)."""
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(BUNDLE)
    asyncio.run(asyncio.wait_for(run_tab_close(chromium, chromium_args(tmp_path)), 60))


async def run_tab_close(chromium: str, args: list[str]) -> None:
    async with demo_browser(chromium, args) as run:
        one, two = await run.open(1), await run.open(2)
        await one.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        await two.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        await one.close()
        # Only UserLeft removes a peer from the page (voice-client.ts removePeer).
        await two.wait_for_function("fastsfuDemo.peers().length === 0", polling=10, timeout=60_000)
        latency = loop.time() - closed_at
        print(f"Harmony tab close -> UserLeft at the other page: {latency * 1000:.1f} ms")
        assert latency < 1.0
        assert sorted(run.rooms.rooms[(GUILD, CHANNEL)].members) == [2]
        assert (await wait_state(two, "joined"))["state"] == "joined"


async def wait_state(page: Any, states: str, timeout_ms: int = 30_000) -> dict[str, Any]:
    """Wait until window.fastsfuDemo.state is one of `states` (comma-separated)."""
    wanted = json.dumps(states.split(","))
    await page.wait_for_function(f"{wanted}.includes(window.fastsfuDemo.state)", timeout=timeout_ms)
    result: dict[str, Any] = await page.evaluate(
        "({state: fastsfuDemo.state, error: fastsfuDemo.error, peers: fastsfuDemo.peers()})"
    )
    return result


async def check_both_hear(one: Any, two: Any, room: Any, engine: Engine) -> None:
    """Pages `one` (user 1) and `two` (user 2) each hear the other, per the browsers' getStats and
    the server's counters."""
    assert sorted(room.members) == [1, 2]
    await asyncio.sleep(MEASURE_SECONDS)
    stats_one = await one.evaluate("fastsfuDemo.stats()")
    stats_two = await two.evaluate("fastsfuDemo.stats()")
    server = {
        user: {
            "producer": s.producer.get_stats()[0] if s.producer else None,
            "consumers": [c.get_stats()[0] for c in s.consumers.values()],
        }
        for user, s in room.members.items()
    }
    engine_stats = engine.stats()
    print(
        "demo page:",
        json.dumps(
            {
                "one": stats_one,
                "two": stats_two,
                "server": server,
                "engine": engine_stats,
            },
            default=str,
            sort_keys=True,
        ),
    )
    for stats, other in ((stats_one, "2"), (stats_two, "1")):
        assert stats["packetsSent"] > 50, stats
        (peer,) = stats["peers"]
        assert peer["userId"] == other, stats
        assert peer["packetsReceived"] > 50, stats
        assert peer["totalSamplesReceived"] > 0, stats
        # The tone, not the fake device's silence: the audio-level header
        # extension and the decoded audio both went through the SFU.
        assert (peer["ssrcAudioLevel"] or 0) > 1e-4, stats
        assert peer["totalAudioEnergy"] > 0, stats
    for user, s in server.items():
        assert s["producer"]["packetCount"] > 50, (user, server)
        assert [c["packetCount"] > 50 for c in s["consumers"]] == [True], (user, server)
    assert engine_stats["drops"]["decrypt_failed"] == 0, engine_stats


async def check_both_shown_speaking(one: Any, two: Any, run: DemoRun) -> None:
    """Both send the looped tone: the server measures both speaking from their ssrc-audio-level
    (docs/observers.md#speaking) and each page marks the other's row; a stranger cannot ask."""
    for page, other in ((one, "2"), (two, "1")):
        await page.wait_for_function(f"fastsfuDemo.speaking.includes({other!r})", timeout=10_000)
        assert await page.evaluate("document.querySelector('#peers li.speaking') !== null")
    assert run.rooms.rooms[(GUILD, CHANNEL)].speaking_users == {1, 2}
    import aiohttp

    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{run.port}/demo/speaking?guild={GUILD}&channel={CHANNEL}"
        for token in ("not-a-token", run.auth.mint(3)):  # a bad token; a user not in the room
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 403
        async with http.get(url, headers={"Authorization": f"Bearer {run.auth.mint(1)}"}) as response:
            assert response.status == 200 and (await response.json()) == {"speaking": ["1", "2"]}


@contextlib.asynccontextmanager
async def demo_browser(chromium: str, args: list[str]) -> AsyncIterator[DemoRun]:
    """An Engine, the Harmony rooms and the demo page over hRPC, and one Chromium; on failure
    the last console lines of every page are printed."""
    auth = TokenAuth("demo-test-secret-of-at-least-thirty-two-bytes")
    async with Engine(Settings(listen_ip="127.0.0.1")) as engine:
        rooms = VoiceRooms(engine)
        mounts = [mount_demo, speaking_mount(rooms, auth.authenticate)]
        async with serve_app(make_app(rooms, auth.authenticate, mounts)) as port:
            run = DemoRun(engine, rooms, auth, port)
            async with launched_chromium(chromium, args, run.console) as run.browser:
                yield run


class DemoRun:
    def __init__(self, engine: Engine, rooms: VoiceRooms, auth: TokenAuth, port: int) -> None:
        self.engine, self.rooms, self.auth, self.port = engine, rooms, auth, port
        self.browser: Any = None
        self.console: list[str] = []

    def url(self, user_id: int | None, token: str | None = None) -> str:
        token = token if token is not None else self.auth.mint(user_id or 0)
        return f"http://127.0.0.1:{self.port}/demo/?guild={GUILD}&channel={CHANNEL}&autojoin=1#token={token}"

    async def open(self, user: int | str, token: str | None = None) -> Any:
        """A page in its own browser context (no shared storage: another "person")."""
        page = await (await self.browser.new_context()).new_page()
        page.on("console", lambda m: self.console.append(f"user {user}: {m.text}"))
        await page.goto(self.url(user if isinstance(user, int) else None, token), timeout=15_000)
        return page


async def run_demo(chromium: str, args: list[str]) -> None:
    async with demo_browser(chromium, args) as run:
        rooms, engine = run.rooms, run.engine
        one, two = await run.open(1), await run.open(2)
        state_one = await wait_state(one, "joined,error,closed")
        assert state_one["state"] == "joined", state_one
        await one.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        await two.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        assert (await wait_state(two, "joined"))["peers"] == ["1"]
        assert (await wait_state(one, "joined"))["peers"] == ["2"]

        room = rooms.rooms[(GUILD, CHANNEL)]
        await check_both_hear(one, two, room, engine)
        await check_both_shown_speaking(one, two, run)

        # A bad token: the page shows the hRPC error the server sent (RpcError code).
        intruder = await run.open("intruder", token="not-a-token")
        bad = await wait_state(intruder, "error,closed")
        assert bad["state"] == "error" and bad["error"].startswith("h.blank-session"), bad
        assert sorted(room.members) == [1, 2]

        # User 1 leaves with the Leave button: user 2 gets UserLeft and closes its consumer.
        await one.click("#leave")
        assert (await wait_state(one, "closed"))["peers"] == []
        await two.wait_for_function("fastsfuDemo.peers().length === 0", timeout=15_000)
        assert sorted(room.members) == [2]
        assert (await wait_state(two, "joined"))["state"] == "joined"
        await two.click("#leave")
        await wait_state(two, "closed")
        for _ in range(50):  # the server sees the WebSocket close a moment later
            if not rooms.rooms and not rooms.sessions:
                break
            await asyncio.sleep(0.1)
        assert not rooms.rooms and not rooms.sessions, (rooms.rooms, rooms.sessions)


async def run_alone_then_pair(chromium: str, args: list[str]) -> None:
    async with demo_browser(chromium, args) as run:
        failed: list[str] = []
        one = await run.open(1)
        assert (await wait_state(one, "joined,error,closed"))["state"] == "joined"
        session = run.rooms.sessions[1]
        assert session.consumer_transport is not None and session.producer_transport is not None
        for t in (session.consumer_transport, session.producer_transport):
            t.on("dtlsstatechange", lambda s, t=t: failed.append(f"{t.id} {s}") if s == "failed" else None)
        # The receive transport has had its DTLS parameters since JoinChannel and seen no DTLS.
        assert session.consumer_transport.dtls_state == "new"
        await asyncio.sleep(ALONE_SECONDS)
        state = await wait_state(one, "joined,error,closed", timeout_ms=1_000)
        assert (state["state"], state["peers"], state["error"]) == ("joined", [], None), state
        assert sorted(run.rooms.rooms[(GUILD, CHANNEL)].members) == [1]
        assert not failed and run.engine.dtls_failures == 0, failed
        two = await run.open(2)
        await one.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        await two.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
        await check_both_hear(one, two, run.rooms.rooms[(GUILD, CHANNEL)], run.engine)
        assert session.consumer_transport.dtls_state == "connected"
