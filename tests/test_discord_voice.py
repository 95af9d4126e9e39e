"""The Discord voice gateway end to end on loopback: a real aiohttp WebSocket server (the gateway core
plus DiscordVoice) and hand-written clients speaking JSON and UDP exactly as docs/discord.md#connection-flow
shows, with the crypto of other libraries. Also the room shared with a Harmony user (aiortc)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from discord_helpers import AES, XCHACHA, Client, discover, ref_open, rtp_packet
from helpers import serve_app

from fastsfu import Engine, Settings
from fastsfu.discord.gateway import Gateway, GatewayConfig
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import make_gateway_app
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(60)]

SECRET = "discord-voice-test-secret-0123456789abcdef"
AUTH = TokenAuth(SECRET)
SERVER_ID = "41"


class GatewayClient:
    """One voice connection: the WebSocket side of a bot, plus its UDP client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, user_id: int) -> None:
        self.ws = ws
        self.user_id = user_id
        self.events: list[dict[str, Any]] = []  # everything received after op 4
        self.udp: Client | None = None
        self.ready: dict[str, Any] = {}
        self.token = ""

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        data: dict[str, Any] = json.loads(msg.data)
        return data

    async def expect(self, op: int) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["op"] == op:
                return message
            self.events.append(message)

    async def send(self, op: int, d: Any) -> None:
        await self.ws.send_str(json.dumps({"op": op, "d": d}))

    async def close_code(self, timeout: float = 5.0) -> int | None:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data)  # the server's code (aiohttp may report its own afterwards)
            if msg.type == aiohttp.WSMsgType.CLOSED:
                return self.ws.close_code
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))


Serve = Callable[[str, aiohttp.ClientSession, VoiceRooms], Awaitable[None]]


def serve(
    body: Serve,
    room_map: dict[str, tuple[int, int]] | None = None,
    resume_grace: float = 60.0,
    voices: list[DiscordVoice] | None = None,
    legacy_modes: bool = False,
    settings: Settings | None = None,
) -> None:
    async def main() -> None:
        async with Engine(settings) as engine:
            rooms = VoiceRooms(engine)
            voice = DiscordVoice(rooms, AUTH.authenticate, room_map, legacy_modes=legacy_modes)
            if voices is not None:
                voices.append(voice)
            gateway = Gateway(voice, GatewayConfig(resume_grace=resume_grace))
            async with serve_app(make_gateway_app(gateway)) as port:
                try:
                    async with aiohttp.ClientSession() as http:
                        await body(f"ws://127.0.0.1:{port}/?v=8", http, rooms)
                finally:
                    gateway.shutdown()

    asyncio.run(asyncio.wait_for(main(), 50))


async def connect(
    url: str,
    http: aiohttp.ClientSession,
    user_id: int,
    mode: str,
    session_id: str = "",
    udp_sock: socket.socket | None = None,
) -> GatewayClient:
    """HELLO, IDENTIFY, READY, IP discovery, SELECT_PROTOCOL, op 4: docs/discord.md#connection-flow."""
    client = GatewayClient(await http.ws_connect(url), user_id)
    client.token = AUTH.mint(user_id)  # RESUME sends the same token again
    hello = await client.recv()
    assert hello["op"] == 8 and hello["d"]["heartbeat_interval"] > 0
    await client.send(
        0,
        {
            "server_id": SERVER_ID,
            "user_id": str(user_id),
            "session_id": session_id or f"s{user_id}",
            "token": client.token,
            "max_dave_protocol_version": 1,
        },
    )
    ready = await client.recv()
    assert ready["op"] == 2, ready
    d = ready["d"]
    client.ready = d
    assert d["modes"][:2] == ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]
    assert d["ip"] == "127.0.0.1" and 0 < d["ssrc"] < 2**32
    udp = Client(d["ssrc"], mode)
    if udp_sock is not None:  # a client on a port another client had
        udp.sock.close()
        udp.sock = udp_sock
    udp.server = (d["ip"], d["port"])
    await discover(udp)
    client.udp = udp
    ip, port = udp.address
    await client.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": mode}})
    session = await client.expect(4)
    assert session["seq"] == 1 and session["d"]["mode"] == mode
    assert session["d"]["dave_protocol_version"] == 0 and len(session["d"]["secret_key"]) == 32
    udp.key = bytes(session["d"]["secret_key"])
    return client


def test_two_bots_hear_each_other_with_different_modes() -> None:
    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA)
        b = await connect(url, http, 1002, AES)
        assert a.udp is not None and b.udp is not None
        # B learns A at once (op 11, then op 5 mapping A's SSRC); A hears of B the same way.
        connect_b = await b.expect(11)
        assert connect_b["d"]["user_ids"] == ["1001"]
        speaking = await b.expect(5)
        assert speaking["d"] == {"user_id": "1001", "ssrc": a.udp.ssrc, "speaking": 0}
        introductions = [(m["op"], m["d"]) for m in b.events if m["op"] in (18, 20)]
        assert introductions == [
            (18, {"user_id": "1001", "flags": 0}),
            (20, {"user_id": "1001", "platform": 0}),
        ]
        assert (await a.expect(11))["d"]["user_ids"] == ["1002"]
        assert (await a.expect(5))["d"]["ssrc"] == b.udp.ssrc
        # A speaks: op 5 relayed to B with A's user ID, then RTP reaches B under A's SSRC.
        await a.send(5, {"speaking": 1, "delay": 0, "ssrc": a.udp.ssrc})
        assert (await b.expect(5))["d"] == {"user_id": "1001", "ssrc": a.udp.ssrc, "speaking": 1}
        frames = [bytes([0xFC, i]) + b"opus" * 10 for i in range(30)]
        for seq, frame in enumerate(frames):
            a.udp.send_rtp(rtp_packet(a.udp.ssrc, 5000 + seq, frame))
        for frame in frames:
            plain, _ = ref_open(AES, b.udp.key, await b.udp.recv(), 12)
            assert plain[1] == 120 and struct.unpack_from("!I", plain, 8)[0] == a.udp.ssrc
            assert plain[12:] == frame
        for seq, frame in enumerate(frames[:5]):
            b.udp.send_rtp(rtp_packet(b.udp.ssrc, 9000 + seq, frame))
        for frame in frames[:5]:
            assert ref_open(XCHACHA, a.udp.key, await a.udp.recv(), 12)[0][12:] == frame
        # B's socket closes with a code that is not a leave: it may RESUME within the grace
        # period, after which it has left and A gets CLIENT_DISCONNECT once.
        await b.ws.close(code=4000)
        await asyncio.sleep(0.3)
        assert sorted(rooms.rooms[("discord", SERVER_ID)].members) == [1001, 1002]
        assert (await a.expect(13))["d"] == {"user_id": "1002"}
        room = rooms.rooms[("discord", SERVER_ID)]
        for _ in range(50):
            if list(room.members) == [1001]:
                break
            await asyncio.sleep(0.05)
        assert list(room.members) == [1001]
        await a.ws.close()

    serve(body, resume_grace=1.0)


@pytest.mark.parametrize("how", ["close 1000", "close 1001", "close 4000", "no close frame"])
def test_a_client_close_with_1000_or_1001_is_a_leave(how: str) -> None:
    """discord.py's disconnect() and djs's destroy() close with 1000, a closing tab with 1001: the
    session ends at once and the others get op 13 within a second. Another code, or a socket that
    drops without a close frame, keeps the session for RESUME (here 60 s)."""

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA)
        b = await connect(url, http, 1002, AES)
        await a.expect(5)  # B is announced to A
        loop = asyncio.get_running_loop()
        left_at = loop.time()
        if how == "no close frame":
            b.ws._response.connection.transport.abort()  # type: ignore[union-attr]
        else:
            await b.ws.close(code=int(how.split()[1]))
        room = rooms.rooms[("discord", SERVER_ID)]
        if how in ("close 1000", "close 1001"):
            assert (await a.expect(13))["d"] == {"user_id": "1002"}
            latency = loop.time() - left_at
            print(f"{how}: op 13 after {latency * 1000:.1f} ms")
            assert latency < 1.0 and sorted(room.members) == [1001]
        else:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(a.expect(13), 1.0)
            assert sorted(room.members) == [1001, 1002]
        await a.ws.close()

    serve(body)


@pytest.mark.parametrize(
    ("identify", "code"),
    [
        ({"token": "not-a-token"}, 4004),
        ({"token": AUTH.mint(7)}, 4004),  # another user's token
        ({"server_id": "999"}, 4011),  # not in the room map, and only mapped servers are served
    ],
)
def test_identify_refusals(identify: dict[str, Any], code: int) -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            voice = DiscordVoice(rooms, AUTH.authenticate, {SERVER_ID: (1, 2)}, only_mapped=True)
            async with serve_app(make_gateway_app(Gateway(voice))) as port, aiohttp.ClientSession() as http:
                client = GatewayClient(await http.ws_connect(f"ws://127.0.0.1:{port}?v=8"), 5)
                await client.recv()
                d = {"server_id": SERVER_ID, "user_id": "5", "session_id": "s", "token": AUTH.mint(5)}
                await client.send(0, d | identify)
                assert await client.close_code() == code
                assert not rooms.rooms and engine.stats()["transports"] == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_unknown_mode_and_protocol_close_and_free_the_media() -> None:
    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        for select, code in (
            (
                {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 1, "mode": "xsalsa20_poly1305"}},
                4016,
            ),
            ({"protocol": "sctp", "data": {}}, 4012),
        ):
            client = GatewayClient(await http.ws_connect(url), 5)
            await client.recv()
            token = AUTH.mint(5)
            await client.send(0, {"server_id": SERVER_ID, "user_id": "5", "session_id": "s5", "token": token})
            await client.expect(2)
            await client.send(1, select)
            assert await client.close_code() == code
            for _ in range(50):
                if not rooms.rooms:
                    break
                await asyncio.sleep(0.02)
            assert not rooms.rooms and rooms.engine.stats()["transports"] == 0

    serve(body)


def test_bad_http_requests_and_versions() -> None:
    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        base = url.split("?")[0]
        for query in ("", "?v=3", "?v=9", "?v=x"):
            async with http.get(base + query, headers={"Connection": "Upgrade", "Upgrade": "websocket"}) as r:
                assert r.status == 400
        async with http.get(url) as r:  # not a WebSocket upgrade
            assert r.status == 400

    serve(body)


def test_resume_keeps_media_flowing() -> None:
    """The socket drops (no close frame); RESUME on a new socket replays, and the UDP media goes on."""

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA, session_id="sa")
        b = await connect(url, http, 1002, AES, session_id="sb")
        assert a.udp is not None and b.udp is not None
        await b.expect(5)
        b.ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        a.udp.send_rtp(rtp_packet(a.udp.ssrc, 1, b"during the outage"))
        assert ref_open(AES, b.udp.key, await b.udp.recv(), 12)[0][12:] == b"during the outage"
        resumed = GatewayClient(await http.ws_connect(url), 1002)
        await resumed.recv()  # HELLO
        await resumed.send(7, {"server_id": SERVER_ID, "session_id": "sb", "token": b.token, "seq_ack": 1})
        assert (await resumed.recv())["op"] == 9
        replayed = [await resumed.recv() for _ in range(4)]  # what followed op 4 (seq 1)
        assert [m["op"] for m in replayed] == [11, 18, 20, 5] and [m["seq"] for m in replayed] == [2, 3, 4, 5]
        a.udp.send_rtp(rtp_packet(a.udp.ssrc, 2, b"after resume"))
        assert ref_open(AES, b.udp.key, await b.udp.recv(), 12)[0][12:] == b"after resume"
        assert sorted(rooms.rooms[("discord", SERVER_ID)].members) == [1001, 1002]

    serve(body)


def test_a_new_client_on_the_port_of_a_session_waiting_for_resume_is_heard_at_once() -> None:
    """B's socket drops; while B's session waits for RESUME, C's client gets B's old UDP port from
    the OS. C's discovery is answered and C's first authenticated packet takes the address (B's
    suspended session yields it), so A hears C at once instead of after resume_grace."""

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA, session_id="sa")
        b = await connect(url, http, 1002, AES, session_id="sb")
        assert a.udp is not None and b.udp is not None
        await b.expect(5)
        b.ws._response.connection.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.2)  # B's session is suspended for RESUME, its address still bound
        c = await connect(url, http, 1003, AES, session_id="sc", udp_sock=b.udp.sock)
        assert c.udp is not None
        await a.expect(5)  # C's SPEAKING (its producer is in the room)
        c.udp.send_rtp(rtp_packet(c.udp.ssrc, 1, b"C on B's old port"))
        plain = ref_open(XCHACHA, a.udp.key, await a.udp.recv(), 12)[0]
        assert plain[12:] == b"C on B's old port"
        assert sorted(rooms.rooms[("discord", SERVER_ID)].members) == [1001, 1002, 1003]

    serve(body)


def fragment_from_offer(sdp: str) -> str:
    """What the Discord web client sends in op 1: ICE credentials, fingerprint, rtpmap and
    extmap lines of its local offer, with no m=, mid, setup or candidate lines."""
    keep = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=extmap:", "a=rtpmap:")
    lines = [line for line in sdp.splitlines() if line.startswith(keep)]
    return "\n".join(dict.fromkeys(lines))  # once each (a session- and a media-level copy)


def browser_answer(template: str, offer_sdp: str, ssrcs: list[int], levels: bool = False) -> str:
    """The full remote answer a web client synthesises from op 4's template; `levels`: accept
    the offer's ssrc-audio-level extmap (the browser then writes levels, RFC 6464)."""
    extmaps = [
        line
        for line in offer_sdp.splitlines()
        if levels and line.startswith("a=extmap:") and "audio-level" in line
    ]
    attrs = dict(
        line.split(":", 1) for line in template.splitlines() if line.startswith("a=") and ":" in line
    )
    port = template.split()[1]
    ip = next(line for line in template.splitlines() if line.startswith("c=")).split()[-1]
    mid = next(line for line in offer_sdp.splitlines() if line.startswith("a=mid:")).split(":", 1)[1]
    pt = next(
        line.split(":", 1)[1].split()[0] for line in offer_sdp.splitlines() if "opus/48000" in line.lower()
    )
    return (
        "\r\n".join(
            [
                "v=0",
                "o=- 1 1 IN IP4 127.0.0.1",
                "s=-",
                "t=0 0",
                f"a=group:BUNDLE {mid}",
                "a=ice-lite",
                f"m=audio {port} UDP/TLS/RTP/SAVPF {pt}",
                f"c=IN IP4 {ip}",
                f"a=mid:{mid}",
                "a=rtcp-mux",
                "a=sendrecv",
                f"a=ice-ufrag:{attrs['a=ice-ufrag']}",
                f"a=ice-pwd:{attrs['a=ice-pwd']}",
                f"a=fingerprint:{attrs['a=fingerprint']}",
                "a=setup:passive",
                f"a=rtpmap:{pt} opus/48000/2",
                *extmaps,
                attrs["a=candidate"].join(["a=candidate:", ""]),
                "a=end-of-candidates",
                *(f"a=ssrc:{s} cname:discord-{s}" for s in ssrcs),
            ]
        )
        + "\r\n"
    )


async def join_aiortc_browser(
    url: str, http: aiohttp.ClientSession, pc: Any, user_id: int, bot_ssrc: int, levels: bool = False
) -> tuple[GatewayClient, int]:
    """A web client on the `webrtc` protocol with aiortc's RTCPeerConnection `pc` (an audio
    track added): IDENTIFY, SELECT_PROTOCOL with its offer's fragment, the answer synthesised from
    op 4, ICE + DTLS up, SPEAKING with its SSRC. Returns its gateway client and SSRC."""
    from aiortc import RTCSessionDescription

    await pc.setLocalDescription(await pc.createOffer())
    offer_sdp = pc.localDescription.sdp
    browser = GatewayClient(await http.ws_connect(url), user_id)
    await browser.recv()
    token = AUTH.mint(user_id)
    await browser.send(
        0, {"server_id": SERVER_ID, "user_id": str(user_id), "session_id": "w", "token": token}
    )
    await browser.expect(2)
    fragment = fragment_from_offer(offer_sdp)
    codecs = [{"name": "opus", "type": "audio", "priority": 1000, "payload_type": 111}]
    await browser.send(1, {"protocol": "webrtc", "data": fragment, "sdp": fragment, "codecs": codecs})
    description = (await browser.expect(4))["d"]
    assert description["dave_protocol_version"] == 0 and "a=ice-ufrag:" in description["sdp"]
    video = await browser.expect(12)  # the bot's audio SSRC, for the browser's a=ssrc lines
    assert video["d"]["user_id"] == "1001" and video["d"]["audio_ssrc"] == bot_ssrc
    answer_sdp = browser_answer(description["sdp"], offer_sdp, [bot_ssrc], levels)
    await pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
    for _ in range(100):
        if pc.connectionState == "connected":
            break
        await asyncio.sleep(0.05)
    assert pc.connectionState == "connected"
    my_ssrc: int = pc.getSenders()[0]._ssrc
    await browser.send(5, {"speaking": 1, "delay": 0, "ssrc": my_ssrc})
    return browser, my_ssrc


@pytest.mark.usefixtures("aiortc_loopback")
def test_webrtc_protocol_with_an_aiortc_browser_and_a_udp_bot() -> None:
    """SELECT_PROTOCOL webrtc: a template answer, ICE-lite + DTLS + SRTP on the shared port, the
    browser's SSRC learned from SPEAKING; it and a udp client hear each other (PT 111 <-> 120)."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack
    from discord_clients import opus_tone_frames

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        bot = await connect(url, http, 1001, XCHACHA)
        assert bot.udp is not None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tracks: list[Any] = []
        pc.on("track", tracks.append)
        pc.addTrack(AudioStreamTrack())
        try:
            browser, my_ssrc = await join_aiortc_browser(url, http, pc, 1002, bot.udp.ssrc)
            # The bot learns the browser (op 11, op 5 with its SSRC), then hears its audio.
            assert (await bot.expect(11))["d"]["user_ids"] == ["1002"]
            assert (await bot.expect(5))["d"] == {"user_id": "1002", "ssrc": my_ssrc, "speaking": 1}
            heard = 0
            for _ in range(20):
                plain, _ = ref_open(XCHACHA, bot.udp.key, await bot.udp.recv(), 12)
                heard += plain[1] & 0x7F == 120 and struct.unpack_from("!I", plain, 8)[0] == my_ssrc
            assert heard == 20
            # The bot speaks real Opus: aiortc decodes it from the SRTP the SFU sends (PT 120 -> 111).
            frames = opus_tone_frames(60, 440.0)
            for seq, frame in enumerate(frames):
                bot.udp.send_rtp(rtp_packet(bot.udp.ssrc, 100 + seq, frame))
                await asyncio.sleep(0.005)
            for _ in range(50):
                if tracks:
                    break
                await asyncio.sleep(0.05)
            assert tracks, "no remote track"
            decoded = 0
            for _ in range(10):
                frame = await asyncio.wait_for(tracks[0].recv(), 5)
                decoded += frame.samples == 960
            assert decoded == 10
            await browser.ws.close()
        finally:
            await pc.close()

    serve(body)


@pytest.mark.usefixtures("aiortc_loopback")
def test_a_webrtc_browser_closing_its_peer_connection_leaves_at_once() -> None:
    """pc.close() sends a DTLS close_notify (RFC 5246 §7.2.1): its transport closes, the session
    ends with 4014 although its WebSocket is still open, and the bot gets op 13 within a second
    (not at ICE consent expiry, ~30 s later)."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        bot = await connect(url, http, 1001, XCHACHA)
        assert bot.udp is not None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(AudioStreamTrack())
        try:
            browser, my_ssrc = await join_aiortc_browser(url, http, pc, 1002, bot.udp.ssrc)
            assert (await bot.expect(5))["d"] == {"user_id": "1002", "ssrc": my_ssrc, "speaking": 1}
            loop = asyncio.get_running_loop()
            closed_at = loop.time()
            await pc.close()
            assert (await bot.expect(13))["d"] == {"user_id": "1002"}
            latency = loop.time() - closed_at
            print(f"aiortc pc.close() -> op 13 at the bot: {latency * 1000:.1f} ms")
            assert latency < 1.0
            assert await browser.close_code() == 4014
            assert sorted(rooms.rooms[("discord", SERVER_ID)].members) == [1001]
        finally:
            await pc.close()

    serve(body)


def test_bad_clients_get_their_close_code_and_the_room_is_undisturbed() -> None:
    """Close codes through the real edge while two members talk: invalid JSON (4002), an op
    before IDENTIFY (4003), a bad token (4004), a second IDENTIFY (4005), a bad webrtc fragment
    (4020), a huge frame (4002); media between the members keeps flowing, the room is unchanged."""

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA)
        b = await connect(url, http, 1002, AES)
        assert a.udp is not None and b.udp is not None
        good = {"server_id": SERVER_ID, "user_id": "9", "session_id": "bad", "token": AUTH.mint(9)}
        cases: list[tuple[list[Any], int]] = [
            (["{not json"], 4002),
            ([{"op": 5, "d": {"speaking": 1, "delay": 0, "ssrc": 1}}], 4003),
            ([{"op": 0, "d": good | {"token": "forged"}}], 4004),
            ([{"op": 0, "d": good}, {"op": 0, "d": good}], 4005),
            ([{"op": 0, "d": good}, {"op": 1, "d": {"protocol": "webrtc", "data": "a=nothing"}}], 4020),
            (["x" * 200_000], 4002),
        ]
        for seq, (frames, code) in enumerate(cases):
            bad = GatewayClient(await http.ws_connect(url), 9)
            await bad.recv()  # HELLO
            for frame in frames:
                await bad.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
            assert await bad.close_code() == code, frames
            a.udp.send_rtp(rtp_packet(a.udp.ssrc, seq, b"still talking %d" % seq))
            plain, _ = ref_open(AES, b.udp.key, await b.udp.recv(), 12)
            assert plain[12:] == b"still talking %d" % seq
        for _ in range(50):
            if rooms.engine.stats()["transports"] == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(rooms.rooms[("discord", SERVER_ID)].members) == [1001, 1002]
        assert rooms.engine.stats()["transports"] == 2  # every refused session's media is freed
        assert not [m for m in a.events + b.events if m["op"] in (11, 13)]  # nobody heard of user 9

    serve(body)


def test_missed_heartbeats_close_4009_through_the_edge() -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            config = GatewayConfig(heartbeat_interval_ms=200, resume_grace=0.0)
            gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate), config)
            async with serve_app(make_gateway_app(gateway)) as port:
                async with aiohttp.ClientSession() as http:
                    client = GatewayClient(await http.ws_connect(f"ws://127.0.0.1:{port}/?v=8"), 5)
                    await client.recv()
                    d = {"server_id": SERVER_ID, "user_id": "5", "session_id": "s", "token": AUTH.mint(5)}
                    await client.send(0, d)
                    await client.expect(2)
                    assert await client.close_code() == 4009  # no heartbeat within 2 intervals
                for _ in range(100):  # grace 0: the session ends, its media is freed
                    if not rooms.rooms:
                        break
                    await asyncio.sleep(0.05)
                assert not rooms.rooms and engine.stats()["transports"] == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_initiated_kick_and_call_end() -> None:
    """4014 for one user (no reconnect, the others stay), 4022 for the whole room; a v6+
    VOICE_BACKEND_VERSION is answered."""
    voices: list[DiscordVoice] = []

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        a = await connect(url, http, 1001, XCHACHA)
        b = await connect(url, http, 1002, AES)
        c = await connect(url, http, 1003, AES)
        await a.send(16, {})
        assert set((await a.expect(16))["d"]) == {"voice", "rtc_worker"}
        (voice,) = voices
        key = voice.room_key(SERVER_ID)
        assert voice.disconnect(1002) == 1
        assert await b.close_code() == 4014
        assert (await a.expect(13))["d"] == {"user_id": "1002"}
        assert sorted(rooms.rooms[key].members) == [1001, 1003]
        assert voice.end_room(key) == 2
        assert await a.close_code() == 4022 and await c.close_code() == 4022
        for _ in range(50):
            if not rooms.rooms:
                break
            await asyncio.sleep(0.02)
        assert not rooms.rooms and rooms.engine.stats()["transports"] == 0

    serve(body, voices=voices)


@pytest.mark.parametrize("enabled", [False, True])
def test_legacy_modes_only_behind_the_setting_and_after_the_aead_ones(enabled: bool) -> None:
    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        client = GatewayClient(await http.ws_connect(url), 5)
        await client.recv()
        token = AUTH.mint(5)
        await client.send(0, {"server_id": SERVER_ID, "user_id": "5", "session_id": "s5", "token": token})
        modes = (await client.expect(2))["d"]["modes"]
        legacy = [
            "xsalsa20_poly1305_lite_rtpsize",
            "xsalsa20_poly1305_lite",
            "xsalsa20_poly1305_suffix",
            "xsalsa20_poly1305",
        ]
        aead = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]
        assert modes == (aead + legacy if enabled else aead)
        select = {
            "protocol": "udp",
            "data": {"address": "127.0.0.1", "port": 9, "mode": "xsalsa20_poly1305_lite"},
        }
        await client.send(1, select)
        if enabled:
            assert (await client.expect(4))["d"]["mode"] == "xsalsa20_poly1305_lite"
        else:
            assert await client.close_code() == 4016

    serve(body, legacy_modes=enabled)


@pytest.mark.usefixtures("aiortc_loopback")
def test_a_browser_that_talks_is_announced_speaking_by_its_measured_levels() -> None:
    """A `webrtc` browser (aiortc, which writes ssrc-audio-level computed from its audio) is
    silent, talks (a 440 Hz tone) for 1.5 s, then is silent again, sending no op 5 of its own
    after the first: the udp bot gets op 5 speaking 1 once when the tone starts and speaking 0
    once after it stops (docs/observers.md#speaking); the metric's set follows."""
    from aiortc import RTCConfiguration, RTCPeerConnection
    from aiortc_helpers import VoiceTrack

    async def body(url: str, http: aiohttp.ClientSession, rooms: VoiceRooms) -> None:
        bot = await connect(url, http, 1001, XCHACHA)
        assert bot.udp is not None
        track = VoiceTrack()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(track)
        try:
            browser, my_ssrc = await join_aiortc_browser(url, http, pc, 1002, bot.udp.ssrc, levels=True)
            await browser.send(5, {"speaking": 0, "delay": 0, "ssrc": my_ssrc})  # then never again
            assert (await bot.expect(11))["d"]["user_ids"] == ["1002"]
            assert (await bot.expect(5))["d"]["speaking"] == 1  # the browser's own claim, at the join
            assert (await bot.expect(5))["d"]["speaking"] == 0  # ... and its own 0, relayed
            room = next(iter(rooms))
            await asyncio.sleep(0.8)
            assert room.speaking_users == set()
            track.talking = True
            on = await bot.expect(5)
            assert on["d"] == {"user_id": "1002", "ssrc": my_ssrc, "speaking": 1}
            assert room.speaking_users == {1002}
            await asyncio.sleep(1.5)
            track.talking = False
            off = await bot.expect(5)
            assert off["d"] == {"user_id": "1002", "ssrc": my_ssrc, "speaking": 0}
            assert room.speaking_users == set()
            assert [e for e in bot.events if e["op"] == 5] == []  # nothing in between: no flapping
            await browser.ws.close()
        finally:
            await pc.close()

    serve(body)
