"""In-memory cost of one pipe hop: CPU per delivered packet, direct vs through a pipe, same run.

Direct: a speaker (SRTP AES-CM-80) fanned out to N listeners in one Datapath. Piped: the speaker in
Datapath A goes to one pipe consumer (passthrough; plain RTP or SRTP AEAD_AES_128_GCM), Datapath B
receives the pipe's datagrams as a producer and fans them out to the same N listeners. The two are
timed round by round, interleaved (thread CPU time), so the difference is the hop's cost.
"""

from __future__ import annotations

import socket
import statistics
import time
from array import array

import pytest

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

EDGE = "AES_CM_128_HMAC_SHA1_80"  # speaker and listeners, as in bench_datapath.py
PIPE = "AEAD_AES_128_GCM"
PACKETS_PER_ROUND = 2000
ROUNDS = 15
SSRC = 1
NOW = 1_000_000_000

Round = tuple[bytes, array]


def pack(packets: list[bytes]) -> Round:
    return b"".join(packets), array("I", [len(p) for p in packets])


class Side:
    """One Datapath: an ingress transport with one producer, and consumers on other transports."""

    def __init__(self, in_suite: str | None, in_key: bytes, capture: bool = False) -> None:
        self.dp = _rtp.Datapath(max_consumers=128)
        self.dp.set_output_mode(_rtp.OUTPUT_CAPTURE if capture else _rtp.OUTPUT_DISCARD)
        self.sock = self.dp.add_socket(-1, socket.AF_INET, False)
        self.t_in = self.dp.add_transport(self.sock)
        self.dp.set_transport_remote(self.t_in, "127.0.0.1", 4000)
        self.keep: list[object] = []
        if in_suite:
            inbound = SrtpContext(in_suite, in_key, inbound=True)
            inbound.add_stream(SSRC)
            self.dp.set_transport_srtp(self.t_in, inbound, None)
            self.keep.append(inbound)
        self.p = self.dp.add_producer(self.t_in, SSRC, 111, 48000, {3: 3})
        self.n = 0

    def consumer(
        self, suite: str | None, key: bytes, ssrc: int, pt: int, ids: dict[int, int], pipe: bool
    ) -> None:
        t = self.dp.add_transport(self.sock)
        self.dp.set_transport_remote(t, "127.0.0.1", 5000 + self.n)
        self.n += 1
        if suite:
            out = SrtpContext(suite, key, inbound=False)
            out.add_stream(ssrc)
            self.dp.set_transport_srtp(t, None, out)
            self.keep.append(out)
        self.dp.add_consumer(self.p, t, ssrc, pt, ids, b"", False, pipe)

    def listeners(self, n: int) -> None:
        for i in range(n):
            self.consumer(EDGE, generate_key(EDGE), 100 + i, 100, {3: 7}, False)

    def run(self, r: Round) -> int:
        return self.dp.process_many(self.sock, r[0], r[1], "127.0.0.1", 4000, NOW)


def speaker_rounds(key: bytes, count: int) -> list[Round]:
    sender = SrtpContext(EDGE, key, inbound=False)
    rounds, seq = [], 0
    for _ in range(count):
        pkts = []
        for _ in range(PACKETS_PER_ROUND):
            # 160-byte anchor (docs/benchmarks.md#micro-benchmarks): 12 header, 12 extension, 136 payload.
            pkt = RtpPacket(
                111,
                seq & 0xFFFF,
                seq * 960 & 0xFFFFFFFF,
                SSRC,
                extensions=[(3, bytes(8))],
                payload=bytes(136),
            )
            pkts.append(sender.protect(bytes(pkt)))
            seq += 1
        rounds.append(pack(pkts))
    return rounds


def cpu_ns(fn: object, *rounds: Round) -> int:
    start = time.thread_time_ns()
    for f, r in zip(fn, rounds, strict=True):  # type: ignore[call-overload]
        f(r)
    return time.thread_time_ns() - start


@pytest.mark.parametrize("fanout", [1, 10])
@pytest.mark.parametrize("pipe_suite", [None, PIPE], ids=["plain", "gcm"])
def test_pipe_hop_cost(benchmark: pytest.FixtureRequest, fanout: int, pipe_suite: str | None) -> None:
    speaker_key = generate_key(EDGE)
    pipe_key = generate_key(PIPE) if pipe_suite else b""
    speaker = speaker_rounds(speaker_key, ROUNDS + 1)
    direct = Side(EDGE, speaker_key)
    direct.listeners(fanout)
    a = Side(EDGE, speaker_key)
    a.consumer(pipe_suite, pipe_key, SSRC, 111, {3: 3}, True)
    b = Side(pipe_suite, pipe_key)
    b.listeners(fanout)
    # What A sends B, made beforehand by an identical A that captures (same keys: same bytes).
    recorder = Side(EDGE, speaker_key, capture=True)
    recorder.consumer(pipe_suite, pipe_key, SSRC, 111, {3: 3}, True)
    piped: list[Round] = []
    for r in speaker:
        recorder.run(r)
        piped.append(pack([data for _, _, data in recorder.dp.take_captured()]))
    assert piped[0][0][:12] == speaker[0][0][:12]  # the hop kept the header (SSRC, PT, seq, ts)
    direct_ns, piped_ns = [], []
    for i, (r, p) in enumerate(zip(speaker, piped, strict=True)):
        d = cpu_ns([direct.run], r)
        h = cpu_ns([a.run, b.run], r, p)
        if i:  # round 0 warms up
            direct_ns.append(d)
            piped_ns.append(h)
    delivered = PACKETS_PER_ROUND * fanout
    assert (
        direct.dp.stats()["forwarded_packets"]
        == b.dp.stats()["forwarded_packets"]
        == (ROUNDS + 1) * delivered
    )
    for side in (direct, a, b):
        assert not any(side.dp.drop_counts().values())
    d_med, h_med = statistics.median(direct_ns), statistics.median(piped_ns)
    hop_ns = (h_med - d_med) / PACKETS_PER_ROUND  # per packet crossing the pipe
    benchmark.extra_info.update(
        direct_ns_per_delivered=round(d_med / delivered, 1),
        piped_ns_per_delivered=round(h_med / delivered, 1),
        hop_ns_per_packet=round(hop_ns, 1),
    )
    benchmark.group = "pipe hop in memory"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # figures are in extra_info
    print(
        f"\n  fan-out {fanout:2d}, pipe {pipe_suite or 'plain':16s}: direct {d_med / delivered:6.1f} ns, "
        f"piped {h_med / delivered:6.1f} ns per delivered packet; one hop {hop_ns:6.1f} ns per packet"
    )
