"""ICE over TCP, passive (RFC 6544, RFC 4571 framing), on loopback with our own framed client:
candidates, STUN/DTLS/SRTP over the stream, forwarding both ways in C, and every kind of bad peer
closed and counted with no descriptor left behind."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

import aiohttp
import pytest
from helpers import client_caps, producer_params, serve_app
from test_discord_voice import AUTH, SERVER_ID, GatewayClient, serve
from test_server_ops import scrape
from test_webrtc_transport import WebRtcClient, connect

from fastsfu import Engine, Settings, stun
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import StaticTokens
from fastsfu.harmony.hrpc_server import make_app
from fastsfu.rtp import RtpPacket
from fastsfu.server.metrics import metrics_mount
from fastsfu.srtp import SrtpContext
from fastsfu.webrtc_transport import TCP_PATH_CLOSED

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60)]


class FramedSocket:
    """A TCP connection that looks like WebRtcClient's UDP socket: sendto() writes one RFC 4571
    frame (2-byte length, then the packet), recv() returns one whole frame or raises
    BlockingIOError."""

    def __init__(self, server: tuple[str, int], rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(server)
        self.sock.setblocking(False)
        self.buf = b""
        self.eof = False

    def sendto(self, data: bytes, _addr: object = None) -> int:
        self.sock.sendall(struct.pack("!H", len(data)) + data)
        return len(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, _size: int = 0) -> bytes:
        while True:
            if len(self.buf) >= 2 and len(self.buf) >= 2 + (n := struct.unpack("!H", self.buf[:2])[0]):
                frame, self.buf = self.buf[2 : 2 + n], self.buf[2 + n :]
                return frame
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                raise BlockingIOError  # nothing more will come
            self.buf += data

    def close(self) -> None:
        self.sock.close()


def tcp_client(transport: Any, rcvbuf: int | None = None) -> WebRtcClient:
    """WebRtcClient speaking over the transport's passive TCP candidate."""
    client = WebRtcClient(transport)
    client.sock.close()
    (cand,) = [c for c in transport.ice_candidates if c["protocol"] == "tcp"]
    client.server = (cand["ip"], cand["port"])
    client.sock = FramedSocket(client.server, rcvbuf)  # type: ignore[assignment]
    return client


async def until(predicate: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 45))


def rtp_of(data: bytes) -> bool:
    return 128 <= data[0] <= 191 and not (192 <= data[1] <= 223)


async def receive_rtp(client: WebRtcClient, ctx: SrtpContext, count: int) -> list[RtpPacket]:
    got: list[RtpPacket] = []
    while len(got) < count and (data := await client.recv()) is not None:
        if rtp_of(data):
            got.append(RtpPacket.parse(ctx.unprotect(data)))
    return got


def test_candidates_ports_and_priorities() -> None:
    async def main() -> None:
        async with Engine(Settings(ice_tcp=True)) as engine:
            router = engine.create_router()
            udp, tcp = router.create_webrtc_transport().ice_candidates
            assert (udp["protocol"], tcp["protocol"], tcp["tcpType"]) == ("udp", "tcp", "passive")
            assert udp["port"] == tcp["port"]  # the TCP port has the UDP port's number by default
            assert udp["priority"] > tcp["priority"]  # UDP preferred (RFC 6544 §4.2)
            assert tcp["priority"] == (126 << 24) | (((4 << 13) | 8191) << 8) | 255
            udp2, tcp2 = router.create_webrtc_transport(prefer_tcp=True).ice_candidates
            assert tcp2["priority"] > udp2["priority"]
            (only,) = router.create_webrtc_transport(enable_udp=False).ice_candidates
            assert only["protocol"] == "tcp"
            (plain,) = router.create_webrtc_transport(enable_tcp=False).ice_candidates
            assert plain["protocol"] == "udp"
            with pytest.raises(ValueError):
                router.create_webrtc_transport(enable_udp=False, enable_tcp=False)
        async with Engine(Settings(ice_tcp=True, media_tcp_port=0)) as engine:
            udp, tcp = engine.create_router().create_webrtc_transport().ice_candidates
            assert tcp["port"] != 0 and engine.ice_tcp is not None
        async with Engine() as engine:
            router = engine.create_router()
            assert [c["protocol"] for c in router.create_webrtc_transport().ice_candidates] == ["udp"]
            with pytest.raises(ValueError):
                router.create_webrtc_transport(enable_tcp=True)

    run(main())


@pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])
def test_ice_dtls_srtp_over_tcp_both_ways(thread: bool) -> None:
    """A TCP member and a UDP member hear each other: ICE, DTLS and SRTP over RFC 4571 frames,
    RTP forwarded by the datapath in both directions (it never reaches the slow path)."""

    async def main() -> None:
        async with Engine(Settings(ice_tcp=True, datapath_thread=thread)) as engine:
            router = engine.create_router()
            ta, tb = router.create_webrtc_transport(), router.create_webrtc_transport()
            a, b = tcp_client(ta), WebRtcClient(tb)
            await connect(a)
            await connect(b)
            sel = ta.ice_selected_tuple
            assert sel is not None and sel["protocol"] == "tcp" and ta.dtls_state == "connected"
            assert tb.ice_selected_tuple is not None and tb.ice_selected_tuple["protocol"] == "udp"
            assert a.keys is not None and b.keys is not None
            pa, pb = ta.produce(producer_params(1111)), tb.produce(producer_params(2222))
            ca, cb = tb.consume(pa.id, client_caps()), ta.consume(pb.id, client_caps())
            slow_before = engine.stats()["slow_path_packets"]
            a_out = SrtpContext(a.keys.srtp_suite, a.keys.local_key, inbound=False)
            b_out = SrtpContext(b.keys.srtp_suite, b.keys.local_key, inbound=False)
            for seq in range(20):
                a.sock.sendto(
                    a_out.protect(bytes(RtpPacket(111, seq, seq * 960, 1111, payload=b"tcp!" * 20))), a.server
                )
                b.sock.sendto(
                    b_out.protect(bytes(RtpPacket(111, seq, seq * 960, 2222, payload=b"udp!" * 20))), b.server
                )
            at_b = await receive_rtp(b, SrtpContext(b.keys.srtp_suite, b.keys.remote_key, inbound=True), 20)
            at_a = await receive_rtp(a, SrtpContext(a.keys.srtp_suite, a.keys.remote_key, inbound=True), 20)
            assert [p.sequence_number for p in at_b] == list(range(20))
            assert {p.ssrc for p in at_b} == {ca.ssrc} and at_b[0].payload == b"tcp!" * 20
            assert [p.sequence_number for p in at_a] == list(range(20))
            assert {p.ssrc for p in at_a} == {cb.ssrc} and at_a[0].payload == b"udp!" * 20
            stats = engine.stats()
            assert stats["forwarded_packets"] == 40
            assert stats["slow_path_packets"] - slow_before < 5  # a few RTCP at most, never RTP
            # RTCP reports go out framed on the TCP path too.
            assert ta.send_rtcp_reports() >= 1
            # The peer hangs up: the connection is reaped and the transport closes (no other path).
            closed = asyncio.Event()
            ta.observer.once("close", closed.set)
            a.sock.close()  # type: ignore[attr-defined]
            await asyncio.wait_for(closed.wait(), 3)
            assert ta.close_reason == TCP_PATH_CLOSED
            assert engine.stats()["ice_tcp"]["peer_closed"] == 1 and not engine.ice_tcp.conns  # type: ignore[union-attr]
            assert engine.stats()["ice_consent_expiries"] == 0

    run(main())


def test_bad_tcp_peers_are_closed_and_counted() -> None:
    """Garbage framing, a non-STUN first frame, a 65535-byte announced frame, an unknown ufrag, a
    silent (half-open) connection and one too many from an address: each is closed with its
    reason counted; the process keeps serving, and no descriptor is left behind."""

    async def main() -> None:
        settings = Settings(ice_tcp=True, ice_tcp_timeout=0.5, ice_tcp_max_connections_per_ip=5)
        async with Engine(settings) as engine:
            t = engine.create_router().create_webrtc_transport()
            tcp = engine.ice_tcp
            assert tcp is not None
            server = tcp.local_address
            baseline = open_fds()

            def conn() -> FramedSocket:
                return FramedSocket(server)

            async def closed_by_server(s: FramedSocket) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 3
                while not s.eof and loop.time() < deadline:
                    try:
                        s.recv()
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                assert s.eof, "the server did not close the connection"
                s.close()

            garbage = conn()
            garbage.send_raw(b"\xff" + os.urandom(1) + os.urandom(200))  # length >= 0xff00: too long
            dtls_first = conn()
            dtls_first.sendto(b"\x16\xfe\xfd" + os.urandom(60))  # not a Binding request
            huge = conn()
            huge.send_raw(b"\xff\xff" + os.urandom(100))  # announces 65535 bytes
            stranger = conn()
            c = WebRtcClient(t)
            c.sock.close()
            c.server = server
            c.sock = stranger  # type: ignore[assignment]
            c.check(ufrag="nobody")  # a well-formed check for a ufrag no transport has
            silent = conn()  # never sends: the ICE deadline closes it
            for s in (garbage, dtls_first, huge, stranger, silent):
                await closed_by_server(s)
            closes = engine.stats()["ice_tcp"]
            assert closes["frame_too_long"] == 2 and closes["bad_first_frame"] == 1, closes
            assert closes["unknown_ufrag"] == 1 and closes["ice_timeout"] == 1, closes
            # A sixth connection from one address is refused at once.
            held = [conn() for _ in range(5)]
            await until(lambda: len(tcp.conns) == 5)
            extra = conn()
            await closed_by_server(extra)
            assert engine.stats()["ice_tcp"]["per_ip_cap"] == 1
            for s in held:
                s.close()
            await until(lambda: not tcp.conns)
            assert open_fds() == baseline
            # Still serving: a good client connects over TCP afterwards.
            good = tcp_client(t)
            await connect(good)
            assert t.ice_selected_tuple is not None and t.ice_selected_tuple["protocol"] == "tcp"
            assert engine.stats()["slow_path_errors"] == 0

    run(main())


def test_a_receiver_that_stops_reading_is_cut_off() -> None:
    """A TCP receiver that never reads fills the kernel's buffers, then its bounded send buffer:
    it is cut off (closed, `tcp_overflow` counted) while a UDP receiver of the same producer keeps
    getting every packet, and the datapath never blocks."""

    async def main() -> None:
        settings = Settings(ice_tcp=True, ice_tcp_send_buffer_bytes=8192)
        async with Engine(settings) as engine:
            router = engine.create_router()
            tsend, tstuck, tudp = (router.create_webrtc_transport() for _ in range(3))
            sender, udp = WebRtcClient(tsend), WebRtcClient(tudp)
            stuck = tcp_client(tstuck, rcvbuf=4096)
            for client in (sender, stuck, udp):
                await connect(client)
            baseline = open_fds()
            producer = tsend.produce(producer_params(3333))
            tstuck.consume(producer.id, client_caps())
            cu = tudp.consume(producer.id, client_caps())
            assert sender.keys is not None and udp.keys is not None
            out = SrtpContext(sender.keys.srtp_suite, sender.keys.local_key, inbound=False)
            udp_in = SrtpContext(udp.keys.srtp_suite, udp.keys.remote_key, inbound=True)
            closed = asyncio.Event()
            tstuck.observer.once("close", closed.set)
            got = 0
            for seq in range(3000):  # ~3.6 MB toward the stuck receiver, in bursts
                sender.sock.sendto(
                    out.protect(bytes(RtpPacket(111, seq, seq * 960, 3333, payload=bytes(1100)))),
                    sender.server,
                )
                if seq % 50 == 49:
                    await asyncio.sleep(0.005)
                    got += len(await receive_rtp(udp, udp_in, 50))
                if closed.is_set():
                    break
            await asyncio.wait_for(closed.wait(), 3)
            stats = engine.stats()
            assert stats["drops"]["tcp_overflow"] >= 1 and stats["ice_tcp"]["send_overflow"] == 1
            assert tstuck.close_reason == TCP_PATH_CLOSED
            assert got == seq + 1 - (seq + 1) % 50, (got, seq)  # the UDP receiver lost nothing
            assert cu.get_stats()[0]["packetCount"] >= got
            assert open_fds() == baseline - 1  # the stuck connection's descriptor is gone
            stuck.sock.close()  # type: ignore[attr-defined]

    run(main())


def test_discord_webrtc_answer_carries_the_tcp_candidate() -> None:
    """A Discord `webrtc` client gets `a=candidate:... TCP ... tcptype passive` in op 4's SDP, and
    a Binding request over that TCP candidate, with the answer's credentials, is answered on it."""

    async def body(url: str, http: Any, rooms: Any) -> None:
        engine = rooms.engine
        browser = GatewayClient(await http.ws_connect(url), 1001)
        await browser.recv()  # HELLO
        token = AUTH.mint(1001)
        await browser.send(0, {"server_id": SERVER_ID, "user_id": "1001", "session_id": "t", "token": token})
        await browser.expect(2)
        fp = DtlsCertificate.generate().fingerprint("sha-256")
        fragment = (
            f"a=ice-ufrag:brws\na=ice-pwd:{'p' * 24}\na=fingerprint:sha-256 {fp}\na=rtpmap:111 opus/48000/2"
        )
        await browser.send(1, {"protocol": "webrtc", "data": fragment, "sdp": fragment})
        sdp = (await browser.expect(4))["d"]["sdp"]
        tcp_lines = [line for line in sdp.splitlines() if " TCP " in line]
        assert engine.ice_tcp is not None
        port = engine.ice_tcp.local_address[1]
        assert len(tcp_lines) == 1 and tcp_lines[0].startswith("a=candidate:2 1 TCP ")
        assert tcp_lines[0].endswith(f" 127.0.0.1 {port} typ host tcptype passive")
        attrs = dict(line[2:].split(":", 1) for line in sdp.splitlines() if line.startswith("a=ice-"))
        framed = FramedSocket(("127.0.0.1", port))
        attributes = [
            (stun.ATTR_USERNAME, f"{attrs['ice-ufrag']}:brws".encode()),
            (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
            (stun.ATTR_ICE_CONTROLLING, os.urandom(8)),
            (stun.ATTR_USE_CANDIDATE, b""),
        ]
        framed.sendto(
            stun.build_message(stun.BINDING_REQUEST, os.urandom(12), attributes, attrs["ice-pwd"].encode())
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while True:
            try:
                response = stun.parse_message(framed.recv())
                break
            except BlockingIOError:
                assert loop.time() < deadline and not framed.eof, "no answer over TCP"
                await asyncio.sleep(0.01)
        assert response.message_type == stun.BINDING_SUCCESS
        (member_transport,) = [t for r in engine.routers.values() for t in r.transports.values()]
        assert member_transport.ice_selected_tuple["protocol"] == "tcp"
        framed.close()

    serve(body, settings=Settings(ice_tcp=True))


def test_closes_and_connections_on_metrics() -> None:
    """/metrics reports open ICE-TCP connections, accepts and closes by reason."""

    async def main() -> None:
        async with Engine(Settings(ice_tcp=True)) as engine:
            rooms = VoiceRooms(engine)
            engine.create_router().create_webrtc_transport()  # opens the media ports
            assert engine.ice_tcp is not None
            async with serve_app(
                make_app(rooms, StaticTokens({}).authenticate, [metrics_mount(rooms)])
            ) as port:
                bad = FramedSocket(engine.ice_tcp.local_address)
                bad.sendto(b"\x80" * 40)  # RTP first: not ICE
                held = FramedSocket(engine.ice_tcp.local_address)
                await until(lambda: engine.stats()["ice_tcp"].get("bad_first_frame") == 1)
                await until(lambda: len(engine.ice_tcp.conns) == 1)  # type: ignore[union-attr]
                async with aiohttp.ClientSession() as http:
                    metrics = await scrape(http, f"http://127.0.0.1:{port}")
                assert metrics['fastsfu_ice_tcp_closes_total{reason="bad_first_frame"}'] == 1
                assert metrics["fastsfu_ice_tcp_accepted_total"] == 2
                assert metrics["fastsfu_ice_tcp_connections"] == 1
                bad.close()
                held.close()

    run(main())


def test_a_tcp_path_whose_consent_expires_is_closed() -> None:
    """A validated TCP path that is not refreshed (RFC 7675) while a UDP path is: ICE forgets it
    and its connection is closed (`consent_expired`), the transport stays on UDP."""

    async def main() -> None:
        async with Engine(Settings(ice_tcp=True, ice_tcp_timeout=0.2)) as engine:
            t = engine.create_router().create_webrtc_transport()
            u, c = WebRtcClient(t), tcp_client(t)
            u.check()
            assert await u.recv() is not None
            c.check(use_candidate=False)  # validated, not selected
            assert await c.recv() is not None
            assert len(t.ice.validated_tuples) == 2
            t.ice.consent_timeout = 0.5  # white-box: the setting is clamped to 10..60 s
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            while loop.time() < end:  # keep only the UDP path fresh
                u.check()
                await u.recv()
                await asyncio.sleep(0.1)
            assert engine.stats()["ice_tcp"].get("consent_expired") == 1, engine.stats()["ice_tcp"]
            assert not engine.ice_tcp.conns  # type: ignore[union-attr]
            with pytest.raises(BlockingIOError):
                c.sock.recv()
            assert c.sock.eof  # type: ignore[attr-defined]
            assert not t.closed and t.ice_selected_tuple is not None
            assert t.ice_selected_tuple["protocol"] == "udp"

    run(main())
