"""Browsers on the Discord voice gateway's `webrtc` protocol leave (issue 14): a plain-JS page
(tests/browser/discord_webrtc.html, the web client's flow of docs/discord.md#the-webrtc-protocol) joins a room
with a discord.py bot, then leaves with pc.close() + ws.close(1000), or its tab closes; the bot gets
CLIENT_DISCONNECT (op 13) within a second. Headless Chromium through Playwright, stock Firefox ESR
as a subprocess that reports to the test's HTTP server (docs/testing.md#firefox-esr).

Runs in a loopback-only network namespace (scripts/test.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from chromium_helpers import chromium_args, find_chromium, require_loopback_namespace, unavailable
from discord_clients import DpyBot, dpy_available, start_dpy_bot
from helpers import serve_app

from fastsfu import Engine, Settings
from fastsfu.discord.gateway import Gateway
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import make_gateway_app
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.browser, pytest.mark.loopback, pytest.mark.timeout(90)]

PAGE = Path(__file__).resolve().parent / "browser" / "discord_webrtc.html"
AUTH = TokenAuth("discord-browser-leave-secret-0123456789abcdef")
SERVER_ID = "41"
BOT = 1001

# docs/testing.md#firefox-esr: fake microphone, no prompt, loopback ICE candidates with their real address,
# and a page allowed to close its own tab (the "closed tab" case).
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "permissions.default.microphone": 1,
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.default_address_only": False,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "dom.allow_scripts_to_close_windows": True,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}


class Room:
    """The gateway (ws, no TLS: the page is on http://127.0.0.1) and the page's HTTP server: the
    page, its progress reports (arrival times, event-loop clock) and long-polled commands."""

    def __init__(self, gateway: Gateway, rooms: VoiceRooms, gateway_port: int) -> None:
        self.gateway = gateway
        self.rooms = rooms
        self.gateway_port = gateway_port
        self.http_port = 0
        self.reports: list[tuple[float, dict[str, Any]]] = []
        self.commands: dict[str, asyncio.Queue[str]] = {}
        self._reported = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/discord.html", self._page)
        app.router.add_post("/report", self._report)
        app.router.add_get("/command", self._command)
        return app

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE)

    async def _report(self, request: web.Request) -> web.Response:
        self.reports.append((asyncio.get_running_loop().time(), json.loads(await request.text())))
        self._reported.set()
        return web.Response(text="ok")

    async def _command(self, request: web.Request) -> web.Response:
        queue = self.commands.setdefault(request.query.get("user", ""), asyncio.Queue())
        with contextlib.suppress(TimeoutError):
            return web.Response(text=await asyncio.wait_for(queue.get(), 20))
        return web.Response(text="")

    def command(self, user: int, command: str) -> None:
        self.commands.setdefault(str(user), asyncio.Queue()).put_nowait(command)

    def url(self, user: int, commands: bool = False) -> str:
        query = {
            "gw": f"ws://127.0.0.1:{self.gateway_port}/?v=8",
            "user": str(user),
            "token": AUTH.mint(user),
            "server": SERVER_ID,
            "session": f"web-{user}",
            **({"commands": "1"} if commands else {}),
        }
        return f"http://127.0.0.1:{self.http_port}/discord.html?{urllib.parse.urlencode(query)}"

    async def reported(self, user: int, event: str, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for _, entry in self.reports:
                if entry.get("user") == str(user) and entry.get("event") == event:
                    return entry
            self._reported.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"user {user}: no {event!r} report in {timeout} s: {self.reports}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reported.wait(), left)

    def member(self, user: int) -> Any:
        room = self.rooms.rooms.get(("discord", SERVER_ID))
        return room.members.get(user) if room is not None else None

    async def announced(self, user: int, timeout: float = 15) -> None:
        """The browser's producer exists (SPEAKING named its SSRC) and its DTLS is up."""
        for _ in range(int(timeout / 0.05)):
            member = self.member(user)
            if (
                member is not None
                and member.producer is not None
                and member.transport.dtls_state == "connected"
            ):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"user {user} never joined with media: {self.reports}")

    async def gone(self, user: int, timeout: float = 5) -> None:
        for _ in range(int(timeout / 0.01)):
            if self.member(user) is None:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"user {user} still in the room {timeout} s after leaving")


@contextlib.asynccontextmanager
async def discord_room() -> AsyncIterator[Room]:
    async with Engine(Settings(listen_ip="127.0.0.1")) as engine:
        rooms = VoiceRooms(engine)
        gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate))
        async with serve_app(make_gateway_app(gateway)) as gateway_port:
            room = Room(gateway, rooms, gateway_port)
            try:
                async with serve_app(room.app()) as http_port:
                    room.http_port = http_port
                    yield room
            finally:
                gateway.shutdown()


async def start_bot(room: Room, hold: float) -> DpyBot:
    if not dpy_available():
        unavailable("discord.py[voice]==2.7.1 is not installed")
    bot = await start_dpy_bot(
        f"127.0.0.1:{room.gateway_port}",
        guild_id=int(SERVER_ID),
        channel_id=42,
        user_id=BOT,
        session_id="bot",
        token=AUTH.mint(BOT),
        scheme="ws",
        hold=hold,
    )
    await bot.wait_event("connected", 15)
    return bot


def end_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The gateway's "session ended" lines: which signal ended each session (for the output)."""
    return [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]


async def op13_latencies(bot: DpyBot, left_at: dict[int, float]) -> dict[int, float]:
    """Seconds from each user's leave action to the bot's op 13 for it (one clock: CLOCK_MONOTONIC)."""
    # room.gone() saw the sessions end on the server; the op 13s it sent may still be on their way
    # to the bot's process: let them land before the bot disconnects (the latencies are the bot's
    # own receive times, so this wait does not enter them).
    await asyncio.sleep(1.0)
    bot.end_hold()
    result = await bot.result()
    assert result.connected, (result.error, result.stderr[-2000:])
    received = {int(m["d"]["user_id"]): m["mono"] for m in result.ws_received if m["op"] == 13}
    assert set(received) == set(left_at), result.ws_received
    return {user: received[user] - at for user, at in left_at.items()}


def test_chromium_on_the_webrtc_protocol_leaves_within_a_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """User 1002 leaves as the web client does (pc.close(), ws.close(1000)); user 1003's tab closes."""
    require_loopback_namespace()
    caplog.set_level(logging.INFO, logger="fastsfu.discord")
    chromium = find_chromium()
    playwright = pytest.importorskip("playwright.async_api")

    async def main() -> None:
        async with discord_room() as room, playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=chromium_args(tmp_path))
            try:
                bot = await start_bot(room, hold=60.0)
                left_at: dict[int, float] = {}
                for user, how in ((1002, "leave"), (1003, "close")):
                    page = await (await browser.new_context()).new_page()
                    await page.goto(room.url(user), timeout=15_000)
                    await room.announced(user)
                    loop = asyncio.get_running_loop()
                    left_at[user] = loop.time()
                    if how == "leave":
                        await page.evaluate("leave()")
                    else:
                        await page.close()
                    await room.gone(user)
                latencies = await op13_latencies(bot, left_at)
            finally:
                await browser.close()
            print(
                "Chromium leave -> op 13 at the bot:", {u: f"{s * 1000:.1f} ms" for u, s in latencies.items()}
            )
            print("\n".join(end_reasons(caplog)))
            assert all(0 <= s < 1.0 for s in latencies.values()), latencies

    asyncio.run(asyncio.wait_for(main(), 80))


@contextlib.contextmanager
def firefox(url: str) -> Any:
    """Stock Firefox ESR, headless, with a fresh profile; killed by PID at the end."""
    binary = shutil.which("firefox-esr")
    if binary is None:
        unavailable("firefox-esr is not installed; run scripts/browser_setup.sh")
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="fsfu-firefox-") as profile:
        prefs = "".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in FIREFOX_PREFS.items())
        Path(profile, "user.js").write_text(prefs)
        proc = subprocess.Popen(
            [binary, "--headless", "--no-remote", "--profile", profile, url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "MOZ_HEADLESS": "1"},
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.firefox
def test_firefox_on_the_webrtc_protocol_leaves_within_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """As for Chromium; the test commands the page over a long poll: "leave", or "close" (the tab
    closes itself with window.close(): unload closes the socket and the peer connection)."""
    require_loopback_namespace()
    caplog.set_level(logging.INFO, logger="fastsfu.discord")

    async def main() -> None:
        async with discord_room() as room:
            bot = await start_bot(room, hold=60.0)
            left_at: dict[int, float] = {}
            loop = asyncio.get_running_loop()
            for user, how in ((1002, "leave"), (1003, "close")):
                with firefox(room.url(user, commands=True)) as proc:
                    await room.announced(user, timeout=20)
                    left_at[user] = loop.time()
                    room.command(user, how)
                    await room.gone(user)
                    if how == "close":  # the window was the last one: Firefox quits
                        await loop.run_in_executor(None, proc.wait, 10)
            latencies = await op13_latencies(bot, left_at)
            print(
                "Firefox leave -> op 13 at the bot:", {u: f"{s * 1000:.1f} ms" for u, s in latencies.items()}
            )
            print("\n".join(end_reasons(caplog)))
            assert all(0 <= s < 1.0 for s in latencies.values()), latencies

    asyncio.run(asyncio.wait_for(main(), 80))
