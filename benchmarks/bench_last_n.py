"""Last-N in a room of 200 with 3 speakers (issue 13), in memory: the real control plane (Engine,
Router, 200 SRTP PlainTransports, 39,800 consumers, fastsfu.last_n.LastN with N = 3, an
ActiveSpeakerObserver over the 200 producers), traffic fed through `Datapath.process_many` with the
output discarded after encryption (as bench_datapath.py). Rounds alternate last-N off and on.

    python benchmarks/bench_last_n.py [--rounds 10] [--frames 25]

Prints process CPU per received and per forwarded packet and packets sent, median [range], and the
observers' timer cost per tick (levels of 200 producers read and decided).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import AUDIO_LEVEL_ID, client_caps, producer_params  # noqa: E402

from fastsfu import Engine, Settings, _rtp  # noqa: E402
from fastsfu.last_n import LastN  # noqa: E402
from fastsfu.rtp import RtpPacket  # noqa: E402
from fastsfu.srtp import SrtpContext, generate_key  # noqa: E402

MEMBERS, SPEAKERS, N = 200, 3, 3
SUITE = "AES_CM_128_HMAC_SHA1_80"
PAYLOAD = bytes(100)
TALK, QUIET = 25, 100  # -dBov (RFC 6464 §3): speech, a quiet room (browsers without DTX keep sending)


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def timed(obs: Any, samples: list[float]) -> None:
    """Time each of the observer's timer callbacks (the callback re-arms itself by name)."""
    tick = obs._tick

    def wrapper() -> None:
        t0 = time.process_time_ns()
        tick()
        samples.append((time.process_time_ns() - t0) / 1000)

    obs._tick = wrapper


async def main(rounds: int, frames: int) -> None:
    async with Engine(Settings(datapath_thread=False)) as engine:
        engine.datapath.set_output_mode(_rtp.OUTPUT_DISCARD)
        router = engine.create_router()
        members = []
        t_setup = time.perf_counter()
        for i in range(MEMBERS):
            key = generate_key(SUITE)
            t = router.create_plain_transport(enable_srtp=True)
            params = {"cryptoSuite": SUITE, "keyBase64": base64.b64encode(key).decode()}
            t.connect("127.0.0.1", 20000 + i, params)
            members.append((t, t.produce(producer_params(1000 + i)), SrtpContext(SUITE, key, inbound=False)))
        for t, _, _ in members:
            for _, p, _ in members:
                if p.transport is not t:
                    t.consume(p.id, client_caps(opus_pt=100))
        setup_s = time.perf_counter() - t_setup
        print(f"room of {MEMBERS}: {len(router.producers)} producers, set up in {setup_s:.1f} s")
        # Each round: `frames` packets (20 ms each) from every member; the first SPEAKERS talk.
        # Made ahead, so that the observers see steady traffic (15 frames per 300 ms) in warm-up.
        seqs = [0] * MEMBERS

        def make_round(frames: int) -> list[tuple[int, int, bytes, array]]:
            out = []
            for i, (t, _, tx) in enumerate(members):
                chunks, lengths = [], array("I")
                level = TALK if i < SPEAKERS else QUIET
                for _ in range(frames):
                    seq = seqs[i]
                    seqs[i] += 1
                    ext = [(AUDIO_LEVEL_ID, bytes([(0x80 if level == TALK else 0) | level]))]
                    pkt = RtpPacket(111, seq & 0xFFFF, seq * 960, 1000 + i, extensions=ext, payload=PAYLOAD)
                    data = tx.protect(bytes(pkt))
                    chunks.append(data)
                    lengths.append(len(data))
                out.append((t.socket.slot, 20000 + i, b"".join(chunks), lengths))
            return out

        warm = [make_round(15) for _ in range(4)]
        batches = [make_round(frames) for _ in range(rounds * 2)]
        policy = LastN(router, N)
        for t, _, _ in members:  # in warm-up only the speakers are forwarded: ticks stay on time
            policy.apply(t)
        active = router.create_active_speaker_observer(interval=300)
        for _, p, _ in members:
            active.add_producer(p.id)
        ticks: dict[str, list[float]] = {"last-N levels (250 ms)": [], "active speaker (300 ms)": []}
        timed(policy._observer, ticks["last-N levels (250 ms)"])
        timed(active, ticks["active speaker (300 ms)"])

        def feed(batch: list[tuple[int, int, bytes, array]]) -> None:
            for sock, port, packed, lengths in batch:
                engine.datapath.process_many(sock, packed, lengths, "127.0.0.1", port, 1_000_000_000)

        def sent() -> int:
            return int(engine.datapath.stats()["forwarded_packets"])

        for batch in warm:  # warm up, and let the observers hear who talks (15 frames per tick)
            feed(batch)
            await asyncio.sleep(0.3)
        assert policy.forwarded == {p.id for _, p, _ in members[:SPEAKERS]}, policy.forwarded
        assert active.dominant is not None and active.dominant.id in policy.forwarded
        results: dict[str, dict[str, list[float]]] = {
            "off": {"rx": [], "fwd": [], "sent": []},
            "on": {"rx": [], "fwd": [], "sent": []},
        }
        for r in range(rounds * 2):
            mode = "on" if r % 2 else "off"
            for t, _, _ in members:
                (policy.apply if mode == "on" else policy.remove)(t)
            batch = batches[r]
            before = sent()
            t0 = time.process_time_ns()
            feed(batch)
            cpu_us = (time.process_time_ns() - t0) / 1000
            out = sent() - before
            results[mode]["rx"].append(cpu_us / (MEMBERS * frames))
            results[mode]["fwd"].append(cpu_us / out)
            results[mode]["sent"].append(out)
            await asyncio.sleep(0.35)  # the observers' timers run between rounds
        drops = engine.datapath.drop_counts()
        print(f"{rounds} rounds each, {MEMBERS * frames} packets received per round ({frames} per member)")
        for mode, res in results.items():
            print(
                f"  last-N {mode:3s}: {stats(res['rx'])} us CPU per received packet, "
                f"{stats(res['fwd'])} us per forwarded packet, sent per round {stats(res['sent'])}"
            )
        print(f"  drops: {dict((k, v) for k, v in drops.items() if v)}")
        for name, values in ticks.items():
            print(f"  timer {name}, {MEMBERS} producers: {stats(values)} us per tick ({len(values)} ticks)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=25)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.frames))
