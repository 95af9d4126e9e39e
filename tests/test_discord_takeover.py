"""Taking over another member's media or session, through the real edge (the aiohttp gateway, the
engine's UDP port, /metrics): an IP discovery from another loopback address never moves a bound
session, only a packet that authenticates with its key does (NAT rebinding); another user's IDENTIFY
or RESUME with a member's session_id never replaces or resumes that member's session."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from discord_helpers import AES, XCHACHA, Client, discover, ref_open, rtp_packet
from helpers import serve_app
from test_discord_voice import AUTH, SERVER_ID, GatewayClient, connect

from fastsfu import Engine
from fastsfu.discord.gateway import Gateway
from fastsfu.discord.udp_transport import DiscordUdpTransport, discovery_response, discovery_table
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import GatewayEndpoint, make_gateway_app
from fastsfu.harmony import VoiceRooms
from fastsfu.server.metrics import metrics_mount

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60)]

THIEF_IP = "127.0.0.2"  # another loopback address: the attacker's (or a spoofed third party's)
NAT_IP = "127.0.0.3"  # where a member's packets come from after its NAT rebinds


@dataclass
class Edge:
    url: str
    http: aiohttp.ClientSession
    rooms: VoiceRooms
    gateway: Gateway
    metrics_url: str

    @property
    def engine(self) -> Engine:
        return self.rooms.engine

    async def metric(self, name: str) -> float:
        async with self.http.get(self.metrics_url) as r:
            text = await r.text()
        values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        assert len(values) == 1, (name, text)
        return float(values[0])

    def transport(self, ssrc: int) -> DiscordUdpTransport:
        transport = discovery_table(self.engine).lookup(ssrc)
        assert isinstance(transport, DiscordUdpTransport)
        return transport


def serve(body: Callable[[Edge], Awaitable[None]]) -> None:
    """The gateway app and a /metrics app (as `fastsfu serve` mounts it) over one engine."""

    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate))
            endpoint = GatewayEndpoint(gateway)
            metrics = web.Application()
            metrics_mount(rooms, discord=endpoint)(metrics)
            async with serve_app(make_gateway_app(gateway, endpoint)) as port, serve_app(metrics) as mport:
                try:
                    async with aiohttp.ClientSession() as http:
                        url, metrics_url = f"ws://127.0.0.1:{port}/?v=8", f"http://127.0.0.1:{mport}/metrics"
                        await body(Edge(url, http, rooms, gateway, metrics_url))
                finally:
                    gateway.shutdown()

    asyncio.run(asyncio.wait_for(main(), 50))


async def datagrams(client: Client, wait: float = 0.3) -> list[bytes]:
    """Everything `client`'s socket receives within `wait` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    received: list[bytes] = []
    while (left := deadline - loop.time()) > 0:
        try:
            received.append(await asyncio.wait_for(loop.sock_recv(client.sock, 4096), left))
        except TimeoutError:
            break
    return received


def rtp_only(received: list[bytes]) -> list[bytes]:
    """The RTP among datagrams (RTCP reports sent before a move may still be queued)."""
    return [d for d in received if len(d) > 1 and d[0] >> 6 == 2 and not 192 <= d[1] <= 223]


async def talk(sender: Client, receiver: Client, first_seq: int, count: int, text: bytes) -> None:
    """`sender` sends `count` packets; `receiver` must get every one, in order, byte for byte."""
    for i in range(count):
        sender.send_rtp(rtp_packet(sender.ssrc, first_seq + i, text + b" %d" % i))
    for i in range(count):
        plain, _ = ref_open(receiver.mode, receiver.key, await receiver.recv(), 12)
        assert plain[12:] == text + b" %d" % i


def udp(client: GatewayClient) -> Client:
    assert client.udp is not None
    return client.udp


async def until(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


# ---------------------------------------------------------------------------------------------- media


def test_discovery_from_another_address_never_takes_a_members_media() -> None:
    """The victim's SSRC is in SPEAKING; a discovery for it from another address, before and after
    the victim's first packet, moves nothing: the thief gets no media (before that first packet,
    only the answer to its own discovery), the victim hears everything, each attempt is counted."""

    async def body(edge: Edge) -> None:
        victim = udp(await connect(edge.url, edge.http, 1001, XCHACHA))
        talker_ws = await connect(edge.url, edge.http, 1002, AES)
        talker = udp(talker_ws)
        ssrc = (await talker_ws.expect(5))["d"]["ssrc"]  # what every member hears
        assert ssrc == victim.ssrc
        thief = Client(ssrc, AES, host=THIEF_IP)
        thief.server = victim.server
        try:
            # The victim has discovered but not sent anything yet.
            thief.discovery()
            assert await thief.recv() == discovery_response(ssrc, *thief.address)  # its own address only
            await talk(talker, victim, 100, 30, b"to the victim")
            # The victim talks: authenticated packets confirm its address. Then the thief retries.
            await talk(victim, talker, 500, 10, b"from the victim")
            for _ in range(3):
                thief.discovery()
            await until(lambda: edge.transport(ssrc).discoveries_refused == 4)
            await talk(talker, victim, 130, 30, b"still to the victim")
            assert await datagrams(thief) == []  # no media, and no answer once confirmed
            assert edge.transport(ssrc).remote == victim.address
            assert edge.engine.stats()["discord_discoveries_refused"] == 4
            assert await edge.metric("fastsfu_discord_discoveries_refused_total") == 4
            assert await edge.metric("fastsfu_discord_remote_moves_total") == 0
        finally:
            thief.close()

    serve(body)


def test_an_authenticated_packet_from_a_new_address_moves_the_session() -> None:
    """NAT rebinding: the member's packets come from a new address; the first one that authenticates
    moves its session there and it hears the room at the new address. A wrong key or a replayed
    packet from a third address moves nothing (counted drops)."""

    async def body(edge: Edge) -> None:
        member = udp(await connect(edge.url, edge.http, 1001, XCHACHA))
        talker = udp(await connect(edge.url, edge.http, 1002, AES))
        ssrc = member.ssrc
        await talk(member, talker, 1, 2, b"hello")
        last = member.send_rtp(rtp_packet(ssrc, 3, b"last from the old address"))
        assert ref_open(AES, talker.key, await talker.recv(), 12)[0][12:] == b"last from the old address"
        thief = Client(ssrc, XCHACHA, host=THIEF_IP)
        thief.server, thief.key, thief.counter = member.server, os.urandom(32), 1000
        rebound = Client(ssrc, XCHACHA, host=NAT_IP)  # the member's socket as seen after the NAT rebinds
        rebound.server, rebound.key, rebound.counter = member.server, member.key, member.counter
        try:
            before = edge.engine.stats()["drops"]
            thief.send_rtp(rtp_packet(ssrc, 4, b"forged"))  # a wrong key
            thief.send(last)  # the member's own packet, replayed from elsewhere

            def dropped(reason: str) -> int:
                return int(edge.engine.stats()["drops"][reason] - before[reason])

            await until(lambda: dropped("decrypt_failed") == 1 and dropped("aead_replay") == 1)
            await talk(talker, member, 10, 5, b"at the old address")
            assert edge.transport(ssrc).remote == member.address
            # The same client (key, counter) now sends from another address.
            rebound.send_rtp(rtp_packet(ssrc, 4, b"from the new address"))
            assert ref_open(AES, talker.key, await talker.recv(), 12)[0][12:] == b"from the new address"
            await until(lambda: edge.transport(ssrc).remote == rebound.address)
            await talk(talker, rebound, 15, 20, b"at the new address")
            assert rtp_only(await datagrams(member, 0.2)) == [] and await datagrams(thief, 0.1) == []
            assert edge.engine.stats()["discord_remote_moves"] == 1
            assert await edge.metric("fastsfu_discord_remote_moves_total") == 1
            assert await edge.metric("fastsfu_discord_discoveries_refused_total") == 0
        finally:
            thief.close()
            rebound.close()

    serve(body)


def test_proof_of_the_key_wins_over_a_discovery_that_raced_the_client() -> None:
    """Someone who knows READY's SSRC discovers before the client: the first discovery binds, the
    client's own is refused but answered, and the client's first authenticated packet moves the
    session to it; from then on the racer gets nothing, not even an answer."""

    async def body(edge: Edge) -> None:
        ws = GatewayClient(await edge.http.ws_connect(edge.url), 1001)
        await ws.recv()  # HELLO
        token = AUTH.mint(1001)
        await ws.send(0, {"server_id": SERVER_ID, "user_id": "1001", "session_id": "s", "token": token})
        ready = (await ws.expect(2))["d"]
        ssrc = ready["ssrc"]
        racer = Client(ssrc, AES, host=THIEF_IP)
        client = Client(ssrc, XCHACHA)
        racer.server = client.server = (ready["ip"], ready["port"])
        try:
            await discover(racer)  # first: bound to the racer, for now
            await discover(client)  # refused (counted), but answered with the client's own address
            assert edge.transport(ssrc).remote == racer.address
            ip, port = client.address
            await ws.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": XCHACHA}})
            client.key = bytes((await ws.expect(4))["d"]["secret_key"])
            talker = udp(await connect(edge.url, edge.http, 1002, AES))
            await talk(client, talker, 1, 5, b"proof of the key")
            await until(lambda: edge.transport(ssrc).remote == client.address)
            await talk(talker, client, 1, 20, b"to the real client")
            racer.discovery()
            await until(lambda: edge.transport(ssrc).discoveries_refused == 2)
            assert await datagrams(racer) == []
            assert await edge.metric("fastsfu_discord_discoveries_refused_total") == 2
            assert await edge.metric("fastsfu_discord_remote_moves_total") == 1
        finally:
            racer.close()
            client.close()

    serve(body)


# ---------------------------------------------------------------------------------------------- sessions


async def identify(edge: Edge, user_id: int, session_id: str, server_id: str = SERVER_ID) -> GatewayClient:
    """HELLO and IDENTIFY with the user's own valid token; READY must follow."""
    client = GatewayClient(await edge.http.ws_connect(edge.url), user_id)
    await client.recv()  # HELLO
    client.token = AUTH.mint(user_id)
    d = {"server_id": server_id, "user_id": str(user_id), "session_id": session_id, "token": client.token}
    await client.send(0, d)
    await client.expect(2)
    return client


async def resume(edge: Edge, token: str, session_id: str, seq_ack: int) -> GatewayClient:
    client = GatewayClient(await edge.http.ws_connect(edge.url), 0)
    await client.recv()  # HELLO
    d = {"server_id": SERVER_ID, "session_id": session_id, "token": token, "seq_ack": seq_ack}
    await client.send(7, d)
    return client


async def still_connected(client: GatewayClient) -> None:
    await client.send(3, {"t": 7, "seq_ack": -1})
    assert (await client.expect(6))["d"] == {"t": 7}


def drop_socket(client: GatewayClient) -> None:
    """The connection dies without a close frame: the session waits for RESUME."""
    client.ws._response.connection.transport.abort()  # type: ignore[union-attr]


def test_another_users_identify_with_a_members_session_id_gets_its_own_session() -> None:
    """A user IDENTIFYs with its own token but the victim's session_id, in another server and in the
    victim's: it gets a session of its own each time; the victim stays connected and keeps hearing
    the room. After both sockets drop, each RESUMEs its own session with its own token."""

    async def body(edge: Edge) -> None:
        victim_ws = await connect(edge.url, edge.http, 1001, XCHACHA, session_id="shared")
        victim = udp(victim_ws)
        talker = udp(await connect(edge.url, edge.http, 1002, AES))
        elsewhere = await identify(edge, 1003, "shared", server_id="77")
        victim_session = edge.gateway.session("shared", "1001")
        assert victim_session is not None and victim_session.state == "active"
        intruder = await identify(edge, 1003, "shared")  # replaces only its own session
        assert await elsewhere.close_code() == 4014
        await still_connected(victim_ws)
        await talk(talker, victim, 1, 20, b"the victim still hears")
        intruder_session = edge.gateway.session("shared", "1003")
        assert intruder_session is not None and intruder_session.server_id == SERVER_ID
        assert edge.gateway.session("shared", "1001") is victim_session and victim_session.state == "active"
        # Both sockets drop: two suspended sessions with one session_id, one per user.
        drop_socket(victim_ws)
        drop_socket(intruder)
        await until(lambda: victim_session.state == intruder_session.state == "suspended")
        back = await resume(edge, intruder.token, "shared", seq_ack=-1)
        assert (await back.recv())["op"] == 9
        assert intruder_session.state == "active" and victim_session.state == "suspended"
        victim_back = await resume(edge, victim_ws.token, "shared", seq_ack=1)
        assert (await victim_back.recv())["op"] == 9
        assert victim_session.state == "active" and victim_session.connection is not None
        await talk(talker, victim, 21, 10, b"after the resume")
        await still_connected(victim_back)
        assert sorted(edge.rooms.rooms[("discord", SERVER_ID)].members) == [1001, 1002]

    serve(body)


def test_resume_with_a_members_session_id_and_ones_own_token_is_4006() -> None:
    """RESUME with the victim's session_id and server but the caller's own valid token: 4006 while
    the victim is connected and while it waits for its own RESUME; the victim is untouched."""

    async def body(edge: Edge) -> None:
        victim_ws = await connect(edge.url, edge.http, 1001, XCHACHA, session_id="victim")
        victim = udp(victim_ws)
        talker = udp(await connect(edge.url, edge.http, 1002, AES))
        session = edge.gateway.session("victim", "1001")
        assert session is not None
        own_token = AUTH.mint(1003)
        attempt = await resume(edge, own_token, "victim", seq_ack=1)
        assert await attempt.close_code() == 4006
        await still_connected(victim_ws)
        await talk(talker, victim, 1, 10, b"connected")
        drop_socket(victim_ws)
        await until(lambda: session.state == "suspended")
        attempt = await resume(edge, own_token, "victim", seq_ack=1)
        assert await attempt.close_code() == 4006
        assert session.state == "suspended"
        await talk(talker, victim, 11, 10, b"suspended")  # UDP media flows on meanwhile
        back = await resume(edge, victim_ws.token, "victim", seq_ack=1)
        assert (await back.recv())["op"] == 9 and session.state == "active"
        await still_connected(back)
        assert await edge.metric('fastsfu_discord_closes_total{code="4006"}') == 2

    serve(body)
