"""The consumes of one join into a room of 50 (the joiner's 49, and one of the joiner's producer
on each member's transport), with each table write taking the datapath's mutex on its own, and
under one TableHold (src/fastsfu/table_hold.py); idle, and while another process blasts a
producer of fan-out 50 so that the datapath thread always wants the tables.

    python benchmarks/bench_join_consumes.py [--flood] [--rounds 20]

Prints wall and loop-thread CPU milliseconds per join (median, 90th percentile). With --flood,
this process (loop and datapath thread) is pinned to one core and the blaster to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from join_loop_time import start_flood  # noqa: E402
from test_harmony_session import CLIENT_CAPS, chromium_producer  # noqa: E402

from fastsfu import Engine, ortc  # noqa: E402
from fastsfu.router import Router  # noqa: E402
from fastsfu.table_hold import TableHold  # noqa: E402
from fastsfu.transport import Transport  # noqa: E402

MEMBERS = 49


def one_join(router: Router, joiner: Transport, members: list[Transport], hold: bool) -> tuple[float, float]:
    producers = [m.producers[next(iter(m.producers))] for m in members]
    caps = ortc.validate_rtp_capabilities(CLIENT_CAPS)
    newcomer = router.create_webrtc_transport()
    producer = newcomer.produce(chromium_producer(99_999))
    t0, c0 = time.perf_counter(), time.thread_time()
    if hold:
        with TableHold(router.engine.datapath.tables_lock) as h:
            for p, m in zip(producers, members, strict=True):
                h.tick()
                joiner.consume(p.id, caps, paused=True)
                m.consume(producer.id, caps, paused=True)
    else:
        for p, m in zip(producers, members, strict=True):
            joiner.consume(p.id, caps, paused=True)
            m.consume(producer.id, caps, paused=True)
    spent = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
    newcomer.close()  # closes the members' consumers of its producer
    for consumer in list(joiner.consumers.values()):
        consumer.close()
    return spent


async def measure(flood: bool, rounds: int) -> None:
    async with Engine() as engine:
        router = engine.create_router()
        members = [router.create_webrtc_transport() for _ in range(MEMBERS)]
        for i, m in enumerate(members):
            m.produce(chromium_producer(1000 + i))
        joiner = router.create_webrtc_transport()
        one_join(router, joiner, members, False)  # warm: each transport validates the caps once
        blaster = start_flood(engine, 50, 600.0) if flood else None
        try:
            time.sleep(0.5 if flood else 0)
            before, t0 = engine.datapath.stats(), time.monotonic()
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(rounds):
                for hold in (False, True):
                    results[hold].append(one_join(router, joiner, members, hold))
            after = engine.datapath.stats()
        finally:
            if blaster is not None:
                blaster.kill()
                blaster.wait(10)
        pps = (after["forwarded_packets"] - before["forwarded_packets"]) / (time.monotonic() - t0)
        hand_offs = after["table_hand_offs"] - before["table_hand_offs"]
        print(f"forwarded {pps / 1e3:.0f} k packets/s, {hand_offs} table hand-offs to the loop")
        for hold, spent in results.items():
            wall, cpu = sorted(s[0] for s in spent), [s[1] for s in spent]
            print(
                f"{'flood' if flood else 'idle '} {'one TableHold ' if hold else 'lock per write'}:"
                f" wall {statistics.median(wall):6.2f} ms median, {wall[int(len(wall) * 0.9)]:6.2f} p90;"
                f" CPU {statistics.median(cpu):5.2f} ms median"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.flood and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    asyncio.run(measure(args.flood, args.rounds))


if __name__ == "__main__":
    main()
