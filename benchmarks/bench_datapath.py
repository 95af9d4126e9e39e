"""In-memory datapath micro-benchmarks (pytest-benchmark): nanoseconds per forwarded packet.

No sockets: `Datapath.process_many` runs the real per-packet path (SRTP unprotect once, per
consumer copy + rewrite + SRTP protect) with output discarded after encryption. Fan-out 1/10/50,
AES-CM-80 and AES-128-GCM; the Discord UDP transport's rtpsize AEAD modes (AES-256-GCM and
XChaCha20-Poly1305: open once, per consumer copy + rewrite + seal with that receiver's counter);
the last case shows the cost without encryption.
"""

from __future__ import annotations

import os
import socket
from array import array

import pytest

from fastsfu import _rtp
from fastsfu.discord.crypto import AeadContext  # also installs the OpenSSL pointers
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

PACKETS_PER_ROUND = 2000
ROUNDS = 12
DISCORD_MODES = {
    "discord_aes256_gcm": "aead_aes256_gcm_rtpsize",
    "discord_xchacha20": "aead_xchacha20_poly1305_rtpsize",
}


# RFC 2198 §3: one redundant 60-byte Opus block (the previous frame), then a 71-byte primary.
RED_PAYLOAD = bytes([0x80 | 111]) + (960 << 10 | 60).to_bytes(3, "big") + bytes([111]) + bytes(60 + 71)


class Sealer:
    """The sender side of a Discord transport: seal() where SRTP suites call protect()."""

    def __init__(self, mode: str, key: bytes) -> None:
        self.ctx = AeadContext(mode, key)

    def protect(self, packet: bytes) -> bytes:
        # rtpsize: the fixed header and the extension preamble stay clear (12 + 4 bytes here).
        return self.ctx.seal(packet, 16)


class Fixture:
    """A producer fanned out to `fanout` consumers, and enough pre-protected input for every round."""

    def __init__(self, fanout: int, suite: str | None, levels: bool = False, red: str | None = None) -> None:
        """levels: packets also carry ssrc-audio-level (RFC 6464) and the producer's levels are
        read (what an observer turns on); the level element is there either way when asked, so
        that only the read differs between the two variants. red: the packets are Opus RED
        (RFC 2198, same 136-byte payload) and every receiver gets them as RED ("forward") or
        unwrapped to the primary block ("unwrap")."""
        self.dp = _rtp.Datapath(max_consumers=max(64, fanout))
        self.dp.set_output_mode(_rtp.OUTPUT_DISCARD)
        self.sock = self.dp.add_socket(-1, socket.AF_INET, False)
        t_in = self.dp.add_transport(self.sock)
        self.dp.set_transport_remote(t_in, "127.0.0.1", 4000)
        mode = DISCORD_MODES.get(suite or "")
        up = os.urandom(32) if mode else generate_key(suite) if suite else b""
        self.keep: list[object] = []
        if mode:
            # One context per Discord transport (its replay window and its own outbound counter).
            ctx = AeadContext(mode, up)
            self.dp.set_transport_aead(t_in, ctx)
            self.keep.append(ctx)
        elif suite:
            inbound = SrtpContext(suite, up, inbound=True)
            inbound.add_stream(1)
            self.dp.set_transport_srtp(t_in, inbound, None)
            self.keep.append(inbound)
        # The same rewrite in every case (SSRC, PT, one extension ID), so only the crypto differs.
        p = self.dp.add_producer(t_in, 1, 111, 48000, {3: 3, 1: 2})
        self.producer = p
        if red:
            self.dp.set_producer_red(p, 63)
        for i in range(fanout):
            t = self.dp.add_transport(self.sock)
            self.dp.set_transport_remote(t, "127.0.0.1", 5000 + i)
            if mode:
                ctx = AeadContext(mode, os.urandom(32))
                self.dp.set_transport_aead(t, ctx)
                self.keep.append(ctx)
            elif suite:
                out = SrtpContext(suite, generate_key(suite), inbound=False)
                out.add_stream(100 + i)
                self.dp.set_transport_srtp(t, None, out)
                self.keep.append(out)
            c = self.dp.add_consumer(p, t, 100 + i, 100, {3: 7, 2: 1} if levels else {3: 7})
            if red == "forward":
                self.dp.set_consumer_red(c, 101)  # block PTs rewritten 111 -> 100 as well
        sender: SrtpContext | Sealer | None = None
        if mode:
            sender = Sealer(mode, up)
        elif suite:
            sender = SrtpContext(suite, up, inbound=False)
        self.rounds = []
        seq = 0
        for _ in range(ROUNDS + 2):
            chunks, lengths = [], array("I")
            for _ in range(PACKETS_PER_ROUND):
                # 160-byte anchor (docs/benchmarks.md#micro-benchmarks): 12 header, 12 extension, 136 payload.
                pkt = bytes(
                    RtpPacket(
                        63 if red else 111,
                        seq & 0xFFFF,
                        seq * 960 & 0xFFFFFFFF,
                        1,
                        extensions=[(3, seq.to_bytes(8, "big"))]
                        + ([(1, bytes([0x80 | (seq % 90)]))] if levels else []),
                        payload=RED_PAYLOAD if red else bytes(132 if levels else 136),
                    )
                )
                data = sender.protect(pkt) if sender else pkt
                chunks.append(data)
                lengths.append(len(data))
                seq += 1
            self.rounds.append((b"".join(chunks), lengths))
        self.next_round = 0

    def setup(self) -> tuple[tuple[object, ...], dict[str, object]]:
        packed, lengths = self.rounds[self.next_round]
        self.next_round += 1
        return (packed, lengths), {}

    def run(self, packed: bytes, lengths: array) -> int:
        return self.dp.process_many(self.sock, packed, lengths, "127.0.0.1", 4000, 1_000_000_000)


@pytest.mark.parametrize("fanout", [1, 10, 50])
@pytest.mark.parametrize(
    "suite",
    ["AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM", *DISCORD_MODES, None],
    ids=["cm", "gcm", "discord_aes256_gcm", "discord_xchacha20", "plain"],
)
def test_forward_in_memory(benchmark: pytest.FixtureRequest, fanout: int, suite: str | None) -> None:
    fx = Fixture(fanout, suite)
    fx.run(*fx.setup()[0])  # warm up: first packets add nothing to libsrtp's state
    benchmark.group = f"datapath in memory, fan-out {fanout}"
    benchmark.extra_info["forwarded_per_round"] = PACKETS_PER_ROUND * fanout
    benchmark.pedantic(fx.run, setup=fx.setup, rounds=ROUNDS, iterations=1)
    forwarded = fx.dp.stats()["forwarded_packets"]
    assert forwarded == (ROUNDS + 1) * PACKETS_PER_ROUND * fanout
    assert not any(fx.dp.drop_counts().values())
    median_ns = benchmark.stats.stats.median * 1e9 / (PACKETS_PER_ROUND * fanout)
    benchmark.extra_info["ns_per_forwarded_packet"] = round(median_ns, 1)
    print(
        f"\n  fan-out {fanout:2d} {suite or 'plain':24s}: {median_ns:7.1f} ns per forwarded packet (median)"
    )


def test_audio_level_observer_overhead() -> None:
    """CPU per forwarded packet, a room of 50 (one speaker, 49 receivers; and fan-out 1, the worst
    case), ssrc-audio-level in every packet: the producer observed (levels read per packet, and an
    observer's take_levels for 50 producers every 300 ms, timed apart) vs not. Interleaved rounds
    on one fixture each, so a shared machine's noise falls on both; medians and ranges printed."""
    import statistics
    import time

    suite = "AES_CM_128_HMAC_SHA1_80"
    for fanout in (49, 1):
        off, on = Fixture(fanout, suite, levels=True), Fixture(fanout, suite, levels=True)
        assert on.dp.set_producer_levels(on.producer, True)
        for fx in (off, on):
            fx.run(*fx.setup()[0])
        samples: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(ROUNDS):
            order = ((off, "off"), (on, "on")) if r % 2 == 0 else ((on, "on"), (off, "off"))
            for fx, name in order:
                args = fx.setup()[0]
                t0 = time.process_time_ns()
                fx.run(*args)
                samples[name].append((time.process_time_ns() - t0) / (PACKETS_PER_ROUND * fanout))
        ((count, _, _, _, _),) = on.dp.take_levels([on.producer])
        assert count == (ROUNDS + 1) * PACKETS_PER_ROUND
        m_off, m_on = statistics.median(samples["off"]), statistics.median(samples["on"])
        span = {k: f"[{min(v):.1f}-{max(v):.1f}]" for k, v in samples.items()}
        print(
            f"\n  fan-out {fanout:2d}: off {m_off:6.1f} ns {span['off']}, on {m_on:6.1f} ns {span['on']}"
            f": {100 * (m_on / m_off - 1):+.2f} % per forwarded packet"
        )
    # The observer's timer: one take_levels for a room of 50 producers, per 300 ms interval.
    room = _rtp.Datapath(max_producers=64)
    sock = room.add_socket(-1, socket.AF_INET, False)
    slots = []
    for i in range(50):
        t = room.add_transport(sock)
        slots.append(room.add_producer(t, 1000 + i, 111, 48000, {1: 2}))
        room.set_producer_levels(slots[-1], True)
    t0 = time.process_time_ns()
    for _ in range(1000):
        room.take_levels(slots)
    per_call = (time.process_time_ns() - t0) / 1000
    share = per_call / 0.3 / 1e9 * 100
    print(
        f"  take_levels(50 producers): {per_call / 1000:.1f} us per call, {share:.4f} % of a core at 300 ms"
    )


def test_red_unwrap_vs_forward() -> None:
    """CPU per forwarded packet, AES-CM-80 at fan-out 10 and 49, no encryption at 49: plain Opus,
    Opus RED forwarded (block PTs rewritten per receiver) and Opus RED unwrapped to its primary block
    (docs/transports.md#opus-red). Interleaved rounds (order rotating), medians and ranges."""
    import statistics
    import time

    for suite, fanout in (("AES_CM_128_HMAC_SHA1_80", 10), ("AES_CM_128_HMAC_SHA1_80", 49), (None, 49)):
        fixtures = {
            name: Fixture(fanout, suite, red=red)
            for name, red in (("opus", None), ("red_forward", "forward"), ("red_unwrap", "unwrap"))
        }
        for fx in fixtures.values():
            fx.run(*fx.setup()[0])
        samples: dict[str, list[float]] = {name: [] for name in fixtures}
        names = list(fixtures)
        for r in range(ROUNDS):
            for name in names[r % 3 :] + names[: r % 3]:
                fx = fixtures[name]
                args = fx.setup()[0]
                t0 = time.process_time_ns()
                fx.run(*args)
                samples[name].append((time.process_time_ns() - t0) / (PACKETS_PER_ROUND * fanout))
        for name, fx in fixtures.items():
            assert fx.dp.stats()["forwarded_packets"] == (ROUNDS + 1) * PACKETS_PER_ROUND * fanout, name
            assert not any(fx.dp.drop_counts().values()), name
        base = statistics.median(samples["opus"])
        print(f"\n  {suite or 'plain'}, fan-out {fanout:2d}:", end="")
        for name, v in samples.items():
            m = statistics.median(v)
            print(f"  {name} {m:6.1f} ns [{min(v):.1f}-{max(v):.1f}] ({100 * (m / base - 1):+.1f} %)", end="")
        print()
