"""Decoding and validation of client frames (docs/discord.md#opcodes); raises GatewayError to close."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn, TypeGuard

from fastsfu.discord.errors import GatewayError
from fastsfu.discord.opcodes import KNOWN_OPS, CloseCode

# The rule used throughout: 4002 "failed to decode" when the JSON does not have the documented
# shape (not JSON, not an object, `op` missing or not an integer, `d` or a required field missing or of
# the wrong JSON type); 4020 "bad request" when the shape is right but a value is not (a malformed
# snowflake, an empty token, a port > 65535).

MAX_ID_CHARS = 256  # server_id (may be a Go Live stream key), session_id, token
MAX_SNOWFLAKE = 2**64 - 1
PROTOCOLS = ("udp", "webrtc")  # op 1


@dataclass(frozen=True, slots=True)
class Credentials:
    """The identity fields shared by IDENTIFY and RESUME, normalised to strings (snowflakes are strings)."""

    server_id: str
    session_id: str
    token: str
    user_id: str = ""  # IDENTIFY only
    seq_ack: int = -1  # RESUME only (v8+); -1 = nothing numbered received


def _shape(message: str) -> NoReturn:
    raise GatewayError(CloseCode.FAILED_TO_DECODE, message)


def _bad(message: str) -> NoReturn:
    raise GatewayError(CloseCode.BAD_REQUEST, message)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python extensions, not RFC 8259


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(frame: str | bytes, max_bytes: int) -> tuple[int, Any]:
    """One WebSocket frame -> (op, d). `d` is None when absent."""
    if not isinstance(frame, str):
        # Text frames only. Binary frames are DAVE's, and we answer dave_protocol_version 0.
        _shape("binary frames are not supported")
    # Oversized frames are refused before decoding (4002, "failed to decode"): checking len() first
    # avoids encoding a huge string; a char is 1-4 UTF-8 bytes.
    if len(frame) > max_bytes or (
        len(frame) * 4 > max_bytes and len(frame.encode("utf-8", "surrogatepass")) > max_bytes
    ):
        _shape(f"frame larger than {max_bytes} bytes")
    try:
        message = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        _shape("invalid JSON")
    if not isinstance(message, dict):
        _shape("a message must be a JSON object")
    op = message.get("op")
    if not _is_int(op):
        _shape("op missing or not an integer")
    if op not in KNOWN_OPS:
        raise GatewayError(CloseCode.UNKNOWN_OPCODE, f"unknown opcode {op}")  # never for a known op
    return op, message.get("d")


def require_object(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        _shape(f"{what}: d must be an object")
    return d


def _string(d: dict[str, Any], key: str, what: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        _shape(f"{what}: {key} missing or not a string")
    if not value or len(value) > MAX_ID_CHARS:
        _bad(f"{what}: {key} empty or longer than {MAX_ID_CHARS}")
    return value


def _snowflake(d: dict[str, Any], key: str, what: str) -> str:
    # Snowflakes are decimal strings (docs/discord.md#opcodes); a JSON integer is accepted too and normalised.
    value = d.get(key)
    if _is_int(value):
        if not 0 <= value <= MAX_SNOWFLAKE:
            _bad(f"{what}: {key} out of range")
        return str(value)
    if not isinstance(value, str):
        _shape(f"{what}: {key} missing or not a snowflake string")
    if not (value.isascii() and value.isdecimal()) or len(value) > 20 or int(value) > MAX_SNOWFLAKE:
        _bad(f"{what}: {key} is not a snowflake")
    return value


def _server_id(d: dict[str, Any], what: str) -> str:
    # Op 0: a guild ID, a channel ID for DM calls, or a Go Live stream key: any non-empty string.
    if _is_int(d.get("server_id")):
        return _snowflake(d, "server_id", what)
    return _string(d, "server_id", what)


def seq_ack(value: Any, what: str) -> int:
    """A client `seq_ack`: an integer, -1 (or absent/null) before any numbered message."""
    if value is None:
        return -1
    if not _is_int(value):
        _shape(f"{what}: seq_ack is not an integer")
    if not -1 <= value <= 0xFFFF:  # seq is a u16 (docs/discord.md#heartbeats-sequence-numbers-and-resume)
        _bad(f"{what}: seq_ack out of range")
    return int(value)


def identify(d: Any) -> Credentials:
    """Op 0: server_id, user_id, session_id, token required; other fields are the handler's."""
    msg = require_object(d, "IDENTIFY")
    return Credentials(
        server_id=_server_id(msg, "IDENTIFY"),
        user_id=_snowflake(msg, "user_id", "IDENTIFY"),
        session_id=_string(msg, "session_id", "IDENTIFY"),
        token=_string(msg, "token", "IDENTIFY"),
    )


def resume(d: Any, version: int) -> Credentials:
    """Op 7 (docs/discord.md#opcodes): server_id, session_id, token; seq_ack from v8 (ignored before)."""
    msg = require_object(d, "RESUME")
    return Credentials(
        server_id=_server_id(msg, "RESUME"),
        session_id=_string(msg, "session_id", "RESUME"),
        token=_string(msg, "token", "RESUME"),
        seq_ack=seq_ack(msg.get("seq_ack"), "RESUME") if version >= 8 else -1,
    )


def select_protocol(d: Any) -> dict[str, Any]:
    """Op 1: the shape checks done before the handler sees it; unknown protocol -> 4012."""
    msg = require_object(d, "SELECT_PROTOCOL")
    protocol = msg.get("protocol")
    if not isinstance(protocol, str):
        _shape("SELECT_PROTOCOL: protocol missing or not a string")
    data = msg.get("data")
    if data is None:
        _shape("SELECT_PROTOCOL: data missing")
    if protocol not in PROTOCOLS:
        raise GatewayError(CloseCode.UNKNOWN_PROTOCOL, f"unknown protocol {protocol[:32]!r}")
    if protocol == "udp":
        # udp data is {address, port, mode}; the mode is checked by the handler (4016).
        if not isinstance(data, dict):
            _shape("SELECT_PROTOCOL: udp data must be an object")
        if not isinstance(data.get("address"), str) or not isinstance(data.get("mode"), str):
            _shape("SELECT_PROTOCOL: udp data needs address and mode strings")
        port = data.get("port")
        if not _is_int(port):
            _shape("SELECT_PROTOCOL: udp data needs an integer port")
        if not 0 <= port <= 0xFFFF:
            _bad("SELECT_PROTOCOL: port out of range")
    elif not isinstance(data, str) and not isinstance(msg.get("sdp"), str):
        # webrtc: an SDP fragment in data (a string), duplicated in sdp by the web client.
        _shape("SELECT_PROTOCOL: webrtc needs an SDP string in data or sdp")
    return msg


def speaking(d: Any) -> dict[str, Any]:
    """Op 5 C→S: speaking bitmask and ssrc required; the handler checks SSRC ownership."""
    msg = require_object(d, "SPEAKING")
    flags, ssrc = msg.get("speaking"), msg.get("ssrc")
    # A JSON boolean passes as an int (pre-v4 `speaking` was a boolean).
    if not isinstance(flags, int) or not _is_int(ssrc):
        _shape("SPEAKING: speaking and ssrc must be integers")
    if flags < 0 or not 0 <= ssrc <= 0xFFFFFFFF:
        _bad("SPEAKING: speaking or ssrc out of range")
    return msg


def heartbeat(d: Any, what: str = "HEARTBEAT") -> tuple[Any, int | None]:
    """Op 3 -> (the op 6 `d`, the seq_ack to apply or None).

    v4-7 send an integer nonce, answered with the same value; v8 sends {t, seq_ack}, answered {t}.
    Either form is accepted in every version: a v8 client sending a bare integer is ACKed, not
    dropped (Spacebar's bug). Other scalars (a string, a float) are echoed unchanged too.
    """
    if isinstance(d, dict):
        ack: dict[str, Any] = {"t": d["t"]} if "t" in d else {}
        return ack, seq_ack(d.get("seq_ack"), what)
    if isinstance(d, list):
        _shape(f"{what}: d must be a nonce or an object")
    return d, None
