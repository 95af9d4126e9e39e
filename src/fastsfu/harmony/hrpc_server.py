"""protocol.voice.v1 over hRPC (WebSocket) for Harmony web clients (docs/harmony.md#hrpc).

GET /protocol.voice.v1.VoiceService/StreamMessage with subprotocol `hrpc1`; binary frames: a raw
StreamMessageRequest from the client; `0x00` + StreamMessageResponse or `0x01` + hrpc.v1.Error from us.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.harmony.grpc_server import Authenticate
from fastsfu.harmony.rate_limit import RateLimiter, rate_limited
from fastsfu.harmony.session import VoiceError, VoiceRooms, VoiceSession, parse_request

log = logging.getLogger(__name__)

STREAM_PATH = "/protocol.voice.v1.VoiceService/StreamMessage"
SUBPROTOCOL = "hrpc1"
MAX_FRAME = 64 * 1024
# Frames up to this size are read and refused in-band (voice-bad-frame, which a browser can show);
# larger ones make aiohttp close with 1009 before buffering them, so memory stays bounded.
HARD_FRAME_LIMIT = 1024 * 1024
PING_INTERVAL = 20.0  # hrpc-rs sends none; browsers answer pings by themselves


def token_from_request(request: web.Request) -> str:
    """Authorization header (raw, harmony_rust_sdk), else the last Sec-WebSocket-Protocol item
    that is not `hrpc1` (browsers cannot set headers), per docs/harmony.md#authentication."""
    header = request.headers.get("Authorization", "")
    if header:
        return header[7:] if header.startswith("Bearer ") else header
    items = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    if items and items[-1] != SUBPROTOCOL:
        return items[-1]
    return ""


def decode_frame(data: bytes | None) -> voice_pb2.StreamMessageRequest:
    """A client frame (None: not a binary frame) -> the request; VoiceError voice-bad-frame otherwise."""
    if data is None:
        raise VoiceError("fastsfu.voice-bad-frame", "expected a binary frame")
    if len(data) > MAX_FRAME:
        raise VoiceError("fastsfu.voice-bad-frame", "frame over 64 KiB")
    request = parse_request(data)
    if isinstance(request, VoiceError):
        raise request
    return request


def _error_body(identifier: str, message: str, details: bytes = b"") -> bytes:
    error = hrpc_pb2.Error(identifier=identifier, human_message=message, details=details)
    return bytes(error.SerializeToString())


def _http_error(status: int, identifier: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=_error_body(identifier, message),
        headers={"Content-Type": "application/hrpc", "hrpc-version": "1"},
    )


class HrpcVoiceEndpoint:
    """The WebSocket endpoint; mount it with `app.router.add_get(STREAM_PATH, endpoint.handle)`."""

    def __init__(
        self, rooms: VoiceRooms, authenticate: Authenticate, rate_limit: RateLimiter | None = None
    ) -> None:
        self.rooms = rooms
        self.authenticate = authenticate
        self.rate_limit = rate_limit

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,), heartbeat=PING_INTERVAL, max_msg_size=HARD_FRAME_LIMIT
        )
        if not ws.can_prepare(request).ok:
            return _http_error(400, "hrpc.http.bad-streaming-request", "this endpoint is a WebSocket stream")
        token = token_from_request(request)
        await ws.prepare(request)  # answers exactly `hrpc1` when offered, never the token
        remote = request.remote or ""
        # Counted before authentication: a flood of bad tokens is limited too. Refused in-band,
        # after the upgrade, because browsers cannot read an HTTP error (docs/harmony.md#hrpc).
        wait = self.rate_limit.check(remote) if self.rate_limit is not None else 0.0
        if wait > 0:
            await self._fail(ws, rate_limited(wait), remote)
            return ws
        try:
            user_id = self.authenticate(token)
        except VoiceError as exc:
            await self._fail(ws, exc, remote)
            return ws
        self.rooms.streams_opened["hrpc"] += 1
        log.debug("voice stream opened", extra={"user_id": user_id, "remote": remote, "frontend": "hrpc"})
        session = self.rooms.open_session(user_id, "hrpc", remote)
        wake = asyncio.Event()
        session.on_output = wake.set
        receiver = self._receive(ws, wake)
        try:
            while True:
                wake.clear()
                for message in session.take_outgoing():
                    if isinstance(message, VoiceError):
                        await self._fail(ws, message, remote, session)
                        return ws
                    await ws.send_bytes(b"\x00" + message.SerializeToString())
                if session.state == "closed":
                    if session.left_by_peer:  # the client closed its media: it left, 1000
                        await ws.close(code=WSCloseCode.OK, message=b"left")
                        return ws
                    # Closed by the server with nothing to report: it is shutting down, so the close
                    # is 1001 "going away" (RFC 6455 §7.4.1); the client may reconnect elsewhere.
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                    return ws
                if not receiver.done():
                    # One Event, set by the session (output) and by the receive (a frame): no
                    # task per wait, so nothing is left pending if this handler is cancelled.
                    try:
                        async with asyncio.timeout(session.timeout()):
                            await wake.wait()
                    except TimeoutError:
                        await self._fail(ws, session.timed_out(), remote, session)
                        return ws
                    continue
                msg = receiver.result()
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return ws  # any close, with or without a status code, is a leave (docs/harmony.md#hrpc)
                try:
                    req = decode_frame(msg.data if msg.type == WSMsgType.BINARY else None)
                except VoiceError as error:
                    await self._fail(ws, error, remote, session)
                    return ws
                receiver = self._receive(ws, wake)
                try:
                    session.handle(req)
                except VoiceError as exc:
                    for message in session.take_outgoing():
                        if not isinstance(message, VoiceError):
                            await ws.send_bytes(b"\x00" + message.SerializeToString())
                    await self._fail(ws, exc, remote, session)
                    return ws
        except ConnectionError:  # the client left while we wrote: a leave (docs/harmony.md#leaving)
            return ws
        finally:
            receiver.cancel()
            session.on_output = None
            session.close()
            await asyncio.wait((receiver,))  # awaited: no task outlives its stream
            if not ws.closed:
                await ws.close()

    @staticmethod
    def _receive(ws: web.WebSocketResponse, wake: asyncio.Event) -> asyncio.Task[WSMessage]:
        """The next frame, read in a task that sets `wake` when it is done."""
        receiver = asyncio.ensure_future(ws.receive())
        receiver.add_done_callback(lambda _: wake.set())
        return receiver

    async def _fail(
        self, ws: web.WebSocketResponse, error: VoiceError, remote: str, session: VoiceSession | None = None
    ) -> None:
        """The 0x01 error frame, then a clean close (code 1000)."""
        self.rooms.stream_errors[error.identifier] += 1
        user_id = None
        if session is not None:
            session.end_reason = error.identifier  # for its leave line
            user_id = session.user_id
        extra = {"identifier": error.identifier, "user_id": user_id, "remote": remote, "frontend": "hrpc"}
        log.info("voice stream ends: %s", error, extra=extra)
        if not ws.closed:
            await ws.send_bytes(b"\x01" + _error_body(error.identifier, error.human_message, error.details))
            await ws.close(code=1000)


def make_app(
    rooms: VoiceRooms,
    authenticate: Authenticate,
    mounts: Sequence[Callable[[web.Application], None]] = (),
    rate_limit: RateLimiter | None = None,
) -> web.Application:
    """An aiohttp app serving the hRPC voice stream; each of `mounts` adds its own routes (the demo
    page, /metrics); every other path answers hrpc.not-found. `rate_limit` None: no limit."""
    endpoint = HrpcVoiceEndpoint(rooms, authenticate, rate_limit)
    app = web.Application()
    app.router.add_get(STREAM_PATH, endpoint.handle)
    for mount in mounts:
        mount(app)

    async def not_found(request: web.Request) -> web.Response:
        return _http_error(404, "hrpc.not-found", f"no such endpoint: {request.path}")

    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
