"""Sans-I/O core of the voice gateway (docs/discord.md): sessions, connections, RESUME
(docs/discord.md#heartbeats-sequence-numbers-and-resume).

The WebSocket edge feeds frames and times in and drains outputs; the media side is a GatewayHandler.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeAlias

from fastsfu.discord import payloads
from fastsfu.discord.errors import GatewayError
from fastsfu.discord.opcodes import (
    CLIENT_LEAVE_CLOSE_CODES,
    CLOSE_MEANINGS,
    CORE_OPS,
    RESUMABLE_CLOSE_CODES,
    CloseCode,
    Op,
)

__all__ = [
    "Close",
    "Connection",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "GatewayHandler",
    "Output",
    "Send",
    "Session",
    "parse_version",
    "wire_seq",
]

log = logging.getLogger("fastsfu.discord")

SEQ_MODULUS = 0xFFFF  # seq runs 1..65535 then 1 again: a u16 that skips 0
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 §5.5: control frame payload 125 bytes, 2 of them the code


# ---------------------------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Send:
    """Send this text frame."""

    text: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with this code and reason; the last output of a Connection."""

    code: int
    reason: str


Output: TypeAlias = Send | Close


# One encoder for every message: json.dumps with separators builds a new one per call, which
# costs a third of a small message's text (a join into a room of 50 sends about 350).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _message(op: int, d: Any, seq: int | None = None) -> str:
    # Compact JSON text, "seq" between "op" and "d" as in docs/discord.md#connection-flow.
    obj = {"op": op, "d": d} if seq is None else {"op": op, "seq": seq, "d": d}
    return _encode(obj)


def _reason(reason: str, code: int) -> str:
    reason = reason or CLOSE_MEANINGS.get(code, "")
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return raw[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


def wire_seq(n: int) -> int:
    """The on-the-wire `seq` of the n-th numbered message (n >= 1): 1..65535, wrapping past 0."""
    return (n - 1) % SEQ_MODULUS + 1


def parse_version(query_string: str) -> int | None:
    """The `v` query parameter of the upgrade request: "v=8", "?v=8" or "/?v=8" -> 8.

    None when it is missing or not a plain decimal number; the range check is Gateway.accepts_version.
    """
    path, sep, query = query_string.partition("?")
    if not sep:
        if path.startswith("/"):
            return None  # a path without a query
        query = path
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("v")
    if not values:
        return None
    value = values[0]
    if not (value.isascii() and value.isdecimal()) or len(value) > 4:
        return None
    return int(value)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class GatewayConfig:
    """Server-wide gateway settings (docs/discord.md#heartbeats-sequence-numbers-and-resume)."""

    heartbeat_interval_ms: int = 13750  # HELLO interval, 13-15 s
    identify_timeout: float = 30.0  # seconds from connect to IDENTIFY/RESUME, else 4009
    heartbeat_timeout: float | None = None  # seconds without op 3, else 4009; None = 2x the interval
    resume_grace: float = 60.0  # seconds a suspended session waits for RESUME
    replay_buffer: int = 256  # numbered messages kept per session for RESUME (v8)
    max_suspended: int = 1024  # suspended sessions kept; the oldest ends when exceeded
    min_version: int = 4  # v1-3 are deprecated (docs/discord.md#heartbeats-sequence-numbers-and-resume)
    max_version: int = 8  # v9 (channel_id) is not implemented
    max_frame_bytes: int = 64 * 1024  # larger client frames close 4002
    max_pending_output: int = 1024  # undrained outputs before a client that does not read is dropped

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms < 1 or self.identify_timeout <= 0 or self.resume_grace < 0:
            raise ValueError("heartbeat_interval_ms and identify_timeout must be > 0, resume_grace >= 0")
        if self.heartbeat_timeout is not None and self.heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        # A buffer of half the u16 seq space or more would make seq_ack ambiguous after a wrap.
        if not 1 <= self.replay_buffer <= SEQ_MODULUS // 2:
            raise ValueError(f"replay_buffer must be 1..{SEQ_MODULUS // 2}")
        if self.max_suspended < 1 or self.max_frame_bytes < 256 or self.max_pending_output < 16:
            raise ValueError("max_suspended >= 1, max_frame_bytes >= 256, max_pending_output >= 16")
        if self.max_pending_output < self.replay_buffer + 16:
            raise ValueError("max_pending_output must exceed replay_buffer: a RESUME replays it at once")
        if not 1 <= self.min_version <= self.max_version:
            raise ValueError("min_version must be 1..max_version")

    @property
    def heartbeat_deadline(self) -> float:
        """Seconds allowed between two heartbeats (close 4009 after ~2x the interval)."""
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        return 2 * self.heartbeat_interval_ms / 1000


# ---------------------------------------------------------------------------------------------- handler


class GatewayHandler(Protocol):
    """The media side of the gateway, called synchronously by the core.

    Raise GatewayError to refuse something: the WebSocket closes with its code. Subclass this
    Protocol explicitly to inherit the no-op defaults of video, other_op, resumed and suspended.
    """

    def identify(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        """A valid IDENTIFY (op 0). Return READY's d ({ssrc, ip, port, modes, experiments, streams}).

        Raise GatewayError(4004) for bad credentials (a token that does not belong to user_id
        included: the core trusts user_id once this returns), GatewayError(4011) for an unknown
        server. Messages sent to `session` from here are delivered after READY. Another session of
        the same user with the same session_id, or in the same server_id, may still exist during
        this call: it ends (ended(), its WebSocket closed 4014) right after this returns and before
        READY is sent. Other users' sessions are never touched, whatever their session_id.
        Do not call session.close() here: raise GatewayError instead. If this raises, ended() is
        not called for `session`.
        """
        ...

    def select_protocol(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        """SELECT_PROTOCOL (op 1), shape-checked, protocol "udp" or "webrtc". Return op 4's d.

        Raise GatewayError(4016) for an unknown mode, GatewayError(4020) for other bad values.
        Messages sent to `session` from here are delivered after op 4.
        """
        ...

    def speaking(self, session: Session, d: dict[str, Any]) -> None:
        """SPEAKING (op 5) with integer speaking and ssrc; raise GatewayError(4020) for another's SSRC."""
        ...

    def video(self, session: Session, d: dict[str, Any]) -> None:
        """VIDEO (op 12) with an object d (a non-object one is dropped)."""
        return None

    def other_op(self, session: Session, op: int, d: Any) -> None:
        """Any other known op after IDENTIFY (14, 15, 16, 32, JSON DAVE 21-31, ...): ignored by default."""
        return None

    def resumed(self, session: Session) -> None:
        """A RESUME succeeded; op 9 and the replay have been queued."""
        return None

    def suspended(self, session: Session) -> None:
        """The WebSocket went away; the session waits resume_grace seconds for RESUME (media flows on)."""
        return None

    def ended(self, session: Session) -> None:
        """The session is gone for good (closed, kicked, grace expired, replaced): exactly once."""
        ...


# ---------------------------------------------------------------------------------------------- session

SessionState = Literal["identifying", "active", "suspended", "ended"]


class Session:
    """One voice session: outlives its WebSocket for RESUME and numbers its messages (v8)."""

    def __init__(self, gateway: Gateway, creds: payloads.Credentials, version: int) -> None:
        self.server_id = creds.server_id
        self.user_id = creds.user_id
        self.session_id = creds.session_id
        self.token = creds.token
        self.version = version
        self.attachment: Any = None  # the handler's own per-session state
        self.protocol: str | None = None  # set by a successful SELECT_PROTOCOL
        self.suspended_at: float | None = None
        self.end_reason: str | None = None  # why it ended (logged; set before handler.ended())
        self._gateway = gateway
        self._state: SessionState = "identifying"
        self._connection: Connection | None = None
        self._hold: list[tuple[int, Any, bool]] | None = None  # sends deferred behind READY / op 4
        self._count = 0  # numbered messages so far; the wire seq is wire_seq(_count)
        self._floor = 0  # highest number no longer in the buffer (acked or evicted)
        self._buffer: deque[tuple[int, str]] = deque()  # (number, text) with number > _floor

    def __repr__(self) -> str:
        return f"<Session {self.session_id!r} user {self.user_id} server {self.server_id} {self._state}>"

    @property
    def key(self) -> tuple[str, str]:
        """(user_id, session_id): session ids are the user's, so only together do they name a session."""
        return (self.user_id, self.session_id)

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connection(self) -> Connection | None:
        return self._connection

    @property
    def seq(self) -> int:
        """The seq of the last numbered message (0 before the first; the first is 1)."""
        return wire_seq(self._count) if self._count else 0

    @property
    def buffered(self) -> int:
        """Numbered messages kept for replay (not yet acknowledged)."""
        return len(self._buffer)

    def send(self, op: int, d: Any, replayable: bool = True) -> None:
        """Send a server message at any time (also while suspended).

        replayable (v8+): numbered with "seq", kept until acknowledged and replayed after RESUME.
        Otherwise it is dropped while no WebSocket is attached. No-op after the session ended.
        """
        if op in CORE_OPS:
            raise ValueError(f"op {op} is sent by the gateway core only")
        if self._state == "ended":
            return
        if self._hold is not None:
            self._hold.append((op, d, replayable))
        else:
            self._send_now(op, d, replayable)

    def close(self, code: int, reason: str = "", now: float | None = None) -> None:
        """Server-initiated close: 4014 kicked/moved, 4022 room closed, 4015 restart, ...

        After 4015 (and 4013) the session stays suspended for RESUME; after any other code it ends.
        `now` defaults to the latest time the gateway has seen.
        """
        if not 4000 <= code <= 4999:
            raise ValueError(f"voice close codes are 4000-4999, not {code}")  # never 1000 for a kick
        if self._state == "identifying":
            raise RuntimeError("raise GatewayError from identify() instead of closing the session")
        if self._state == "ended":
            return
        when = self._gateway._clock(now)
        if self._connection is not None:
            self._connection._finish(when, code, reason, resumable=code in RESUMABLE_CLOSE_CODES)
        elif code not in RESUMABLE_CLOSE_CODES:
            self._gateway._end(self, code, reason)

    # -------------------------------------------------------------- internals

    def _send_now(self, op: int, d: Any, replayable: bool) -> None:
        conn = self._connection
        if replayable and self.version >= 8:  # v4-7: no seq, no replay
            text = _message(op, d, wire_seq(self._count + 1))
            self._count += 1
            if len(self._buffer) >= self._gateway.config.replay_buffer:
                self._floor = self._buffer.popleft()[0]  # a later RESUME needing it gets 4006
            self._buffer.append((self._count, text))
        elif conn is None:
            return
        else:
            text = _message(op, d)
        if conn is not None:
            conn._emit(Send(text))

    def _resolve_ack(self, seq_ack: int) -> int | None:
        """A client seq_ack -> the number of the message it names; None if never sent."""
        if seq_ack <= 0:
            return 0  # -1 (or 0): nothing numbered received yet
        # The latest message whose wire seq is seq_ack; unambiguous because the buffer holds
        # less than half the seq space (GatewayConfig).
        number = self._count - (wire_seq(self._count) - seq_ack) % SEQ_MODULUS
        return number if number >= 1 else None

    def _ack(self, number: int) -> None:
        """Drop the buffered messages up to `number` (trimmed by each seq_ack)."""
        if number <= self._floor:
            return
        while self._buffer and self._buffer[0][0] <= number:
            self._buffer.popleft()
        self._floor = number


# ---------------------------------------------------------------------------------------------- connection

ConnState = Literal["hello", "ready", "relayed", "closed"]


class Connection:
    """One WebSocket: feed receive()/handle_timer()/transport_closed(), drain poll_output()."""

    def __init__(self, gateway: Gateway, version: int | None, now: float, greet: bool = True) -> None:
        self.version = version or 0
        self._gateway = gateway
        self._state: ConnState = "hello"
        self._out: list[Output] = []
        self._session: Session | None = None
        self._identify_deadline = now + gateway.config.identify_timeout
        self._last_beat = now
        self.close_code: int | None = None
        # Called whenever output is queued, also from other connections' steps (a relayed op 5):
        # the edge wakes up its writer and drains poll_output().
        self.on_output: Callable[[], None] | None = None
        if gateway._shutting_down is not None:
            self._finish(now, *gateway._shutting_down)
        elif not gateway.accepts_version(version):
            # A missing v or v<4 (or one we do not implement) -> 4020 (or HTTP 400 at the edge).
            self._finish(now, CloseCode.BAD_REQUEST, f"unsupported gateway version {version}")
        else:
            gateway._connections.add(self)
            if greet:  # HELLO at once (unless a cluster edge already sent it: docs/cluster.md#bridging)
                hello = {"v": self.version, "heartbeat_interval": gateway.config.heartbeat_interval_ms}
                self._emit(Send(_message(Op.HELLO, hello)))

    def __repr__(self) -> str:
        return f"<Connection v{self.version} {self._state} {self._session!r}>"

    @property
    def session(self) -> Session | None:
        return self._session

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # -------------------------------------------------------------- the edge's interface

    def poll_output(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        if self._state == "hello":
            return self._identify_deadline
        if self._state == "ready":
            return self._last_beat + self._gateway.config.heartbeat_deadline
        return None

    def handle_timer(self, now: float) -> None:
        self._gateway._tick(now)
        if self._state == "hello" and now >= self._identify_deadline:
            self._finish(now, CloseCode.SESSION_TIMEOUT, "no IDENTIFY in time")
        elif self._state == "ready" and now >= self._last_beat + self._gateway.config.heartbeat_deadline:
            # A silent client is most likely a dead network path: keep the session for RESUME.
            self._finish(now, CloseCode.SESSION_TIMEOUT, "no heartbeat in time", resumable=True)

    def relay(self) -> None:
        """This WebSocket's session runs on another node, its frames relayed there (docs/cluster.md,
        "Bridging"): no frames or timers here any more, but shutdown() still closes the socket."""
        if self._state == "hello":
            self._state = "relayed"

    def transport_closed(self, now: float, code: int | None = None) -> None:
        """The socket went away; `code` is the status of the client's close frame (None: none).

        A client's 1000 or 1001 is a leave (CLIENT_LEAVE_CLOSE_CODES): the session ends at once.
        A drop or any other code suspends an identified session for RESUME.
        """
        self._gateway._tick(now)
        if code in CLIENT_LEAVE_CLOSE_CODES:
            self._finish(now, None, f"the client closed with {code}")
        else:
            why = "no close frame" if code is None else f"the client closed with {code}"
            self._finish(now, None, why, resumable=True)

    def close(self, code: int, reason: str = "", now: float | None = None) -> None:
        """Close from the edge (e.g. 4021 rate limited); the session follows Session.close's rule."""
        if not 4000 <= code <= 4999:
            raise ValueError(f"voice close codes are 4000-4999, not {code}")
        self._finish(self._gateway._clock(now), code, reason, resumable=code in RESUMABLE_CLOSE_CODES)

    def receive(self, frame: str | bytes, now: float) -> None:
        """One WebSocket message (str for text frames, bytes for binary ones)."""
        self._gateway._tick(now)
        if self._state in ("closed", "relayed"):
            return
        try:
            op, d = payloads.decode(frame, self._gateway.config.max_frame_bytes)
            if self._state == "hello" and op not in (Op.IDENTIFY, Op.RESUME):
                raise GatewayError(CloseCode.NOT_AUTHENTICATED, f"op {op} before IDENTIFY")  # 4003
            self._dispatch(op, d, now)
        except GatewayError as exc:
            self._finish(now, exc.code, exc.reason, resumable=exc.code in RESUMABLE_CLOSE_CODES)
        except Exception:
            # A bug (ours or the handler's): "voice server crashed" (4015), but the session's state
            # is suspect, so it ends instead of waiting for RESUME; the client's RESUME gets 4006.
            log.exception("voice gateway: op handling failed on %r", self)
            self._finish(now, CloseCode.VOICE_SERVER_CRASHED, "internal error", resumable=False)

    # -------------------------------------------------------------- ops

    def _dispatch(self, op: int, d: Any, now: float) -> None:
        if op == Op.IDENTIFY:
            self._identify(d, now)
        elif op == Op.RESUME:
            self._resume(d, now)
        elif op == Op.HEARTBEAT:
            self._heartbeat(d, now)
        else:
            session = self._session
            assert session is not None  # state "ready"
            handler = self._gateway.handler
            if op == Op.SELECT_PROTOCOL:
                self._select_protocol(session, d)
            elif op == Op.SPEAKING:
                handler.speaking(session, payloads.speaking(d))
            elif op == Op.VIDEO:
                if isinstance(d, dict):  # a known op is never fatal: a bad one is dropped
                    handler.video(session, d)
            else:
                handler.other_op(session, op, d)  # known, ignored unless the handler cares

    def _identify(self, d: Any, now: float) -> None:
        if self._state != "hello":
            raise GatewayError(CloseCode.ALREADY_AUTHENTICATED, "already identified")  # 4005
        creds = payloads.identify(d)
        gateway = self._gateway
        session = Session(gateway, creds, self.version)
        session._connection = self
        session._hold = []
        self._session = session
        try:
            ready = gateway.handler.identify(session, d)  # GatewayError 4004/4011/...: no ended()
        except BaseException:
            session._hold = None
            raise
        if self.closed or self._session is not session:  # the handler shut the gateway down
            session._hold = None
            return
        if not isinstance(ready, dict):
            raise TypeError(f"GatewayHandler.identify returned {type(ready).__name__}, not a dict")
        gateway._replace(session)  # one session per (user, session_id) and per user in a server
        gateway._register(session)
        session._state = "active"
        self._state = "ready"
        self._last_beat = now  # the heartbeat clock starts once identified
        log.info(
            "discord session started: user %s server_id %s v%d",
            session.user_id,
            session.server_id,
            self.version,
        )
        self._emit(Send(_message(Op.READY, ready)))  # READY carries no seq
        self._release_hold(session)

    def _select_protocol(self, session: Session, d: Any) -> None:
        if session.protocol is not None:
            # One op 1 per session (also across RESUME): its key and mode stay; re-keying is not offered.
            raise GatewayError(CloseCode.BAD_REQUEST, "protocol already selected")
        d = payloads.select_protocol(d)  # 4002 shape, 4012 unknown protocol
        held: list[tuple[int, Any, bool]] = []
        session._hold = held
        try:
            description = self._gateway.handler.select_protocol(session, d)
        finally:
            session._hold = None  # on failure the held messages go with the closing socket
        if self.closed:
            return  # the handler closed the session meanwhile
        if not isinstance(description, dict):
            raise TypeError("GatewayHandler.select_protocol must return a dict")
        session.protocol = d["protocol"]
        log.info(
            "discord session protocol: user %s server_id %s protocol %s",
            session.user_id,
            session.server_id,
            session.protocol,
        )
        session._send_now(Op.SESSION_DESCRIPTION, description, True)  # replayable: seq 1 on v8
        for op, data, replayable in held:
            session._send_now(op, data, replayable)

    def _heartbeat(self, d: Any, now: float) -> None:
        ack, seq_ack = payloads.heartbeat(d)
        self._last_beat = now
        self._emit(Send(_message(Op.HEARTBEAT_ACK, ack)))  # never numbered
        session = self._session
        if seq_ack is not None and session is not None and self.version >= 8:
            number = session._resolve_ack(seq_ack)
            if number is not None:
                session._ack(number)

    def _resume(self, d: Any, now: float) -> None:
        if self._state != "hello":
            raise GatewayError(CloseCode.ALREADY_AUTHENTICATED, "already identified")
        creds = payloads.resume(d, self.version)
        gateway = self._gateway
        invalid = CloseCode.SESSION_NO_LONGER_VALID  # every failed RESUME is 4006
        # RESUME names no user: the session is the one with this id and server whose user the
        # same token authenticated at IDENTIFY. Another user's colliding session_id never
        # matches, and a failed RESUME leaves every session alone (one reason for all failures:
        # no oracle for which session ids exist).
        token = creds.token.encode()
        matches = [
            s
            for s in gateway._ids.get(creds.session_id, ())
            if s.server_id == creds.server_id and hmac.compare_digest(s.token.encode(), token)
        ]
        if len(matches) != 1:  # none, or a token the handler accepted for two users: no guessing
            raise GatewayError(invalid, "unknown, expired or invalid session")
        session = matches[0]
        if session.version != self.version:
            raise GatewayError(invalid, "gateway version differs from the session's")
        acked = 0
        if self.version >= 8:
            number = session._resolve_ack(creds.seq_ack)
            if number is None or number < session._floor:
                # The client needs messages that are gone (or names one never sent): it must rejoin.
                gateway._end(session, invalid, "session could not be resumed")
                raise GatewayError(invalid, "cannot replay the messages after seq_ack")
            acked = number
        old = session._connection
        if old is not None:
            old._detach(CloseCode.DISCONNECTED, "session resumed on another connection")
        else:
            gateway._unsuspend(session)
        session._connection = self
        session._state = "active"
        self._session = session
        self._state = "ready"
        self._last_beat = now
        self._emit(Send(_message(Op.RESUMED, None)))  # op 9 null, then the replay
        log.info("discord session resumed: user %s server_id %s", session.user_id, session.server_id)
        if self.version >= 8:
            session._ack(acked)
            for _, text in session._buffer:  # everything left has seq > seq_ack, in order
                self._emit(Send(text))
        gateway.handler.resumed(session)

    # -------------------------------------------------------------- internals

    def _release_hold(self, session: Session) -> None:
        held, session._hold = session._hold or [], None
        for op, data, replayable in held:
            session._send_now(op, data, replayable)

    def _emit(self, output: Output) -> None:
        if self._state == "closed":
            return
        if len(self._out) >= self._gateway.config.max_pending_output:
            # The edge cannot deliver (the client does not read): drop the backlog and the socket,
            # but keep the session for RESUME; v8 replays what is still buffered.
            self._out.clear()
            self._finish(self._gateway._clock(None), CloseCode.SESSION_TIMEOUT, "client is not reading", True)
            return
        self._out.append(output)
        if self.on_output is not None:
            self.on_output()

    def _detach(self, code: int, reason: str) -> None:
        """Close this WebSocket without deciding the session's fate (it moves or ends elsewhere)."""
        session = self._session
        if session is not None and session._connection is self:
            session._connection = None
        self._session = None
        self._finish(self._gateway._clock(None), code, reason)

    def _finish(self, now: float, code: int | None, reason: str, resumable: bool = False) -> None:
        """Close (code) or lose (None) the WebSocket once; suspend or end an identified session."""
        if self._state == "closed":
            return
        if code is not None:
            self._out.append(Close(code, _reason(reason, code)))  # the last output
            if self.on_output is not None:
                self.on_output()
            log.debug("voice gateway: closing %r with %d %s", self, code, reason)
        self._state = "closed"
        self.close_code = code
        self._gateway._connections.discard(self)
        session, self._session = self._session, None
        if session is None or session._connection is not self:
            return
        session._connection = None
        if session._state != "active":
            return  # IDENTIFY refused: never registered, so no ended()
        if code is not None:
            reason = f"closed {code}: {_reason(reason, code)}"
        if resumable:
            self._gateway._suspend(session, now, reason)
        else:
            self._gateway._end(session, reason=reason)


# ---------------------------------------------------------------------------------------------- gateway


class Gateway:
    """All voice sessions of one server; hands out a Connection per WebSocket.

    On SIGTERM `fastsfu serve` will call shutdown() (4015 by default: clients that can, RESUME).
    Sessions suspended for RESUME end after resume_grace: the edge runs handle_timer() at
    next_deadline() (any connection's receive/handle_timer also expires them on the way).
    """

    def __init__(self, handler: GatewayHandler, config: GatewayConfig | None = None) -> None:
        self.handler = handler
        self.config = config or GatewayConfig()
        # Live sessions by Session.key, (user_id, session_id): a session id is unique per user
        # only, as on Discord, so another user's IDENTIFY or RESUME with the same id (colliding
        # or copied) gets a session of its own or 4006, and never replaces or resumes this one.
        self._sessions: dict[tuple[str, str], Session] = {}
        self._ids: dict[str, list[Session]] = {}  # by session_id alone: RESUME's candidates
        self._by_user: dict[tuple[str, str], Session] = {}  # by (server_id, user_id)
        self._suspended: dict[tuple[str, str], Session] = {}  # by Session.key, oldest first
        self._connections: set[Connection] = set()
        self._now = -math.inf  # the latest time seen (for calls without `now`)
        self._shutting_down: tuple[int, str] | None = None

    def accepts_version(self, version: int | None) -> bool:
        """Whether `?v=` is supported; the edge may answer HTTP 400 instead of connecting."""
        return version is not None and self.config.min_version <= version <= self.config.max_version

    def connect(self, version: int | None, now: float, greet: bool = True) -> Connection:
        """A new WebSocket with its parse_version() result; HELLO (or a 4020 close) is queued.
        greet=False: the client has its HELLO already (a cluster edge relays this connection)."""
        self._tick(now)
        return Connection(self, version, now, greet)

    def session(self, session_id: str, user_id: str | None = None) -> Session | None:
        """The live session `session_id` of `user_id` (None: of whichever user got it first)."""
        if user_id is not None:
            return self._sessions.get((user_id, session_id))
        return next(iter(self._ids.get(session_id, ())), None)

    @property
    def sessions(self) -> Mapping[tuple[str, str], Session]:
        """Live sessions (active or suspended) by Session.key, (user_id, session_id)."""
        return MappingProxyType(self._sessions)

    @property
    def suspended_count(self) -> int:
        return len(self._suspended)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def next_deadline(self) -> float | None:
        """When the oldest suspended session expires, if any."""
        oldest = next(iter(self._suspended.values()), None)
        if oldest is None or oldest.suspended_at is None:
            return None
        return oldest.suspended_at + self.config.resume_grace

    def handle_timer(self, now: float) -> None:
        self._tick(now)

    def shutdown(
        self,
        code: int = CloseCode.VOICE_SERVER_CRASHED,
        reason: str = "server restarting",
        now: float | None = None,
        end_sessions: bool = True,
    ) -> None:
        """Close every WebSocket with `code` (4015: clients RESUME) and refuse new ones.

        With end_sessions (the process is going away) every session then ends (ended() once each).
        """
        when = self._clock(now)
        self._shutting_down = (code, reason)
        for conn in list(self._connections):
            session = conn._session
            if end_sessions and session is not None and session._state == "active":
                self._end(session, code, reason)  # closes its socket with `code`, no suspended() first
            else:
                conn._finish(when, code, reason, resumable=code in RESUMABLE_CLOSE_CODES)
        if end_sessions:
            for session in list(self._sessions.values()):
                self._end(session, code, reason)

    # -------------------------------------------------------------- internals

    def _clock(self, now: float | None) -> float:
        if now is not None and now > self._now:
            self._now = now
        return self._now if math.isfinite(self._now) else 0.0

    def _tick(self, now: float) -> None:
        self._clock(now)
        grace = self.config.resume_grace
        while self._suspended:
            oldest = next(iter(self._suspended.values()))
            assert oldest.suspended_at is not None
            if oldest.suspended_at + grace > now:
                break
            self._end(oldest, reason="RESUME grace expired")

    def _suspend(self, session: Session, now: float, why: str) -> None:
        while len(self._suspended) >= self.config.max_suspended:
            # bounded: the oldest goes first
            self._end(next(iter(self._suspended.values())), reason="too many suspended sessions")
        log.info(
            "discord session suspended for RESUME: user %s server_id %s protocol %s: %s",
            session.user_id,
            session.server_id,
            session.protocol,
            why,
        )
        session._state = "suspended"
        session.suspended_at = self._clock(now)
        self._suspended[session.key] = session
        try:
            self.handler.suspended(session)
        except Exception:
            log.exception("voice gateway: handler.suspended failed for %r", session)

    def _unsuspend(self, session: Session) -> None:
        if self._suspended.get(session.key) is session:
            del self._suspended[session.key]
        session.suspended_at = None

    def _replace(self, new: Session) -> None:
        """End the sessions an IDENTIFY supersedes: only ever the same (authenticated) user's."""
        for old in (self._sessions.get(new.key), self._by_user.get((new.server_id, new.user_id))):
            if old is not None and old is not new and old._state != "ended":
                self._end(old, CloseCode.DISCONNECTED, "replaced by a newer session")

    def _register(self, session: Session) -> None:
        self._sessions[session.key] = session
        self._ids.setdefault(session.session_id, []).append(session)
        self._by_user[session.server_id, session.user_id] = session

    def _end(self, session: Session, code: int = CloseCode.DISCONNECTED, reason: str = "") -> None:
        """The session is gone for good: its WebSocket (if any) closes with `code`; ended() once."""
        if session._state == "ended":
            return
        conn = session._connection
        if conn is not None:
            conn._detach(code, reason)
        session._state = "ended"
        session.end_reason = reason or CLOSE_MEANINGS.get(code, str(code))
        log.info(
            "discord session ended: user %s server_id %s protocol %s: %s",
            session.user_id,
            session.server_id,
            session.protocol,
            session.end_reason,
        )
        session._connection = None
        session._hold = None
        session._buffer.clear()
        self._unsuspend(session)
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        same_id = self._ids.get(session.session_id, [])
        if session in same_id:
            same_id.remove(session)
            if not same_id:
                del self._ids[session.session_id]
        key = (session.server_id, session.user_id)
        if self._by_user.get(key) is session:
            del self._by_user[key]
        try:
            self.handler.ended(session)
        except Exception:
            log.exception("voice gateway: handler.ended failed for %r", session)
