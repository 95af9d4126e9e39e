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

import pytest

pytest.importorskip("aiohttp.web")
pytest.importorskip("playwright.async_api")

from chromium_helpers import chromium_args, harness, require_harness, wait_result  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.loopback, pytest.mark.timeout(90)]

MEASURE_SECONDS = 3


def test_chromium_send_and_receive(tmp_path: Path) -> None:
    chromium = require_harness()
    asyncio.run(asyncio.wait_for(run_chromium_pair(chromium, chromium_args(tmp_path)), 75))


async def run_chromium_pair(chromium_path: str, args: list[str]) -> None:
    async with (
        Engine(Settings(listen_ip="127.0.0.1")) as engine,
        harness(engine.create_router(), chromium_path, args) as run,
    ):
        signaling = run.signaling
        sender = await run.open("send", f"role=send&seconds={MEASURE_SECONDS}")
        producer_id = await run.producer_id(sender)

        receiver = await run.open("recv", f"role=recv&producerId={producer_id}&seconds={MEASURE_SECONDS}")
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
        # The audio-level header extension made it through the SFU: the tone is far above the
        # fake device's silence (level 127, 1.1e-5).
        assert (recv_result["ssrcAudioLevel"] or 0) > 1e-4, recv_result
