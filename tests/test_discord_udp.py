"""Discord's `udp` transport (docs/transports.md#discord-udp): the rtpsize AEAD modes in C checked against
independent implementations (cryptography's AES-GCM, PyNaCl's XChaCha20-Poly1305), and the
transport through real sockets on 127.0.0.1: IP discovery, keep-alives, forwarding with PT 120 and
CC 0 re-encrypted per receiver, and bad input (tampering, replays, malformed discovery)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from discord_helpers import AES, XCHACHA, Client, discover, ref_open, ref_seal, rtp_packet

from fastsfu import Engine, Settings
from fastsfu.discord.crypto import (
    LEGACY_MODES,
    MODES,
    AeadContext,
    hchacha20,
    legacy_modes_available,
    rtp_clear_length,
)
from fastsfu.discord.udp_transport import (
    DISCORD_RTP_CAPABILITIES,
    MAX_REFUSED_ANSWERS,
    DiscordUdpTransport,
    discovery_response,
    parse_discovery_request,
    rtp_parameters,
)

pytestmark = pytest.mark.loopback


# ---------------------------------------------------------------------------------------------- crypto


def test_hchacha20_known_answer() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert hchacha20(key, nonce).hex() == expected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "packet",
    [
        rtp_packet(7, 1, b""),
        rtp_packet(7, 2, os.urandom(160)),
        rtp_packet(7, 3, os.urandom(60), csrcs=2),
        rtp_packet(7, 4, os.urandom(60), extension=b"\x10\x85\x30\x01\x02\x03"),
    ],
)
def test_seal_and_open_match_independent_implementations(mode: str, packet: bytes) -> None:
    key = os.urandom(32)
    clear = rtp_clear_length(packet)
    ours = AeadContext(mode, key)
    for counter in (0, 1, 0xFFFFFFFF):
        ours.out_counter = counter
        sealed = ours.seal(packet, clear)
        assert sealed == ref_seal(mode, key, packet, clear, counter)
        assert ref_open(mode, key, sealed, clear) == (packet, counter)
        assert AeadContext(mode, key).open(sealed, clear) == packet
    assert ours.out_counter == 0  # wrapped past 2^32 - 1


@pytest.mark.parametrize("mode", MODES)
def test_open_refuses_tampering_replays_and_short_packets(mode: str) -> None:
    key = os.urandom(32)
    packet = rtp_packet(9, 1, os.urandom(40))
    rx = AeadContext(mode, key)
    sealed = [ref_seal(mode, key, packet, 12, c) for c in range(200)]
    for i in (0, 12, len(sealed[5]) - 20, len(sealed[5]) - 1):  # header (AAD), body, tag, counter
        bad = bytearray(sealed[5])
        bad[i] ^= 0x01
        with pytest.raises(ValueError, match="authentication failed"):
            rx.open(bytes(bad), 12)
    with pytest.raises(ValueError):
        AeadContext(mode, os.urandom(32)).open(sealed[5], 12)  # another key
    with pytest.raises(ValueError, match="short"):
        rx.open(sealed[0][:31], 12)
    # Out of order within 64 is fine, a repeat or anything 64 or more behind is a replay.
    for c in (100, 98, 99, 40, 37):
        assert rx.open(sealed[c], 12) == packet
    for c in (100, 98, 36, 10):
        with pytest.raises(ValueError, match="replayed"):
            rx.open(sealed[c], 12)
    # Failed attempts leave no trace: the genuine packet still opens.
    assert rx.open(sealed[101], 12) == packet


def test_replay_window_crosses_the_counter_wrap() -> None:
    key = os.urandom(32)
    rx = AeadContext(XCHACHA, key)
    packet = rtp_packet(1, 1, b"x" * 10)
    for c in (0xFFFFFFFE, 0xFFFFFFFF, 0, 1):
        assert rx.open(ref_seal(XCHACHA, key, packet, 12, c), 12) == packet
    with pytest.raises(ValueError, match="replayed"):
        rx.open(ref_seal(XCHACHA, key, packet, 12, 0xFFFFFFFF), 12)


def test_discovery_codec() -> None:
    request = struct.pack("!HHI66x", 1, 70, 0xDEADBEEF)
    assert parse_discovery_request(request) == 0xDEADBEEF
    assert parse_discovery_request(request[:-1]) is None
    assert parse_discovery_request(struct.pack("!HHI66x", 2, 70, 5)) is None
    assert parse_discovery_request(struct.pack("!HHI66x", 1, 66, 5)) is None
    response = discovery_response(0xDEADBEEF, "127.0.0.1", 40000)
    assert len(response) == 74 and response[:8] == struct.pack("!HHI", 2, 70, 0xDEADBEEF)
    assert response[8:72].rstrip(b"\0") == b"127.0.0.1" and response[72:] == struct.pack("!H", 40000)


# ---------------------------------------------------------------------------------------------- transport


Room = tuple[Engine, list[Client], list[DiscordUdpTransport], Any, Any]


def run_room(body: Callable[[Room], Awaitable[None]], settings: Settings | None = None) -> None:
    """Two Discord sessions in one router: A sends with AES-GCM, B receives with XChaCha."""

    async def main() -> None:
        async with Engine(settings) as engine:
            router = engine.create_router()
            clients = [Client(1001, AES), Client(1002, XCHACHA)]
            transports = [router.create_discord_udp_transport(c.ssrc) for c in clients]
            for c, t in zip(clients, transports, strict=True):
                c.server = t.local_address
                c.key = t.select_mode(c.mode)
            producer = transports[0].produce(rtp_parameters(1001))
            consumer = transports[1].consume(producer.id, DISCORD_RTP_CAPABILITIES, ssrc=1001)
            try:
                await body((engine, clients, transports, producer, consumer))
            finally:
                for c in clients:
                    c.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_discovery_then_forwarding_rewrites_and_reencrypts_per_receiver() -> None:
    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        await discover(b)
        assert ta.remote == a.address and tb.remote == b.address
        sent = []
        for seq in range(20):
            # Native clients add CSRCs and one-byte extensions: receivers get neither.
            payload = bytes([seq]) * 50
            sent.append(payload)
            a.send_rtp(
                rtp_packet(1001, 100 + seq, payload, csrcs=seq % 3, extension=b"\x10\x85" if seq % 2 else b"")
            )
        for seq in range(20):
            plain, counter = ref_open(XCHACHA, b.key, await b.recv(), 12)
            assert counter == seq  # B's own counter, from 0
            b0, pt, out_seq, ts, ssrc = struct.unpack_from("!BBHII", plain)
            assert b0 == 0x80 and pt == 120 and ssrc == 1001  # V=2, no X, CC 0, PT 120
            assert plain[12:] == sent[seq]
            assert out_seq == (100 + seq) & 0xFFFF and ts == (100 + seq) * 960
        assert producer.get_stats()[0]["packetCount"] == 20
        assert consumer.get_stats()[0]["packetCount"] == 20
        assert engine.stats()["drops"]["decrypt_failed"] == 0

    run_room(body)


def test_bad_input_is_counted_and_the_stream_goes_on() -> None:
    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        await discover(b)
        good = a.send_rtp(rtp_packet(1001, 1, b"first"))
        assert ref_open(XCHACHA, b.key, await b.recv(), 12)[0][12:] == b"first"
        a.send(good)  # replayed nonce
        tampered = bytearray(ref_seal(AES, a.key, rtp_packet(1001, 2, b"second"), 12, 77))
        tampered[-10] ^= 1  # inside the tag
        a.send(bytes(tampered))
        a.send(ref_seal(AES, os.urandom(32), rtp_packet(1001, 3, b"forged"), 12, 50))  # wrong key
        a.send(good[:25])  # shorter than header + tag + counter
        a.send(struct.pack("!HHI65x", 1, 70, 1001))  # 73-byte discovery
        a.send(struct.pack("!HHI66x", 1, 71, 1001))  # wrong length field
        a.send(struct.pack("!HHI66x", 1, 70, 4242))  # unknown SSRC
        await b.recv_none()
        await a.recv_none()  # no discovery answer for any of those
        drops = engine.stats()["drops"]
        assert drops["aead_replay"] == 1 and drops["decrypt_failed"] == 3, drops
        assert engine.stats()["unhandled_datagrams"] >= 2
        # A forged discovery from another address cannot move a stream that has carried media.
        thief = Client(1001, AES)
        thief.server = a.server
        try:
            thief.discovery()
            await thief.recv_none()
        finally:
            thief.close()
        assert ta.remote == a.address and ta.discoveries_refused == 1
        a.send_rtp(rtp_packet(1001, 4, b"still here"))
        assert ref_open(XCHACHA, b.key, await b.recv(), 12)[0][12:] == b"still here"

    run_room(body)


def test_refused_discoveries_get_a_bounded_number_of_answers() -> None:
    """Before any authenticated packet, a refused discovery is answered (the sender's own address)
    so that a client that lost the race can go on, but only MAX_REFUSED_ANSWERS times."""

    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        other = Client(1001, AES, host="127.0.0.2")
        other.server = a.server
        expected = discovery_response(1001, *other.address)  # its own address, nothing of A's
        try:
            for _ in range(MAX_REFUSED_ANSWERS + 3):
                other.discovery()
            answers = [await other.recv() for _ in range(MAX_REFUSED_ANSWERS)]
            await other.recv_none()
        finally:
            other.close()
        assert answers == [expected] * MAX_REFUSED_ANSWERS
        refused = MAX_REFUSED_ANSWERS + 3
        assert ta.discoveries_refused == engine.stats()["discord_discoveries_refused"] == refused
        assert ta.remote == a.address

    run_room(body)


def test_a_discovery_from_another_sessions_address_is_answered_without_taking_it() -> None:
    """A's client left and the OS gave its port to B's client while A's session waits for RESUME:
    B's discovery arrives on A's tuple. B answers (its SSRC, the sender's own address) so its
    client goes on, but the address stays A's (a discovery proves nothing); once A's session
    ends, B's next discovery from there binds it."""

    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        b_request = struct.pack("!HHI66x", 1, 70, b.ssrc)
        a.sock.sendto(b_request, a.server)  # B's client, on the port A's client had
        assert await a.recv() == discovery_response(b.ssrc, *a.address)
        assert ta.remote == a.address and tb.remote is None
        assert tb.discoveries_refused == 1 and ta.discoveries_refused == 0
        ta.close()  # A's session ends: its address is free
        a.sock.sendto(b_request, a.server)
        assert await a.recv() == discovery_response(b.ssrc, *a.address)
        assert tb.remote == a.address

    run_room(body)


def test_a_reused_port_passes_to_the_new_session_on_proof_of_its_key_only_if_the_old_one_yields() -> None:
    """A's client left (A waits for RESUME) and the OS gave its port to C's client. C's media from
    there is dropped while A holds the address as a live session would; once A yields it (as a
    suspended session does), C's first packet that authenticates with C's key takes the address,
    and A's remote is cleared. A forged packet (C's SSRC, wrong key) takes nothing."""

    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        tc = ta.router.create_discord_udp_transport(1003)
        c = Client(1003, AES)
        c.sock.close()
        c.sock = a.sock  # C's client on the port A's client had
        c.server, c.key = tc.local_address, tc.select_mode(AES)
        tb.consume(tc.produce(rtp_parameters(1003)).id, DISCORD_RTP_CAPABILITIES, ssrc=1003)
        await discover(a)
        await discover(b)
        c.discovery()  # answered by C's session, the address stays A's
        assert await a.recv() == discovery_response(1003, *a.address)
        c.send_rtp(rtp_packet(1003, 1, b"not yet"))
        await b.recv_none()
        assert tc.remote is None and ta.remote == a.address
        assert engine.stats()["drops"]["unknown_ssrc"] >= 1
        ta.set_yields_address(True)
        c.send(ref_seal(AES, os.urandom(32), rtp_packet(1003, 2, b"forged"), 12, 5000))
        await b.recv_none()
        assert tc.remote is None and ta.remote == a.address
        c.send_rtp(rtp_packet(1003, 3, b"C speaks"))
        plain, _ = ref_open(XCHACHA, b.key, await b.recv(), 12)
        assert plain[12:] == b"C speaks" and struct.unpack_from("!I", plain, 8)[0] == 1003
        assert tc.remote == a.address and ta.remote is None
        assert tc.remote_moves == 1
        # The address is C's now, and C never yields: A's old key from there moves nothing back.
        a.send_rtp(rtp_packet(1001, 9, b"A's leftover"))
        await b.recv_none()
        assert tc.remote == a.address and ta.remote is None
        assert engine.stats()["drops"]["decrypt_failed"] == 1

    run_room(body)


def test_roaming_needs_an_rtpsize_aead_key_and_an_ssrc_of_its_own() -> None:
    """Only a transport keyed with an rtpsize AEAD mode (a replay window) may move on proof of the
    key; its SSRC names it among the socket's unknown addresses, so it is unique and freed on close."""

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            first = router.create_discord_udp_transport(1001)
            with pytest.raises(ValueError, match="rtpsize AEAD"):
                engine.datapath.set_transport_roaming(first.slot, 1001)  # no key yet
            first.select_mode(AES)  # roams with READY's SSRC from now on
            second = router.create_discord_udp_transport(1002)
            second.select_mode(XCHACHA)
            with pytest.raises(ValueError, match="already roams"):
                engine.datapath.set_transport_roaming(second.slot, 1001)
            first.close()
            engine.datapath.set_transport_roaming(second.slot, 1001)  # freed with its transport

    asyncio.run(asyncio.wait_for(main(), 10))


def test_keepalives_are_echoed_and_pings_answered() -> None:
    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        keepalive = struct.pack("<I4x", 7)
        a.send(keepalive)
        assert await a.recv() == keepalive
        a.send(struct.pack("!II", 0x1337CAFE, 9))
        assert await a.recv() == struct.pack("!II", 0x1337F00D, 9)
        assert ta.keepalives == 2
        b.send(keepalive)  # before discovery: not admitted, no answer
        await b.recv_none()

    run_room(body)


def test_discovery_and_keepalives_that_queued_long_are_still_answered() -> None:
    """Only RTP ages out (docs/datapath.md): IP discovery and keep-alives that waited 60 ms in
    the socket queue (the loop was stuck) are answered; RTP that waited as long is dropped."""

    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        a.discovery()
        time.sleep(0.06)  # the event loop, and so the inline datapath, is stuck meanwhile
        response = await a.recv()
        assert len(response) == 74 and response[:8] == struct.pack("!HHI", 2, 70, a.ssrc)
        keepalive = struct.pack("<I4x", 7)
        a.send(keepalive)
        time.sleep(0.06)
        assert await a.recv() == keepalive
        assert engine.stats()["drops"]["queue_age"] == 0
        a.send_rtp(rtp_packet(1001, 1, bytes(50)))
        time.sleep(0.06)
        await asyncio.sleep(0.02)
        assert engine.stats()["drops"]["queue_age"] == 1  # the control: the stall was long enough

    run_room(body, Settings(max_queue_age_ms=20, datapath_thread=False))


def test_only_receivers_with_a_discovered_address_get_media_and_close_frees_the_ssrc() -> None:
    async def body(room: Room) -> None:
        engine, (a, b), (ta, tb), producer, consumer = room
        await discover(a)
        a.send_rtp(rtp_packet(1001, 1, b"nobody hears"))
        await b.recv_none()
        assert engine.stats()["drops"]["no_remote"] == 1
        router = ta.router
        with pytest.raises(ValueError, match="already in use"):
            router.create_discord_udp_transport(1001)
        ta.close()
        assert producer.closed and consumer.closed
        again = router.create_discord_udp_transport(1001)  # the SSRC is free again
        assert again.ssrc == 1001

    run_room(body)


def test_server_rtcp_is_sealed_with_the_receivers_mode() -> None:
    """Sender reports go out with the 8-byte RTCP header as the clear part."""

    async def main() -> None:
        from fastsfu import Settings

        async with Engine(Settings(rtcp_interval=0.1)) as engine:
            router = engine.create_router()
            a, b = Client(2001, AES), Client(2002, XCHACHA)
            ta, tb = (router.create_discord_udp_transport(c.ssrc) for c in (a, b))
            try:
                for c, t in ((a, ta), (b, tb)):
                    c.server = t.local_address
                    c.key = t.select_mode(c.mode)
                    await discover(c)
                producer = ta.produce(rtp_parameters(2001))
                tb.consume(producer.id, DISCORD_RTP_CAPABILITIES, ssrc=2001)
                a.send_rtp(rtp_packet(2001, 1, b"hello"))
                await b.recv()
                for _ in range(40):
                    if b.rtcp:
                        break
                    await asyncio.sleep(0.05)
                    with contextlib.suppress(TimeoutError):
                        await b.recv(0.01)
                plain, _ = ref_open(XCHACHA, b.key, b.rtcp[0], 8)
                assert plain[1] == 200 and struct.unpack_from("!I", plain, 4)[0] == 2001  # SR of 2001
            finally:
                a.close()
                b.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_select_mode_installs_a_provisioned_key() -> None:
    """select_mode(mode, key): the given key, not a fresh one (the load benchmark provisions keys)."""
    from fastsfu.transport import TransportError

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            a, b = Client(3001, AES), Client(3002, XCHACHA)
            ta, tb = (router.create_discord_udp_transport(c.ssrc) for c in (a, b))
            try:
                with pytest.raises(TransportError, match="32 bytes"):
                    ta.select_mode(AES, key=bytes(31))
                assert ta.mode is None
                for c, t in ((a, ta), (b, tb)):
                    c.server = t.local_address
                    c.key = os.urandom(32)
                    assert t.select_mode(c.mode, key=c.key) == c.key
                    await discover(c)
                assert ta.select_mode(AES) != a.key  # without a key: a fresh random one
                ta.select_mode(AES, key=a.key)
                producer = ta.produce(rtp_parameters(3001))
                tb.consume(producer.id, DISCORD_RTP_CAPABILITIES, ssrc=3001)
                a.send_rtp(rtp_packet(3001, 1, b"provisioned"))
                assert ref_open(XCHACHA, b.key, await b.recv(), 12)[0][12:] == b"provisioned"
            finally:
                a.close()
                b.close()

    asyncio.run(asyncio.wait_for(main(), 20))


# ---------------------------------------------------------------------------------------------- legacy


def legacy_ref_seal(mode: str, key: bytes, packet: bytes, counter: int, nonce24: bytes = b"") -> bytes:
    """The legacy wire layouts built with PyNaCl's SecretBox: hdr ‖ MAC ‖ ct ‖ suffix."""
    import nacl.secret

    clear = rtp_clear_length(packet) if mode == "xsalsa20_poly1305_lite_rtpsize" else 12
    if mode == "xsalsa20_poly1305":
        nonce, suffix = packet[:12] + bytes(12), b""
    elif mode == "xsalsa20_poly1305_suffix":
        nonce = suffix = nonce24
    else:
        nonce, suffix = counter.to_bytes(4, "big") + bytes(20), counter.to_bytes(4, "big")
    box = nacl.secret.SecretBox(key).encrypt(packet[clear:], nonce)
    return packet[:clear] + box.ciphertext + suffix  # ciphertext = MAC ‖ ct


@pytest.mark.parametrize("mode", LEGACY_MODES)
def test_legacy_modes_match_pynacl(mode: str) -> None:
    assert legacy_modes_available()
    key = os.urandom(32)
    packet = rtp_packet(7, 3, os.urandom(60), csrcs=1, extension=b"\x10\x85")
    ours, peer = AeadContext(mode, key), AeadContext(mode, key)
    clear = ours.rtp_clear(packet)
    assert clear == (rtp_clear_length(packet) if mode.endswith("rtpsize") else 12)
    ours.out_counter = 9
    sealed = ours.seal(packet, clear)
    if mode == "xsalsa20_poly1305_suffix":
        assert sealed == legacy_ref_seal(mode, key, packet, 0, sealed[-24:])
    else:
        assert sealed == legacy_ref_seal(mode, key, packet, 9)
    assert peer.open(sealed, clear) == packet
    bad = bytearray(sealed)
    bad[clear + 3] ^= 1
    with pytest.raises(ValueError, match="authentication failed"):
        AeadContext(mode, key).open(bytes(bad), clear)
    if "lite" in mode:  # a counter nonce: replays are refused
        with pytest.raises(ValueError, match="replayed"):
            peer.open(sealed, clear)


@pytest.mark.parametrize("mode", LEGACY_MODES)
def test_a_legacy_sender_is_heard_by_an_aead_receiver_and_back(mode: str) -> None:
    """The datapath opens older modes before reading CSRCs and extensions (they are encrypted)."""

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            old, new = Client(4001, mode), Client(4002, AES)
            t_old, t_new = (router.create_discord_udp_transport(c.ssrc) for c in (old, new))
            try:
                for c, t in ((old, t_old), (new, t_new)):
                    c.server = t.local_address
                    c.key = t.select_mode(c.mode)
                    await discover(c)
                p_old, p_new = t_old.produce(rtp_parameters(4001)), t_new.produce(rtp_parameters(4002))
                t_new.consume(p_old.id, DISCORD_RTP_CAPABILITIES, ssrc=4001)
                t_old.consume(p_new.id, DISCORD_RTP_CAPABILITIES, ssrc=4002)
                packet = rtp_packet(4001, 5, b"from the past", csrcs=2, extension=b"\x10\x85")
                old.send(legacy_ref_seal(mode, old.key, packet, 1, os.urandom(24)))
                plain, _ = ref_open(AES, new.key, await new.recv(), 12)
                assert plain[0] == 0x80 and plain[12:] == b"from the past"  # CC 0, no extension
                new.send_rtp(rtp_packet(4002, 6, b"to the past"))
                import nacl.secret

                data = await old.recv()
                trailer = {"xsalsa20_poly1305": 0, "xsalsa20_poly1305_suffix": 24}.get(mode, 4)
                nonce = {
                    0: data[:12] + bytes(12),
                    24: data[-24:] if trailer == 24 else b"",
                    4: data[-4:] + bytes(20),
                }[trailer]
                box = data[12 : len(data) - trailer]
                assert nacl.secret.SecretBox(old.key).decrypt(box, nonce) == b"to the past"
                assert engine.stats()["drops"]["decrypt_failed"] == 0
            finally:
                old.close()
                new.close()

    asyncio.run(asyncio.wait_for(main(), 20))
