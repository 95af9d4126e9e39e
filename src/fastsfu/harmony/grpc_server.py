"""protocol.voice.v1 over gRPC (grpc.aio, bidirectional stream): the session driven by a stream.

Token from the `authorization` metadata (an optional `Bearer ` is stripped, harmony.md §2.2);
errors end the RPC with a status, a human message and the hrpc.v1.Error in `hrpc-error-bin`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.harmony.session import VoiceError, VoiceRooms

log = logging.getLogger("fastsfu.harmony")

Authenticate = Callable[[str], int]  # token -> user id; raises VoiceError("h.blank-session", ...)


def token_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            token = value.decode() if isinstance(value, bytes) else value
            return token[7:] if token.startswith("Bearer ") else token
    return ""


class VoiceServicer(voice_pb2_grpc.VoiceServiceServicer):  # type: ignore[misc]  # generated, not analysed
    """`/protocol.voice.v1.VoiceService/StreamMessage`: one VoiceSession per call."""

    def __init__(self, rooms: VoiceRooms, authenticate: Authenticate) -> None:
        self.rooms = rooms
        self.authenticate = authenticate

    async def StreamMessage(  # noqa: N802 - the generated servicer's method name
        self,
        request_iterator: AsyncIterator[voice_pb2.StreamMessageRequest],
        context: grpc.aio.ServicerContext[voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse],
    ) -> AsyncIterator[voice_pb2.StreamMessageResponse]:
        try:
            user_id = self.authenticate(token_from_metadata(context.invocation_metadata()))
        except VoiceError as exc:
            await self._abort(context, exc)
            return
        session = self.rooms.open_session(user_id)
        events: asyncio.Queue[voice_pb2.StreamMessageRequest | None] = asyncio.Queue()
        wake = asyncio.Event()
        session.on_output = wake.set

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await events.put(request)
            except Exception:  # a cancelled or broken stream is a leave (harmony.md §3.6)
                pass
            finally:
                await events.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                wake.clear()
                for message in session.take_outgoing():
                    if isinstance(message, VoiceError):
                        await self._abort(context, message)
                        return
                    yield message
                timeout = session.timeout()
                getter = asyncio.ensure_future(events.get())
                waker = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait(
                    {getter, waker}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                if getter not in done:
                    getter.cancel()
                    if not done:  # the state's deadline passed with no message
                        await self._abort(context, session.timed_out())
                        return
                    continue
                request = getter.result()
                if request is None:
                    return  # the client half-closed: leave
                try:
                    session.handle(request)
                except VoiceError as exc:
                    for message in session.take_outgoing():
                        if not isinstance(message, VoiceError):
                            yield message
                    await self._abort(context, exc)
                    return
        finally:
            reader.cancel()
            session.on_output = None
            session.close()

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext[object, object], error: VoiceError) -> None:
        detail = hrpc_pb2.Error(
            identifier=error.identifier, human_message=error.human_message
        ).SerializeToString()
        log.info("voice stream ends: %s", error)
        await context.abort(
            grpc.StatusCode[error.grpc_code],
            error.human_message,
            trailing_metadata=(("hrpc-error-bin", detail),),
        )


async def start_grpc_server(
    rooms: VoiceRooms, authenticate: Authenticate, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, int]:
    """Serve VoiceService on `address`; returns the server and the bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.max_receive_message_length", 64 * 1024),
        ]
    )
    voice_pb2_grpc.add_VoiceServiceServicer_to_server(VoiceServicer(rooms, authenticate), server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
