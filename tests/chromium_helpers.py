"""Headless Chromium for the browser tests (docs/testing.md): launch flags, a tone file for the
fake microphone, the loopback-only namespace guard, and the mediasoup-client harness page
(tests/browser/static) served against one Router. scripts/test.sh runs these tests under
`unshare -n`; outside such a namespace they skip (developer machine) or fail (CI=true)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import socket
import struct
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import serve_app

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STATIC = Path(__file__).parent / "browser" / "static"  # the harness page and its bundle

# docs/testing.md#chromium. --allow-loopback-in-peer-connection is required in a lo-only namespace.
CHROMIUM_ARGS = [
    "--allow-loopback-in-peer-connection",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def write_tone(path: Path, seconds: int = 2, hz: float = 440.0, rate: int = 48000) -> Path:
    """A tone for --use-file-for-fake-audio-capture (Chromium loops it), so a receiving page can
    show real audio energy rather than the fake device's near-silence."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / rate))) for i in range(seconds * rate)
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def require_loopback_namespace() -> None:
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        unavailable(f"not in a loopback-only network namespace (interfaces: {names}); run scripts/test.sh")


def find_chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("chromium is not installed; run scripts/browser_setup.sh")
    raise AssertionError("unreachable")


def require_bundle(bundle: Path) -> Path:
    if not bundle.is_file():
        unavailable(f"{bundle} is missing; run scripts/web_build.sh")
    return bundle


def chromium_args(tmp_path: Path) -> list[str]:
    return [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={write_tone(tmp_path / 'tone.wav')}"]


def require_harness() -> str:
    """The Chromium to launch against the harness page: in a loopback-only namespace, with the
    page's bundle built (scripts/web_build.sh)."""
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(STATIC / "harness.js")
    return chromium


class Signaling:
    """The page's JSON RPC, mapped onto one fastsfu Router."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.transports: dict[str, Any] = {}
        self.producers: dict[str, Any] = {}
        self.consumers: dict[str, Any] = {}
        self.calls: list[str] = []

    def handle(self, method: str, params: dict[str, Any]) -> Any:
        self.calls.append(method)
        if method == "getRouterRtpCapabilities":
            return self.router.rtp_capabilities
        if method == "createTransport":
            t = self.router.create_webrtc_transport(app_data={"direction": params.get("direction")})
            self.transports[t.id] = t
            return {
                "id": t.id,
                "iceParameters": t.ice_parameters,
                "iceCandidates": t.ice_candidates,
                "dtlsParameters": t.dtls_parameters,
            }
        if method == "connectTransport":
            self.transports[params["transportId"]].connect(params["dtlsParameters"])
            return {}
        if method == "produce":
            assert params["kind"] == "audio", params["kind"]
            p = self.transports[params["transportId"]].produce(params["rtpParameters"], kind="audio")
            self.producers[p.id] = p
            return {"id": p.id}
        if method == "consume":
            c = self.transports[params["transportId"]].consume(
                params["producerId"], params["rtpCapabilities"], paused=True
            )
            self.consumers[c.id] = c
            return {
                "id": c.id,
                "producerId": c.producer_id,
                "kind": c.kind,
                "rtpParameters": c.rtp_parameters,
            }
        if method == "resumeConsumer":
            self.consumers[params["consumerId"]].resume()
            return {}
        raise KeyError(f"unknown method {method!r}")


def make_app(signaling: Signaling) -> web.Application:
    async def rpc(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            result = signaling.handle(body["method"], body.get("params") or {})
        except Exception as exc:  # reported to the page, which fails with it
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=500)
        return web.json_response({"result": result})

    app = web.Application()
    app.router.add_post("/rpc", rpc)
    app.router.add_static("/", STATIC)
    return app


async def wait_result(page: Any, timeout_ms: int) -> dict[str, Any]:
    await page.wait_for_function("window.result !== undefined", timeout=timeout_ms)
    result: dict[str, Any] = await page.evaluate("window.result")
    assert "error" not in result, result
    return result


class HarnessRun:
    """The harness page served for one Router, and the Chromium that opens it."""

    def __init__(self, signaling: Signaling, port: int) -> None:
        self.signaling = signaling
        self.base = f"http://127.0.0.1:{port}/voice.html"
        self.browser: Any = None
        self.console: list[str] = []

    async def open(self, name: str, query: str) -> Any:
        """A page at voice.html?query, its console lines kept under `name`."""
        page = await self.browser.new_page()
        page.on("console", lambda m: self.console.append(f"{name}: {m.text}"))
        await page.goto(f"{self.base}?{query}", timeout=15_000)
        return page

    async def producer_id(self, sender: Any) -> str:
        """The producer a role=send page made (an AssertionError with its result if it failed)."""
        await sender.wait_for_function(
            "window.producerId !== undefined || window.result !== undefined", timeout=20_000
        )
        producer_id: str = await sender.evaluate("window.producerId")
        assert producer_id, await sender.evaluate("window.result")
        return producer_id


@contextlib.asynccontextmanager
async def launched_chromium(chromium: str, args: list[str], console: list[str]) -> AsyncIterator[Any]:
    """One headless Chromium (closed at the end); on failure the last 80 lines of `console`, where
    the tests keep what their pages logged, are printed."""
    from playwright.async_api import async_playwright

    try:
        async with async_playwright() as pw:
            browser = await asyncio.wait_for(
                pw.chromium.launch(executable_path=chromium, args=args, timeout=30_000), 40
            )
            try:
                yield browser
            finally:
                await asyncio.wait_for(browser.close(), 15)
    except BaseException:
        print("\n".join(console[-80:]))
        raise


@contextlib.asynccontextmanager
async def harness(router: Any, chromium: str, args: list[str]) -> AsyncIterator[HarnessRun]:
    """The harness page's signaling for `router` over HTTP and one Chromium to open it."""
    signaling = Signaling(router)
    async with serve_app(make_app(signaling)) as port:
        run = HarnessRun(signaling, port)
        async with launched_chromium(chromium, args, run.console) as run.browser:
            yield run
