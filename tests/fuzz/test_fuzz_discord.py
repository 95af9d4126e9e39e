"""Fuzz the Discord voice gateway: payload decoding, IP discovery, the webrtc SDP fragment, and the
gateway core with the real media side (DiscordVoice on an Engine) fed valid and mutated
IDENTIFY / SELECT_PROTOCOL / SPEAKING / HEARTBEAT / RESUME frames. The core answers every frame
with payloads or a close code, never 4015 (its "internal error"), and a finished session leaves no
room behind."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from engine_loop import Loop
from hypothesis import event, given
from hypothesis import strategies as st
from mutations import budget, corpus, json_text, mutated, mutated_json, seeded

from fastsfu.discord import payloads
from fastsfu.discord.errors import GatewayError
from fastsfu.discord.gateway import Close, Gateway, GatewayConfig, Send
from fastsfu.discord.opcodes import CloseCode, Op
from fastsfu.discord.udp_transport import parse_discovery_request
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.webrtc_sdp import SdpError, parse_fragment
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import TokenAuth

AUTH = TokenAuth("discord-fuzz-secret-0123456789abcdef")
USER = 5
FINGERPRINT = DtlsCertificate.generate().fingerprints()[0]
FRAGMENT = "\n".join(
    [
        "a=ice-ufrag:abcd",
        "a=ice-pwd:0123456789abcdef012345",
        f"a=fingerprint:{FINGERPRINT['algorithm']} {FINGERPRINT['value']}",
        "a=rtpmap:111 opus/48000/2",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    ]
)
IDENTIFY = {"server_id": "41", "user_id": str(USER), "session_id": "s1", "token": AUTH.mint(USER)}
SELECT_UDP = {
    "protocol": "udp",
    "data": {"address": "127.0.0.1", "port": 40000, "mode": "aead_aes256_gcm_rtpsize"},
}
SELECT_WEBRTC = {
    "protocol": "webrtc",
    "data": FRAGMENT,
    "sdp": FRAGMENT,
    "codecs": [{"name": "opus", "type": "audio", "priority": 1000, "payload_type": 111}],
}
SPEAKING = {"speaking": 1, "delay": 0, "ssrc": 1234}
HEARTBEAT = {"t": 1501184119561, "seq_ack": 10}
RESUME = {"server_id": "41", "session_id": "s1", "token": IDENTIFY["token"], "seq_ack": 1}
MESSAGES = [
    (Op.IDENTIFY, IDENTIFY),
    (Op.SELECT_PROTOCOL, SELECT_UDP),
    (Op.SELECT_PROTOCOL, SELECT_WEBRTC),
    (Op.SPEAKING, SPEAKING),
    (Op.HEARTBEAT, HEARTBEAT),
    (Op.HEARTBEAT, 1501184119561),
    (Op.RESUME, RESUME),
    (Op.VIDEO, {"audio_ssrc": 1234, "video_ssrc": 0, "rtx_ssrc": 0, "streams": []}),
    (Op.CLIENT_DISCONNECT, {"user_id": "7"}),
]


def frame_strategy() -> st.SearchStrategy[str]:
    """A valid message, a JSON-level mutation of one, a text-level mutation, or corpus text."""
    seeds = [{"op": int(op), "d": d} for op, d in MESSAGES]
    return st.one_of(
        st.sampled_from(seeds).map(json.dumps),
        st.sampled_from(seeds).flatmap(mutated_json).map(json.dumps),
        st.sampled_from(seeds).flatmap(json_text),
        st.sampled_from([c.decode("utf-8", "replace") for c in corpus("discord")] or ["{}"]),
    )


FRAMES = frame_strategy()


@budget(500)
@given(FRAMES, st.integers(4, 8))
def test_payload_decoders_raise_only_gateway_error(text: str, version: int) -> None:
    try:
        op, d = payloads.decode(text, 64 * 1024)
        for check in (
            payloads.identify,
            lambda d: payloads.resume(d, version),
            payloads.select_protocol,
            payloads.speaking,
            payloads.heartbeat,
        ):
            try:
                check(d)
            except GatewayError as exc:
                assert 4000 <= exc.code <= 4999
    except GatewayError as exc:
        assert 4000 <= exc.code <= 4999


@budget(300)
@given(seeded([struct.pack("!HHI66x", 1, 70, 1234), struct.pack("!HHI64sH", 2, 70, 7, b"1.2.3.4", 9)]))
def test_ip_discovery_parser_never_raises(data: bytes) -> None:
    ssrc = parse_discovery_request(data)
    assert ssrc is None or (len(data) == 74 and ssrc == struct.unpack_from("!I", data, 4)[0])


@budget(300)
@given(
    st.one_of(mutated_json(FRAGMENT), mutated(FRAGMENT.encode()).map(lambda b: b.decode("utf-8", "replace"))),
    mutated_json(SELECT_WEBRTC["codecs"]),
)
def test_sdp_fragment_raises_only_sdp_error(text: Any, codecs: Any) -> None:
    try:
        offer = parse_fragment(text, codecs)
    except SdpError:
        return
    assert offer.ice_ufrag and offer.ice_pwd and offer.fingerprints and 0 <= offer.opus_pt < 128
    offer.rtp_capabilities()
    offer.rtp_parameters(1)




def check_outputs(outputs: list[Send | Close]) -> int | None:
    """Every output is a JSON message with an integer op, or the Close that comes last; its code."""
    for i, output in enumerate(outputs):
        if isinstance(output, Close):
            assert i == len(outputs) - 1
            assert 4000 <= output.code <= 4999 and output.code != CloseCode.VOICE_SERVER_CRASHED, output
            return output.code
        message = json.loads(output.text)
        assert isinstance(message["op"], int)
    return None


def fuzzed(data: st.DataObject, op: int, d: Any, label: str) -> str:
    """The frame {op, d}: as is (half the time), JSON-mutated, or text-mutated."""
    seed = {"op": int(op), "d": d}
    how = data.draw(st.sampled_from(["valid", "valid", "json", "text"]), label=f"{label} how")
    if how == "valid":
        return json.dumps(seed)
    if how == "json":
        return json.dumps(data.draw(mutated_json(seed), label=label))
    return data.draw(json_text(seed), label=label)


@budget(120)
@given(st.data(), st.sampled_from([SELECT_UDP, SELECT_WEBRTC]), st.sampled_from([4, 7, 8]))
def test_gateway_with_real_media_answers_every_frame(
    media: Loop, data: st.DataObject, select: dict[str, Any], version: int
) -> None:
    """The connection flow of docs/discord.md#connection-flow (IDENTIFY, SELECT_PROTOCOL, SPEAKING with
    READY's SSRC, HEARTBEAT, VIDEO, RESUME), each frame valid or mutated, with random frames in between."""

    async def body() -> None:
        rooms = VoiceRooms(media.engine)
        gateway = Gateway(DiscordVoice(rooms, AUTH.authenticate), GatewayConfig(resume_grace=1.0))
        conn = gateway.connect(version, 0.0)
        check_outputs(conn.poll_output())
        ssrc = 1234
        script = [(Op.IDENTIFY, IDENTIFY), (Op.SELECT_PROTOCOL, select), (Op.SPEAKING, None)]
        script += [(Op.HEARTBEAT, HEARTBEAT), MESSAGES[7], (Op.RESUME, RESUME)]
        now, code, joined = 0.0, None, False
        for i, (op, d) in enumerate(script):
            if d is None:
                d = dict(SPEAKING, ssrc=ssrc)
            texts = [fuzzed(data, op, d, f"frame {i}")]
            texts += data.draw(st.lists(FRAMES, max_size=1), label=f"extra {i}")
            for text in texts:
                now += 0.1
                conn.receive(text, now)
                outputs = conn.poll_output()
                code = check_outputs(outputs)
                for output in outputs:
                    if isinstance(output, Send):
                        message = json.loads(output.text)
                        if message["op"] == Op.READY:
                            ssrc = message["d"]["ssrc"]
                        joined = joined or message["op"] == Op.SESSION_DESCRIPTION
                if code is not None:
                    break
            if code is not None:
                assert conn.closed
                break
        event(f"close {code}, {select['protocol']} session described: {joined}")
        # A lost WebSocket, the RESUME grace period, then the session ends: nothing stays behind.
        conn.transport_closed(now)
        gateway.handle_timer(now + 5.0)
        gateway.shutdown()
        assert not gateway.sessions and gateway.connection_count == 0
        assert not rooms.rooms, rooms.rooms

    media.loop.run_until_complete(asyncio.wait_for(body(), 20))
