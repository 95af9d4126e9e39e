"""Datapath rules, one behaviour per test: bad input, rewriting, continuity, comedia, limits."""

from __future__ import annotations

import socket
import struct

import pytest

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

SUITE = "AES_CM_128_HMAC_SHA1_80"
SENDER, RECEIVER = ("127.0.0.1", 7000), ("127.0.0.1", 7001)
SSRC, OUT_SSRC = 0x11223344, 0x55667788
MS = 1_000_000


class Room:
    """One sender transport with a producer, one receiver transport with a consumer."""

    def __init__(
        self,
        srtp: bool = True,
        ext_kinds: dict[int, int] | None = None,
        ext_ids: dict[int, int] | None = None,
        mid: bytes = b"",
        consumer: bool = True,
    ) -> None:
        self.dp = _rtp.Datapath(max_sockets=2, max_transports=4, max_producers=4, max_consumers=8)
        self.dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
        self.sock = self.dp.add_socket(-1, socket.AF_INET, False)
        self.tx_t = self.dp.add_transport(self.sock)
        self.rx_t = self.dp.add_transport(self.sock)
        self.dp.set_transport_remote(self.tx_t, *SENDER)
        self.dp.set_transport_remote(self.rx_t, *RECEIVER)
        self.client = self.server_out = None
        if srtp:
            up, down = generate_key(SUITE), generate_key(SUITE)
            self.dp.set_transport_srtp(
                self.tx_t, SrtpContext(SUITE, up, True), SrtpContext(SUITE, generate_key(SUITE), False)
            )
            self.dp.set_transport_srtp(
                self.rx_t, SrtpContext(SUITE, generate_key(SUITE), True), SrtpContext(SUITE, down, False)
            )
            self.client = SrtpContext(SUITE, up, inbound=False)
            self.receiver = SrtpContext(SUITE, down, inbound=True)
        self.producer = self.dp.add_producer(self.tx_t, SSRC, 111, 48000, ext_kinds or {})
        self.consumer = -1
        if consumer:
            self.consumer = self.dp.add_consumer(self.producer, self.rx_t, OUT_SSRC, 100, ext_ids or {}, mid)
        self.now = 10_000 * MS

    def packet(self, seq: int, ts: int, **kw: object) -> bytes:
        data = bytes(
            RtpPacket(
                payload_type=kw.pop("pt", 111),
                sequence_number=seq,
                timestamp=ts,
                ssrc=kw.pop("ssrc", SSRC),
                payload=kw.pop("payload", b"\x01" * 40),
                **kw,
            )
        )
        return self.client.protect(data) if self.client else data

    def send(self, data: bytes, src: tuple[str, int] = SENDER, dt_ms: float = 20) -> list[RtpPacket]:
        self.now += int(dt_ms * MS)
        slow = self.dp.process(self.sock, data, *src, self.now)
        assert slow is None
        out = []
        for sock, dest, raw in self.dp.take_captured():
            assert (sock, dest) == (self.sock, RECEIVER)
            out.append(RtpPacket.parse(self.receiver.unprotect(raw) if self.client else raw))
        return out

    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.dp.drop_counts().items() if v}


def test_forward_rewrites_ssrc_pt_and_keeps_payload() -> None:
    room = Room()
    (out,) = room.send(room.packet(500, 48000, marker=True, payload=b"opus frame"))
    assert (out.ssrc, out.payload_type, out.sequence_number, out.timestamp) == (OUT_SSRC, 100, 500, 48000)
    assert out.marker and out.payload == b"opus frame"
    assert room.dp.consumer_stats(room.consumer)["packets"] == 1
    assert room.dp.transport_stats(room.rx_t)["tx_packets"] == 1


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty", b"", "malformed"),
        ("short header", b"\x80\x6f\x00\x01\x00\x00", "malformed"),
        ("CSRC count past the end", b"\x8f\x6f" + bytes(10) + bytes(8), "malformed"),
        ("extension header past the end", b"\x90\x6f" + bytes(10), "malformed"),
        (
            "extension length past the end",
            b"\x90\x6f" + bytes(2) + bytes(4) + struct.pack("!I", SSRC) + b"\xbe\xde\x00\x40" + bytes(8),
            "malformed",
        ),
        ("unknown SSRC", bytes(RtpPacket(111, 1, 1, 0xABCDEF, payload=b"x")), "unknown_ssrc"),
        ("wrong payload type", bytes(RtpPacket(8, 1, 1, SSRC, payload=b"x")), "unknown_pt"),
        ("RTCP too short", b"\x80\xc9\x00\x00\x00", "malformed"),
    ],
)
def test_bad_input_is_dropped_and_counted(name: str, data: bytes, reason: str) -> None:
    room = Room(srtp=False)
    assert room.send(data) == []
    assert room.drops() == {reason: 1}, name
    # The room still works afterwards.
    assert len(room.send(room.packet(1, 960))) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\x40\x00\x00\x04abcd",  # TURN channel data (RFC 7983: 64-79)
        b"\x40\x6f" + bytes(30),  # "RTP version 1" lands in the TURN range
        b"\xc0\x6f" + bytes(30),  # version 3
        b"\xff" + bytes(40),
    ],
)
def test_unknown_protocols_from_an_admitted_tuple_go_to_python(data: bytes) -> None:
    room = Room(srtp=False)
    assert room.dp.process(room.sock, data, *SENDER, 0) == [
        (_rtp.SLOW_OTHER, room.tx_t, data, SENDER, room.sock)
    ]
    # From a tuple nobody admitted the same datagram is dropped in C.
    assert room.dp.process(room.sock, data, "127.0.0.1", 9999, 0) is None
    assert room.drops() == {"unknown_protocol": 1}


def test_padding_count_past_payload_is_malformed() -> None:
    room = Room(srtp=False)
    good = bytes(RtpPacket(111, 1, 1, SSRC, payload=b"abc", padding=4))
    bad = bytearray(good)
    bad[-1] = 200
    assert room.send(bytes(bad)) == []
    zero = bytearray(good)
    zero[-1] = 0
    assert room.send(bytes(zero)) == []
    assert room.drops() == {"malformed": 2}
    (out,) = room.send(good)
    assert out.padding == 4 and out.payload == b"abc"


def test_oversized_datagram_is_dropped() -> None:
    room = Room(srtp=False)
    assert room.send(room.packet(1, 1, payload=bytes(3000))) == []
    assert room.drops() == {"oversize": 1}


def test_srtp_bad_tag_and_replay_are_counted_separately() -> None:
    room = Room()
    good = room.packet(10, 960)
    tampered = bytearray(good)
    tampered[20] ^= 1
    assert room.send(bytes(tampered)) == []
    assert room.drops() == {"decrypt_failed": 1}
    assert len(room.send(good)) == 1
    assert room.send(good) == []  # replayed
    assert room.drops() == {"decrypt_failed": 1, "srtp_replay": 1}
    assert room.dp.transport_stats(room.tx_t)["drops"] == {"decrypt_failed": 1, "srtp_replay": 1}


def test_plain_rtp_is_not_accepted_on_an_srtp_transport() -> None:
    room = Room()
    plain = bytes(RtpPacket(111, 10, 960, SSRC, payload=b"x" * 40))
    assert room.send(plain) == []
    assert room.drops() == {"decrypt_failed": 1}


def test_unknown_tuple_is_dropped_without_decrypting() -> None:
    room = Room()
    assert room.send(room.packet(1, 960), src=("127.0.0.1", 9999)) == []
    assert room.drops() == {"unknown_tuple": 1}
    assert room.dp.producer_stats(room.producer)["packets"] == 0


def test_unknown_ssrc_is_reported_once() -> None:
    room = Room(srtp=False)
    for seq in range(3):
        room.send(bytes(RtpPacket(111, seq, 0, 0xBAD, payload=b"x")))
    assert room.dp.take_events() == [(_rtp.EVENT_UNKNOWN_SSRC, room.tx_t, 0xBAD)]
    assert room.drops() == {"unknown_ssrc": 3}


def test_slow_path_classification() -> None:
    room = Room(srtp=False)
    stun = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12)
    dtls = b"\x16\xfe\xfd" + bytes(20)
    assert room.dp.process(room.sock, stun, "127.0.0.1", 9999, 0) == [
        (_rtp.SLOW_STUN, -1, stun, ("127.0.0.1", 9999), room.sock)
    ]
    assert room.dp.process(room.sock, stun, *SENDER, 0) == [
        (_rtp.SLOW_STUN, room.tx_t, stun, SENDER, room.sock)
    ]
    assert room.dp.process(room.sock, dtls, *SENDER, 0) == [
        (_rtp.SLOW_DTLS, room.tx_t, dtls, SENDER, room.sock)
    ]
    # DTLS only from tuples ICE (or connect) admitted.
    assert room.dp.process(room.sock, dtls, "127.0.0.1", 9999, 0) is None
    assert room.drops() == {"unknown_tuple": 1}


def test_sequence_and_timestamp_continue_across_consumer_pause() -> None:
    room = Room()
    for i in range(3):
        room.send(room.packet(100 + i, 960 * i))
    room.dp.set_consumer_paused(room.consumer, True)
    for i in range(3, 50):  # nearly a second of audio the receiver never sees
        assert room.send(room.packet(100 + i, 960 * i)) == []
    room.dp.set_consumer_paused(room.consumer, False)
    (out,) = room.send(room.packet(150, 960 * 50), dt_ms=20)
    # Next sequence number; timestamp advanced by the wall time since the last packet sent.
    assert out.sequence_number == 103
    assert out.timestamp == 960 * 2 + 48 * (20 * 48)
    (nxt,) = room.send(room.packet(151, 960 * 51))
    assert (nxt.sequence_number, (nxt.timestamp - out.timestamp)) == (104, 960)
    # With its only consumer paused the producer has no active consumer: dropped before decryption.
    assert room.drops() == {"no_consumers": 47}


def test_resume_after_a_day_keeps_timestamps_continuous() -> None:
    room = Room(srtp=False)
    (first,) = room.send(room.packet(1, 1000))
    room.dp.set_consumer_paused(room.consumer, True)
    room.dp.set_consumer_paused(room.consumer, False)
    day_ms = 24 * 3600 * 1000 + 20
    (out,) = room.send(room.packet(2, 5000), dt_ms=day_ms)
    # The timestamp advances by the elapsed time in 48 kHz ticks, modulo 2^32 (RFC 3550 §5.1).
    assert out.sequence_number == 2
    assert out.timestamp == (1000 + day_ms * 48) & 0xFFFFFFFF


def test_paused_producer_is_not_decrypted_and_resumes_continuously() -> None:
    room = Room()
    room.send(room.packet(7, 0))
    room.dp.set_producer_paused(room.producer, True)
    tampered = bytearray(room.packet(8, 960))
    tampered[-1] ^= 1
    assert room.send(bytes(tampered)) == []
    assert room.drops() == {"producer_paused": 1}  # dropped before decryption: no auth failure
    room.dp.set_producer_paused(room.producer, False)
    (out,) = room.send(room.packet(2000, 960 * 2000))
    assert out.sequence_number == 8


def test_producer_silence_keeps_the_senders_own_gaps() -> None:
    room = Room()
    room.send(room.packet(1, 0))
    # DTX: sequence continues, timestamp jumps a second; a forwarder must not hide that.
    (out,) = room.send(room.packet(2, 48000), dt_ms=1000)
    assert (out.sequence_number, out.timestamp) == (2, 48000)
    (lost,) = room.send(room.packet(5, 48000 + 3 * 960))  # 2 packets lost upstream
    assert lost.sequence_number == 5


def test_sender_restart_is_stitched_into_one_stream() -> None:
    room = Room(srtp=False)
    room.send(room.packet(100, 1000))
    # A new sequence space from the same SSRC is believed once a second packet follows the jump
    # (RFC 3550 A.1 probation); the output continues with no gap.
    assert room.send(room.packet(40000, 5)) == []
    (out,) = room.send(room.packet(40001, 965))
    assert out.sequence_number == 101
    assert out.timestamp == 1000 + 2 * 960  # 40 ms after the last packet sent
    assert room.dp.producer_stats(room.producer)["epoch"] == 1
    # A stray packet from before the restart is not a restart, and is not forwarded.
    assert room.send(room.packet(99, 40)) == []
    (after,) = room.send(room.packet(40002, 1925))
    assert after.sequence_number == 102
    assert room.drops() == {"seq_jump": 2}


def test_late_packet_from_before_a_resume_is_stale() -> None:
    room = Room(srtp=False)
    room.send(room.packet(10, 0))
    room.dp.set_consumer_paused(room.consumer, True)
    room.dp.set_consumer_paused(room.consumer, False)
    (out,) = room.send(room.packet(12, 1920))
    assert out.sequence_number == 11
    assert room.send(room.packet(11, 960)) == []  # reordered behind the resync point
    assert room.drops() == {"stale_seq": 1}


def test_sequence_wraps_without_resync() -> None:
    room = Room(srtp=False)
    seqs = [(65533 + i) & 0xFFFF for i in range(6)]
    outs = [room.send(room.packet(s, 960 * i))[0].sequence_number for i, s in enumerate(seqs)]
    assert outs == seqs
    assert room.dp.producer_stats(room.producer)["extended_highest_seq"] == 65536 + 2


def test_extensions_are_mapped_per_receiver() -> None:
    # producer: audio-level on 1 (kind 2), capture time on 3 (kind 3), mid on 4 (kind 1)
    room = Room(srtp=False, ext_kinds={1: 2, 3: 3, 4: 1}, ext_ids={2: 12, 3: 7, 1: 9}, mid=b"a1")
    pkt = room.packet(1, 0, extensions=[(4, b"0"), (1, b"\x7f"), (3, bytes(8)), (6, b"unknown")])
    (out,) = room.send(pkt)
    # The consumer's own MID first, then mapped elements; unknown IDs dropped.
    assert out.extension_profile == 0xBEDE
    assert out.extensions == [(9, b"a1"), (12, b"\x7f"), (7, bytes(8))]


def test_extension_ids_above_14_use_the_two_byte_form() -> None:
    room = Room(srtp=False, ext_kinds={1: 2}, ext_ids={2: 100})
    (out,) = room.send(room.packet(1, 0, extensions=[(1, b"\x10")]))
    assert out.extension_profile == 0x1000
    assert out.extensions == [(100, b"\x10")]


def test_extension_block_removed_when_nothing_survives() -> None:
    room = Room(srtp=False, ext_kinds={1: 2})  # the receiver negotiated no extension
    (out,) = room.send(room.packet(1, 0, extensions=[(1, b"\x10")], payload=b"pp"))
    assert out.extensions == [] and out.payload == b"pp"
    raw = bytes(out)
    assert not raw[0] & 0x10


def test_no_consumers_skips_decryption_but_keeps_srtp_in_step() -> None:
    room = Room(consumer=False)
    room.send(room.packet(1, 0))  # the first packet is always authenticated
    bad = bytearray(room.packet(2, 960))
    bad[-1] ^= 1
    assert room.send(bytes(bad)) == []
    assert room.drops() == {"no_consumers": 2}
    # Every 4096 sequence numbers one packet is decrypted, so a forged one shows up there.
    bad = bytearray(room.packet(4097, 0))
    bad[-1] ^= 1
    assert room.send(bytes(bad)) == []
    assert room.drops()["decrypt_failed"] == 1


def test_comedia_learns_only_from_an_authenticated_packet() -> None:
    dp = _rtp.Datapath(max_sockets=1, max_transports=2, max_producers=1, max_consumers=1)
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    t = dp.add_transport(sock)
    dp.set_transport_comedia(t, True)
    up = generate_key(SUITE)
    dp.set_transport_srtp(t, SrtpContext(SUITE, up, True), SrtpContext(SUITE, generate_key(SUITE), False))
    dp.add_producer(t, SSRC, 111, 48000, {})
    client = SrtpContext(SUITE, up, inbound=False)
    forged = bytes(RtpPacket(111, 1, 0, SSRC, payload=b"x" * 20)) + bytes(10)
    dp.process(sock, forged, "127.0.0.1", 5555, 0)
    assert dp.transport_stats(t)["has_remote"] is False
    good = client.protect(bytes(RtpPacket(111, 2, 0, SSRC, payload=b"x")))
    dp.process(sock, good, "127.0.0.1", 6666, 0)
    assert dp.transport_stats(t)["remote"] == ("127.0.0.1", 6666)
    assert dp.take_events() == [(_rtp.EVENT_TUPLE_LEARNED, t, 0)]
    # Learned once: another source is now an unknown tuple.
    dp.process(sock, client.protect(bytes(RtpPacket(111, 3, 0, SSRC, payload=b"x"))), "127.0.0.1", 7777, 0)
    assert dp.drop_counts()["unknown_tuple"] == 1


def test_table_limits_and_bad_arguments() -> None:
    dp = _rtp.Datapath(max_sockets=1, max_transports=1, max_producers=1, max_consumers=1)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    with pytest.raises(OverflowError):
        dp.add_socket(-1, socket.AF_INET, False)
    t = dp.add_transport(sock)
    with pytest.raises(OverflowError):
        dp.add_transport(sock)
    p = dp.add_producer(t, 1, 111, 48000, {})
    with pytest.raises(ValueError):
        dp.add_producer(t, 1, 111, 48000, {})  # same SSRC twice is refused before the table is full
    with pytest.raises(ValueError):
        dp.add_consumer(p, t, 2, 200, {})
    dp.add_consumer(p, t, 2, 100, {})
    with pytest.raises(OverflowError):
        dp.add_consumer(p, t, 3, 100, {})
    with pytest.raises(KeyError):
        dp.producer_stats(5)
    with pytest.raises(ValueError):
        dp.set_transport_remote(t, "not-an-ip", 5)
    with pytest.raises(ValueError):
        dp.remove_socket(sock)  # still has a transport
    dp.remove_transport(t)
    dp.remove_socket(sock)


def test_a_tuple_belongs_to_one_transport() -> None:
    dp = _rtp.Datapath()
    sock = dp.add_socket(-1, socket.AF_INET, False)
    a, b = dp.add_transport(sock), dp.add_transport(sock)
    dp.set_transport_remote(a, "127.0.0.1", 5000)
    with pytest.raises(ValueError, match="another transport"):
        dp.set_transport_remote(b, "127.0.0.1", 5000)
    dp.clear_transport_remote(a)
    dp.set_transport_remote(b, "127.0.0.1", 5000)


def test_ipv6_socket_accepts_ipv4_mapped_peers() -> None:
    dp = _rtp.Datapath()
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET6, False)
    a, b = dp.add_transport(sock), dp.add_transport(sock)
    dp.set_transport_remote(a, "::1", 5000)
    dp.set_transport_remote(b, "127.0.0.1", 5001)
    p = dp.add_producer(a, SSRC, 111, 48000, {})
    dp.add_consumer(p, b, OUT_SSRC, 100, {})
    dp.process(sock, bytes(RtpPacket(111, 1, 0, SSRC, payload=b"x")), "::1", 5000, 0)
    ((_, dest, _),) = dp.take_captured()
    assert dest == ("::ffff:127.0.0.1", 5001)


def test_loss_and_jitter_statistics() -> None:
    room = Room(srtp=False)
    last = 0
    for seq in (1, 2, 3, 6, 7):  # 4 and 5 lost
        room.send(room.packet(seq, seq * 960), dt_ms=20 * (seq - last))
        last = seq
    s = room.dp.producer_stats(room.producer)
    assert (s["expected"], s["packets"], s["lost"]) == (7, 5, 2)
    assert s["jitter"] == 0  # perfectly paced
    room.send(room.packet(8, 8 * 960), dt_ms=30)  # 10 ms late = 480 ticks
    assert room.dp.producer_stats(room.producer)["jitter"] == 480 // 16
