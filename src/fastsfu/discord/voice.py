"""The media side of the Discord gateway: each session gets a Discord UDP transport and joins a room
shared with Harmony users (docs/discord.md#rooms).

A configured map puts a Discord server_id into a Harmony (guild_id, channel_id) room; other
server_ids get rooms of their own. Members of either protocol fan out through RoomMember.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastsfu import __version__
from fastsfu.consumer import Consumer
from fastsfu.discord.crypto import LEGACY_MODES, MODES, legacy_modes_available
from fastsfu.discord.gateway import GatewayError, GatewayHandler, Session
from fastsfu.discord.opcodes import CloseCode, Op
from fastsfu.discord.udp_transport import (
    DISCORD_RTP_CAPABILITIES,
    DiscordUdpTransport,
    create_udp_transport,
    discovery_table,
    rtp_parameters,
)
from fastsfu.discord.webrtc_sdp import SdpError, WebRtcOffer, answer, parse_fragment
from fastsfu.producer import Producer
from fastsfu.rooms import (
    CREATE_ERRORS,
    ConsumeError,
    RemoteMember,
    Room,
    RoomError,
    RoomKey,
    RoomMember,
    Rooms,
)
from fastsfu.table_hold import TableHold
from fastsfu.transport import Transport, TransportError
from fastsfu.types import RtpCapabilities

log = logging.getLogger("fastsfu.discord")

# Members per slice of a sliced join (about 40 us each), as Harmony's (docs/harmony.md, "Session
# flow"): rooms this small join in one step.
JOIN_SLICE_MEMBERS = 8

Authenticate = Callable[[str], int]  # token -> user id; raises a RoomError (the Harmony hook's VoiceError)

# Harmony authorization identifiers -> the Discord close code a client understands.
_AUTHZ_CLOSE = {"h.bad-guild-id": CloseCode.SERVER_NOT_FOUND, "h.bad-channel-id": CloseCode.SERVER_NOT_FOUND}


class DiscordMember:
    """One Discord gateway session in a room: its transport (udp, or webrtc once selected), its
    producer and its consumers of the others."""

    def __init__(self, session: Session, user_id: int, room: Room, transport: DiscordUdpTransport) -> None:
        self.session = session
        self.user_id = user_id
        self.room = room
        self.udp: DiscordUdpTransport | None = transport
        self.transport: Transport = transport
        self.offer: WebRtcOffer | None = None  # the browser's fragment, for the webrtc protocol
        self.ssrc: int | None = transport.ssrc  # READY's (udp) or the first announced (webrtc)
        self.producer: Producer | None = None
        self.consumers: dict[int, Consumer] = {}  # by the sending user
        self.speaking = 0  # the last SPEAKING bitmask, replayed to newcomers (op 5)
        self.joined = False

    @property
    def reports_speaking(self) -> bool:
        """udp clients send SPEAKING (op 5) as they talk; browsers (webrtc) are measured."""
        return self.offer is None

    @property
    def receive_capabilities(self) -> RtpCapabilities:
        return self.offer.rtp_capabilities() if self.offer is not None else DISCORD_RTP_CAPABILITIES

    # ------------------------------------------------------------------ RoomMember

    def member_joined(self, user_id: int, producer: Producer) -> None:
        consumer = self.consumers.get(user_id)
        if consumer is None or consumer.closed or consumer.producer is not producer:
            consumer = self._consume(user_id, producer)  # unless made ahead (make_ahead_for)
        self.session.send(Op.CLIENTS_CONNECT, {"user_ids": [str(user_id)]})
        self._introduce(user_id)
        self._announce(user_id, consumer.ssrc, _speaking_of(self.room, user_id))

    def make_ahead_for(self, user_id: int, producer: Producer) -> None:
        """A joiner's producer consumed here ahead of its member_joined, which then uses it (a
        sliced join, DiscordVoice._start_join); it closes with the producer if the join never
        commits. A failure is left to member_joined, which refuses the join all or none."""
        if not self.joined or user_id in self.consumers:
            return
        with contextlib.suppress(ConsumeError):  # member_joined tries again
            self._consume(user_id, producer)

    def member_left(self, user_id: int) -> None:
        self.consumers.pop(user_id, None)  # closed with its producer already
        self.session.send(Op.CLIENT_DISCONNECT, {"user_id": str(user_id)})

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        """A measured member (a browser, a Harmony user) started or stopped speaking: op 5 with
        the microphone bit, under the SSRC this client receives it as. A member on another node
        whose client reports its speaking: op 5 with the flags it sent (docs/cluster.md#remote-members)."""
        consumer = self.consumers.get(user_id)
        if consumer is not None:
            other = self.room.members.get(user_id)
            flags = other.speaking if isinstance(other, RemoteMember) else None
            self._announce_speaking(user_id, consumer.ssrc, flags if flags is not None else int(speaking))

    # ------------------------------------------------------------------ helpers

    def _consume(self, user_id: int, producer: Producer) -> Consumer:
        """Forward `producer` here under its own SSRC when free (so SPEAKING's ssrc is the
        sender's), else a fresh one. udp receivers get PT 120, no extensions and CC 0;
        webrtc receivers their own Opus PT and extension IDs (docs/discord.md#the-webrtc-protocol)."""
        caps = self.receive_capabilities
        try:
            try:
                consumer = self.transport.consume(producer.id, caps, ssrc=producer.ssrc)
            except TransportError:
                consumer = self.transport.consume(producer.id, caps)
        except CREATE_ERRORS as exc:
            raise ConsumeError(str(exc)) from None
        self.consumers[user_id] = consumer
        consumer.observer.once("close", lambda: self._forget(user_id, consumer))
        return consumer

    def _forget(self, user_id: int, consumer: Consumer) -> None:
        if self.consumers.get(user_id) is consumer:
            del self.consumers[user_id]

    def _introduce(self, user_id: int) -> None:
        """CLIENT_FLAGS and CLIENT_PLATFORM for a member (docs/discord.md#opcodes): no clip or recording
        permissions, desktop; real clients expect both for every user in the call."""
        self.session.send(Op.CLIENT_FLAGS, {"user_id": str(user_id), "flags": 0})
        self.session.send(Op.CLIENT_PLATFORM, {"user_id": str(user_id), "platform": 0})

    def _announce(self, user_id: int, ssrc: int, speaking: int) -> None:
        if self.offer is not None:
            # A browser builds its remote description's a=ssrc lines from op 12.
            video = {
                "user_id": str(user_id),
                "audio_ssrc": ssrc,
                "video_ssrc": 0,
                "rtx_ssrc": 0,
                "streams": [],
            }
            self.session.send(Op.VIDEO, video)
        # djs maps SSRC -> user only from a server SPEAKING with user_id (op 5).
        self._announce_speaking(user_id, ssrc, speaking)

    def _announce_speaking(self, user_id: int, ssrc: int, speaking: int) -> None:
        self.session.send(Op.SPEAKING, {"user_id": str(user_id), "ssrc": ssrc, "speaking": speaking})


def _speaking_of(room: Room, user_id: int) -> int:
    member = room.members.get(user_id)
    if isinstance(member, DiscordMember) and (member.reports_speaking or member.speaking):
        return member.speaking  # what its client said last
    if isinstance(member, RemoteMember) and member.speaking is not None:
        return member.speaking  # what its client said last, relayed by its node
    if room.speaking_detection:  # measured: speaking now or not (docs/observers.md#speaking)
        return 1 if user_id in room.speaking_users else 0
    # Not measured: a Harmony user or a silent browser; announce a microphone (bit 1).
    return 1


class DiscordVoice(GatewayHandler):
    """GatewayHandler: IDENTIFY allocates an SSRC and a UDP transport, SELECT_PROTOCOL keys it and
    joins the room, SPEAKING is relayed, the end of a session leaves the room exactly once."""

    def __init__(
        self,
        rooms: Rooms,
        authenticate: Authenticate,
        room_map: Mapping[str, RoomKey] | None = None,  # [discord.rooms]: server_id -> room key
        only_mapped: bool = False,
        announced_ip: str | None = None,
        webrtc: bool = True,
        legacy_modes: bool = False,
    ) -> None:
        self.rooms = rooms
        self.webrtc = webrtc
        # READY's modes: the AEAD ones first, legacy ones (if enabled and PyNaCl is there) after.
        self.modes = MODES + (LEGACY_MODES if legacy_modes and legacy_modes_available() else ())
        if legacy_modes and not legacy_modes_available():
            log.warning(
                "legacy Discord modes need PyNaCl (pip install 'fastsfu[discord-legacy]'): not offered"
            )
        self.authenticate = authenticate
        # Runs a callback soon, after what the event loop has waiting (the server sets the loop's
        # call_soon): a join into a big room is then made in slices (_start_join). None: one step.
        self.schedule: Callable[[Callable[[], None]], object] | None = None
        self.room_map = dict(room_map or {})
        self.only_mapped = only_mapped
        self.announced_ip = announced_ip

    # ------------------------------------------------------------------ IDENTIFY

    def identify(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        try:
            token_user = self.authenticate(session.token)
        except RoomError as exc:
            raise GatewayError(CloseCode.AUTHENTICATION_FAILED, exc.human_message) from None
        user_id = int(session.user_id)
        if token_user != user_id:
            raise GatewayError(CloseCode.AUTHENTICATION_FAILED, "the token belongs to another user")
        key = self._room_key(session.server_id)
        try:
            self.rooms.check_authorized(user_id, key)
        except RoomError as exc:
            code = _AUTHZ_CLOSE.get(exc.identifier, CloseCode.AUTHENTICATION_FAILED)
            raise GatewayError(code, exc.human_message) from None
        room = self.rooms.acquire(key)
        try:
            transport = create_udp_transport(
                room.router, self._free_ssrc(), self.announced_ip, app_data={"discord_user": user_id}
            )
        except (*CREATE_ERRORS, ValueError) as exc:
            self.rooms.release(room)
            raise GatewayError(CloseCode.BAD_REQUEST, f"cannot allocate media: {exc}") from None
        member = DiscordMember(session, user_id, room, transport)
        room.hold(member)
        session.attachment = member
        ip, port = transport.local_address
        return {
            "ssrc": transport.ssrc,
            "ip": ip,
            "port": port,
            "modes": list(self.modes),
            "experiments": [],
            "streams": [],
        }

    def _room_key(self, server_id: str) -> RoomKey:
        if self.only_mapped and server_id not in self.room_map:
            raise GatewayError(CloseCode.SERVER_NOT_FOUND, f"no voice server {server_id!r} here")
        return self.room_key(server_id)

    def _free_ssrc(self) -> int:
        """A non-zero SSRC unused by Discord sessions of this engine and by producers of any room."""
        taken = {p.ssrc for room in self.rooms for p in room.router.producers.values()}
        discovery = discovery_table(self.rooms.engine)
        for _ in range(64):
            ssrc = secrets.randbelow(2**32 - 1) + 1
            if ssrc not in taken and discovery.lookup(ssrc) is None:
                return ssrc
        raise ValueError("no free SSRC")

    # ------------------------------------------------------------------ SELECT_PROTOCOL

    def select_protocol(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        member = self._member(session)
        if d["protocol"] == "webrtc":
            return self._select_webrtc(member, d)
        data = d.get("data")
        mode = data.get("mode") if isinstance(data, dict) else None
        if mode not in self.modes:
            raise GatewayError(CloseCode.UNKNOWN_ENCRYPTION_MODE, f"unknown encryption mode {mode!r}")
        assert member.udp is not None
        key = member.udp.select_mode(mode)
        try:
            member.producer = member.udp.produce(rtp_parameters(member.udp.ssrc))
        except CREATE_ERRORS as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, f"cannot create the producer: {exc}") from None
        self._start_join(member)
        return {
            "mode": mode,
            "secret_key": list(key),
            "audio_codec": "opus",
            "video_codec": "H264",
            "media_session_id": uuid.uuid4().hex,
            "dave_protocol_version": 0,  # DAVE declined; discord.py needs the field
        }

    def _select_webrtc(self, member: DiscordMember, d: dict[str, Any]) -> dict[str, Any]:
        """ICE-lite, DTLS passive and SRTP on the shared port (docs/discord.md#the-webrtc-protocol); the
        producer comes with the first SSRC the browser announces (SPEAKING or VIDEO)."""
        if not self.webrtc:
            raise GatewayError(CloseCode.UNKNOWN_PROTOCOL, "the webrtc protocol is disabled")
        fragment = d.get("sdp") if isinstance(d.get("sdp"), str) else d.get("data")
        try:
            offer = parse_fragment(fragment if isinstance(fragment, str) else "", d.get("codecs"))
        except SdpError as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, str(exc)) from None
        router = member.room.router
        try:
            webrtc = router.create_webrtc_transport(app_data={"discord_user": member.user_id})
        except (*CREATE_ERRORS, ValueError) as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, f"cannot allocate media: {exc}") from None
        try:
            webrtc.connect({"role": "client", "fingerprints": offer.fingerprints})  # we are passive
        except TransportError as exc:
            webrtc.close()
            raise GatewayError(CloseCode.BAD_REQUEST, f"bad DTLS parameters: {exc}") from None
        if member.udp is not None:
            member.udp.close()  # READY's SSRC and the udp transport are not used by a browser
            member.udp = None
        member.transport = webrtc
        member.offer = offer
        member.ssrc = None
        session = member.session
        webrtc.observer.once("close", lambda: self._media_gone(session, webrtc.close_reason))
        self._join(member)
        member.session.send(Op.MEDIA_SINK_WANTS, {"any": 100})
        candidate = webrtc.ice_candidates[0]
        tcp = next((c for c in webrtc.ice_candidates if c["protocol"] == "tcp"), None)
        fingerprint = next(f for f in webrtc.dtls_parameters["fingerprints"] if f["algorithm"] == "sha-256")
        return {
            "audio_codec": "opus",
            "video_codec": "H264",
            "media_session_id": uuid.uuid4().hex,
            "sdp": answer(candidate["ip"], candidate["port"], webrtc.ice_parameters, fingerprint, tcp),
            "dave_protocol_version": 0,
        }

    def _media_gone(self, session: Session, why: str | None) -> None:
        """The browser's transport closed itself (its DTLS close_notify or a fatal alert, DTLS
        failure, ICE consent expiry): end the session at once, the others get op 13."""
        if session.state in ("active", "suspended"):
            session.close(CloseCode.DISCONNECTED, f"media connection lost: {why or 'closed'}")

    def _start_join(self, member: DiscordMember) -> None:
        """_join, or in a room of more than JOIN_SLICE_MEMBERS (with a schedule) the same in slices:
        the consumers of both directions made ahead, JOIN_SLICE_MEMBERS members a slice with the
        loop free in between and nobody told anything; then the commit, one step, which sends the
        others their announcements; then the joiner's introductions of the others, in slices,
        skipping whoever left meanwhile (it heard op 13 for them already)."""
        room, schedule = member.room, self.schedule
        if schedule is None or len(room.members) <= JOIN_SLICE_MEMBERS:
            self._join(member)
            return
        if member.user_id in room.members:
            raise GatewayError(CloseCode.BAD_REQUEST, "this user is already in the voice channel")
        try:
            room.check_capacity()  # refused at once if full now; checked again at the commit
        except RoomError as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, exc.human_message) from None
        steps = self._make_ahead(member, list(room.members.values()))
        schedule(lambda: self._slice(member, steps, schedule, self._commit_later))

    def _make_ahead(self, member: DiscordMember, others: list[RoomMember]) -> Iterator[None]:
        for other in others:
            if member.session.attachment is not member:
                return  # ended: its producer took the consumers made for it along
            if (
                other.producer is not None
                and not other.producer.closed
                and other.user_id not in member.consumers
            ):
                # A failure is tried again by the commit, which refuses the join all or none.
                with contextlib.suppress(ConsumeError):
                    member._consume(other.user_id, other.producer)
            make_ahead_for = getattr(other, "make_ahead_for", None)  # members of any protocol
            if member.producer is not None and make_ahead_for is not None:
                make_ahead_for(member.user_id, member.producer)
            yield

    def _slice(
        self,
        member: DiscordMember,
        steps: Iterator[None],
        schedule: Callable[[Callable[[], None]], object],
        then: Callable[[DiscordMember], None],
    ) -> None:
        if member.session.attachment is not member:
            return
        done = True
        with TableHold(member.room.router.engine.datapath.tables_lock) as hold:
            for count, _ in enumerate(steps, 1):  # each item's work runs inside next()
                if count == JOIN_SLICE_MEMBERS:
                    done = False
                    break
                hold.tick()
        schedule((lambda: then(member)) if done else lambda: self._slice(member, steps, schedule, then))

    def _commit_later(self, member: DiscordMember) -> None:
        if member.session.attachment is not member:
            return  # ended before its commit
        try:
            others = self._commit(member)
        except GatewayError as exc:
            member.session.close(exc.code, exc.reason)
            return
        if others:
            member.session.send(Op.CLIENTS_CONNECT, {"user_ids": [str(o.user_id) for o in others]})
        schedule = self.schedule
        assert schedule is not None
        steps = self._introductions(member, others)
        schedule(lambda: self._slice(member, steps, schedule, lambda _: None))

    def _introductions(self, member: DiscordMember, others: list[RoomMember]) -> Iterator[None]:
        room = member.room
        for other in others:
            if member.session.attachment is not member or not member.joined:
                return
            if room.members.get(other.user_id) is other:  # not gone meanwhile (op 13 sent then)
                member._introduce(other.user_id)
                consumer = member.consumers.get(other.user_id)
                if consumer is not None:
                    member._announce(other.user_id, consumer.ssrc, _speaking_of(room, other.user_id))
            yield

    def _commit(self, member: DiscordMember) -> list[RoomMember]:
        """The room commit, one step with no await: consumers both ways (any not made ahead), the
        announcements to the others, and the joiner in. Returns the others."""
        room = member.room
        if member.user_id in room.members:
            raise GatewayError(CloseCode.BAD_REQUEST, "this user is already in the voice channel")
        others: list[RoomMember] = list(room.members.values())
        try:
            room.check_capacity()
            # The 2N table writes under one hold of the datapath's tables, handed back between
            # members when the datapath thread waits (table_hold.py).
            with TableHold(room.router.engine.datapath.tables_lock) as hold:
                for other in others:
                    hold.tick()
                    if other.producer is not None:
                        consumer = member.consumers.get(other.user_id)
                        if consumer is None or consumer.closed or consumer.producer is not other.producer:
                            member._consume(other.user_id, other.producer)
                if member.producer is not None:
                    room.announce_joined(member, others, before=lambda _: hold.tick())
        except RoomError as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, exc.human_message) from None
        room.add(member)
        member.joined = True
        if member.reports_speaking:  # what it said before its join, for the room's other nodes
            room.report_speaking(member, member.speaking)
        return others

    def _join(self, member: DiscordMember) -> None:
        """The room commit, one step with no await: consumers both ways, then the announcements
        (delivered after op 4)."""
        room = member.room
        others = self._commit(member)
        if others:
            member.session.send(Op.CLIENTS_CONNECT, {"user_ids": [str(o.user_id) for o in others]})
        for other in others:
            member._introduce(other.user_id)
            consumer = member.consumers.get(other.user_id)
            if consumer is not None:
                member._announce(other.user_id, consumer.ssrc, _speaking_of(room, other.user_id))

    # ------------------------------------------------------------------ SPEAKING and the end

    def speaking(self, session: Session, d: dict[str, Any]) -> None:
        member = self._member(session)
        member.speaking = d["speaking"]
        if member.reports_speaking and member.joined:  # counted in fastsfu_speaking_members
            if member.speaking:
                member.room.speaking_users.add(member.user_id)
            else:
                member.room.speaking_users.discard(member.user_id)
            member.room.report_speaking(member, member.speaking)  # to the room's other nodes
        if self._claim_ssrc(member, d["ssrc"]) or not member.joined:
            return  # just announced to the room with this speaking state, or not in it yet
        # Relay to every Discord member, with the SSRC that member receives this user under.
        for other in member.room.members.values():
            if isinstance(other, DiscordMember) and other is not member:
                consumer = other.consumers.get(member.user_id)
                if consumer is not None:
                    other._announce(member.user_id, consumer.ssrc, member.speaking)

    def video(self, session: Session, d: dict[str, Any]) -> None:
        """VIDEO (op 12): a browser announces its audio SSRC here too; video is ignored."""
        audio = d.get("audio_ssrc")
        if isinstance(audio, int) and not isinstance(audio, bool) and 0 < audio < 2**32:
            member = self._member(session)
            if member.offer is not None:
                self._claim_ssrc(member, audio)

    def _claim_ssrc(self, member: DiscordMember, ssrc: int) -> bool:
        """udp: SPEAKING's ssrc must be READY's. webrtc: the first non-zero one is the browser's
        audio SSRC; its producer is created then and announced to the room: True."""
        if member.offer is None or member.ssrc is not None:
            if ssrc != member.ssrc:
                raise GatewayError(CloseCode.BAD_REQUEST, "SPEAKING with an SSRC that is not yours")
            return False
        if ssrc == 0 or not member.joined:
            return False
        try:
            member.producer = member.transport.produce(member.offer.rtp_parameters(ssrc))
        except CREATE_ERRORS as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, f"cannot create the producer: {exc}") from None
        member.ssrc = ssrc
        others = [o for o in member.room.members.values() if o is not member]
        try:
            member.room.announce_joined(member, others)
        except RoomError as exc:
            raise GatewayError(CloseCode.BAD_REQUEST, exc.human_message) from None
        return True

    def other_op(self, session: Session, op: int, d: Any) -> None:
        if op == Op.VOICE_BACKEND_VERSION:  # C->S {}: answer with our versions (v6+)
            session.send(op, {"voice": __version__, "rtc_worker": __version__}, replayable=False)

    # ------------------------------------------------------------------ server-initiated ends

    def disconnect(self, user_id: int, key: RoomKey | None = None) -> int:
        """Kick a user (4014: clients do not reconnect) from the room `key`, or from every room.
        Returns how many sessions were closed."""
        return self._close_members(CloseCode.DISCONNECTED, "disconnected", key, user_id)

    def end_room(self, key: RoomKey) -> int:
        """The call is over (4022): every Discord member of the room leaves."""
        return self._close_members(CloseCode.CALL_TERMINATED, "call terminated", key, None)

    def room_key(self, server_id: str) -> RoomKey:
        """The neutral room key a Discord server_id joins ([discord.rooms]): a mapped (guild_id,
        channel_id), shared with Harmony, or a room of its own."""
        return self.room_map.get(server_id) or ("discord", server_id)

    def _close_members(self, code: int, reason: str, key: RoomKey | None, user_id: int | None) -> int:
        closed = 0
        for room in self.rooms:
            if key is not None and room.key != key:
                continue
            for member in [*room.members.values(), *room.holders]:
                if isinstance(member, DiscordMember) and user_id in (None, member.user_id):
                    member.session.close(code, reason)
                    closed += 1
        return closed

    def suspended(self, session: Session) -> None:
        # Its client may be gone and its port reused by a new client (docs/transports.md#ip-discovery).
        member = session.attachment
        if isinstance(member, DiscordMember) and member.udp is not None and not member.udp.closed:
            member.udp.set_yields_address(True)

    def resumed(self, session: Session) -> None:
        member = session.attachment
        if isinstance(member, DiscordMember) and member.udp is not None and not member.udp.closed:
            member.udp.set_yields_address(False)

    def ended(self, session: Session) -> None:
        member = session.attachment
        if not isinstance(member, DiscordMember):
            return
        session.attachment = None
        room = member.room
        room.unhold(member)
        was_member = room.remove(member)
        announced = member.producer is not None
        member.transport.close()  # its producer, and its consumers on the others' transports
        if member.udp is not None and member.udp is not member.transport:
            member.udp.close()
        if was_member and announced:  # only those who were told of this user hear it left
            room.announce_left(member.user_id)
        self.rooms.release(room)

    @staticmethod
    def _member(session: Session) -> DiscordMember:
        member = session.attachment
        if not isinstance(member, DiscordMember):
            raise GatewayError(CloseCode.BAD_REQUEST, "no media for this session")
        return member
