"""Headless Chromium + mediasoup-client 3.24.1 against fastsfu (docs/testing.md#chromium): one page produces
its fake microphone over ICE-lite + DTLS-SRTP, a second page consumes that producer and decodes it.

Runs only in a loopback-only network namespace (docs/testing.md#network-namespace); scripts/test.sh does
`unshare -n`, scripts/browser_setup.sh installs Chromium and scripts/web_build.sh builds
tests/browser/static/harness.js first. Outside a lo-only namespace the test skips (developer
machine) or fails (CI=true).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

aiohttp_web = pytest.importorskip("aiohttp.web")
playwright_async = pytest.importorskip("playwright.async_api")

from chromium_helpers import chromium_args, find_chromium, require_bundle, require_loopback_namespace  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.loopback, pytest.mark.timeout(90)]

STATIC = Path(__file__).parent / "browser" / "static"
MEASURE_SECONDS = 3


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


def make_app(signaling: Signaling) -> Any:
    web = aiohttp_web

    async def rpc(request: Any) -> Any:
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


def test_chromium_send_and_receive(tmp_path: Path) -> None:
    require_loopback_namespace()
    chromium = find_chromium()
    require_bundle(STATIC / "harness.js")
    asyncio.run(asyncio.wait_for(run_chromium_pair(chromium, chromium_args(tmp_path)), 75))


async def run_chromium_pair(chromium_path: str, args: list[str]) -> None:
    web = aiohttp_web
    console: list[str] = []
    async with Engine(Settings(listen_ip="127.0.0.1")) as engine:
        router = engine.create_router()
        signaling = Signaling(router)
        runner = web.AppRunner(make_app(signaling), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}/voice.html"
        browser = None
        try:
            async with playwright_async.async_playwright() as pw:
                browser = await asyncio.wait_for(
                    pw.chromium.launch(executable_path=chromium_path, args=args, timeout=30_000),
                    40,
                )
                try:
                    sender = await browser.new_page()
                    sender.on("console", lambda m: console.append(f"send: {m.text}"))
                    await sender.goto(f"{base}?role=send&seconds={MEASURE_SECONDS}", timeout=15_000)
                    await sender.wait_for_function(
                        "window.producerId !== undefined || window.result !== undefined", timeout=20_000
                    )
                    producer_id = await sender.evaluate("window.producerId")
                    assert producer_id, await sender.evaluate("window.result")

                    receiver = await browser.new_page()
                    receiver.on("console", lambda m: console.append(f"recv: {m.text}"))
                    await receiver.goto(
                        f"{base}?role=recv&producerId={producer_id}&seconds={MEASURE_SECONDS}", timeout=15_000
                    )
                    recv_result = await wait_result(receiver, 30_000)
                    send_result = await wait_result(sender, 30_000)

                    producer = signaling.producers[producer_id]
                    consumer = signaling.consumers[recv_result["consumerId"]]
                    send_t = signaling.transports[send_result["transportId"]]
                    recv_t = signaling.transports[recv_result["transportId"]]
                    p_stats = producer.get_stats()[0]
                    c_stats = consumer.get_stats()[0]
                    send_t_stats = send_t.get_stats()[0]
                    recv_t_stats = recv_t.get_stats()[0]
                    engine_stats = engine.stats()
                    report = {
                        "browser": send_result | {"recv": recv_result},
                        "producer": p_stats,
                        "consumer": c_stats,
                        "sendTransport": send_t_stats,
                        "recvTransport": recv_t_stats,
                        "engine": engine_stats,
                    }
                    print("chromium interop:", json.dumps(report, default=str, sort_keys=True))

                    # Server side: DTLS up on both transports, Opus in and out, no SRTP failures.
                    assert send_t.dtls_state == "connected", send_t_stats
                    assert recv_t.dtls_state == "connected", recv_t_stats
                    assert p_stats["packetCount"] > 50, p_stats
                    assert c_stats["packetCount"] > 50, c_stats
                    assert engine_stats["drops"]["decrypt_failed"] == 0, report
                    assert engine_stats["drops"]["srtp_replay"] == 0, report
                    # Browser side: sent, received and decoded.
                    assert send_result["packetsSent"] > 0, send_result
                    assert recv_result["packetsReceived"] > 50, recv_result
                    assert recv_result["totalSamplesReceived"] > 0, recv_result
                    assert recv_result["dtlsState"] == "connected", recv_result
                    # The audio-level header extension made it through the SFU: the tone is far
                    # above the fake device's silence (level 127, 1.1e-5).
                    assert (recv_result["ssrcAudioLevel"] or 0) > 1e-4, recv_result
                finally:
                    await asyncio.wait_for(browser.close(), 15)
        except BaseException:
            print("\n".join(console[-60:]))
            raise
        finally:
            await runner.cleanup()
