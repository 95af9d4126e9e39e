"""protocol.voice.v1: one session state machine per StreamMessage stream (docs/harmony.md#session-flow).

Synchronous and independent of how frames arrive: a front-end (grpc.aio, hRPC WebSocket) feeds
requests to `handle()`, drains `take_outgoing()`, enforces `timeout()`, and calls `close()` when
the stream ends. Room changes happen in one step with no await, so fan-out is atomic.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastsfu import ortc
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.rooms import CREATE_ERRORS, Authorize, Room, RoomError, RoomMember, Rooms
from fastsfu.table_hold import TableHold
from fastsfu.transport import TransportError
from fastsfu.types import RtpCapabilities
from fastsfu.webrtc_transport import CLOSED_BY_PEER

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from fastsfu.consumer import Consumer
    from fastsfu.engine import Engine
    from fastsfu.producer import Producer
    from fastsfu.webrtc_transport import WebRtcTransport

log = logging.getLogger(__name__)

# Members whose consumers a sliced join makes per slice (about 50 us each): bounds the event loop's
# busy time per slice to well under a millisecond, and rooms this small join in one step.
JOIN_SLICE_MEMBERS = 8

__all__ = ["CREATE_ERRORS", "RoomMember", "VoiceError", "VoiceRooms", "VoiceSession", "VoiceSettings"]

Req = voice_pb2.StreamMessageRequest
Resp = voice_pb2.StreamMessageResponse

# docs/harmony.md#errors: identifier -> gRPC status code name (front-ends map the name to their own codes).
GRPC_CODES = {
    "h.blank-session": "UNAUTHENTICATED",
    "h.bad-session": "UNAUTHENTICATED",
    "h.bad-guild-id": "NOT_FOUND",
    "h.bad-channel-id": "NOT_FOUND",
    "h.not-joined": "PERMISSION_DENIED",
    "fastsfu.voice-not-voice-channel": "FAILED_PRECONDITION",
    "fastsfu.voice-bad-frame": "INVALID_ARGUMENT",
    "hrpc.resource-exhausted": "RESOURCE_EXHAUSTED",
    "fastsfu.voice-message-timeout": "DEADLINE_EXCEEDED",
    "fastsfu.voice-unexpected-message": "INVALID_ARGUMENT",
    "fastsfu.voice-invalid-json": "INVALID_ARGUMENT",
    "fastsfu.voice-incompatible-capabilities": "INVALID_ARGUMENT",
    "fastsfu.voice-bad-dtls-parameters": "INVALID_ARGUMENT",
    "fastsfu.voice-create-producer": "INVALID_ARGUMENT",
    "fastsfu.voice-create-consumer": "INTERNAL",
    "fastsfu.voice-transport-failed": "UNAVAILABLE",
    "fastsfu.voice-cluster-unavailable": "UNAVAILABLE",  # --workers: the bus cannot place the room
    "fastsfu.voice-session-replaced": "ABORTED",
    "fastsfu.voice-already-connected": "ALREADY_EXISTS",
    "fastsfu.voice-room-full": "RESOURCE_EXHAUSTED",
    "h.not-enough-permissions": "PERMISSION_DENIED",
    "hrpc.internal-server-error": "INTERNAL",
}


class VoiceError(RoomError):
    """A protocol error: sent to the client (gRPC status or hRPC Error frame), then the stream ends."""

    def __init__(self, identifier: str, human_message: str, details: bytes = b"") -> None:
        super().__init__(identifier, human_message)
        self.details = details  # hrpc.v1.Error.details, e.g. a serialized RetryInfo

    @property
    def grpc_code(self) -> str:
        return GRPC_CODES.get(self.identifier, "INTERNAL")

    @classmethod
    def of(cls, error: RoomError) -> VoiceError:
        """A room's refusal (or a member's of another protocol) as Harmony's error."""
        return error if isinstance(error, VoiceError) else cls(error.identifier, error.human_message)


def parse_request(data: bytes) -> voice_pb2.StreamMessageRequest | VoiceError:
    """A client's StreamMessageRequest, or voice-bad-frame (docs/harmony.md#errors) for bytes that
    do not decode: both front-ends (gRPC and hRPC) and the cluster bridge read requests through it."""
    try:
        request: voice_pb2.StreamMessageRequest = voice_pb2.StreamMessageRequest.FromString(data)
    except Exception:  # protobuf's DecodeError: bad wire format, bad UTF-8, RecursionError on nesting
        return VoiceError("fastsfu.voice-bad-frame", "undecodable StreamMessageRequest")
    return request


@dataclass
class VoiceSettings:
    """Session policies (docs/harmony.md#limits)."""

    id_quoting: str = "json"  # "json": IDs as JSON string literals, as scherzo sends them; or "bare"
    duplicate_session: str = "replace"  # or "reject"
    max_users_per_room: int = 50
    init_timeout: float = 10.0
    prepare_timeout: float = 10.0
    join_timeout: float = 30.0  # covers a microphone permission prompt
    max_outbox: int = 4096  # queued responses before a client that does not read is dropped
    speaking_detection: bool = True  # measure who speaks from audio levels (docs/observers.md#speaking)
    last_n: int = 0  # forward each member only the N most recent loud speakers; 0: everyone
    opus_red: bool = False  # rooms route Opus RED beside Opus (docs/transports.md#opus-red)

    def __post_init__(self) -> None:
        if self.id_quoting not in ("json", "bare") or self.duplicate_session not in ("replace", "reject"):
            raise ValueError("id_quoting must be json|bare and duplicate_session replace|reject")
        if self.max_users_per_room < 1 or self.max_outbox < 16 or self.last_n < 0:
            raise ValueError("max_users_per_room must be >= 1, max_outbox >= 16 and last_n >= 0")


class VoiceRooms(Rooms):
    """The room registry (fastsfu.rooms) with Harmony's sessions: rooms by (guild, channel), sessions
    by user. Other front-ends (discord/) share it as a plain Rooms."""

    def __init__(
        self,
        engine: Engine,
        settings: VoiceSettings | None = None,
        authorize: Authorize | None = None,  # raises VoiceError (h.*) to refuse
    ) -> None:
        self.settings = settings or VoiceSettings()
        super().__init__(
            engine,
            self.settings.max_users_per_room,
            authorize,
            self.settings.speaking_detection,
            self.settings.last_n,
            self.settings.opus_red,
        )
        self.sessions: dict[int, VoiceSession] = {}  # user -> the session that passed Initialize
        self.open_sessions: set[VoiceSession] = set()  # every stream's session, until it closes
        # Counted by the front-ends for monitoring: streams opened (by front-end) and ended by error.
        self.streams_opened: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()  # by identifier
        # Makes each stream's session; a cluster worker's routes it to its room's home node.
        self.session_factory: Callable[[VoiceRooms, int, str, str], VoiceSession] = VoiceSession
        # Runs a callback soon, after what the event loop has waiting (the edge sets the loop's
        # call_soon): a join into a big room is then made in slices (VoiceSession._join). None:
        # every join is one step.
        self.schedule: Callable[[Callable[[], None]], object] | None = None

    def open_session(self, user_id: int, frontend: str = "", remote: str = "") -> VoiceSession:
        """A new stream from an authenticated user (front-end and address for the logs)."""
        session = self.session_factory(self, user_id, frontend, remote)
        self.open_sessions.add(session)
        return session


class VoiceSession:
    """INIT -> PREPARE -> JOIN -> JOINED (docs/harmony.md#session-flow), then closed exactly once."""

    def __init__(self, rooms: VoiceRooms, user_id: int, frontend: str = "", remote: str = "") -> None:
        self.rooms = rooms
        self.user_id = user_id
        self.frontend = frontend
        self.remote = remote
        self.end_reason = ""  # why the stream ends (an error identifier), for the leave line
        self.left_by_peer = False  # the client closed its DTLS association: a leave, no error
        self.state = "init"
        self.outbox: deque[Resp | VoiceError] = deque()
        self.room: Room | None = None  # from Initialize on
        self._caps: RtpCapabilities | None = None
        self.consumer_transport: WebRtcTransport | None = None
        self.producer_transport: WebRtcTransport | None = None
        self.producer: Producer | None = None
        self.consumers: dict[str, Consumer] = {}  # by bare consumer id
        # Made ahead of a sliced join, before anyone is told (VoiceSession._join): by producer id,
        # the consumer and its UserConsumerOptions.
        self._premade: dict[str, tuple[Consumer, voice_pb2.UserConsumerOptions]] = {}
        # Called whenever something is queued, also from other sessions' steps (UserJoined,
        # UserLeft, session-replaced): the front-end wakes up and drains take_outgoing().
        self.on_output: Callable[[], None] | None = None

    # ------------------------------------------------------------------ front-end interface

    def timeout(self) -> float | None:
        s = self.rooms.settings
        return {"init": s.init_timeout, "prepare": s.prepare_timeout, "join": s.join_timeout}.get(self.state)

    def take_outgoing(self) -> list[Resp | VoiceError]:
        out = list(self.outbox)
        self.outbox.clear()
        return out

    def handle(self, request: Req) -> None:
        """One request; raises VoiceError when the stream must end with that error."""
        if self.state in ("closed", "joining"):
            return  # joining: nothing is valid before JoinedChannel, and the join is under way
        kind = request.WhichOneof("message")
        expected = {"init": "initialize", "prepare": "prepare_for_join_channel", "join": "join_channel"}
        if self.state == "joined":
            if kind == "resume_consumer":
                self._resume(request.resume_consumer.consumer_id)
            return  # anything else once joined is ignored (docs/harmony.md#session-flow)
        if kind != expected[self.state]:
            raise VoiceError(
                "fastsfu.voice-unexpected-message", f"expected {expected[self.state]}, got {kind}"
            )
        try:
            if kind == "initialize":
                self._initialize(request.initialize.guild_id, request.initialize.channel_id)
            elif kind == "prepare_for_join_channel":
                self._prepare(request.prepare_for_join_channel.rtp_capabilities)
            else:
                self._join(request.join_channel)
        except VoiceError:
            raise
        except Exception as exc:  # a bug: this stream ends with an error, the others go on
            log.exception("voice session of user %d failed in state %s", self.user_id, self.state)
            raise VoiceError("hrpc.internal-server-error", "internal error") from exc

    def timed_out(self) -> VoiceError:
        return VoiceError("fastsfu.voice-message-timeout", f"no message in state {self.state}")

    def close(self, reason: str = "") -> None:
        """The stream ended (any reason): leave exactly once (docs/harmony.md#leaving)."""
        if self.state == "closed":
            return
        room = self.room
        was_member = room is not None and room.members.get(self.user_id) is self
        if was_member:
            self._log_member("leave", reason or self.end_reason or "left")
        self.state = "closed"
        self.rooms.open_sessions.discard(self)
        if room is not None:
            room.remove(self)
            room.unhold(self)
        if self.rooms.sessions.get(self.user_id) is self:
            del self.rooms.sessions[self.user_id]
        for transport in (self.producer_transport, self.consumer_transport):
            if transport is not None:
                transport.close()  # closes the producer, its consumers elsewhere, and ours
        if room is not None:
            if was_member:
                room.announce_left(self.user_id)
            self.rooms.release(room)
        if self.on_output is not None:
            self.on_output()  # closed by the server (shutdown): the front-end ends the stream

    # ------------------------------------------------------------------ states

    def _initialize(self, guild_id: int, channel_id: int) -> None:
        rooms = self.rooms
        try:
            rooms.check_authorized(self.user_id, (guild_id, channel_id))
        except RoomError as exc:
            raise VoiceError.of(exc) from None
        old = rooms.sessions.get(self.user_id)
        if old is not None and old is not self:
            if rooms.settings.duplicate_session == "reject":
                raise VoiceError("fastsfu.voice-already-connected", "this user already has a voice session")
            # replace: the old session leaves fully (UserLeft) before this one can join.
            old._send(VoiceError("fastsfu.voice-session-replaced", "a newer session of this user took over"))
            old.close("fastsfu.voice-session-replaced")
        room = rooms.acquire((guild_id, channel_id))
        try:
            room.check_capacity()
        except RoomError as exc:
            rooms.release(room)
            raise VoiceError.of(exc) from None
        rooms.sessions[self.user_id] = self
        room.hold(self)  # until close(): the room outlives a session that has not joined yet
        self.room = room
        self.state = "prepare"
        self._send(
            Resp(initialized=Resp.Initialized(rtp_capabilities=json.dumps(room.router.rtp_capabilities)))
        )

    def _prepare(self, caps_json: str) -> None:
        assert self.room is not None
        try:
            caps = ortc.validate_rtp_capabilities(self._json(caps_json, "rtp_capabilities"))
        except ortc.OrtcError as exc:
            raise VoiceError("fastsfu.voice-incompatible-capabilities", str(exc)) from None
        router_codec = self.room.router.rtp_capabilities["codecs"][0]
        if not any(
            c["mimeType"].lower() == "audio/opus"
            and c["clockRate"] == 48000
            and c.get("channels") == 2
            and c.get("preferredPayloadType") == router_codec["preferredPayloadType"]
            for c in caps["codecs"]
        ):
            raise VoiceError(
                "fastsfu.voice-incompatible-capabilities", "no receivable Opus 48000/2 at the router's PT"
            )
        self._caps = caps
        router = self.room.router
        self.consumer_transport = router.create_webrtc_transport(
            app_data={"user": self.user_id, "role": "consumer"}
        )
        self.producer_transport = router.create_webrtc_transport(
            app_data={"user": self.user_id, "role": "producer"}
        )
        for transport in (self.consumer_transport, self.producer_transport):
            # Consent expiry (RFC 7675 §5.1), a DTLS failure or the peer's DTLS close (RFC 5246
            # §7.2) closes the transport, and that ends the session: the others get UserLeft.
            transport.observer.once(
                "close", lambda t=transport: self._transport_closed(t.close_reason or "closed")
            )
        self.state = "join"
        self._send(
            Resp(
                prepared_for_join_channel=Resp.PreparedForJoinChannel(
                    consumer_transport_options=self._transport_options(self.consumer_transport),
                    producer_transport_options=self._transport_options(self.producer_transport),
                )
            )
        )

    def _join(self, join: Req.JoinChannel) -> None:
        room, caps = self.room, self._caps
        assert room is not None and caps is not None
        assert self.producer_transport is not None and self.consumer_transport is not None
        rtp_parameters = self._json(join.rtp_paramaters, "rtp_paramaters")
        for transport, field_name in (
            (self.producer_transport, "producer_dtls_paramaters"),
            (self.consumer_transport, "consumer_dtls_paramaters"),
        ):
            dtls = self._json(getattr(join, field_name), field_name)
            own = {f["value"].upper() for f in transport.dtls_parameters["fingerprints"]}
            theirs = dtls.get("fingerprints") if isinstance(dtls, dict) else None
            if isinstance(theirs, list) and any(
                isinstance(f, dict) and str(f.get("value", "")).upper() in own for f in theirs
            ):
                raise VoiceError(
                    "fastsfu.voice-bad-dtls-parameters", f"{field_name} echoes the server's fingerprint"
                )
            try:
                transport.connect(dtls)
            except TransportError as exc:
                raise VoiceError("fastsfu.voice-bad-dtls-parameters", f"{field_name}: {exc}") from None
        try:
            self.producer = self.producer_transport.produce(rtp_parameters)
        except CREATE_ERRORS as exc:
            raise VoiceError("fastsfu.voice-create-producer", str(exc)) from None
        schedule = self.rooms.schedule
        if schedule is None or len(room.members) <= JOIN_SLICE_MEMBERS:
            self._commit_join()
            return
        # A big room: its 2N consumers and their options are made ahead, JOIN_SLICE_MEMBERS
        # members a slice with the loop free in between, and nobody is told anything until the
        # commit (one step, as always), which only sends what is ready; members who came or
        # went meanwhile are handled there as in a one-step join (docs/harmony.md#session-flow).
        self.state = "joining"
        steps = self._make_ahead(list(room.members.values()))
        schedule(lambda: self._join_slice(steps, schedule))

    def _make_ahead(self, members: list[RoomMember]) -> Iterator[None]:
        """One item per member: our consumer of its producer, and its consumer of ours. A failure
        is left for the commit, which tries again and refuses the join all or none."""
        assert self.consumer_transport is not None and self._caps is not None and self.producer is not None
        for member in members:
            producer = member.producer
            if self.state != "joining":
                return
            if producer is not None and not producer.closed:
                try:
                    mine = self._consume(self.consumer_transport, producer, self._caps, self)
                except VoiceError:
                    pass
                else:
                    self._premade[producer.id] = (
                        mine,
                        self._consumer_options(member.user_id, producer, mine),
                    )
            # Members of any protocol that can (Harmony's, Discord's) consume ours ahead too.
            make_ahead_for = getattr(member, "make_ahead_for", None)
            if make_ahead_for is not None:
                make_ahead_for(self.user_id, self.producer)
            yield

    def make_ahead_for(self, user_id: int, producer: Producer) -> None:
        """A joiner's producer consumed here ahead of its member_joined, which then uses it; the
        consumer closes with the producer if the join never commits."""
        if self.state != "joined" or producer.id in self._premade:
            return
        assert self.consumer_transport is not None and self._caps is not None
        try:
            consumer = self._consume(self.consumer_transport, producer, self._caps, self)
        except VoiceError:
            return  # member_joined tries again, and a failure there refuses the join
        entry = self._premade[producer.id] = (consumer, self._consumer_options(user_id, producer, consumer))
        # The joiner may go before its commit: forget the consumer when it closes with the producer.
        consumer.observer.once(
            "close",
            lambda: self._premade.pop(producer.id) if self._premade.get(producer.id) is entry else None,
        )

    def _join_slice(self, steps: Iterator[None], schedule: Callable[[Callable[[], None]], object]) -> None:
        if self.state != "joining":
            return  # closed meanwhile: its producer took the consumers made ahead with it
        assert self.room is not None
        done = True
        with TableHold(self.room.router.engine.datapath.tables_lock) as hold:
            for count, _ in enumerate(steps, 1):  # each item's work runs inside next()
                if count == JOIN_SLICE_MEMBERS:
                    done = False
                    break
                hold.tick()
        schedule(self._commit_joined_later if done else lambda: self._join_slice(steps, schedule))

    def _commit_joined_later(self) -> None:
        if self.state != "joining":
            return
        try:
            self._commit_join()
        except VoiceError as exc:
            self._send(exc)
            self.close(f"{exc.identifier}: {exc.human_message}")
        except Exception:  # a bug: this stream ends with an error, the others go on
            log.exception("voice session of user %d failed in state joining", self.user_id)
            self._send(VoiceError("hrpc.internal-server-error", "internal error"))
            self.close("hrpc.internal-server-error")

    def _commit_join(self) -> None:
        """The join commit: one step, no await (docs/harmony.md#session-flow)."""
        room, caps = self.room, self._caps
        assert room is not None and caps is not None and self.consumer_transport is not None
        others = []
        consumer_transport = self.consumer_transport
        # The 2N table writes of this join under one hold of the datapath's tables, handed back
        # between members when the datapath thread waits (table_hold.py).
        hold = TableHold(room.router.engine.datapath.tables_lock)

        def consume(member: RoomMember) -> None:
            hold.tick()
            if member.producer is not None:  # a member of another protocol may not send yet
                ready = self._take_premade(member.producer)
                if ready is not None:
                    others.append(ready[1])
                    return
                mine = self._consume(consumer_transport, member.producer, caps, self)
                others.append(self._consumer_options(member.user_id, member.producer, mine))

        try:
            room.check_capacity()
            # Each member's producer consumed here, then UserJoined to it (unicast, never to the
            # joiner); all or none (Room.announce_joined).
            with hold:
                room.announce_joined(self, list(room.members.values()), before=consume)
        except RoomError as exc:
            raise VoiceError.of(exc) from None
        for consumer, _ in self._premade.values():
            consumer.close()  # made ahead for a member who has left since
        self._premade.clear()
        room.add(self)
        self.state = "joined"
        self._log_member("join")
        self._send(Resp(joined_channel=Resp.JoinedChannel(other_users=others)))

    # ------------------------------------------------------------------ RoomMember

    def member_joined(self, user_id: int, producer: Producer) -> None:
        """A paused consumer on this user's transport, built with this user's caps, and UserJoined."""
        assert self.consumer_transport is not None and self._caps is not None
        ready = self._take_premade(producer)
        if ready is not None:
            options = ready[1]
        else:
            consumer = self._consume(self.consumer_transport, producer, self._caps, self)
            options = self._consumer_options(user_id, producer, consumer)
        self._send(Resp(user_joined=Resp.UserJoined(data=options)))

    def _take_premade(self, producer: Producer) -> tuple[Consumer, voice_pb2.UserConsumerOptions] | None:
        ready = self._premade.pop(producer.id, None)
        return ready if ready is not None and not ready[0].closed else None

    @property
    def reports_speaking(self) -> bool:
        return False  # protocol.voice.v1 has no speaking message: measured (docs/observers.md#speaking)

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        """protocol.voice.v1 cannot carry it; the demo page polls the room instead."""

    def member_left(self, user_id: int) -> None:
        self._send(Resp(user_left=Resp.UserLeft(user_id=user_id)))

    def _resume(self, consumer_id: str) -> None:
        # Accept the quoted form (what we send with id_quoting=json) and the bare one (docs/harmony.md#ids).
        bare = consumer_id
        if consumer_id.startswith('"'):
            try:
                bare = json.loads(consumer_id)
            except ValueError:
                return
        consumer = self.consumers.get(bare) if isinstance(bare, str) else None
        if consumer is not None:
            consumer.resume()  # idempotent; only this session's consumers are reachable

    def _transport_closed(self, reason: str) -> None:
        if reason == CLOSED_BY_PEER:
            # The client sent close_notify (RFC 5246 §7.2.1): it left on purpose, so the session
            # ends as a leave (the others get UserLeft) and its stream ends cleanly, not in error.
            if self.state != "closed":
                self.left_by_peer = True
                self.close("left: the client closed its DTLS association")
            return
        self._transport_failed(reason)

    def _transport_failed(self, reason: str) -> None:
        if self.state == "closed":
            return  # our own close() is closing the transports
        self._send(VoiceError("fastsfu.voice-transport-failed", reason))
        self.close(f"fastsfu.voice-transport-failed: {reason}")

    # ------------------------------------------------------------------ helpers

    def _log_member(self, event: str, reason: str = "") -> None:
        """One info line per join and leave: who, which room, over what, from where (no token)."""
        assert self.room is not None
        guild_id, channel_id = self.room.key
        fields: dict[str, Any] = {
            "user_id": self.user_id,
            "guild_id": guild_id,
            "channel_id": channel_id,
            "protocol": "harmony",
            "frontend": self.frontend,
            "remote": self.remote,
        }
        via = f"harmony/{self.frontend}" if self.frontend else "harmony"
        where = (
            f"user {self.user_id} guild {guild_id} channel {channel_id} via {via} from {self.remote or '?'}"
        )
        if event == "leave":
            fields["reason"] = reason
            log.info("voice leave: %s: %s", where, reason, extra=fields)
        else:
            log.info("voice join: %s", where, extra=fields)

    def _send(self, message: Resp | VoiceError) -> None:
        if self.state == "closed" and not isinstance(message, VoiceError):
            return
        if len(self.outbox) >= self.rooms.settings.max_outbox:
            # A client that stops reading must not grow memory without bound: drop it.
            self.outbox.clear()
            self.outbox.append(VoiceError("hrpc.internal-server-error", "client is not reading its stream"))
            self.close("hrpc.internal-server-error: client is not reading its stream")
        else:
            self.outbox.append(message)
        if self.on_output is not None:
            self.on_output()

    def _id(self, value: str) -> str:
        return json.dumps(value) if self.rooms.settings.id_quoting == "json" else value

    @staticmethod
    def _json(text: str, field: str) -> Any:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            raise VoiceError("fastsfu.voice-invalid-json", f"{field} is not valid JSON") from None

    def _transport_options(self, transport: WebRtcTransport) -> voice_pb2.TransportOptions:
        return voice_pb2.TransportOptions(
            id=self._id(transport.id),
            dtls_parameters=json.dumps(transport.dtls_parameters),
            ice_candidates=[json.dumps(c) for c in transport.ice_candidates],
            ice_parameters=json.dumps(transport.ice_parameters),
        )

    def _consume(
        self, transport: WebRtcTransport, producer: Producer, caps: RtpCapabilities, owner: VoiceSession
    ) -> Consumer:
        try:
            consumer = transport.consume(producer.id, caps, paused=True)  # resumed by ResumeConsumer
        except CREATE_ERRORS as exc:
            raise VoiceError("fastsfu.voice-create-consumer", str(exc)) from None
        owner.consumers[consumer.id] = consumer
        # Forget it when it closes (its producer left): long sessions with churn stay bounded.
        consumer.observer.once("close", lambda: owner.consumers.pop(consumer.id, None))
        return consumer

    def _consumer_options(
        self, user_id: int, producer: Producer, consumer: Consumer
    ) -> voice_pb2.UserConsumerOptions:
        return voice_pb2.UserConsumerOptions(
            user_id=user_id,
            producer_id=self._id(producer.id),
            consumer_id=self._id(consumer.id),
            rtp_parameters=json.dumps(consumer.rtp_parameters),
        )
