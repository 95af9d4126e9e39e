"""End to end through real UDP sockets on 127.0.0.1 with SRTP: the Engine as an embedder uses it."""

from __future__ import annotations

import asyncio
import os
import select
import time

import pytest
from helpers import AUDIO_LEVEL_ID, MID_ID, SrtpClient, client_caps, producer_params

from fastsfu import Engine, Settings, _rtp, ortc, rtp
from fastsfu.rtp import RtpPacket
from fastsfu.transport import ntp_from

pytestmark = pytest.mark.loopback


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def make_room(engine: Engine, n: int, suite: str) -> tuple[list[SrtpClient], list, list, dict]:
    router = engine.create_router()
    clients = [SrtpClient(suite) for _ in range(n)]
    transports = []
    for c in clients:
        t = router.create_plain_transport(enable_srtp=True, srtp_crypto_suite=suite)
        t.connect("127.0.0.1", c.port, c.srtp_parameters)
        c.set_server_parameters(t.srtp_parameters)
        transports.append(t)
    producers = [t.produce(producer_params(5000 + i)) for i, t in enumerate(transports)]
    consumers = {}
    for i, t in enumerate(transports):
        for p in producers:
            if p.transport is not t:
                consumers[(i, p.ssrc)] = t.consume(p.id, client_caps(opus_pt=100 + i))
    return clients, transports, producers, consumers


def server_addr(t: object) -> tuple[str, int]:
    return t.tuple["localIp"], t.tuple["localPort"]  # type: ignore[attr-defined]


def opus(ssrc: int, seq: int, level: int = 0x85) -> RtpPacket:
    return RtpPacket(
        111,
        seq,
        seq * 960,
        ssrc,
        extensions=[(AUDIO_LEVEL_ID, bytes([level])), (MID_ID, b"0")],
        payload=os.urandom(90),
    )


@pytest.mark.parametrize("suite", ["AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM"])
def test_everyone_hears_everyone_else(suite: str) -> None:
    async def main() -> None:
        async with Engine() as engine:
            clients, transports, producers, consumers = await make_room(engine, 4, suite)
            for seq in range(25):
                for i, c in enumerate(clients):
                    c.send_rtp(server_addr(transports[i]), opus(5000 + i, 1000 + seq))
                await asyncio.sleep(0.002)
            for i, c in enumerate(clients):
                got = [RtpPacket.parse(c.rx.unprotect(d)) for d in await c.receive_rtp(75, timeout=5)]
                by_ssrc: dict[int, list[RtpPacket]] = {}
                for pkt in got:
                    by_ssrc.setdefault(pkt.ssrc, []).append(pkt)
                expected = {
                    consumers[(i, p.ssrc)].ssrc: consumers[(i, p.ssrc)]
                    for p in producers
                    if p.transport is not transports[i]
                }
                assert set(by_ssrc) == set(expected)
                for ssrc, pkts in by_ssrc.items():
                    params = expected[ssrc].rtp_parameters
                    assert [p.sequence_number for p in pkts] == list(range(1000, 1025))
                    assert {p.payload_type for p in pkts} == {params["codecs"][0]["payloadType"]} == {100 + i}
                    ids = {e["uri"]: e["id"] for e in params["headerExtensions"]}
                    assert pkts[0].extensions == [
                        (ids[ortc.URI_MID], params["mid"].encode()),
                        (ids[ortc.URI_AUDIO_LEVEL], b"\x85"),
                    ]
            stats = engine.stats()
            assert stats["forwarded_packets"] == 4 * 3 * 25
            assert {k: v for k, v in stats["drops"].items() if v} == {}
            # Each consumer's packets came from an SRTP session of its own: libsrtp never walked
            # the transport's other consumers' streams to find it (benchmarks/README.md).
            for t in transports:
                assert t.srtp_out is not None and t.srtp_out.streams.isdisjoint(
                    c.ssrc for c in t.consumers.values()
                )

    run(main())


def test_comedia_learns_the_remote_and_emits_tuple() -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            sender, listener = SrtpClient(), SrtpClient()
            a = router.create_plain_transport(comedia=True, enable_srtp=True)
            a.connect(srtp_parameters=sender.srtp_parameters)
            b = router.create_plain_transport(comedia=True)  # plain RTP comedia
            tuples = []
            a.on("tuple", tuples.append)
            p = a.produce(producer_params(1))
            c = b.consume(p.id, client_caps())
            # The listener speaks first (any RTP with a known SSRC teaches b its remote).
            own = b.produce(producer_params(2))
            listener.send_raw(server_addr(b), bytes(opus(own.ssrc, 1)))
            sender.send_rtp(server_addr(a), opus(1, 10))
            await asyncio.sleep(0.05)
            sender.send_rtp(server_addr(a), opus(1, 11))
            got = await listener.receive_rtp(2)
            assert [RtpPacket.parse(d).ssrc for d in got] == [c.ssrc, c.ssrc]
            assert tuples == [a.tuple] and a.tuple["remotePort"] == sender.port
            assert b.tuple["remotePort"] == listener.port

    run(main())


@pytest.mark.parametrize("thread", [True, False])
def test_rtcp_reports_flow_both_ways(thread: bool) -> None:
    async def main() -> None:
        async with Engine(Settings(rtcp_interval=0.1, datapath_thread=thread)) as engine:
            clients, transports, producers, consumers = await make_room(engine, 2, "AEAD_AES_128_GCM")
            speaker, listener = clients
            for seq in range(20):
                if seq not in (5, 6):  # two packets lost on the way in
                    speaker.send_rtp(server_addr(transports[0]), opus(5000, seq))
            # The speaker's SR gives the server an LSR to echo (RFC 3550 §6.4.1).
            speaker.sock.sendto(
                speaker.tx.protect_rtcp(rtp.build_sender_report(5000, 0x1122334455667788, 0, 18, 1800)),
                server_addr(transports[0]),
            )
            await asyncio.sleep(0.35)
            reports = [
                rtp.parse_rtcp(speaker.rx.unprotect_rtcp(d))
                for d in await speaker.receive(10, 0.5)
                if rtp.is_rtcp(d)
            ]
            blocks = [b for compound in reports for pkt in compound for b in pkt.reports if b.ssrc == 5000]
            assert blocks, "no receiver report about the speaker's stream"
            last = blocks[-1]
            assert (last.highest_sequence, last.packets_lost) == (19, 2)
            assert last.lsr == 0x33445566
            consumer = consumers[(1, 5000)]
            heard = await listener.receive(60, 0.5)
            srs = [
                p
                for d in heard
                if rtp.is_rtcp(d)
                for p in rtp.parse_rtcp(listener.rx.unprotect_rtcp(d))
                if p.packet_type == rtp.RTCP_SR
            ]
            assert srs and srs[-1].ssrc == consumer.ssrc and srs[-1].packet_count == 18
            # The listener's RR about the consumer stream feeds consumer stats.
            block = rtp.ReportBlock(consumer.ssrc, 64, 3, 19, 5, lsr=0, dlsr=0)
            listener.sock.sendto(
                listener.tx.protect_rtcp(rtp.build_receiver_report(77, [block])), server_addr(transports[1])
            )
            # Alone, RTCP waits up to 100 ms for company before the loop is woken (docs/datapath.md).
            deadline = time.monotonic() + 2.0
            while consumer.get_stats()[0]["fractionLost"] != 64 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert consumer.get_stats()[0]["fractionLost"] == 64
            stats = transports[1].get_stats()[0]
            assert stats["type"] == "plain-rtp-transport" and stats["rtcpPacketsReceived"] == 1

    run(main())


def test_round_trip_time_counts_from_the_reports_arrival() -> None:
    """RTCP alone waits up to 100 ms in the datapath's ring before the loop takes it
    (docs/datapath.md): RTT = A - LSR - DLSR (RFC 3550 §6.4.1) must use its arrival A, not the
    moment the loop got to it, or every RTT would grow by that wait."""

    async def main() -> None:
        async with Engine(Settings(rtcp_interval=3600.0)) as engine:
            clients, transports, _producers, consumers = await make_room(engine, 2, "AEAD_AES_128_GCM")
            consumer = consumers[(1, 5000)]
            # Our SR "left" 0.2 s ago and the receiver held it 0.15 s: the path took 0.05 s.
            lsr = (ntp_from(time.time() - 0.2) >> 16) & 0xFFFFFFFF
            block = rtp.ReportBlock(consumer.ssrc, 0, 0, 1, 0, lsr=lsr, dlsr=int(0.15 * 65536))
            clients[1].sock.sendto(
                clients[1].tx.protect_rtcp(rtp.build_receiver_report(77, [block])), server_addr(transports[1])
            )
            deadline = time.monotonic() + 2.0
            while consumer.round_trip_time is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert consumer.round_trip_time is not None
            assert abs(consumer.round_trip_time - 0.05) < 0.03

    run(main())


@pytest.mark.parametrize("connected", [False, True])
def test_garbage_flood_does_not_harm_the_room(connected: bool) -> None:
    """Unconnected, the datapath drops the attacker's datagrams itself (counted); connected to
    the client (docs/datapath.md, "Connected sockets"), the kernel never delivers them."""

    async def main() -> None:
        async with Engine(Settings(connect_sockets=connected)) as engine:
            clients, transports, producers, consumers = await make_room(engine, 2, "AES_CM_128_HMAC_SHA1_80")
            if connected:
                assert transports[0].socket.sock.getpeername() == ("127.0.0.1", clients[0].port)
            else:
                with pytest.raises(OSError):
                    transports[0].socket.sock.getpeername()
            attacker = SrtpClient()
            # A datagram larger than any receive slot, from the legitimate client itself.
            clients[0].send_raw(server_addr(transports[0]), os.urandom(9000))
            for seq in range(40):
                clients[0].send_rtp(server_addr(transports[0]), opus(5000, seq))
                for _ in range(25):  # 1000 datagrams of junk at the same port, from an unknown tuple
                    attacker.send_raw(server_addr(transports[0]), os.urandom(1 + seq % 200))
                # ...and forged RTP with the victim's SSRC from a known-looking shape
                attacker.send_raw(server_addr(transports[0]), bytes(opus(5000, 100 + seq)))
                await asyncio.sleep(0.001)
            got = await clients[1].receive_rtp(40, 5)
            assert len(got) == 40
            assert [RtpPacket.parse(clients[1].rx.unprotect(d)).sequence_number for d in got] == list(
                range(40)
            )
            drops = engine.stats()["drops"]
            strangers = drops["unknown_tuple"] + drops["unknown_protocol"] + drops["malformed"]
            assert strangers == 0 if connected else strangers >= 1000
            assert drops["oversize"] == 1  # truncated by recvmmsg (MSG_TRUNC), dropped
            assert engine.stats()["slow_path_errors"] == 0

    run(main())


def test_rtp_queued_too_long_is_dropped_rtcp_is_not() -> None:
    async def main() -> None:
        async with Engine(Settings(max_queue_age_ms=20, datapath_thread=False)) as engine:
            clients, transports, producers, consumers = await make_room(engine, 2, "AEAD_AES_128_GCM")
            for seq in range(10):
                clients[0].send_rtp(server_addr(transports[0]), opus(5000, seq))
            sr = rtp.build_sender_report(5000, 1 << 32, 0, 10, 900)
            clients[0].send_raw(server_addr(transports[0]), clients[0].tx.protect_rtcp(sr))
            time.sleep(0.06)  # the loop is stuck: these packets are already 60 ms old when drained
            await asyncio.sleep(0.05)
            assert engine.stats()["drops"]["queue_age"] == 10
            # RTCP is never dropped for age (docs/datapath.md): the sender report arrived.
            assert transports[0].rtcp_received[rtp.RTCP_SR] == 1
            assert engine.stats()["late_packets"] == 0
            assert await clients[1].receive_rtp(1, 0.1) == []
            clients[0].send_rtp(server_addr(transports[0]), opus(5000, 10))
            assert len(await clients[1].receive_rtp(1, 2)) == 1

    run(main())


def test_late_rtp_under_the_limit_is_forwarded_and_counted() -> None:
    """Scheduling noise is not loss: RTP that waited 60 ms (three frames) is still forwarded,
    since a receiver's jitter buffer still plays it, and counted as late."""

    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            assert engine.settings.max_queue_age_ms == _rtp.DEFAULT_MAX_QUEUE_AGE == 200
            clients, transports, producers, consumers = await make_room(engine, 2, "AEAD_AES_128_GCM")
            for seq in range(10):
                clients[0].send_rtp(server_addr(transports[0]), opus(5000, seq))
            time.sleep(0.06)
            got = await clients[1].receive_rtp(10, 2)
            seqs = [RtpPacket.parse(clients[1].rx.unprotect(d)).sequence_number for d in got]
            assert seqs == list(range(10))
            stats = engine.stats()
            assert stats["drops"]["queue_age"] == 0 and stats["late_packets"] == 10
            clients[0].send_rtp(server_addr(transports[0]), opus(5000, 10))  # on time: not late
            assert len(await clients[1].receive_rtp(1, 2)) == 1
            assert engine.stats()["late_packets"] == 10

    run(main())


def test_media_flows_while_the_event_loop_is_blocked() -> None:
    """The datapath thread forwards while the loop is stuck (a join, a GC pause): the receiver
    gets every packet during the stall, and none of them was late."""

    async def main() -> None:
        async with Engine() as engine:
            assert engine.datapath.running
            clients, transports, producers, consumers = await make_room(engine, 2, "AES_CM_128_HMAC_SHA1_80")
            rx = clients[1].sock
            got: list[bytes] = []
            deadline = time.monotonic() + 2
            # From here to the end of the loop the event loop never runs.
            for seq in range(20):
                clients[0].send_rtp(server_addr(transports[0]), opus(5000, seq))
                time.sleep(0.005)
            while len(got) < 20 and time.monotonic() < deadline:
                if select.select([rx], [], [], max(deadline - time.monotonic(), 0))[0]:
                    data = rx.recv(4096)
                    if not (192 <= data[1] <= 223):  # skip RTCP reports
                        got.append(data)
            seqs = [RtpPacket.parse(clients[1].rx.unprotect(d)).sequence_number for d in got]
            assert seqs == list(range(20))
            stats = engine.stats()
            assert stats["late_packets"] == 0 and stats["drops"]["queue_age"] == 0

    run(main())


def test_pause_resume_over_the_wire_keeps_srtp_happy() -> None:
    async def main() -> None:
        async with Engine() as engine:
            clients, transports, producers, consumers = await make_room(engine, 2, "AES_CM_128_HMAC_SHA1_80")
            consumer = consumers[(1, 5000)]
            seqs = []
            for seq in range(30):
                if seq == 10:
                    consumer.pause()
                if seq == 20:
                    consumer.resume()
                clients[0].send_rtp(server_addr(transports[0]), opus(5000, 40000 + seq))
                await asyncio.sleep(0.003)
                for d in await clients[1].receive_rtp(1, 0.05):
                    seqs.append(RtpPacket.parse(clients[1].rx.unprotect(d)).sequence_number)
            assert seqs == list(range(40000, 40020))  # continuous: no gap where the pause was

    run(main())
