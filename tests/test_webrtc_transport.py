"""WebRtcTransport end to end on loopback with a scripted client: STUN checks on the shared port,
DTLS (our own client role against the transport's server role), then SRTP media both ways."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any

import pytest
from helpers import client_caps, producer_params

from fastsfu import Engine, Settings, TransportError, stun
from fastsfu.dtls import DtlsCertificate, DtlsConnected, DtlsTransport
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60)]


class WebRtcClient:
    """ICE (controlling, checks only), DTLS client, SRTP: the minimum a browser does."""

    def __init__(self, transport: Any, cert: DtlsCertificate | None = None) -> None:
        self.transport = transport
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        c = transport.ice_candidates[0]
        self.server = (c["ip"], c["port"])
        # A shared certificate saves a key generation per client (benchmarks/storm_client.py).
        self.cert = cert or DtlsCertificate.generate()
        self.dtls: DtlsTransport | None = None
        self.keys: DtlsConnected | None = None

    def check(self, use_candidate: bool = True, pwd: str | None = None, ufrag: str | None = None) -> bytes:
        params = self.transport.ice_parameters
        tid = os.urandom(12)
        attrs = [
            (stun.ATTR_USERNAME, f"{ufrag or params['usernameFragment']}:client".encode()),
            (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
            (stun.ATTR_ICE_CONTROLLING, os.urandom(8)),
        ]
        if use_candidate:
            attrs.append((stun.ATTR_USE_CANDIDATE, b""))
        self.sock.sendto(
            stun.build_message(stun.BINDING_REQUEST, tid, attrs, (pwd or params["password"]).encode()),
            self.server,
        )
        return tid

    async def recv(self, timeout: float = 2.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                return self.sock.recv(4096)
            except BlockingIOError:
                await asyncio.sleep(0.002)
        return None

    def signal(self, role_seen_by_server: str = "client") -> None:
        """What the signaling channel does: hand our DTLS parameters to the transport."""
        self.transport.connect({"role": role_seen_by_server, "fingerprints": self.cert.fingerprints()})

    async def handshake(self, role_seen_by_server: str | None = "client") -> DtlsConnected:
        loop = asyncio.get_running_loop()
        self.dtls = DtlsTransport(self.cert, "client")
        self.dtls.set_remote_fingerprints(self.transport.dtls_parameters["fingerprints"])
        if role_seen_by_server is not None:
            self.signal(role_seen_by_server)
        self.dtls.start(loop.time())
        deadline = loop.time() + 10
        while loop.time() < deadline:
            for data in self.dtls.datagrams_to_send(loop.time()):
                self.sock.sendto(data, self.server)
            event = self.dtls.next_event()
            if isinstance(event, DtlsConnected):
                self.keys = event
                return event
            assert event is None, event
            data = await self.recv(0.05)
            if data is not None and 20 <= data[0] <= 63:
                self.dtls.receive_datagram(data, loop.time())
            self.dtls.handle_timer(loop.time()) if (t := self.dtls.get_timer()) and t <= loop.time() else None
        raise AssertionError("DTLS handshake did not complete")


async def connect(client: WebRtcClient) -> None:
    client.check()
    resp = stun.parse_message(await client.recv())
    assert resp.message_type == stun.BINDING_SUCCESS
    assert stun.verify_integrity(resp, client.transport.ice_parameters["password"].encode())
    await client.handshake()
    for _ in range(100):
        if client.transport.dtls_state == "connected":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"server DTLS state {client.transport.dtls_state}")


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 45))


def test_shared_port_ice_dtls_srtp_end_to_end() -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            ta, tb = router.create_webrtc_transport(), router.create_webrtc_transport()
            assert ta.ice_candidates[0]["port"] == tb.ice_candidates[0]["port"]  # one shared port
            assert ta.ice_candidates[0]["ip"] == ta.ice_candidates[0]["address"] == "127.0.0.1"
            assert ta.ice_parameters["iceLite"] and ta.dtls_parameters["role"] == "auto"
            states = []
            ta.on("dtlsstatechange", states.append)
            a, b = WebRtcClient(ta), WebRtcClient(tb)
            await connect(a)
            await connect(b)
            assert states == ["connected"] and ta.ice_state == "completed"
            assert a.keys is not None and a.keys.peer_fingerprint == engine.dtls_certificate.fingerprint(
                "sha-256"
            )

            producer = ta.produce(producer_params(4242))
            consumer = tb.consume(producer.id, client_caps())
            sender = SrtpContext(a.keys.srtp_suite, a.keys.local_key, inbound=False)
            receiver = SrtpContext(b.keys.srtp_suite, b.keys.remote_key, inbound=True)
            for seq in range(5):
                a.sock.sendto(
                    sender.protect(bytes(RtpPacket(111, seq, seq * 960, 4242, payload=b"opus" * 10))),
                    a.server,
                )
            got = []
            while len(got) < 5 and (data := await b.recv()) is not None:
                if 128 <= data[0] <= 191 and not (192 <= data[1] <= 223):
                    got.append(RtpPacket.parse(receiver.unprotect(data)))
            assert [p.sequence_number for p in got] == list(range(5))
            assert {p.ssrc for p in got} == {consumer.ssrc}
            # ICE/DTLS datagrams the socket refuses are counted in the transport's stats.
            assert ta.get_stats()[0]["controlSendFailures"] == 0
            ta._send(b"\x00", ("127.0.0.1", 0))  # the kernel refuses port 0
            assert ta.get_stats()[0]["controlSendFailures"] == 1

    run(main())


def test_idle_transport_waits_for_its_first_dtls_datagram() -> None:
    """mediasoup-client connects a receive transport only when it first consumes: a transport
    that was given DTLS parameters but never saw a DTLS datagram does not time out on that account
    (issue: a member alone in a channel was dropped after 30 s). Once the peer starts the
    handshake, the deadline applies."""

    async def main() -> None:
        async with Engine(Settings(dtls_handshake_timeout=0.3)) as engine:
            router = engine.create_router()
            idle, started = router.create_webrtc_transport(), router.create_webrtc_transport()
            failures: list[str] = []
            for t in (idle, started):
                t.on("dtlsstatechange", lambda s, t=t: s == "failed" and failures.append(f"{t.id} {s}"))
            a, b = WebRtcClient(idle), WebRtcClient(started)
            a.signal()  # the JoinChannel: DTLS parameters now, media maybe much later
            b.signal()
            b.check()
            assert await b.recv() is not None
            # One ClientHello flight, then silence: this handshake has started and must time out.
            hello = DtlsTransport(b.cert, "client")
            hello.start(asyncio.get_running_loop().time())
            for data in hello.datagrams_to_send(asyncio.get_running_loop().time()):
                b.sock.sendto(data, b.server)
            await asyncio.sleep(1.0)  # over three handshake timeouts
            assert idle.dtls_state == "new" and not idle.closed, idle.dtls_state
            assert started.dtls_state == "failed" and failures == [f"{started.id} failed"]
            assert engine.dtls_failures == 1
            # The idle one still connects when its peer finally shows up.
            a.check()
            assert await a.recv() is not None
            await a.handshake(role_seen_by_server=None)
            for _ in range(100):
                if idle.dtls_state == "connected":
                    break
                await asyncio.sleep(0.01)
            assert idle.dtls_state == "connected"

    run(main())


def test_bad_checks_and_strangers_are_refused() -> None:
    async def main() -> None:
        async with Engine() as engine:
            t = engine.create_router().create_webrtc_transport()
            c = WebRtcClient(t)
            c.check(pwd="wrong-password-wrong-password")
            resp = stun.parse_message(await c.recv())
            assert stun.decode_error_code(resp.get(stun.ATTR_ERROR_CODE))[0] == 401
            c.check(ufrag="nobody")  # no transport has this ufrag: dropped, counted
            assert await c.recv(0.2) is None
            c.sock.sendto(b"\x16\xfe\xfd" + os.urandom(40), c.server)  # DTLS from an unvalidated tuple
            await asyncio.sleep(0.05)
            stats = engine.stats()
            assert stats["unhandled_datagrams"] == 1 and stats["drops"]["unknown_tuple"] == 1
            assert t.ice_state == "new" and t.ice_selected_tuple is None

    run(main())


class StallingSocket:
    """A client socket whose every send then blocks the event loop (as a 60 ms join or GC pause
    would), so what it sent waits that long in the server's socket queue."""

    def __init__(self, sock: socket.socket, stall: float) -> None:
        self.sock, self.stall = sock, stall

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        sent = self.sock.sendto(data, addr)
        time.sleep(self.stall)
        return sent

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)


def test_ice_and_dtls_that_queued_long_are_still_handled() -> None:
    """The age limit is for RTP only (docs/datapath.md): an ICE check or a DTLS flight that waited
    past it is answered, while RTP that waited as long is dropped and counted."""

    async def main() -> None:
        async with Engine(Settings(max_queue_age_ms=20, datapath_thread=False)) as engine:
            router = engine.create_router()
            ta, tb = router.create_webrtc_transport(), router.create_webrtc_transport()
            a, b = WebRtcClient(ta), WebRtcClient(tb)
            await connect(b)
            a.sock = StallingSocket(a.sock, 0.06)  # type: ignore[assignment]
            await connect(a)  # every check and flight waited 60 ms > 20 ms in the queue
            assert ta.ice_state == "completed" and ta.dtls_state == "connected"
            assert engine.stats()["drops"]["queue_age"] == 0
            producer = ta.produce(producer_params(4242))
            tb.consume(producer.id, client_caps())
            assert a.keys is not None
            sender = SrtpContext(a.keys.srtp_suite, a.keys.local_key, inbound=False)
            a.sock.sendto(sender.protect(bytes(RtpPacket(111, 0, 0, 4242, payload=bytes(40)))), a.server)
            await asyncio.sleep(0.02)
            stats = engine.stats()
            assert stats["drops"]["queue_age"] == 1 and stats["forwarded_packets"] == 0

    run(main())


def test_wrong_peer_fingerprint_fails_dtls() -> None:
    async def main() -> None:
        async with Engine() as engine:
            t = engine.create_router().create_webrtc_transport()
            c = WebRtcClient(t)
            c.check()
            await c.recv()
            c.dtls = DtlsTransport(c.cert, "client")
            c.dtls.set_remote_fingerprints(t.dtls_parameters["fingerprints"])
            t.connect(
                {"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()}
            )  # not c's cert
            loop = asyncio.get_running_loop()
            c.dtls.start(loop.time())
            for _ in range(200):
                for data in c.dtls.datagrams_to_send(loop.time()):
                    c.sock.sendto(data, c.server)
                data = await c.recv(0.02)
                if data is not None:
                    c.dtls.receive_datagram(data, loop.time())
                if t.dtls_state == "failed":
                    break
            assert t.dtls_state == "failed"
            assert t.srtp_in is None  # no keys reached the datapath
            await asyncio.sleep(0)  # a failed transport closes itself on the next loop step
            assert t.closed and t.close_reason is not None and t.close_reason.startswith("DTLS failed")

    run(main())


def test_peer_dtls_close_closes_the_transport_at_once() -> None:
    """A browser leaving sends close_notify (RFC 5246 §7.2.1): the transport closes within a loop
    step (its producer and consumers with it), not 30 s later at ICE consent expiry."""

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            ta, tb = router.create_webrtc_transport(), router.create_webrtc_transport()
            a, b = WebRtcClient(ta), WebRtcClient(tb)
            await connect(a)
            await connect(b)
            producer = ta.produce(producer_params(4242))
            consumer = tb.consume(producer.id, client_caps())
            closed = asyncio.Event()
            ta.observer.once("close", closed.set)
            loop = asyncio.get_running_loop()
            assert a.dtls is not None
            a.dtls.close()
            (alert,) = a.dtls.datagrams_to_send(loop.time())
            sent = loop.time()
            a.sock.sendto(alert, a.server)
            await asyncio.wait_for(closed.wait(), 1)
            print(f"close_notify to transport close: {(loop.time() - sent) * 1e3:.2f} ms")
            assert ta.close_reason == "DTLS closed by the peer" and ta.dtls_state == "closed"
            assert producer.closed and consumer.closed and not tb.closed

    run(main())


def test_connect_validation_restart_and_consent_loss() -> None:
    async def main() -> None:
        async with Engine(Settings(ice_consent_timeout=10)) as engine:
            t = engine.create_router().create_webrtc_transport()
            for bad in (
                {"role": "both", "fingerprints": []},
                {"fingerprints": []},
                "x",
                {"fingerprints": [{"a": 1}]},
            ):
                with pytest.raises(TransportError):
                    t.connect(bad)  # type: ignore[arg-type]
            c = WebRtcClient(t)
            old = t.ice_parameters
            new = t.restart_ice()
            assert new["usernameFragment"] != old["usernameFragment"] and new["password"] != old["password"]
            c.check(ufrag=old["usernameFragment"], pwd=old["password"])  # old credentials still valid
            assert stun.parse_message(await c.recv()).message_type == stun.BINDING_SUCCESS
            c.check()  # the new ones complete the restart
            assert stun.parse_message(await c.recv()).message_type == stun.BINDING_SUCCESS
            assert t.ice_selected_tuple is not None
            closed = []
            t.observer.on("close", lambda: closed.append(True))
            # No check for the consent timeout: the transport stops sending and closes.
            t.ice.handle_timer(asyncio.get_running_loop().time() + 11)
            t._pump()
            await asyncio.sleep(0.01)
            assert t.ice_state == "closed" and closed == [True]

    run(main())
