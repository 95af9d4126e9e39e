"""ICE over TCP with real browsers: a Chromium (or Firefox ESR) whose network drops all UDP joins
a Harmony channel through the /demo page over the passive TCP candidate and hears, and is heard
by, a Chromium member on UDP (docs/transports.md, "ICE over TCP"; docs/testing.md, the UDP-blocked client).

The UDP-blocked browser lives in a network namespace of its own, joined to the test's namespace by
a veth pair (10.200.0.1 here, 10.200.0.2 there) whose addresses exist only inside these
namespaces; nftables drops every UDP packet in and out of it. Runs in scripts/test.sh's
loopback-only namespace (root); skips elsewhere, fails in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

aiohttp_web = pytest.importorskip("aiohttp.web")
playwright_async = pytest.importorskip("playwright.async_api")

from chromium_helpers import (  # noqa: E402
    chromium_args,
    find_chromium,
    require_bundle,
    require_loopback_namespace,
    unavailable,
)
from test_demo_chromium import (  # noqa: E402
    CHANNEL,
    GUILD,
    MEASURE_SECONDS,
    DemoRun,
    check_both_hear,
    wait_state,
)
from test_discord_browser_leave import FIREFOX_PREFS  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402
from fastsfu.harmony import VoiceRooms  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402
from fastsfu.harmony.hrpc_server import make_app  # noqa: E402
from fastsfu.server.demo_page import BUNDLE, mount_demo, speaking_mount  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.loopback, pytest.mark.timeout(180)]

HOST, PEER = "10.200.0.1", "10.200.0.2"
NFT_DROP_UDP = """
table inet fsfu_no_udp {
    chain out { type filter hook output priority 0; meta l4proto udp drop; }
    chain in { type filter hook input priority 0; meta l4proto udp drop; }
}
"""


def sh(*argv: str, input: str | None = None) -> None:  # noqa: A002 - subprocess's name
    subprocess.run(argv, check=True, timeout=20, input=input, text=True, capture_output=True)


@contextlib.contextmanager
def udp_blocked_namespace() -> Iterator[str]:
    """A network namespace reachable over a veth pair, with UDP dropped both ways; its name."""
    if shutil.which("nft") is None:
        unavailable("nft is not installed; run scripts/browser_setup.sh (Debian package nftables)")
    name = f"fsfu-noudp{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", "fsfu-host", "type", "veth", "peer", "name", "fsfu-peer")
        sh("ip", "link", "set", "fsfu-peer", "netns", name)
        sh("ip", "addr", "add", f"{HOST}/24", "dev", "fsfu-host")
        sh("ip", "link", "set", "fsfu-host", "up")
        inside = ("ip", "netns", "exec", name)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{PEER}/24", "dev", "fsfu-peer")
        sh(*inside, "ip", "link", "set", "fsfu-peer", "up")
        sh(*inside, "ip", "route", "add", "default", "via", HOST)
        sh(*inside, "nft", "-f", "-", input=NFT_DROP_UDP)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=20, check=False)  # the veth pair goes with it
        subprocess.run(["ip", "link", "del", "fsfu-host"], timeout=20, check=False, capture_output=True)


PROBE = """
import socket, sys, urllib.request
host, udp_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"probe", (host, udp_port))
    print("udp: sent")
except OSError as e:
    print("udp: refused", e.errno)
with urllib.request.urlopen(f"http://{host}:{http_port}/demo/", timeout=5) as r:
    print("tcp:", r.status)
"""


def test_udp_blocked_chromium_joins_over_tcp_and_hears_a_udp_member(tmp_path: Path) -> None:
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(BUNDLE)
    with udp_blocked_namespace() as netns:
        wrapper = tmp_path / "chromium-no-udp"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {chromium} "$@"\n')
        wrapper.chmod(0o755)
        asyncio.run(asyncio.wait_for(run(chromium, str(wrapper), netns, chromium_args(tmp_path)), 120))


async def serve_on(app: Any, host: str) -> tuple[Any, int]:
    runner = aiohttp_web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp_web.TCPSite(runner, host, 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class Run(DemoRun):
    host = HOST

    def url(self, user_id: int | None, token: str | None = None) -> str:
        token = token if token is not None else self.auth.mint(user_id or 0)
        return (
            f"http://{self.host}:{self.port}/demo/?guild={GUILD}&channel={CHANNEL}&autojoin=1#token={token}"
        )


@contextlib.asynccontextmanager
async def udp_blocked_room(netns: str) -> AsyncIterator[Run]:
    """The engine (ICE-TCP on) and the demo page on the veth address; the block is proven first:
    from the namespace a UDP datagram to the media port cannot leave, while the page loads over TCP."""
    auth = TokenAuth("demo-test-secret-of-at-least-thirty-two-bytes")
    async with Engine(Settings(listen_ip=HOST, ice_tcp=True)) as engine:
        rooms = VoiceRooms(engine)
        runner, port = await serve_on(
            make_app(rooms, auth.authenticate, [mount_demo, speaking_mount(rooms, auth.authenticate)]), HOST
        )
        try:
            udp_port = engine.media_socket().local_address[1]
            assert engine.ice_tcp is not None and engine.ice_tcp.local_address[1] == udp_port
            proc = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", netns, sys.executable, "-c", PROBE, HOST, str(udp_port), str(port)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = (b.decode() for b in await asyncio.wait_for(proc.communicate(), 20))
            assert "udp: refused" in out and "tcp: 200" in out, (out, err)
            assert engine.stats()["slow_path_packets"] == 0  # the probe datagram never arrived
            run = Run(engine, rooms, auth, port)
            try:
                yield run
            except BaseException:
                print("\n".join(run.console[-80:]))
                raise
        finally:
            await runner.cleanup()


def check_tcp_member(run: Run, user: int) -> None:
    """The server's view: `user`'s two transports carry media over ICE-TCP, none was cut off."""
    session = run.rooms.sessions[user]
    for t in (session.producer_transport, session.consumer_transport):
        assert t is not None and t.ice_selected_tuple is not None
        assert t.ice_selected_tuple["protocol"] == "tcp", t.ice_selected_tuple
    stats = run.engine.stats()
    print("ICE-TCP:", stats["ice_tcp"], "drops:", stats["drops"])
    assert stats["ice_tcp"]["connections"] >= 2 and stats["drops"]["tcp_overflow"] == 0


async def run(chromium: str, wrapped: str, netns: str, args: list[str]) -> None:
    async with udp_blocked_room(netns) as run, playwright_async.async_playwright() as pw:
        extra = [f"--unsafely-treat-insecure-origin-as-secure=http://{HOST}:{run.port}"]
        udp_browser = await pw.chromium.launch(executable_path=chromium, args=[*args, *extra])
        tcp_browser = await pw.chromium.launch(executable_path=wrapped, args=[*args, *extra])
        try:
            run.browser = udp_browser
            one = await run.open(1)
            run.browser = tcp_browser
            two = await run.open(2)
            for page in (one, two):
                assert (await wait_state(page, "joined,error,closed"))["state"] == "joined"
                await page.wait_for_function("fastsfuDemo.peers().length === 1", timeout=30_000)
            await check_both_hear(one, two, run.rooms.rooms[(GUILD, CHANNEL)], run.engine)
            # The browsers' own view: user 2's selected pairs are TCP, user 1's UDP.
            assert await two.evaluate("fastsfuDemo.paths()") == ["tcp", "tcp"]
            assert await one.evaluate("fastsfuDemo.paths()") == ["udp", "udp"]
            check_tcp_member(run, 2)
            await two.click("#leave")
            await wait_state(two, "closed")
            await one.wait_for_function("fastsfuDemo.peers().length === 0", timeout=15_000)
        finally:
            await asyncio.wait_for(udp_browser.close(), 15)
            await asyncio.wait_for(tcp_browser.close(), 15)


@pytest.mark.firefox
def test_udp_blocked_firefox_joins_over_tcp_and_hears_a_udp_member(tmp_path: Path) -> None:
    """The same with stock Firefox ESR as the UDP-blocked member (a subprocess in the namespace:
    docs/testing.md#firefox-esr). It reports nothing itself, so its side is read at the server:
    its producer's packets arrive over TCP, its consumer's go out over TCP, and its RTCP receiver
    reports about that consumer come back (it received the stream)."""
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(BUNDLE)
    if shutil.which("firefox-esr") is None:
        unavailable("firefox-esr is not installed; run scripts/browser_setup.sh")
    with udp_blocked_namespace() as netns:
        asyncio.run(asyncio.wait_for(run_firefox(chromium, netns, chromium_args(tmp_path), tmp_path), 120))


async def run_firefox(chromium: str, netns: str, args: list[str], tmp_path: Path) -> None:
    async with udp_blocked_room(netns) as run, playwright_async.async_playwright() as pw:
        extra = [f"--unsafely-treat-insecure-origin-as-secure=http://{HOST}:{run.port}"]
        run.browser = await pw.chromium.launch(executable_path=chromium, args=[*args, *extra])
        profile = tmp_path / "firefox-profile"
        profile.mkdir()
        prefs = {
            **FIREFOX_PREFS,
            "media.devices.insecure.enabled": True,
            "media.getusermedia.insecure.enabled": True,
        }
        (profile / "user.js").write_text(
            "".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in prefs.items())
        )
        firefox = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "firefox-esr",
                "--headless",
                "--no-remote",
                "--profile",
                str(profile),
                run.url(2),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "MOZ_HEADLESS": "1"},
        )
        try:
            one = await run.open(1)
            assert (await wait_state(one, "joined,error,closed"))["state"] == "joined"
            await one.wait_for_function("fastsfuDemo.peers().length === 1", timeout=40_000)
            await asyncio.sleep(MEASURE_SECONDS)
            stats = await one.evaluate("fastsfuDemo.stats()")
            (peer,) = stats["peers"]
            print("Chromium (UDP) hears Firefox (TCP):", stats)
            assert peer["userId"] == "2" and peer["packetsReceived"] > 50 and peer["totalAudioEnergy"] > 0, (
                stats
            )
            assert await one.evaluate("fastsfuDemo.paths()") == ["udp", "udp"]
            check_tcp_member(run, 2)
            session = run.rooms.sessions[2]
            assert session.producer is not None and session.producer.get_stats()[0]["packetCount"] > 50
            (consumer,) = session.consumers.values()
            assert consumer.get_stats()[0]["packetCount"] > 50  # sent to Firefox over TCP
            # Firefox's receiver reports name the consumer's SSRC (RFC 3550 §6.4); the round trip
            # needs one that echoes a sender report of ours, which go out every 5 s (rtcp_interval).
            for _ in range(150):
                if consumer.round_trip_time is not None:
                    break
                await asyncio.sleep(0.1)
            assert consumer.round_trip_time is not None, "no receiver report from Firefox about its stream"
        finally:
            if firefox.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(firefox.pid, signal.SIGKILL)
            firefox.wait(10)
            await asyncio.wait_for(run.browser.close(), 15)
