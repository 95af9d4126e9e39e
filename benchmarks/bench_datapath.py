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


class Sealer:
    """The sender side of a Discord transport: seal() where SRTP suites call protect()."""

    def __init__(self, mode: str, key: bytes) -> None:
        self.ctx = AeadContext(mode, key)

    def protect(self, packet: bytes) -> bytes:
        # rtpsize: the fixed header and the extension preamble stay clear (12 + 4 bytes here).
        return self.ctx.seal(packet, 16)


class Fixture:
    """A producer fanned out to `fanout` consumers, and enough pre-protected input for every round."""

    def __init__(self, fanout: int, suite: str | None) -> None:
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
        p = self.dp.add_producer(t_in, 1, 111, 48000, {3: 3})
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
            self.dp.add_consumer(p, t, 100 + i, 100, {3: 7})
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
                        111,
                        seq & 0xFFFF,
                        seq * 960 & 0xFFFFFFFF,
                        1,
                        extensions=[(3, seq.to_bytes(8, "big"))],
                        payload=bytes(136),
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
