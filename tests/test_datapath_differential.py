"""The Cython datapath and the Python reference forwarder, fed the same input, agree byte for byte."""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass, field

import pytest
from reference_forwarder import ReferenceForwarder

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

SUITES = [None, "AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM", "AEAD_AES_256_GCM", "AES_CM_128_HMAC_SHA1_32"]


@dataclass
class Sender:
    transport: int
    ssrc: int
    pt: int
    ext_ids: dict[int, int]  # producer extension ID -> kind
    srtp: SrtpContext | None
    seq: int
    ts: int
    producer: int = -1
    red_pt: int = -1  # the producer also sends audio/red (RFC 2198) with this PT
    consumers: list[int] = field(default_factory=list)
    pipes: set[int] = field(default_factory=set)  # the consumers that are pipe (passthrough) ones


class Pair:
    """A Datapath and a ReferenceForwarder programmed with the same calls."""

    def __init__(self) -> None:
        self.dp = _rtp.Datapath(max_sockets=4, max_transports=16, max_producers=16, max_consumers=64)
        self.dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
        self.ref = ReferenceForwarder()

    def call(self, name: str, *args: object) -> object:
        a = getattr(self.dp, name)(*args)
        b = getattr(self.ref, name)(*args)
        assert a == b, f"{name}{args}: datapath returned {a}, reference {b}"
        return a

    def srtp(self, t: int, suite: str | None, up_key: bytes, down_key: bytes) -> None:
        if suite is None:
            return
        self.dp.set_transport_srtp(
            t, SrtpContext(suite, up_key, inbound=True), SrtpContext(suite, down_key, inbound=False)
        )
        self.ref.set_transport_srtp(
            t, SrtpContext(suite, up_key, inbound=True), SrtpContext(suite, down_key, inbound=False)
        )

    def feed(self, sock: int, data: bytes, ip: str, port: int, now: int) -> list[bytes]:
        a = self.dp.process(sock, data, ip, port, now)
        b = self.ref.process(sock, data, ip, port, now)
        assert a == b, "slow path differs"
        out_a, out_b = self.dp.take_captured(), self.ref.take_captured()
        assert out_a == out_b, f"forwarded output differs for input {data.hex()}"
        assert self.dp.drop_counts() == self.ref.drop_counts()
        assert self.dp.take_events() == self.ref.take_events()
        self.forwarded += len(out_a)
        return [out for _, _, out in out_a]

    forwarded = 0
    pipe_forwarded = 0


def assert_counters_agree(pair: Pair, senders: list[Sender]) -> None:
    """The C datapath's and the reference's per-consumer and per-producer counters are equal."""
    for s in senders:
        for c in s.consumers:
            a, b = pair.dp.consumer_stats(c), pair.ref.consumers[c]
            assert a["packets"] == b.packets
            assert (a["last_seq"], a["last_timestamp"]) == (
                (b.last_seq, b.last_ts) if b.has_sent else (None, None)
            )
        assert pair.dp.producer_stats(s.producer)["packets"] == pair.ref.producers[s.producer].packets
        assert pair.call("take_levels", [s.producer]) is not None  # the levels read agree (Pair.call)
        assert pair.dp.producer_stats(s.producer)["jitter"] == pair.ref.producers[s.producer].jitter_q4 >> 4


def random_extensions(rng: random.Random, sender: Sender) -> tuple[list[tuple[int, bytes]], int]:
    elements = []
    for eid in sender.ext_ids:
        if rng.random() < 0.7:
            elements.append((eid, rng.randbytes(rng.choice([1, 1, 2, 8, 16]))))
    if rng.random() < 0.2:
        elements.append((rng.randint(1, 14), rng.randbytes(3)))  # an ID the producer never declared
    profile = 0x1000 if rng.random() < 0.15 else 0xBEDE
    return elements, profile


def make_packet(rng: random.Random, s: Sender) -> bytes | None:
    r = rng.random()
    if r < 0.80:
        step = 1
    elif r < 0.88:
        step = -rng.randint(0, 3)  # reordering and duplicates
    elif r < 0.95:
        step = rng.randint(2, 20)  # loss
    elif r < 0.98:
        step = rng.choice([5000, 30000])  # a sender restart
    else:
        step = -rng.randint(200, 600)  # far in the past: also a restart (RFC 3550 A.1)
    s.seq = (s.seq + step) & 0xFFFF
    s.ts = (s.ts + 960 * step) & 0xFFFFFFFF
    ext, profile = random_extensions(rng, s)
    red = s.red_pt >= 0 and rng.random() < 0.6
    pkt = RtpPacket(
        payload_type=s.red_pt if red else s.pt,
        sequence_number=s.seq,
        timestamp=s.ts,
        ssrc=s.ssrc,
        marker=rng.random() < 0.05,
        csrcs=[rng.getrandbits(32)] if rng.random() < 0.05 else [],
        extensions=ext,
        extension_profile=profile,
        payload=red_payload(rng, s.pt) if red else rng.randbytes(rng.randint(1, 160)),
        padding=rng.choice([0, 0, 0, 0, 1, 4]),
    )
    data = bytes(pkt)
    if s.srtp is not None:
        try:
            data = s.srtp.protect(data)
        except Exception:
            return None  # libsrtp will not protect far into its own past: no such packet exists
    return data


def red_payload(rng: random.Random, opus_pt: int) -> bytes:
    """An RFC 2198 payload of Opus blocks: well formed mostly, else one of the malformations."""
    blocks = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
    primary = rng.randbytes(rng.randint(1, 100))
    pts = [opus_pt] * (len(blocks) + 1)
    lengths = [len(b) for b in blocks]
    flaw = rng.randrange(12)
    if flaw == 0 and blocks:
        lengths[-1] += len(primary) + rng.randint(0, 5)  # a block length past the packet
    elif flaw == 1:
        pts[rng.randrange(len(pts))] = (opus_pt + 1) & 0x7F  # a block that is not Opus
    elif flaw == 2:
        blocks = [b""] * 16  # too many blocks (17 headers)
        lengths = [0] * 16
        pts = [opus_pt] * 17
    elif flaw == 3:
        primary = b""  # an empty primary
    headers = b"".join(
        struct.pack("!BHB", 0x80 | pt, (rng.getrandbits(14) << 2) | (n >> 8), n & 0xFF)
        for pt, n in zip(pts, lengths, strict=False)
    )
    out = headers + bytes([pts[-1]]) + b"".join(blocks) + primary
    if flaw == 4:
        return out[: rng.randint(0, len(headers))]  # truncated inside the headers
    return out


def corrupt(rng: random.Random, data: bytes) -> bytes:
    choice = rng.randrange(7)
    if choice == 6:
        return data[:8] + rng.randbytes(4) + data[12:]  # an SSRC nobody produces
    if choice == 0:
        return data[: rng.randint(0, 11)]  # truncated header
    if choice == 1:
        return bytes([data[0] & 0x3F]) + data[1:]  # version 0
    if choice == 2:
        return bytes([(data[0] & 0xF0) | 0x0F]) + data[1:20]  # CSRC count past the end
    if choice == 3:
        b = bytearray(data)
        b[-1] ^= 0xFF  # a bad SRTP tag (or a bad padding count)
        return bytes(b)
    if choice == 4:
        return bytes([rng.choice([0, 1, 22, 70, 200, 255])]) + rng.randbytes(rng.randint(0, 40))
    b = bytearray(data)
    b[1] = (b[1] & 0x80) | 0x7F  # payload type nobody produces
    return bytes(b)


def build(rng: random.Random, pair: Pair) -> tuple[int, list[Sender], list[int]]:
    sock = pair.call("add_socket", -1, socket.AF_INET, False)
    senders = []
    transports = []
    for i in range(rng.randint(2, 5)):
        t = pair.call("add_transport", sock, False)
        transports.append(t)
        pair.call("set_transport_remote", t, "127.0.0.1", 7000 + i)
        suite = rng.choice(SUITES)
        up, down = (generate_key(suite), generate_key(suite)) if suite else (b"", b"")
        pair.srtp(t, suite, up, down)
        ids = rng.sample(range(1, 15), 3)
        ext_ids = {ids[0]: 1, ids[1]: 2, ids[2]: 3}
        s = Sender(
            transport=t,
            ssrc=rng.getrandbits(32),
            pt=rng.choice([96, 111]),
            ext_ids=ext_ids,
            srtp=SrtpContext(suite, up, inbound=False) if suite else None,
            seq=rng.getrandbits(16),
            ts=rng.getrandbits(32),
        )
        s.producer = pair.call("add_producer", t, s.ssrc, s.pt, 48000, ext_ids)
        if rng.random() < 0.6:
            s.red_pt = rng.choice([63, 110])
            pair.call("set_producer_red", s.producer, s.red_pt)
        if rng.random() < 0.5:
            pair.call("set_producer_levels", s.producer, True)
        senders.append(s)
    for s in senders:
        for t in transports:
            if t != s.transport and rng.random() < 0.85:
                add_consumer(rng, pair, s, t)
    add_consumer(rng, pair, senders[0], senders[1].transport, pipe=True)  # every run has a pipe
    return sock, senders, transports


def add_consumer(rng: random.Random, pair: Pair, s: Sender, t: int, pipe: bool = False) -> None:
    if pipe or rng.random() < 0.25:
        # A pipe consumer: the producer's SSRC, PT and extension IDs (MID aside), seq/ts unchanged.
        ext_ids = {kind: eid for eid, kind in s.ext_ids.items() if kind != 1}
        c = pair.call("add_consumer", s.producer, t, s.ssrc, s.pt, ext_ids, b"", rng.random() < 0.1, True)
        s.consumers.append(c)
        s.pipes.add(c)
        return
    ssrc = rng.getrandbits(32)
    ids = rng.sample(list(range(1, 15)) + [15, 200], 3)  # 15 and 200 force the two-byte form
    ext_ids = {kind: eid for kind, eid in zip((1, 2, 3), ids, strict=True) if rng.random() < 0.8}
    mid = rng.choice([b"", b"0", b"12", b"audio"])
    c = pair.call(
        "add_consumer", s.producer, t, ssrc, rng.choice([100, 109, 111]), ext_ids, mid, rng.random() < 0.1
    )
    if s.red_pt >= 0 and rng.random() < 0.5:
        pair.call("set_consumer_red", c, rng.choice([63, 120]))  # negotiated RED; else unwrapped
    s.consumers.append(c)
    # The outbound SRTP session needs no stream per SSRC: its template covers any SSRC.


def apply_control(rng: random.Random, pair: Pair, senders: list[Sender], transports: list[int]) -> None:
    s = rng.choice(senders)
    op = rng.randrange(8)
    if op == 0 and s.consumers:
        pair.call("set_consumer_paused", rng.choice(s.consumers), rng.random() < 0.5)
    elif op == 1:
        pair.call("set_producer_paused", s.producer, rng.random() < 0.3)
    elif op == 2 and s.consumers:
        c = s.consumers.pop(rng.randrange(len(s.consumers)))
        pair.call("remove_consumer", c)
    elif op == 3:
        add_consumer(rng, pair, s, rng.choice([t for t in transports if t != s.transport]))
    elif op == 4:
        t = rng.choice(transports)
        pair.call("clear_transport_remote", t)
    elif op == 5:
        t = rng.choice(transports)
        pair.call("set_transport_remote", t, "127.0.0.1", 7000 + transports.index(t))
    elif op == 7:
        # An observer comes or goes (docs/observers.md): levels read, observed packets decrypted.
        pair.call("take_levels", [s.producer])
        pair.call("set_producer_levels", s.producer, rng.random() < 0.6)


@pytest.mark.parametrize("seed", range(24))
def test_random_traffic_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    pair = Pair()
    sock, senders, transports = build(rng, pair)
    now = 1_000_000_000_000
    for _ in range(400):
        now += rng.randint(0, 40_000_000)
        r = rng.random()
        if r < 0.06:
            apply_control(rng, pair, senders, transports)
            continue
        s = rng.choice(senders)
        data = make_packet(rng, s)
        if data is None:
            continue
        port = 7000 + transports.index(s.transport)
        if r < 0.13:
            data = corrupt(rng, data)
        elif r < 0.15:
            port = 9999  # unknown tuple
        for out in pair.feed(sock, data, "127.0.0.1", port, now):
            if out[8:12] == data[8:12]:  # the producer's SSRC: only a pipe consumer sends it
                assert out[1] & 0x7F == s.pt and out[2:8] == data[2:8], "a pipe rewrote seq/ts/PT"
                pair.pipe_forwarded += 1
    assert pair.forwarded > 0
    assert pair.pipe_forwarded > 0, "no pipe consumer forwarded anything in this run"
    # Counters agree too, not just the bytes.
    assert_counters_agree(pair, senders)


@pytest.mark.parametrize("packets", [0, 40, 64, 150])
def test_the_levels_of_an_interval_come_back_in_order_past_the_ring(packets: int) -> None:
    """The per-frame levels the active speaker needs (docs/observers.md): the last 64 of an
    interval in arrival order, alike in C and in the reference, across the ring's wrap."""
    rng = random.Random(packets)
    pair = Pair()
    sock, senders, transports = build(rng, pair)
    s = senders[0]
    assert pair.call("set_producer_levels", s.producer, True)
    level_id = next(eid for eid, kind in s.ext_ids.items() if kind == 2)
    sent = []
    for _ in range(packets):
        level = rng.randrange(128)
        sent.append(level)
        s.seq = (s.seq + 1) & 0xFFFF
        s.ts = (s.ts + 960) & 0xFFFFFFFF
        pkt = RtpPacket(
            s.pt, s.seq, s.ts, s.ssrc, extensions=[(level_id, bytes([0x80 | level]))], payload=b"x"
        )
        data = s.srtp.protect(bytes(pkt)) if s.srtp is not None else bytes(pkt)
        pair.feed(sock, data, "127.0.0.1", 7000 + transports.index(s.transport), 1_000_000_000_000)
    ((count, total, loudest, voiced, recent),) = pair.call("take_levels", [s.producer])  # type: ignore[misc]
    assert (count, total, voiced) == (packets, sum(sent), packets)
    assert loudest == min(sent, default=127) and recent == bytes(sent[-64:])
    assert pair.call("take_levels", [s.producer]) == [(0, 0, 127, 0, b"")]  # and reset


def test_slow_path_rtcp_is_unprotected_and_matches() -> None:
    pair = Pair()
    sock = pair.call("add_socket", -1, socket.AF_INET, False)
    t = pair.call("add_transport", sock, False)
    pair.call("set_transport_remote", t, "127.0.0.1", 7000)
    up, down = generate_key("AEAD_AES_128_GCM"), generate_key("AEAD_AES_128_GCM")
    pair.srtp(t, "AEAD_AES_128_GCM", up, down)
    client = SrtpContext("AEAD_AES_128_GCM", up, inbound=False)
    rr = struct.pack("!BBHI", 0x80, 201, 1, 0xDEADBEEF)
    protected = client.protect_rtcp(rr)
    a = pair.dp.process(sock, protected, "127.0.0.1", 7000, 0)
    b = pair.ref.process(sock, protected, "127.0.0.1", 7000, 0)
    assert a == b == [(_rtp.SLOW_RTCP, t, rr, ("127.0.0.1", 7000), sock)]
    # A second copy is a replay: counted, not delivered.
    assert pair.dp.process(sock, protected, "127.0.0.1", 7000, 0) is None
    assert pair.dp.drop_counts()["decrypt_failed"] == 1
