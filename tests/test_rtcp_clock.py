"""RtcpClock: every transport's periodic RTCP on one event-loop timer, reports due close together
sent in one wake-up of the loop (docs/datapath.md, "Waking the event loop")."""

from __future__ import annotations

import asyncio
import gc
import weakref

from helpers import SrtpClient

from fastsfu import Engine, Settings
from fastsfu.rtcp_clock import RtcpClock


def test_calls_due_within_the_window_share_one_wake_up() -> None:
    async def main() -> None:
        clock = RtcpClock(asyncio.get_running_loop(), window=0.1)
        ran: list[int] = []
        for i in range(10):  # due 0 to 45 ms apart: one wake-up runs them all
            clock.call_later(0.05 + 0.005 * i, lambda i=i: ran.append(i))
        await asyncio.sleep(0.3)
        assert sorted(ran) == list(range(10)) and clock.wakeups == 1
        clock.call_later(0.02, lambda: ran.append(10))
        clock.call_later(0.3, lambda: ran.append(11))  # past the window: its own wake-up
        await asyncio.sleep(0.1)
        assert ran[10:] == [10] and clock.wakeups == 2
        await asyncio.sleep(0.4)
        assert ran[10:] == [10, 11] and clock.wakeups == 3
        clock.close()

    asyncio.run(main())


def test_cancel_drops_the_callback_and_its_owner_at_once() -> None:
    class Owner:
        def __init__(self) -> None:
            self.ran = False

        def tick(self) -> None:
            self.ran = True

    async def main() -> None:
        clock = RtcpClock(asyncio.get_running_loop(), window=0.01)
        owner = Owner()
        ref = weakref.ref(owner)
        entry = clock.call_later(0.05, owner.tick)
        clock.cancel(entry)
        del owner
        gc.collect()
        assert ref() is None  # the clock holds no reference to a closed transport
        await asyncio.sleep(0.15)
        assert clock.calls == 0 and clock.wakeups == 0  # a cancelled call does not wake the loop
        clock.close()

    asyncio.run(main())


def test_a_failing_callback_does_not_stop_the_others_and_reschedules_land_later() -> None:
    async def main() -> None:
        clock = RtcpClock(asyncio.get_running_loop(), window=0.05)
        ran: list[str] = []

        def bad() -> None:
            raise RuntimeError("boom")

        def again() -> None:
            ran.append("again")
            if len(ran) < 3:
                clock.call_later(0, again)  # due at once, but runs in the next round

        clock.call_later(0.01, bad)
        clock.call_later(0.02, again)
        await asyncio.sleep(0.2)
        assert ran == ["again"] * 3 and clock.wakeups == 3
        clock.close()

    asyncio.run(main())


def test_an_engines_transports_report_in_few_wake_ups() -> None:
    """Twenty connected transports reporting every 0.2 s (randomized over [0.1, 0.3] s) for a
    second: with one timer per transport the loop would wake once per report."""

    async def main() -> None:
        async with Engine(Settings(rtcp_interval=0.2)) as engine:
            router = engine.create_router()
            clients = [SrtpClient("AEAD_AES_128_GCM") for _ in range(20)]
            transports = []
            for c in clients:
                t = router.create_plain_transport(enable_srtp=True, srtp_crypto_suite="AEAD_AES_128_GCM")
                t.connect("127.0.0.1", c.port, c.srtp_parameters)
                transports.append(t)
            await asyncio.sleep(1.0)
            clock = engine.rtcp_clock
            assert clock.calls >= 40  # about 100 reports are due in that second
            assert clock.wakeups * 2 <= clock.calls
            for t in transports:
                t.close()
            calls = clock.calls
            await asyncio.sleep(0.4)
            assert clock.calls == calls  # closed transports report no more
        for c in clients:
            c.close()

    asyncio.run(main())
