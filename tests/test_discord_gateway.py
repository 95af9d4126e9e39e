"""The Discord voice gateway core driven with JSON frames alone (docs/discord.md):
flow, heartbeats, every close code, RESUME and replay, server closes, timers and memory bounds."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from fastsfu.discord.gateway import (
    Close,
    Connection,
    Gateway,
    GatewayConfig,
    GatewayError,
    GatewayHandler,
    Send,
    Session,
    parse_version,
    wire_seq,
)
from fastsfu.discord.opcodes import KNOWN_OPS, CloseCode, Op

MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]
KEY = list(range(32))
CREDENTIALS = {"41": {"t1", "t2", "t3"}}  # server_id -> valid tokens


class Handler(GatewayHandler):
    """A tiny media side: one room per server_id, SSRCs from 1001, op 5 relayed to the room."""

    def __init__(self) -> None:
        self.next_ssrc = 1001
        self.rooms: dict[str, list[Session]] = {}
        self.events: list[tuple[str, str]] = []  # (callback, session_id)
        self.other: list[tuple[int, Any]] = []
        self.videos: list[dict[str, Any]] = []
        self.select_calls = 0
        self.send_in_identify: tuple[int, Any] | None = None
        self.crash_in_speaking = False

    def identify(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        if session.server_id not in CREDENTIALS:  # the core normalised the snowflakes to strings
            raise GatewayError(CloseCode.SERVER_NOT_FOUND)
        if session.token not in CREDENTIALS[session.server_id]:
            raise GatewayError(CloseCode.AUTHENTICATION_FAILED)
        ssrc, self.next_ssrc = self.next_ssrc, self.next_ssrc + 1
        session.attachment = ssrc
        self.rooms.setdefault(session.server_id, []).append(session)
        self.events.append(("identify", session.session_id))
        if self.send_in_identify is not None:
            session.send(*self.send_in_identify)
        return {"ssrc": ssrc, "ip": "127.0.0.1", "port": 50000, "modes": MODES, "experiments": []}

    def select_protocol(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        self.select_calls += 1
        if d["protocol"] == "webrtc":
            return {"audio_codec": "opus", "sdp": "m=audio 50001 ICE/SDP", "dave_protocol_version": 0}
        if d["data"]["mode"] not in MODES:
            raise GatewayError(CloseCode.UNKNOWN_ENCRYPTION_MODE)
        # Sent from inside the callback: must arrive after op 4.
        session.send(Op.CLIENTS_CONNECT, {"user_ids": []})
        return {
            "mode": d["data"]["mode"],
            "secret_key": KEY,
            "audio_codec": "opus",
            "video_codec": "H264",
            "media_session_id": "9f0c",
            "dave_protocol_version": 0,
        }

    def speaking(self, session: Session, d: dict[str, Any]) -> None:
        if self.crash_in_speaking:
            raise RuntimeError("bug")
        if d["ssrc"] != session.attachment:
            raise GatewayError(CloseCode.BAD_REQUEST, "not your SSRC")
        for other in self.rooms[session.server_id]:
            if other is not session:
                other.send(
                    Op.SPEAKING, {"user_id": session.user_id, "ssrc": d["ssrc"], "speaking": d["speaking"]}
                )

    def video(self, session: Session, d: dict[str, Any]) -> None:
        self.videos.append(d)

    def other_op(self, session: Session, op: int, d: Any) -> None:
        self.other.append((op, d))

    def resumed(self, session: Session) -> None:
        self.events.append(("resumed", session.session_id))

    def suspended(self, session: Session) -> None:
        self.events.append(("suspended", session.session_id))

    def ended(self, session: Session) -> None:
        self.rooms[session.server_id].remove(session)
        self.events.append(("ended", session.session_id))

    def count(self, callback: str, session_id: str = "s1") -> int:
        return self.events.count((callback, session_id))


def frame(op: int, d: Any) -> str:
    return json.dumps({"op": op, "d": d})


def out(conn: Connection) -> list[Any]:
    """Drained outputs: Send -> the decoded message, Close -> ("close", code)."""
    result: list[Any] = []
    for o in conn.poll_output():
        result.append(json.loads(o.text) if isinstance(o, Send) else ("close", o.code))
    return result


def closed_with(conn: Connection) -> int | None:
    outputs = conn.poll_output()
    closes = [o for o in outputs if isinstance(o, Close)]
    assert len(closes) <= 1 and (not closes or outputs[-1] is closes[0])  # Close is always last
    return closes[0].code if closes else None


def identify_d(user: str = "42", sid: str = "s1", token: str = "t1", server: str = "41") -> dict[str, Any]:
    return {
        "server_id": server,
        "user_id": user,
        "session_id": sid,
        "token": token,
        "max_dave_protocol_version": 1,
    }


UDP = {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 41234, "mode": MODES[1]}}


def join(
    gw: Gateway,
    user: str = "42",
    sid: str = "s1",
    token: str = "t1",
    v: int = 8,
    now: float = 0.0,
    select: bool = True,
) -> tuple[Connection, Session]:
    conn = gw.connect(v, now)
    conn.receive(frame(Op.IDENTIFY, identify_d(user, sid, token)), now)
    if select:
        conn.receive(frame(Op.SELECT_PROTOCOL, UDP), now)
    session = conn.session
    assert session is not None and not conn.closed
    conn.poll_output()
    return conn, session


def resume_d(sid: str = "s1", token: str = "t1", seq_ack: int = -1, server: str = "41") -> dict[str, Any]:
    return {"server_id": server, "session_id": sid, "token": token, "seq_ack": seq_ack}


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
def gw(handler: Handler) -> Gateway:
    return Gateway(handler)


# ------------------------------------------------------------------------------------------ happy path


def test_v8_flow_matches_the_spec_transcript(gw: Gateway, handler: Handler) -> None:
    conn = gw.connect(8, 0.0)
    assert [o.text for o in conn.poll_output() if isinstance(o, Send)] == [
        '{"op":8,"d":{"v":8,"heartbeat_interval":13750}}'
    ]
    conn.receive(frame(0, identify_d()), 1.0)
    assert [o.text for o in conn.poll_output() if isinstance(o, Send)] == [
        '{"op":2,"d":{"ssrc":1001,"ip":"127.0.0.1","port":50000,'
        '"modes":["aead_aes256_gcm_rtpsize","aead_xchacha20_poly1305_rtpsize"],"experiments":[]}}'
    ]
    conn.receive(frame(1, UDP), 2.0)
    texts = [o.text for o in conn.poll_output() if isinstance(o, Send)]
    assert texts[0].startswith(
        '{"op":4,"seq":1,"d":{"mode":"aead_xchacha20_poly1305_rtpsize","secret_key":[0,1,'
    )
    op4 = json.loads(texts[0])["d"]
    assert op4["secret_key"] == KEY and op4["dave_protocol_version"] == 0
    assert texts[1:] == ['{"op":11,"seq":2,"d":{"user_ids":[]}}']  # sent inside select_protocol: after op 4

    # A second member; op 5 is relayed through the handler, numbered in the receiver's own sequence.
    other, other_session = join(gw, user="43", sid="s2", token="t2")
    conn.receive(frame(5, {"speaking": 1, "delay": 0, "ssrc": 1001}), 3.0)
    assert out(conn) == []
    assert out(other) == [{"op": 5, "seq": 3, "d": {"user_id": "42", "ssrc": 1001, "speaking": 1}}]
    conn.receive(frame(5, {"speaking": 0, "delay": 0, "ssrc": 1001}), 3.1)  # speaking 0 is relayed too
    assert out(other)[0]["d"]["speaking"] == 0

    session = conn.session
    assert session is not None and session.buffered == 2 and session.seq == 2
    conn.receive(frame(3, {"t": 1754000000000, "seq_ack": 1}), 4.0)
    assert [o.text for o in conn.poll_output() if isinstance(o, Send)] == ['{"op":6,"d":{"t":1754000000000}}']
    assert session.buffered == 1  # op 4 acknowledged, op 11 kept
    conn.receive(frame(3, {"t": 5, "seq_ack": 2}), 5.0)
    assert session.buffered == 0
    assert not conn.closed and gw.sessions["42", "s1"] is session and session.state == "active"


def test_v4_heartbeat_echoes_the_integer_and_nothing_is_numbered(gw: Gateway) -> None:
    conn = gw.connect(4, 0.0)
    assert out(conn) == [{"op": 8, "d": {"v": 4, "heartbeat_interval": 13750}}]
    conn.receive(frame(0, identify_d()), 0.0)
    conn.receive(frame(1, UDP), 0.0)
    messages = out(conn)
    assert [m["op"] for m in messages] == [2, 4, 11]
    assert all("seq" not in m for m in messages)
    conn.receive(frame(3, 1754000000123), 1.0)
    assert out(conn) == [{"op": 6, "d": 1754000000123}]
    session = conn.session
    assert session is not None and session.buffered == 0 and session.seq == 0


def test_v8_client_sending_a_bare_integer_heartbeat_is_acked_not_dropped(gw: Gateway) -> None:
    conn, _ = join(gw)
    conn.receive(frame(3, 12345), 1.0)
    assert out(conn) == [{"op": 6, "d": 12345}]
    assert not conn.closed


def test_heartbeat_resets_the_heartbeat_deadline(gw: Gateway) -> None:
    conn, _ = join(gw, now=0.0)
    assert conn.next_deadline() == pytest.approx(27.5)  # 2 x 13.75 s
    conn.receive(frame(3, {"t": 1, "seq_ack": -1}), 20.0)
    assert conn.next_deadline() == pytest.approx(47.5)
    conn.handle_timer(40.0)
    assert not conn.closed


def test_known_ops_after_identify_are_never_fatal(gw: Gateway, handler: Handler) -> None:
    conn, _ = join(gw)
    ignored = sorted(KNOWN_OPS - {0, 1, 3, 5, 7, 12})
    for op in ignored:
        conn.receive(frame(op, {}), 1.0)
    conn.receive(frame(12, {"audio_ssrc": 1001, "video_ssrc": 0, "rtx_ssrc": 0}), 1.0)
    conn.receive(frame(12, None), 1.0)  # a malformed VIDEO is dropped, not fatal
    assert closed_with(conn) is None
    assert [op for op, _ in handler.other] == ignored
    assert 32 in ignored and set(range(21, 32)) <= set(ignored) and {14, 15, 16} <= set(ignored)
    assert handler.videos == [{"audio_ssrc": 1001, "video_ssrc": 0, "rtx_ssrc": 0}]


def test_messages_sent_during_identify_follow_ready(gw: Gateway, handler: Handler) -> None:
    handler.send_in_identify = (Op.CLIENTS_CONNECT, {"user_ids": ["43"]})
    conn = gw.connect(8, 0.0)
    conn.poll_output()
    conn.receive(frame(0, identify_d()), 0.0)
    assert [(m["op"], m.get("seq")) for m in out(conn)] == [(2, None), (11, 1)]


def test_messages_reach_a_session_between_ready_and_select_protocol(gw: Gateway) -> None:
    newcomer, _ = join(gw, select=False)
    speaker, _ = join(gw, user="43", sid="s2", token="t2")
    speaker.receive(frame(5, {"speaking": 1, "delay": 0, "ssrc": 1002}), 1.0)
    assert out(newcomer) == [{"op": 5, "seq": 1, "d": {"user_id": "43", "ssrc": 1002, "speaking": 1}}]


# ------------------------------------------------------------------------------------------ close codes


@pytest.mark.parametrize("op", [99, 33, -1, 1000])
def test_unknown_op_closes_4001(gw: Gateway, op: int) -> None:
    conn, _ = join(gw)
    conn.receive(frame(op, {}), 1.0)
    assert closed_with(conn) == 4001


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{",
        "[0]",
        '"op"',
        "12",
        "null",
        '{"d":{}}',  # no op
        '{"op":"0","d":{}}',
        '{"op":true,"d":{}}',
        '{"op":1.0,"d":{}}',
        '{"op":3,"d":NaN}',
        "[" * 200000 + "]" * 200000,
    ],
)
def test_undecodable_frames_close_4002(gw: Gateway, text: str) -> None:
    conn, _ = join(gw, select=False)
    conn.receive(text, 1.0)
    assert closed_with(conn) == 4002


def test_binary_and_oversized_frames_close_4002(handler: Handler) -> None:
    gw = Gateway(handler, GatewayConfig(max_frame_bytes=1024))
    conn, _ = join(gw)
    conn.receive(b'{"op":3,"d":1}', 1.0)
    assert closed_with(conn) == 4002
    conn2, _ = join(gw, user="43", sid="s2", token="t2")
    conn2.receive(frame(3, {"t": 1, "pad": "x" * 1000}), 1.0)
    assert closed_with(conn2) == 4002
    conn3, _ = join(gw, user="44", sid="s3", token="t3")
    conn3.receive(frame(3, {"t": 1, "pad": "é" * 600}), 1.0)  # 600 chars but 1200 UTF-8 bytes
    assert closed_with(conn3) == 4002


@pytest.mark.parametrize("op", [1, 3, 5, 12, 15, 16, 32])
def test_ops_before_identify_close_4003(gw: Gateway, handler: Handler, op: int) -> None:
    conn = gw.connect(8, 0.0)
    conn.poll_output()
    conn.receive(frame(op, {}), 1.0)
    assert closed_with(conn) == 4003
    assert handler.other == [] and gw.sessions == {}


def test_bad_token_closes_4004_and_unknown_server_4011(gw: Gateway, handler: Handler) -> None:
    conn = gw.connect(8, 0.0)
    conn.receive(frame(0, identify_d(token="wrong")), 0.0)
    assert out(conn) == [{"op": 8, "d": {"v": 8, "heartbeat_interval": 13750}}, ("close", 4004)]  # no READY
    assert conn.closed and conn.close_code == 4004
    conn = gw.connect(8, 0.0)
    conn.receive(frame(0, identify_d(server="77")), 0.0)
    assert closed_with(conn) == 4011
    assert gw.sessions == {} and handler.count("ended") == 0  # refused sessions never "end"


def test_second_identify_or_resume_closes_4005(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    conn.receive(frame(0, identify_d()), 1.0)
    assert closed_with(conn) == 4005
    assert session.state == "ended" and handler.count("ended") == 1
    conn, _ = join(gw, user="43", sid="s2", token="t2")
    conn.receive(frame(7, resume_d("s2", "t2")), 1.0)
    assert closed_with(conn) == 4005


@pytest.mark.parametrize(
    ("d", "code"),
    [
        (None, 4002),
        ([], 4002),
        ({"server_id": "41", "user_id": "42", "session_id": "s1"}, 4002),  # no token
        ({"server_id": "41", "user_id": "42", "token": "t1"}, 4002),  # no session_id
        ({"user_id": "42", "session_id": "s1", "token": "t1"}, 4002),  # no server_id
        ({"server_id": "41", "session_id": "s1", "token": "t1"}, 4002),  # no user_id
        ({"server_id": "41", "user_id": ["42"], "session_id": "s1", "token": "t1"}, 4002),
        ({"server_id": "41", "user_id": "42", "session_id": 5, "token": "t1"}, 4002),
        ({"server_id": "41", "user_id": "4x2", "session_id": "s1", "token": "t1"}, 4020),
        ({"server_id": "41", "user_id": "42", "session_id": "s1", "token": ""}, 4020),
        ({"server_id": "", "user_id": "42", "session_id": "s1", "token": "t1"}, 4020),
        ({"server_id": "41", "user_id": "99999999999999999999", "session_id": "s1", "token": "t1"}, 4020),
        ({"server_id": "41", "user_id": "42", "session_id": "s" * 300, "token": "t1"}, 4020),
    ],
)
def test_identify_validation(gw: Gateway, handler: Handler, d: Any, code: int) -> None:
    conn = gw.connect(8, 0.0)
    conn.poll_output()
    conn.receive(frame(0, d), 0.0)
    assert closed_with(conn) == code
    assert handler.events == []  # the handler never saw it


def test_identify_accepts_integer_snowflakes_and_extra_fields(gw: Gateway) -> None:
    conn = gw.connect(8, 0.0)
    d = identify_d() | {
        "user_id": 42,
        "server_id": 41,
        "video": True,
        "streams": [],
        "max_secure_frames_version": 0,
    }
    conn.receive(frame(0, d), 0.0)
    session = conn.session
    assert session is not None and (session.user_id, session.server_id) == ("42", "41")
    assert closed_with(conn) is None


@pytest.mark.parametrize(
    ("d", "code", "handler_called"),
    [
        ({"protocol": "tcp", "data": {}}, 4012, False),
        ({"protocol": "UDP", "data": {"address": "1.2.3.4", "port": 1, "mode": MODES[0]}}, 4012, False),
        (
            {"protocol": "udp", "data": {"address": "1.2.3.4", "port": 1, "mode": "xsalsa20_poly1305"}},
            4016,
            True,
        ),
        ({"protocol": "udp"}, 4002, False),
        ({"data": {}}, 4002, False),
        ({"protocol": 1, "data": {}}, 4002, False),
        ("udp", 4002, False),
        ({"protocol": "udp", "data": {"address": "1.2.3.4", "mode": MODES[0]}}, 4002, False),
        ({"protocol": "udp", "data": {"address": "1.2.3.4", "port": 70000, "mode": MODES[0]}}, 4020, False),
        ({"protocol": "webrtc", "data": {"not": "sdp"}}, 4002, False),
    ],
)
def test_select_protocol_errors(
    gw: Gateway, handler: Handler, d: Any, code: int, handler_called: bool
) -> None:
    conn, session = join(gw, select=False)
    conn.receive(frame(1, d), 1.0)
    assert closed_with(conn) == code
    assert handler.select_calls == int(handler_called)
    assert session.state == "ended" and handler.count("ended") == 1


def test_second_select_protocol_closes_4020(gw: Gateway, handler: Handler) -> None:
    conn, _ = join(gw)
    conn.receive(frame(1, UDP), 1.0)
    assert closed_with(conn) == 4020
    assert handler.select_calls == 1


def test_webrtc_select_protocol_reaches_the_handler(gw: Gateway, handler: Handler) -> None:
    conn, _ = join(gw, select=False)
    sdp = "a=ice-ufrag:x\na=ice-pwd:y\na=fingerprint:sha-256 AB"
    conn.receive(frame(1, {"protocol": "webrtc", "data": sdp, "sdp": sdp}), 1.0)
    messages = out(conn)
    assert [(m["op"], m.get("seq")) for m in messages] == [(4, 1)]
    assert messages[0]["d"]["sdp"] == "m=audio 50001 ICE/SDP"


@pytest.mark.parametrize(
    ("d", "code"),
    [
        ({"speaking": 1, "delay": 0, "ssrc": 999}, 4020),  # not the sender's SSRC (handler)
        ({"speaking": 1, "delay": 0}, 4002),
        ({"speaking": "1", "ssrc": 1001}, 4002),
        ({"speaking": -1, "ssrc": 1001}, 4020),
        ({"speaking": 1, "ssrc": 2**32}, 4020),
        (None, 4002),
    ],
)
def test_speaking_errors(gw: Gateway, d: Any, code: int) -> None:
    conn, _ = join(gw)
    conn.receive(frame(5, d), 1.0)
    assert closed_with(conn) == code


def test_identify_timeout_closes_4009(gw: Gateway) -> None:
    conn = gw.connect(8, 100.0)
    conn.poll_output()
    assert conn.next_deadline() == pytest.approx(130.0)
    conn.handle_timer(129.9)
    assert closed_with(conn) is None
    conn.handle_timer(130.0)
    assert closed_with(conn) == 4009
    assert conn.next_deadline() is None


def test_heartbeat_timeout_closes_4009_and_keeps_the_session_for_resume(
    gw: Gateway, handler: Handler
) -> None:
    conn, session = join(gw, now=0.0)
    conn.handle_timer(27.4)
    assert closed_with(conn) is None
    conn.handle_timer(27.5)
    assert closed_with(conn) == 4009
    assert session.state == "suspended" and handler.count("suspended") == 1
    new = gw.connect(8, 28.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 28.0)
    assert [m["op"] for m in out(new)] == [8, 9]


def test_heartbeat_seq_ack_errors(gw: Gateway) -> None:
    conn, _ = join(gw)
    conn.receive(frame(3, {"t": 1, "seq_ack": "2"}), 1.0)
    assert closed_with(conn) == 4002
    conn, _ = join(gw, user="43", sid="s2", token="t2")
    conn.receive(frame(3, {"t": 1, "seq_ack": 70000}), 1.0)
    assert closed_with(conn) == 4020


def test_unsupported_version_closes_4020_without_hello(gw: Gateway) -> None:
    for v in (None, 0, 3, 9):
        conn = gw.connect(v, 0.0)
        assert out(conn) == [("close", 4020)]
        assert conn.closed and conn.next_deadline() is None
    for v in range(4, 9):
        assert gw.accepts_version(v)
        assert out(gw.connect(v, 0.0)) == [{"op": 8, "d": {"v": v, "heartbeat_interval": 13750}}]


def test_parse_version() -> None:
    assert parse_version("v=8") == 8
    assert parse_version("?v=8") == 8
    assert parse_version("/?v=8") == 8
    assert parse_version("/?encoding=json&v=4") == 4
    assert parse_version("/voice?v=7&x=1") == 7
    for bad in ("", "/", "?", "v=", "?v=eight", "?v=-8", "?v=8.0", "?v= 8", "/v=8", "?x=8", "?v=99999"):
        assert parse_version(bad) is None, bad


def test_handler_crash_closes_4015_and_ends_the_session(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    handler.crash_in_speaking = True
    conn.receive(frame(5, {"speaking": 1, "delay": 0, "ssrc": 1001}), 1.0)
    assert closed_with(conn) == 4015
    assert session.state == "ended" and handler.count("ended") == 1 and handler.count("suspended") == 0


@pytest.mark.parametrize(
    ("code", "ends"), [(1000, True), (1001, True), (4000, False), (1006, False), (None, False)]
)
def test_a_client_close_1000_or_1001_ends_the_session_others_suspend(
    gw: Gateway, handler: Handler, code: int | None, ends: bool
) -> None:
    """1000/1001 from the client is a leave (discord.py disconnect(), djs destroy(), a closed tab);
    no close frame or any other code keeps the RESUME window."""
    conn, session = join(gw)
    conn.transport_closed(1.0, code)
    assert session.state == ("ended" if ends else "suspended")
    assert (handler.count("ended"), handler.count("suspended")) == ((1, 0) if ends else (0, 1))
    new = gw.connect(8, 2.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 2.0)
    assert closed_with(new) == (4006 if ends else None)


def test_session_start_protocol_and_end_are_logged_without_the_token(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastsfu.discord")
    conn, session = join(gw)
    conn.transport_closed(1.0, 1000)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        "discord session started: user 42 server_id 41 v8",
        "discord session protocol: user 42 server_id 41 protocol udp",
        "discord session ended: user 42 server_id 41 protocol udp: the client closed with 1000",
    ]
    assert session.end_reason == "the client closed with 1000"
    conn, session = join(gw, sid="s2", now=2.0)
    conn.transport_closed(3.0)
    gw.handle_timer(3.0 + gw.config.resume_grace)
    lines = [r.getMessage() for r in caplog.records][3:]
    assert lines[-2:] == [
        "discord session suspended for RESUME: user 42 server_id 41 protocol udp: no close frame",
        "discord session ended: user 42 server_id 41 protocol udp: RESUME grace expired",
    ]
    assert not any("t1" in r.getMessage() for r in caplog.records)  # the token


# ------------------------------------------------------------------------------------------ resume


def test_resume_replays_exactly_the_unacked_messages_in_order(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)  # op 4 = seq 1, op 11 = seq 2
    for i in range(3):  # seq 3, 4, 5
        session.send(Op.SPEAKING, {"user_id": "43", "ssrc": 2000 + i, "speaking": 1})
    assert [m["seq"] for m in out(conn)] == [3, 4, 5]
    conn.receive(frame(3, {"t": 1, "seq_ack": 3}), 1.0)
    conn.transport_closed(2.0)
    assert session.state == "suspended" and session.connection is None
    assert handler.count("suspended") == 1 and handler.count("ended") == 0
    session.send(Op.CLIENT_DISCONNECT, {"user_id": "43"})  # seq 6, buffered while suspended
    session.send(Op.MEDIA_SINK_WANTS, {"any": 100}, replayable=False)  # dropped: nobody to deliver it to

    new = gw.connect(8, 3.0)
    new.poll_output()
    new.receive(frame(7, resume_d(seq_ack=4)), 3.0)  # the client got seq 4 but never acked it
    messages = out(new)
    assert messages == [
        {"op": 9, "d": None},
        {"op": 5, "seq": 5, "d": {"user_id": "43", "ssrc": 2002, "speaking": 1}},
        {"op": 13, "seq": 6, "d": {"user_id": "43"}},
    ]
    assert handler.count("resumed") == 1 and session.connection is new and session.state == "active"
    assert handler.count("identify") == 1 and handler.select_calls == 1  # no new READY or op 4
    session.send(Op.SPEAKING, {"user_id": "43", "ssrc": 1, "speaking": 0})
    assert out(new)[0]["seq"] == 7
    new.receive(frame(3, {"t": 2, "seq_ack": 7}), 4.0)
    assert session.buffered == 0


def test_resume_with_everything_acked_replays_nothing(gw: Gateway) -> None:
    conn, session = join(gw)
    conn.transport_closed(1.0)
    new = gw.connect(8, 2.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 2.0)
    assert out(new)[1:] == [{"op": 9, "d": None}]


def test_resume_takes_over_a_still_attached_connection(gw: Gateway, handler: Handler) -> None:
    old, session = join(gw)
    new = gw.connect(8, 1.0)
    new.receive(frame(7, resume_d(seq_ack=-1)), 1.0)
    assert closed_with(old) == 4014 and old.closed
    messages = out(new)
    assert [(m["op"], m.get("seq")) for m in messages] == [(8, None), (9, None), (4, 1), (11, 2)]
    assert session.connection is new and session.state == "active"
    assert handler.count("suspended") == 0 and handler.count("ended") == 0 and handler.count("resumed") == 1
    old.transport_closed(2.0)  # the old socket's late close does not touch the moved session
    assert session.state == "active"


def test_resume_on_v4_answers_op9_and_replays_nothing(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw, v=4)
    conn.transport_closed(1.0)
    session.send(Op.SPEAKING, {"user_id": "43", "ssrc": 5, "speaking": 1})  # lost: no replay before v8
    new = gw.connect(4, 2.0)
    new.receive(frame(7, {"server_id": "41", "session_id": "s1", "token": "t1"}), 2.0)
    assert out(new) == [{"op": 8, "d": {"v": 4, "heartbeat_interval": 13750}}, {"op": 9, "d": None}]
    assert handler.count("resumed") == 1


@pytest.mark.parametrize(
    "d",
    [
        resume_d(sid="nope"),
        resume_d(token="t2"),  # valid for another session, not this one
        resume_d(server="77"),
    ],
)
def test_resume_with_wrong_credentials_closes_4006_and_spares_the_session(
    gw: Gateway, handler: Handler, d: dict[str, Any]
) -> None:
    conn, session = join(gw)
    conn.transport_closed(1.0)
    bad = gw.connect(8, 2.0)
    bad.receive(frame(7, d), 2.0)
    assert closed_with(bad) == 4006
    assert session.state == "suspended" and handler.count("ended") == 0
    good = gw.connect(8, 3.0)
    good.receive(frame(7, resume_d(seq_ack=2)), 3.0)
    assert closed_with(good) is None and session.state == "active"


def test_resume_shape_errors(gw: Gateway) -> None:
    for d, code in [
        (None, 4002),
        ({"session_id": "s1", "token": "t1"}, 4002),
        (resume_d() | {"seq_ack": "x"}, 4002),
    ]:
        conn = gw.connect(8, 0.0)
        conn.receive(frame(7, d), 0.0)
        assert closed_with(conn) == code


def test_resume_with_a_different_version_closes_4006(gw: Gateway) -> None:
    conn, _ = join(gw, v=8)
    conn.transport_closed(1.0)
    new = gw.connect(7, 2.0)
    new.receive(frame(7, resume_d()), 2.0)
    assert closed_with(new) == 4006


def test_resume_with_an_unreplayable_gap_closes_4006_and_ends_the_session(handler: Handler) -> None:
    gw = Gateway(handler, GatewayConfig(replay_buffer=4))
    conn, session = join(gw)  # seq 1, 2
    for i in range(6):  # seq 3..8; the buffer keeps 5..8
        session.send(Op.SPEAKING, {"user_id": "43", "ssrc": i, "speaking": 1})
    assert session.buffered == 4
    conn.transport_closed(1.0)
    new = gw.connect(8, 2.0)
    new.receive(frame(7, resume_d(seq_ack=3)), 2.0)  # needs 4, which is gone
    assert closed_with(new) == 4006
    assert session.state == "ended" and handler.count("ended") == 1
    again = gw.connect(8, 3.0)
    again.receive(frame(7, resume_d(seq_ack=8)), 3.0)
    assert closed_with(again) == 4006  # ended sessions cannot be resumed


def test_resume_with_an_ack_below_a_heartbeat_ack_is_a_gap(gw: Gateway) -> None:
    conn, session = join(gw)
    conn.receive(frame(3, {"t": 1, "seq_ack": 2}), 1.0)  # the client said it has 1 and 2
    conn.transport_closed(1.0)
    new = gw.connect(8, 2.0)
    new.receive(frame(7, resume_d(seq_ack=1)), 2.0)  # ... and now needs 2 again: trimmed
    assert closed_with(new) == 4006 and session.state == "ended"


def test_resume_acking_a_seq_never_sent_closes_4006(gw: Gateway) -> None:
    conn, session = join(gw)  # sent seq 1, 2
    conn.transport_closed(1.0)
    new = gw.connect(8, 2.0)
    new.receive(frame(7, resume_d(seq_ack=50)), 2.0)
    assert closed_with(new) == 4006


def test_resume_after_4015(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    session.close(CloseCode.VOICE_SERVER_CRASHED, "restarting")
    assert closed_with(conn) == 4015
    assert session.state == "suspended" and handler.count("suspended") == 1 and handler.count("ended") == 0
    new = gw.connect(8, 1.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 1.0)
    assert [m["op"] for m in out(new)] == [8, 9]
    assert session.state == "active" and handler.count("resumed") == 1


@pytest.mark.parametrize("code", [4014, 4022])
def test_no_resume_after_a_kick_or_call_terminated(gw: Gateway, handler: Handler, code: int) -> None:
    conn, session = join(gw)
    session.close(code)
    assert closed_with(conn) == code
    assert session.state == "ended" and handler.count("ended") == 1 and handler.count("suspended") == 0
    session.close(code)  # idempotent
    session.send(Op.SPEAKING, {})  # no-op once ended
    assert handler.count("ended") == 1 and conn.poll_output() == []
    new = gw.connect(8, 1.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 1.0)
    assert closed_with(new) == 4006


def test_close_codes_outside_4000_4999_are_refused(gw: Gateway) -> None:
    conn, session = join(gw)
    with pytest.raises(ValueError):
        session.close(1000)  # never 1000 for a kick (docs/discord.md#close-codes)
    with pytest.raises(ValueError):
        GatewayError(1000)
    with pytest.raises(ValueError):
        session.send(Op.READY, {})  # the core's own messages
    assert not conn.closed


def test_grace_expiry_ends_the_session_once(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    conn.transport_closed(10.0)
    assert gw.next_deadline() == pytest.approx(70.0)
    gw.handle_timer(69.9)
    assert session.state == "suspended"
    gw.handle_timer(70.0)
    assert session.state == "ended" and handler.count("ended") == 1
    gw.handle_timer(200.0)
    assert handler.count("ended") == 1 and gw.next_deadline() is None and gw.sessions == {}
    new = gw.connect(8, 71.0)
    new.receive(frame(7, resume_d(seq_ack=2)), 71.0)
    assert closed_with(new) == 4006


def test_grace_expiry_also_happens_on_other_connections_traffic(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    conn.transport_closed(0.0)
    other, _ = join(gw, user="43", sid="s2", token="t2", now=1.0)
    other.receive(frame(3, 1), 61.0)
    assert session.state == "ended" and handler.count("ended") == 1


def test_transport_closed_before_identify_drops_everything(gw: Gateway, handler: Handler) -> None:
    conn = gw.connect(8, 0.0)
    conn.transport_closed(1.0)
    assert conn.closed and gw.connection_count == 0 and handler.events == []
    conn.receive(frame(0, identify_d()), 2.0)  # ignored after the socket is gone
    assert gw.sessions == {}


def test_identify_replaces_the_same_users_session(gw: Gateway, handler: Handler) -> None:
    old, old_session = join(gw, sid="s1")
    new, new_session = join(gw, sid="s9", token="t2")
    assert closed_with(old) == 4014
    assert old_session.state == "ended" and handler.count("ended", "s1") == 1
    assert gw.sessions == {("42", "s9"): new_session} and handler.rooms["41"] == [new_session]
    bad = gw.connect(8, 1.0)
    bad.receive(frame(7, resume_d(sid="s1")), 1.0)
    assert closed_with(bad) == 4006


def test_session_ids_are_per_user_and_collisions_never_interfere(gw: Gateway, handler: Handler) -> None:
    """Another user's IDENTIFY with the same session_id is a session of its own; each RESUMEs its
    own (the token picks it); a RESUME that matches no session, or two, is 4006 and touches none."""
    victim_conn, victim = join(gw, user="42", sid="s1", token="t1")
    other_conn, other = join(gw, user="43", sid="s1", token="t2")
    assert closed_with(victim_conn) is None and victim.state == other.state == "active"
    assert gw.sessions == {("42", "s1"): victim, ("43", "s1"): other} and handler.count("ended") == 0
    assert gw.session("s1", "42") is victim and gw.session("s1", "43") is other
    victim_conn.transport_closed(1.0)
    other_conn.transport_closed(1.0)
    for d in (resume_d(token="t3"), resume_d(token="t1", server="77")):
        bad = gw.connect(8, 2.0)
        bad.receive(frame(7, d), 2.0)
        assert closed_with(bad) == 4006
    assert victim.state == other.state == "suspended"
    mine = gw.connect(8, 3.0)
    mine.receive(frame(7, resume_d(token="t2", seq_ack=2)), 3.0)
    assert mine.session is other and other.state == "active" and victim.state == "suspended"
    theirs = gw.connect(8, 3.0)
    theirs.receive(frame(7, resume_d(token="t1", seq_ack=2)), 3.0)
    assert theirs.session is victim and victim.state == "active" and handler.count("ended") == 0


def test_resume_matching_two_users_sessions_is_refused(gw: Gateway, handler: Handler) -> None:
    # This test handler accepts one token for several users: the core cannot tell them apart.
    first, a = join(gw, user="42", sid="s1", token="t1")
    second, b = join(gw, user="43", sid="s1", token="t1")
    bad = gw.connect(8, 1.0)
    bad.receive(frame(7, resume_d(token="t1", seq_ack=2)), 1.0)
    assert closed_with(bad) == 4006
    assert a.connection is first and b.connection is second and handler.count("ended") == 0


# ------------------------------------------------------------------------------------------ bounds, seq


def test_replay_buffer_is_bounded(handler: Handler) -> None:
    gw = Gateway(handler, GatewayConfig(replay_buffer=8))
    conn, session = join(gw)
    for i in range(100):
        session.send(Op.SPEAKING, {"ssrc": i})
    assert session.buffered == 8 and session.seq == 102


def test_suspended_sessions_are_bounded(handler: Handler) -> None:
    gw = Gateway(handler, GatewayConfig(max_suspended=2))
    sessions = []
    for i, token in enumerate(["t1", "t2", "t3"]):
        conn, session = join(gw, user=str(42 + i), sid=f"s{i}", token=token, now=float(i))
        conn.transport_closed(float(i))
        sessions.append(session)
    assert gw.suspended_count == 2
    assert [s.state for s in sessions] == ["ended", "suspended", "suspended"]
    assert handler.count("ended", "s0") == 1


def test_undrained_output_is_bounded(handler: Handler) -> None:
    gw = Gateway(handler, GatewayConfig(replay_buffer=4, max_pending_output=20))
    conn, session = join(gw)
    for i in range(40):
        session.send(Op.SPEAKING, {"ssrc": i})
    outputs = conn.poll_output()
    assert outputs == [Close(4009, "client is not reading")]
    assert session.state == "suspended"  # RESUME can replay from the (bounded) buffer


def test_seq_wraps_past_65535_to_1(gw: Gateway) -> None:
    assert [wire_seq(n) for n in (1, 2, 65534, 65535, 65536, 65537, 131070, 131071)] == [
        1,
        2,
        65534,
        65535,
        1,
        2,
        65535,
        1,
    ]
    conn, session = join(gw)  # 2 numbered messages
    conn.transport_closed(0.0)
    for i in range(65535):  # numbers 3 .. 65537
        session.send(Op.SPEAKING, {"i": i})
    assert session.seq == 2
    new = gw.connect(8, 1.0)
    new.receive(frame(7, resume_d(seq_ack=65535)), 1.0)
    messages = out(new)[1:]
    assert [(m["op"], m.get("seq")) for m in messages] == [(9, None), (5, 1), (5, 2)]
    assert 0 not in [m.get("seq") for m in messages]
    new.receive(frame(3, {"t": 0, "seq_ack": 1}), 2.0)  # an ack after the wrap trims correctly
    assert session.buffered == 1


# ------------------------------------------------------------------------------------------ shutdown


def test_shutdown_closes_every_connection_with_4015(gw: Gateway, handler: Handler) -> None:
    a, sa = join(gw)
    b, sb = join(gw, user="43", sid="s2", token="t2")
    pending = gw.connect(8, 0.0)
    pending.poll_output()
    gw.shutdown()
    assert [closed_with(c) for c in (a, b, pending)] == [4015, 4015, 4015]
    assert sa.state == sb.state == "ended"
    assert handler.count("ended", "s1") == handler.count("ended", "s2") == 1
    assert handler.count("suspended", "s1") == 0 and gw.connection_count == 0
    assert out(gw.connect(8, 1.0)) == [("close", 4015)]


def test_shutdown_can_keep_sessions_suspended(gw: Gateway, handler: Handler) -> None:
    conn, session = join(gw)
    gw.shutdown(end_sessions=False, now=5.0)
    assert (
        closed_with(conn) == 4015
        and session.state == "suspended"
        and gw.next_deadline() == pytest.approx(65.0)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"replay_buffer": 0},
        {"replay_buffer": 40000},  # half the u16 seq space or more: seq_ack would be ambiguous
        {"max_suspended": 0},
        {"replay_buffer": 256, "max_pending_output": 100},  # a RESUME replay must fit the output queue
        {"min_version": 9},
        {"heartbeat_timeout": 0},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GatewayConfig(**kwargs)
    assert GatewayConfig().heartbeat_deadline == pytest.approx(27.5)
    assert GatewayConfig(heartbeat_timeout=45).heartbeat_deadline == 45
