"""protocol.voice.v1 over gRPC (grpc.aio, bidirectional stream): the session driven by a stream.

Token from the `authorization` metadata (an optional `Bearer ` is stripped, docs/harmony.md#grpc);
errors end the RPC with a status, a human message and the hrpc.v1.Error in `hrpc-error-bin`.
The server also answers grpc.health.v1.Health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.harmony.health import Health
from fastsfu.harmony.rate_limit import RateLimiter, rate_limited
from fastsfu.harmony.session import VoiceError, VoiceRooms, VoiceSession, parse_request

log = logging.getLogger(__name__)

Authenticate = Callable[[str], int]  # token -> user id; raises VoiceError("h.blank-session", ...)
SERVICE_NAME = "protocol.voice.v1.VoiceService"


def peer_address(peer: str) -> str:
    """The IP of a grpc peer string: `ipv4:1.2.3.4:5`, `ipv6:[::1]:5` (anything else as is)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


def token_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            token = value.decode() if isinstance(value, bytes) else value
            return token[7:] if token.startswith("Bearer ") else token
    return ""


def decode_request(data: bytes) -> voice_pb2.StreamMessageRequest | VoiceError:
    """The request deserializer. It never raises: grpc.aio would raise its error inside the
    request iterator, where it looks like a broken stream; the servicer answers it instead."""
    return parse_request(data)


# What the reader hands to the stream loop: a request, a bad-frame error, or END.
Inbound = voice_pb2.StreamMessageRequest | VoiceError | None
END = None  # the client half-closed, cancelled, or its connection broke: a leave (docs/harmony.md#leaving)


class VoiceServicer:
    """`/protocol.voice.v1.VoiceService/StreamMessage`: one VoiceSession per call."""

    def __init__(
        self, rooms: VoiceRooms, authenticate: Authenticate, rate_limit: RateLimiter | None = None
    ) -> None:
        self.rooms = rooms
        self.authenticate = authenticate
        self.rate_limit = rate_limit

    async def StreamMessage(  # noqa: N802 - the RPC's name in voice.proto
        self,
        request_iterator: AsyncIterator[voice_pb2.StreamMessageRequest | VoiceError],  # decode_request
        context: grpc.aio.ServicerContext[voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse],
    ) -> AsyncIterator[voice_pb2.StreamMessageResponse]:
        remote = peer_address(context.peer())
        # Counted before authentication, so a flood of bad tokens is limited too.
        wait = self.rate_limit.check(remote) if self.rate_limit is not None else 0.0
        if wait > 0:
            await self._abort(context, rate_limited(wait), remote)
            return
        try:
            user_id = self.authenticate(token_from_metadata(context.invocation_metadata()))
        except VoiceError as exc:
            await self._abort(context, exc, remote)
            return
        self.rooms.streams_opened["grpc"] += 1
        log.debug("voice stream opened", extra={"user_id": user_id, "remote": remote, "frontend": "grpc"})
        session = self.rooms.open_session(user_id, "grpc", remote)
        # No task per wait: the loop sleeps on one Event, set by the reader (after it queued
        # something) and by the session (output queued); a one-slot inbox makes the reader wait
        # for the loop, so grpc's flow control holds back a client that sends too fast.
        inbox: asyncio.Queue[Inbound] = asyncio.Queue(maxsize=1)
        wake = asyncio.Event()
        session.on_output = wake.set

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await inbox.put(request)
                    wake.set()
                    if isinstance(request, VoiceError):
                        return  # the stream ends on it: read no further
            except Exception as exc:  # grpc's error for a cancelled or broken call
                log.debug("voice stream read ended: %r", exc, extra={"user_id": user_id, "remote": remote})
            await inbox.put(END)
            wake.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                wake.clear()
                for message in session.take_outgoing():
                    if isinstance(message, VoiceError):
                        await self._abort(context, message, remote, session)
                        return
                    yield message
                if session.state == "closed":
                    return  # status OK: a shutdown, or the client closed its media (a leave)
                try:
                    request = inbox.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        async with asyncio.timeout(session.timeout()):
                            await wake.wait()
                    except TimeoutError:  # the state's deadline passed with no message
                        await self._abort(context, session.timed_out(), remote, session)
                        return
                    continue
                if request is END:
                    return  # a leave: status OK
                if isinstance(request, VoiceError):  # undecodable: as hRPC's bad frame
                    await self._abort(context, request, remote, session)
                    return
                try:
                    session.handle(request)
                except VoiceError as exc:
                    for message in session.take_outgoing():
                        if not isinstance(message, VoiceError):
                            yield message
                    await self._abort(context, exc, remote, session)
                    return
        finally:
            reader.cancel()
            session.on_output = None
            session.close()
            # Awaited, so no task outlives its stream (a cancelled RPC included).
            await asyncio.wait((reader,))

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[object, object],
        error: VoiceError,
        remote: str,
        session: VoiceSession | None = None,
    ) -> None:
        detail = hrpc_pb2.Error(
            identifier=error.identifier, human_message=error.human_message, details=error.details
        ).SerializeToString()
        self.rooms.stream_errors[error.identifier] += 1
        user_id = None
        if session is not None:
            session.end_reason = error.identifier  # for its leave line
            user_id = session.user_id
        extra = {"identifier": error.identifier, "user_id": user_id, "remote": remote, "frontend": "grpc"}
        log.info("voice stream ends: %s", error, extra=extra)
        await context.abort(
            grpc.StatusCode[error.grpc_code],
            error.human_message,
            trailing_metadata=(("hrpc-error-bin", detail),),
        )


async def start_grpc_server(
    rooms: VoiceRooms,
    authenticate: Authenticate,
    address: str = "127.0.0.1:0",
    rate_limit: RateLimiter | None = None,
    health: Health | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve VoiceService and grpc.health.v1.Health (SERVING for "" and the voice service) on
    `address`; returns the server and the bound port. Pass `health` to flip it at shutdown
    (`health.shutdown()`); `rate_limit` None: no limit."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.max_receive_message_length", 64 * 1024),
        ]
    )
    stream = grpc.stream_stream_rpc_method_handler(
        VoiceServicer(rooms, authenticate, rate_limit).StreamMessage,
        request_deserializer=decode_request,
        response_serializer=voice_pb2.StreamMessageResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"StreamMessage": stream}),)
    )
    health = health or Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind": the same error as any other listener's
        raise OSError(
            f"gRPC cannot listen on {address}: the port is taken or the address is not local"
        ) from exc
    for service in ("", SERVICE_NAME):
        health.set(service, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    return server, port
