"""PipeTransport and pipe_to_router over real loopback sockets: the pipe hop keeps the producer's
SSRC, PT, extension IDs, sequence numbers and timestamps; the far router rewrites as usual."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from helpers import AUDIO_LEVEL_ID, MID_ID, SrtpClient, client_caps, producer_params

from fastsfu import Engine, PipeTransport, TransportError, ortc
from fastsfu.consumer import Consumer
from fastsfu.plain_transport import PlainTransport
from fastsfu.producer import Producer
from fastsfu.router import Router
from fastsfu.rtp import RtpPacket

pytestmark = pytest.mark.loopback

SSRC = 0x5EED0001
SEQ0 = 65500  # the stream wraps inside the test
TS0 = 0xFFFFF000


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def addr(t: PlainTransport) -> tuple[str, int]:
    return t.tuple["localIp"], t.tuple["localPort"]


def opus(seq: int, level: int = 0x85) -> RtpPacket:
    return RtpPacket(
        111,
        seq & 0xFFFF,
        (TS0 + (seq - SEQ0) * 960) & 0xFFFFFFFF,
        SSRC,
        extensions=[(AUDIO_LEVEL_ID, bytes([level])), (MID_ID, b"0")],
        payload=os.urandom(60),
    )


def speaker(router: Router, suite: str = "AEAD_AES_128_GCM") -> tuple[SrtpClient, PlainTransport, Producer]:
    client = SrtpClient(suite)
    t = router.create_plain_transport(enable_srtp=True, srtp_crypto_suite=suite)
    t.connect("127.0.0.1", client.port, client.srtp_parameters)
    client.set_server_parameters(t.srtp_parameters)  # type: ignore[arg-type]
    return client, t, t.produce(producer_params(SSRC))


def listener(router: Router, producer_id: str) -> tuple[SrtpClient, Consumer]:
    client = SrtpClient("AES_CM_128_HMAC_SHA1_80")
    t = router.create_plain_transport(enable_srtp=True)
    t.connect("127.0.0.1", client.port, client.srtp_parameters)
    client.set_server_parameters(t.srtp_parameters)  # type: ignore[arg-type]
    return client, t.consume(producer_id, client_caps(opus_pt=100, level_id=7, mid_id=2))


async def heard(client: SrtpClient, count: int) -> list[RtpPacket]:
    assert client.rx is not None
    return [RtpPacket.parse(client.rx.unprotect(d)) for d in await client.receive_rtp(count, timeout=5)]


def assert_rewritten_for_b(pkts: list[RtpPacket], consumer: Consumer, seqs: list[int]) -> None:
    """What router B's consumer sends: B's SSRC, PT and extension IDs over the original seq/ts."""
    assert {p.ssrc for p in pkts} == {consumer.ssrc}
    assert {p.payload_type for p in pkts} == {100}
    assert [p.sequence_number for p in pkts] == [s & 0xFFFF for s in seqs]
    assert [p.timestamp for p in pkts] == [opus(s).timestamp for s in seqs]
    assert {tuple(p.extensions) for p in pkts} == {((2, b"0"), (7, b"\x85"))}


@pytest.mark.parametrize("enable_srtp", [False, True])
def test_pipe_to_router_in_one_engine(enable_srtp: bool) -> None:
    """An SRTP speaker in A, a listener in B: every packet arrives with B's rewrite, and since B's
    consumer starts without offsets, its seq/ts equal to the speaker's prove the hop kept them."""

    async def main() -> None:
        async with Engine() as engine:
            a, b = engine.create_router(), engine.create_router()
            client, t, producer = speaker(a)
            result = a.pipe_to_router(producer.id, b, enable_srtp=enable_srtp)
            pipe_consumer, far = result["pipeConsumer"], result["pipeProducer"]
            assert far.id == producer.id and b.producers[producer.id] is far
            assert far.ssrc == SSRC and pipe_consumer.ssrc == SSRC and pipe_consumer.type == "pipe"
            assert far.rtp_parameters["codecs"][0]["payloadType"] == 111
            assert {e["uri"]: e["id"] for e in far.rtp_parameters["headerExtensions"]} == {
                ortc.URI_AUDIO_LEVEL: AUDIO_LEVEL_ID,
                ortc.URI_ABS_CAPTURE_TIME: 3,
            }
            pipe = pipe_consumer.transport
            assert isinstance(pipe, PipeTransport) and (pipe.srtp_in is not None) == enable_srtp
            out, consumer = listener(b, producer.id)
            seqs = list(range(SEQ0, SEQ0 + 60))  # across the 16-bit wrap
            for s in seqs:
                client.send_rtp(addr(t), opus(s))
                if s % 10 == 0:
                    await asyncio.sleep(0.002)
            assert_rewritten_for_b(await heard(out, len(seqs)), consumer, seqs)
            assert pipe_consumer.get_stats()[0]["packetCount"] == len(seqs)
            assert far.get_stats()[0]["packetCount"] == len(seqs)
            # A second pipe_to_router between the same routers reuses the pipe pair.
            other_client, other_t, other = speaker_with_ssrc(a, SSRC + 1)
            again = a.pipe_to_router(other.id, b, enable_srtp=enable_srtp)
            assert again["pipeConsumer"].transport is pipe
            other_client.close()
            client.close()
            out.close()

    run(main())


def speaker_with_ssrc(router: Router, ssrc: int) -> tuple[SrtpClient, PlainTransport, Producer]:
    client = SrtpClient()
    t = router.create_plain_transport(enable_srtp=True)
    t.connect("127.0.0.1", client.port, client.srtp_parameters)
    return client, t, t.produce(producer_params(ssrc))


def test_pause_and_resume_follow_across_the_pipe() -> None:
    """The far producer pauses and resumes with the source; the pipe forwards as-is (a gap in
    the numbering), and B's consumer resyncs so its listener hears one continuous stream."""

    async def main() -> None:
        async with Engine() as engine:
            a, b = engine.create_router(), engine.create_router()
            client, t, producer = speaker(a)
            far = a.pipe_to_router(producer.id, b)["pipeProducer"]
            out, consumer = listener(b, producer.id)
            for s in range(SEQ0, SEQ0 + 5):
                client.send_rtp(addr(t), opus(s))
            first = await heard(out, 5)
            producer.pause()
            assert far.paused
            for s in range(SEQ0 + 5, SEQ0 + 15):
                client.send_rtp(addr(t), opus(s))  # dropped at A: nothing crosses the pipe
            await asyncio.sleep(0.05)
            producer.resume()
            assert not far.paused
            for s in range(SEQ0 + 15, SEQ0 + 20):
                client.send_rtp(addr(t), opus(s))
            second = await heard(out, 5)
            assert [p.sequence_number for p in first + second] == [(SEQ0 + i) & 0xFFFF for i in range(10)]
            assert far.get_stats()[0]["packetCount"] == 10
            client.close()
            out.close()

    run(main())


class Relay:
    """A UDP socket between two pipes that records every RTP datagram it passes on."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.seen: list[bytes] = []

    async def pass_on(self, count: int, to: tuple[str, int], timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.seen) < count and loop.time() < deadline:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                await asyncio.sleep(0.002)
                continue
            if len(data) > 1 and 192 <= data[1] <= 223:
                continue  # RTCP between the pipes: not part of this check
            self.seen.append(data)
            self.sock.sendto(data, to)


@pytest.mark.parametrize("enable_srtp", [False, True])
def test_two_engines_joined_by_pipe_transports(enable_srtp: bool) -> None:
    """Two Engines, two pipe transports, a recording relay between them: on the wire between the
    nodes the stream has the producer's SSRC, PT, extension IDs, seq and ts; SRTP (AEAD_AES_128_GCM)
    protects the payload; B's listener hears every packet with B's rewrite."""

    async def main() -> None:
        async with Engine() as engine_a, Engine() as engine_b:
            a, b = engine_a.create_router(), engine_b.create_router()
            client, t, producer = speaker(a, "AES_CM_128_HMAC_SHA1_80")
            pipe_a = a.create_pipe_transport("127.0.0.1", enable_srtp=enable_srtp)
            pipe_b = b.create_pipe_transport("127.0.0.1", enable_srtp=enable_srtp)
            relay = Relay()
            pipe_a.connect("127.0.0.1", relay.port, pipe_b.srtp_parameters)
            pipe_b.connect("127.0.0.1", relay.port, pipe_a.srtp_parameters)
            assert (pipe_a.srtp_parameters is not None) == enable_srtp
            if enable_srtp:
                assert pipe_a.srtp_parameters["cryptoSuite"] == "AEAD_AES_128_GCM"  # type: ignore[index]
            pipe_consumer = pipe_a.consume(producer.id)
            far = pipe_b.produce(pipe_consumer.rtp_parameters, id=producer.id)
            out, consumer = listener(b, producer.id)
            # A pause in the middle: the pipe forwards the numbering as the producer sent it (with
            # the gap), where a normal consumer would have closed the gap.
            seqs = list(range(SEQ0, SEQ0 + 20)) + list(range(SEQ0 + 30, SEQ0 + 50))
            sent = [opus(s) for s in seqs]
            for pkt in sent[:20]:
                client.send_rtp(addr(t), pkt)
            await relay.pass_on(20, addr(pipe_b))
            producer.pause()
            for s in range(SEQ0 + 20, SEQ0 + 30):
                client.send_rtp(addr(t), opus(s))
            await asyncio.sleep(0.05)
            producer.resume()
            for pkt in sent[20:]:
                client.send_rtp(addr(t), pkt)
            await relay.pass_on(len(seqs), addr(pipe_b))
            on_wire = [RtpPacket.parse(d) for d in relay.seen]
            assert [(p.ssrc, p.payload_type, p.sequence_number, p.timestamp) for p in on_wire] == [
                (SSRC, 111, p.sequence_number, p.timestamp) for p in sent
            ]
            assert {tuple(p.extensions) for p in on_wire} == {((AUDIO_LEVEL_ID, b"\x85"),)}
            payload_visible = [p.payload == s.payload for p, s in zip(on_wire, sent, strict=True)]
            assert all(payload_visible) if not enable_srtp else not any(payload_visible)
            got = await heard(out, len(seqs))
            assert_rewritten_for_b(got, consumer, seqs)
            assert [p.payload for p in got] == [p.payload for p in sent]
            # Across engines nothing ties the two ends: closing the pipe consumer leaves the far
            # producer to the application (mediasoup's pipeToRouter wiring is in-process only).
            pipe_consumer.close()
            assert not far.closed
            far.close()
            assert consumer.closed
            client.close()
            out.close()
            relay.sock.close()

    run(main())


def test_close_cascades() -> None:
    """pipe_to_router ties the two ends: closing the source producer, the far producer or the
    pipe transport closes the rest, and B's consumers see "producerclose"."""

    async def main() -> None:
        async with Engine() as engine:
            a, b = engine.create_router(), engine.create_router()
            client, _, producer = speaker(a)
            pair = a.pipe_to_router(producer.id, b)
            _, consumer = listener(b, producer.id)
            events: list[str] = []
            consumer.on("producerclose", lambda: events.append("producerclose"))
            producer.close()
            assert pair["pipeConsumer"].closed and pair["pipeProducer"].closed and consumer.closed
            assert events == ["producerclose"] and producer.id not in b.producers

            _, _, producer = speaker_with_ssrc(a, SSRC + 1)
            pair = a.pipe_to_router(producer.id, b)
            pair["pipeProducer"].close()  # the far end goes: the pipe consumer follows
            assert pair["pipeConsumer"].closed and not producer.closed

            pair = a.pipe_to_router(producer.id, b)
            pipe = pair["pipeConsumer"].transport
            pipe.close()  # the transport goes: its consumer, then the far producer
            assert pair["pipeConsumer"].closed and pair["pipeProducer"].closed
            assert not producer.closed and producer.id not in b.producers
            again = a.pipe_to_router(producer.id, b)  # a closed pipe pair is replaced
            assert again["pipeConsumer"].transport is not pipe and not again["pipeProducer"].closed
            client.close()

    run(main())


def test_bad_calls_are_clear_errors() -> None:
    async def main() -> None:
        async with Engine() as engine:
            a, b = engine.create_router(), engine.create_router()
            client, _, producer = speaker(a)
            with pytest.raises(TransportError, match="own router"):
                a.pipe_to_router(producer.id, a)
            with pytest.raises(TransportError, match="no producer"):
                a.pipe_to_router("nope", b)
            pair = a.pipe_to_router(producer.id, b)
            with pytest.raises(TransportError, match="already has a producer"):
                a.pipe_to_router(producer.id, b)
            with pytest.raises(TransportError, match="already sent on this pipe"):
                pair["pipeConsumer"].transport.consume(producer.id)  # type: ignore[call-arg]
            pipe = a.create_pipe_transport(enable_srtp=True)
            with pytest.raises(TransportError, match="AEAD_AES_128_GCM"):
                pipe.connect("127.0.0.1", 9, {"cryptoSuite": "AES_CM_128_HMAC_SHA1_80", "keyBase64": "AA=="})
            client.close()

    run(main())
