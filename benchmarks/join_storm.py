"""A join storm inside the fastsfu SUT: RATE joins per second into the room's router, each the way
signaling runs one (a WebRtcTransport, ICE and a DTLS handshake from an in-process client over
loopback UDP, a producer, consumers of the room's producers), left after a short hold.

Each join's event-loop time is the sum of perf_counter spans around its synchronous server steps:
create, connect, produce, consume, close, and the transport's STUN/DTLS datagram callbacks; the
loop thread's CPU time over the same spans is recorded beside it.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import client_caps, producer_params  # noqa: E402
from test_webrtc_transport import WebRtcClient  # noqa: E402

from fastsfu import stun  # noqa: E402
from fastsfu.dtls import DtlsCertificate  # noqa: E402

JOIN_TIMEOUT_S = 10.0
SSRC_BASE = 0x5E000000


class StormClient(WebRtcClient):
    """The test client, but waiting for datagrams on the loop's reader instead of polling every
    2 ms: dozens of polling clients would load the SUT's loop far more than the joins do."""

    async def recv(self, timeout: float = 2.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        except TimeoutError:
            return None


class JoinStorm:
    """Runs the storm against one router whose producers a joiner consumes; collects per-join times."""

    def __init__(self, router: Any, producers: list[Any], rate: float, seconds: float, hold: float) -> None:
        self.router = router
        self.producers = producers
        self.rate = rate
        self.seconds = seconds
        self.hold = hold
        self.loop_s: list[float] = []  # per completed join: event-loop seconds of its server steps
        # The same spans in the loop thread's CPU time: on a contended core the wall spans also
        # hold waits for the CPU and for the GIL (the datapath thread); this part is the join's own.
        self.loop_cpu_s: list[float] = []
        self.setup_s: list[float] = []  # per completed join: wall seconds from create to consuming
        self.failures: list[str] = []
        self.cert = DtlsCertificate.generate()  # one client certificate for every joiner
        self._ssrc = itertools.count(SSRC_BASE)

    async def run(self) -> None:
        """Start one join every 1/rate s for `seconds`, then wait for all of them to leave."""
        loop = asyncio.get_running_loop()
        tasks = []
        start = loop.time()
        for i in range(round(self.rate * self.seconds)):
            delay = start + i / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self._join_once()))
        await asyncio.gather(*tasks)

    async def _join_once(self) -> None:
        spent = [0.0, 0.0]  # perf_counter seconds, loop-thread CPU seconds

        def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                t, c = time.perf_counter(), time.thread_time()
                try:
                    return fn(*args)
                finally:
                    spent[0] += time.perf_counter() - t
                    spent[1] += time.thread_time() - c

            return wrapper

        t0 = time.perf_counter()
        transport = timed(self.router.create_webrtc_transport)()
        # The transport's own STUN and DTLS callbacks (server side of ICE and the handshake) run on
        # the loop for this join: count them (the engine looks the method up per datagram).
        transport._on_slow_datagram = timed(transport._on_slow_datagram)
        client = StormClient(transport, self.cert)
        try:
            await asyncio.wait_for(self._connect(client, timed), JOIN_TIMEOUT_S)
            ssrc = next(self._ssrc)
            timed(self._produce_consume)(transport, ssrc)
            self.setup_s.append(time.perf_counter() - t0)
            await asyncio.sleep(self.hold)
        except Exception as exc:  # a failed join (e.g. a handshake timeout) is counted, not fatal
            self.failures.append(f"{type(exc).__name__}: {exc}")
            timed(transport.close)()
            client.sock.close()
            return
        timed(transport.close)()
        client.sock.close()
        self.loop_s.append(spent[0])
        self.loop_cpu_s.append(spent[1])

    async def _connect(self, client: StormClient, timed: Callable[..., Any]) -> None:
        client.check()
        data = await client.recv()
        if data is None or stun.parse_message(data).message_type != stun.BINDING_SUCCESS:
            raise RuntimeError("no STUN binding success")
        timed(client.signal)()  # the signaling channel's connect(): our DTLS fingerprint
        await client.handshake(role_seen_by_server=None)
        # The server's last flight can reach the client before the server has handled the client's
        # Finished: wait for its state (a few ms at most) rather than race it.
        while client.transport.dtls_state != "connected":
            await asyncio.sleep(0.005)

    def _produce_consume(self, transport: Any, ssrc: int) -> None:
        transport.produce(producer_params(ssrc))
        caps = client_caps()
        for p in self.producers:
            transport.consume(p.id, caps)

    def summary(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "seconds": self.seconds,
            "hold_s": self.hold,
            "joins": len(self.loop_s),
            "failures": len(self.failures),
            "failure_reasons": sorted(set(self.failures))[:5],
            "loop_ms": _percentiles(self.loop_s),
            "loop_cpu_ms": _percentiles(self.loop_cpu_s),
            "setup_ms": _percentiles(self.setup_s),
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50": round(statistics.median(ms), 3), "p99": round(p99, 3), "max": round(ms[-1], 3)}
