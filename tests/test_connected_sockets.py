"""A PlainTransport's or PipeTransport's own socket is connect(2)ed to its one remote (docs/datapath.md,
"Connected sockets"): forwarding still works, strangers never reach the datapath."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers import SrtpClient, client_caps, producer_params
from test_loopback import opus, server_addr

from fastsfu import Engine, Settings, _rtp
from fastsfu.plain_transport import PlainTransport
from fastsfu.router import Router
from fastsfu.rtp import RtpPacket


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def peer_of(t: PlainTransport) -> tuple[str, int] | None:
    try:
        name: tuple[str, int] = t.socket.sock.getpeername()
    except OSError:
        return None  # ENOTCONN
    return name


def dropped(engine: Engine) -> int:
    return sum(engine.stats()["drops"].values())


def listener(router: Router, producer_id: str) -> tuple[SrtpClient, PlainTransport]:
    client = SrtpClient()
    t = router.create_plain_transport(enable_srtp=True)
    t.connect("127.0.0.1", client.port, client.srtp_parameters)
    client.set_server_parameters(t.srtp_parameters)  # type: ignore[arg-type]
    t.consume(producer_id, client_caps(opus_pt=100))
    return client, t


async def heard_seqs(client: SrtpClient, count: int) -> list[int]:
    assert client.rx is not None
    got = await client.receive_rtp(count, 5)
    return [RtpPacket.parse(client.rx.unprotect(d)).sequence_number for d in got]


@pytest.mark.parametrize("connect_sockets", [True, False])
def test_connect_fixes_the_peer_and_forwarding_goes_on(connect_sockets: bool) -> None:
    async def main() -> None:
        async with Engine(Settings(connect_sockets=connect_sockets)) as engine:
            router = engine.create_router()
            speaker = SrtpClient()
            t = router.create_plain_transport(enable_srtp=True)
            assert peer_of(t) is None
            t.connect("127.0.0.1", speaker.port, speaker.srtp_parameters)
            producer = t.produce(producer_params(5000))
            out, t_out = listener(router, producer.id)
            expected = ("127.0.0.1", out.port) if connect_sockets else None
            assert peer_of(t_out) == expected
            assert engine.datapath.socket_peer(t_out.socket.slot) == (t_out.slot if connect_sockets else -1)
            for seq in range(30):
                speaker.send_rtp(server_addr(t), opus(5000, seq))
            assert await heard_seqs(out, 30) == list(range(30))
            assert engine.stats()["drops"]["send_failed"] == 0
            t_out.close()
            t.close()
            speaker.close()
            out.close()

    run(main())


def test_comedia_connects_once_the_tuple_is_learned_then_strangers_are_filtered() -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            speaker, stranger = SrtpClient(), SrtpClient()
            t = router.create_plain_transport(comedia=True, enable_srtp=True)
            t.connect(srtp_parameters=speaker.srtp_parameters)
            producer = t.produce(producer_params(5000))
            out, _ = listener(router, producer.id)
            # Before learning anyone may speak first: the socket stays unconnected.
            stranger.send_raw(server_addr(t), b"\x80" + bytes(40))
            await asyncio.sleep(0.05)
            assert peer_of(t) is None
            assert dropped(engine) == 1  # it could not authenticate (counted)
            learned = asyncio.get_running_loop().create_future()
            t.on("tuple", learned.set_result)
            speaker.send_rtp(server_addr(t), opus(5000, 0))
            await asyncio.wait_for(learned, 5)
            assert peer_of(t) == ("127.0.0.1", speaker.port)
            for seq in range(1, 20):
                stranger.send_raw(server_addr(t), bytes(opus(5000, 1000 + seq)))
                speaker.send_rtp(server_addr(t), opus(5000, seq))
            assert await heard_seqs(out, 20) == list(range(20))
            # The kernel filtered the stranger: nothing of it reached the datapath.
            assert dropped(engine) == 1
            assert t.get_stats()[0]["rtpPacketsReceived"] == 20
            for c in (speaker, stranger, out):
                c.close()

    run(main())


def test_pipe_ends_are_connected_to_each_other() -> None:
    async def main() -> None:
        async with Engine() as engine:
            a, b = engine.create_router(), engine.create_router()
            speaker = SrtpClient()
            t = a.create_plain_transport(enable_srtp=True)
            t.connect("127.0.0.1", speaker.port, speaker.srtp_parameters)
            producer = t.produce(producer_params(5000))
            pair = a.pipe_to_router(producer.id, b)
            local, remote = pair["pipeConsumer"].transport, pair["pipeProducer"].transport
            assert peer_of(local) == server_addr(remote) and peer_of(remote) == server_addr(local)
            out, _ = listener(b, producer.id)
            for seq in range(20):
                speaker.send_rtp(server_addr(t), opus(5000, seq))
            assert len(await heard_seqs(out, 20)) == 20
            speaker.close()
            out.close()

    run(main())


def test_the_datapath_follows_the_remote_and_gives_up_on_a_second_one() -> None:
    """A remote that changes reconnects (AF_UNSPEC first); a cleared one disconnects; a second
    transport with a remote on the socket turns the socket back to addressed sends for good."""
    dp = _rtp.Datapath(max_sockets=1, max_transports=2, max_producers=1, max_consumers=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        sock = dp.add_socket(s.fileno(), socket.AF_INET, False)
        t = dp.add_transport(sock)
        dp.set_transport_remote(t, "127.0.0.1", 5004)
        assert dp.socket_peer(sock) == -1  # not asked to connect
        dp.set_socket_connect(sock, True)
        assert dp.socket_peer(sock) == t and s.getpeername() == ("127.0.0.1", 5004)
        dp.set_transport_remote(t, "127.0.0.2", 5006)
        assert s.getpeername() == ("127.0.0.2", 5006)
        dp.clear_transport_remote(t)
        assert dp.socket_peer(sock) == -1
        with pytest.raises(OSError):
            s.getpeername()
        dp.set_transport_remote(t, "127.0.0.1", 5004)
        other = dp.add_transport(sock)
        dp.set_transport_remote(other, "127.0.0.1", 5008)
        assert dp.socket_peer(sock) == -1
        with pytest.raises(OSError):
            s.getpeername()
        dp.remove_transport(other)
        dp.remove_transport(t)
        dp.remove_socket(sock)
    dp.close()


def test_a_peer_that_went_away_costs_counted_drops_only() -> None:
    """A connected socket gets the ICMP port-unreachable of a closed peer as ECONNREFUSED on its
    next recv or send: counted (recv_error, send_failed), the thread goes on, the room too."""

    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            speaker = SrtpClient()
            t = router.create_plain_transport(enable_srtp=True)
            t.connect("127.0.0.1", speaker.port, speaker.srtp_parameters)
            producer = t.produce(producer_params(5000))
            gone, _ = listener(router, producer.id)
            stays, _ = listener(router, producer.id)
            gone.close()
            for seq in range(50):
                speaker.send_rtp(server_addr(t), opus(5000, seq))
                await asyncio.sleep(0.002)
            assert await heard_seqs(stays, 50) == list(range(50))
            drops = engine.stats()["drops"]
            assert drops["recv_error"] + drops["send_failed"] >= 1
            assert engine.stats()["slow_path_errors"] == 0
            speaker.close()
            stays.close()

    run(main())
