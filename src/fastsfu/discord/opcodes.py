"""Discord voice gateway opcodes and WebSocket close codes (docs/discord.md#opcodes, #close-codes).

Constants only: which ops the gateway knows, and what every close code means to clients.
"""

from __future__ import annotations

from enum import IntEnum


class Op(IntEnum):
    """Voice gateway opcodes (docs/discord.md#opcodes). C→S = client to server, S→C = server to client."""

    IDENTIFY = 0  # C→S
    SELECT_PROTOCOL = 1  # C→S
    READY = 2  # S→C
    HEARTBEAT = 3  # C→S (the server may also send it to request a beat, UD)
    SESSION_DESCRIPTION = 4  # S→C; the Discord client's (and old Spacebar's) name is SELECT_PROTOCOL_ACK
    SELECT_PROTOCOL_ACK = 4  # alias of SESSION_DESCRIPTION (docs/discord.md#opcodes)
    SPEAKING = 5  # both
    HEARTBEAT_ACK = 6  # S→C
    RESUME = 7  # C→S
    HELLO = 8  # S→C
    RESUMED = 9  # S→C
    OBSOLETE_10 = 10  # obsolete, undocumented (docs/discord.md#opcodes): never sent, ignored if received
    CLIENTS_CONNECT = 11  # S→C {user_ids}
    VIDEO = 12  # both
    CLIENT_DISCONNECT = 13  # S→C {user_id}
    SESSION_UPDATE = 14  # both
    MEDIA_SINK_WANTS = 15  # both (v5+)
    VOICE_BACKEND_VERSION = 16  # both (v6+)
    CHANNEL_OPTIONS_UPDATE = 17  # S→C, obsolete: never sent
    CLIENT_FLAGS = 18  # S→C
    SPEED_TEST = 19  # obsolete: never sent
    CLIENT_PLATFORM = 20  # S→C
    # DAVE (MLS end-to-end encryption): declined with dave_protocol_version 0, so never sent by us
    # and ignored when a client sends one of the JSON ones anyway.
    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    DAVE_MLS_EXTERNAL_SENDER = 25
    DAVE_MLS_KEY_PACKAGE = 26
    DAVE_MLS_PROPOSALS = 27
    DAVE_MLS_COMMIT_WELCOME = 28
    DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION = 29
    DAVE_MLS_WELCOME = 30
    DAVE_MLS_INVALID_COMMIT_WELCOME = 31
    NO_ROUTE = 32  # C→S {}: ignored (docs/discord.md#opcodes)


# Every op above is "known": receiving one is never fatal; anything else closes with 4001.
KNOWN_OPS: frozenset[int] = frozenset(int(op) for op in Op)
DAVE_OPS: frozenset[int] = frozenset(range(21, 32))

# Server messages numbered with "seq" on v8+ and kept for replay after RESUME.
# The handler may number any other dispatch by sending it with replayable=True (the default).
REPLAYABLE_OPS: frozenset[int] = frozenset({4, 5, 11, 12, 13, 18, 20})

# Messages the gateway core itself owns: a handler cannot send them through Session.send().
CORE_OPS: frozenset[int] = frozenset({Op.READY, Op.HEARTBEAT_ACK, Op.HELLO, Op.RESUMED})


class CloseCode(IntEnum):
    """Voice WebSocket close codes. Clients rejoin on all of them except where noted."""

    # fastsfu's own (the main gateway's 4000 "unknown error, try reconnecting"): with --workers, the
    # cluster cannot place or reach this server's room now (docs/cluster.md#bridging). Clients rejoin.
    CLUSTER_UNAVAILABLE = 4000
    UNKNOWN_OPCODE = 4001
    FAILED_TO_DECODE = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    SESSION_NO_LONGER_VALID = 4006
    SESSION_TIMEOUT = 4009
    SERVER_NOT_FOUND = 4011
    UNKNOWN_PROTOCOL = 4012
    MEDIA_FAILED = 4013  # "WebRTC crashed, try resuming" (UD only)
    DISCONNECTED = 4014  # kicked/moved: clients do not reconnect
    VOICE_SERVER_CRASHED = 4015  # clients RESUME (graceful restart)
    UNKNOWN_ENCRYPTION_MODE = 4016
    E2EE_REQUIRED = 4017
    BAD_REQUEST = 4020
    RATE_LIMITED = 4021  # clients do not reconnect
    CALL_TERMINATED = 4022  # room closed: clients do not reconnect


CLOSE_MEANINGS: dict[int, str] = {
    CloseCode.CLUSTER_UNAVAILABLE: "voice cluster unavailable, reconnect later",
    CloseCode.UNKNOWN_OPCODE: "unknown opcode",
    CloseCode.FAILED_TO_DECODE: "failed to decode payload",
    CloseCode.NOT_AUTHENTICATED: "not authenticated",
    CloseCode.AUTHENTICATION_FAILED: "authentication failed",
    CloseCode.ALREADY_AUTHENTICATED: "already authenticated",
    CloseCode.SESSION_NO_LONGER_VALID: "session no longer valid",
    CloseCode.SESSION_TIMEOUT: "session timeout",
    CloseCode.SERVER_NOT_FOUND: "server not found",
    CloseCode.UNKNOWN_PROTOCOL: "unknown protocol",
    CloseCode.MEDIA_FAILED: "media backend failed, try resuming",
    CloseCode.DISCONNECTED: "disconnected",
    CloseCode.VOICE_SERVER_CRASHED: "voice server crashed, resume",
    CloseCode.UNKNOWN_ENCRYPTION_MODE: "unknown encryption mode",
    CloseCode.E2EE_REQUIRED: "end-to-end encryption required",
    CloseCode.BAD_REQUEST: "bad request",
    CloseCode.RATE_LIMITED: "rate limited",
    CloseCode.CALL_TERMINATED: "call terminated",
}

# Server-initiated closes after which the session stays suspended for RESUME (djs resumes on 4015,
# UD says "try resuming" for 4013). After any other code the session ends (4014/4022: do not reconnect).
RESUMABLE_CLOSE_CODES: frozenset[int] = frozenset({CloseCode.MEDIA_FAILED, CloseCode.VOICE_SERVER_CRASHED})

# A client's own close with 1000 (normal closure) or 1001 (going away, a closed tab), RFC 6455
# §7.4.1, is a leave: discord.py's disconnect() and @discordjs/voice's destroy() send 1000, a browser
# 1001 on unload; Discord's main gateway invalidates a session closed this way too (its gateway
# docs, "Disconnecting"). The session ends at once. Their closes before a reconnect carry no close
# frame or another code, and keep RESUME.
# One exception (djs Networking.onUdpClose): if djs's own UDP socket closes, it opens a socket to
# RESUME and closes the old one with 1000; that RESUME gets 4006 and djs rejoins with IDENTIFY.
CLIENT_LEAVE_CLOSE_CODES: frozenset[int] = frozenset({1000, 1001})
