"""Fuzz Harmony: mediasoup JSON through ortc, hRPC frames (StreamMessageRequest bytes) through
decode_frame, and the VoiceSession fed mutated Initialize / PrepareForJoinChannel / JoinChannel /
ResumeConsumer with real RTP parameters. Bad input ends a stream with a VoiceError that has a known
identifier (never "internal error", never a bare exception) and leaves no room or transport behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from engine_loop import Loop
from hypothesis import event, given
from hypothesis import strategies as st
from mutations import budget, corpus, json_text, mutated, mutated_json
from test_harmony_session import CHANNEL, CLIENT_CAPS, GUILD, chromium_producer

from fastsfu import ortc
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceError, VoiceRooms, VoiceSession
from fastsfu.harmony.hrpc_server import decode_frame
from fastsfu.harmony.session import GRPC_CODES

Req = voice_pb2.StreamMessageRequest
ROUTER_CAPS = ortc.generate_router_rtp_capabilities()
PRODUCER = chromium_producer(4242)
DTLS = {"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]}


def requests(caps: str, params: str, producer_dtls: str, consumer_dtls: str) -> list[Req]:
    return [
        Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)),
        Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)),
        Req(
            join_channel=Req.JoinChannel(
                rtp_paramaters=params,
                producer_dtls_paramaters=producer_dtls,
                consumer_dtls_paramaters=consumer_dtls,
            )
        ),
        Req(resume_consumer=Req.ResumeConsumer(consumer_id='"0"')),
    ]


VALID = requests(json.dumps(CLIENT_CAPS), json.dumps(PRODUCER), json.dumps(DTLS), json.dumps(DTLS))
FRAME_SEEDS = [r.SerializeToString() for r in VALID] + corpus("hrpc")


@budget(300)
@given(st.one_of(mutated_json(CLIENT_CAPS), mutated_json(PRODUCER)), st.sampled_from([0, 1, 2**32]))
def test_ortc_raises_only_ortc_error(value: Any, ssrc: int) -> None:
    for call in (
        lambda: ortc.validate_rtp_capabilities(value),
        lambda: ortc.validate_rtp_parameters(value),
        lambda: ortc.get_producer_rtp_info(value, ROUTER_CAPS),
        lambda: ortc.can_consume(value, ROUTER_CAPS, CLIENT_CAPS),
        lambda: ortc.can_consume(PRODUCER, ROUTER_CAPS, value),
        lambda: ortc.get_consumer_rtp_parameters(PRODUCER, ROUTER_CAPS, value, ssrc),
        lambda: ortc.get_consumer_rtp_parameters(value, ROUTER_CAPS, CLIENT_CAPS, ssrc, "0"),
    ):
        with contextlib.suppress(ortc.OrtcError):
            call()


@budget(500)
@given(st.one_of(st.binary(max_size=256), st.sampled_from(FRAME_SEEDS).flatmap(lambda s: mutated(s, 6))))
def test_hrpc_frame_decodes_or_is_a_bad_frame(data: bytes) -> None:
    try:
        request = decode_frame(data)
    except VoiceError as exc:
        assert exc.identifier == "fastsfu.voice-bad-frame"
        return
    assert isinstance(request, Req)




def drive(session: VoiceSession, request: Req) -> VoiceError | None:
    """One request as a front-end does it: a VoiceError ends the stream, with a known identifier."""
    try:
        session.handle(request)
    except VoiceError as exc:
        assert exc.identifier in GRPC_CODES and exc.identifier != "hrpc.internal-server-error", exc
        return exc
    for message in session.take_outgoing():
        if isinstance(message, VoiceError):
            assert message.identifier != "hrpc.internal-server-error", message
    return None


def valid_join(rooms: VoiceRooms, user: int) -> VoiceSession:
    session = rooms.open_session(user)
    for request in VALID[:3]:
        assert drive(session, request) is None
    assert session.state == "joined"
    return session


def maybe_fuzzed(seed: Any) -> st.SearchStrategy[str]:
    """The seed's JSON text half the time, else a JSON- or text-level mutation of it."""
    return st.one_of(st.just(json.dumps(seed)), json_text(seed))


SESSION_STEPS = st.tuples(
    maybe_fuzzed(CLIENT_CAPS), maybe_fuzzed(PRODUCER), maybe_fuzzed(DTLS), maybe_fuzzed(DTLS)
).map(lambda t: requests(*t))


@budget(150)
@given(
    SESSION_STEPS,
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from(FRAME_SEEDS).flatmap(mutated)), max_size=2),
    st.sampled_from(["alone", "other_first", "other_after"]),
)
def test_session_ends_with_a_voice_error_and_leaves_nothing(
    media: Loop, steps: list[Req], frames: list[tuple[int, bytes]], company: str
) -> None:
    """The fuzzed user's steps (JSON-mutated, and some replaced by byte-mutated hRPC frames) with
    another user joined before or after: errors are VoiceErrors, and closing frees everything."""

    async def body() -> None:
        rooms = VoiceRooms(media.engine)
        transports_before = len(media.engine._transports)
        other = valid_join(rooms, 1) if company == "other_first" else None
        session = rooms.open_session(2)
        for index, frame in frames:
            with contextlib.suppress(VoiceError):
                steps[index] = decode_frame(frame)
        error = None
        for request in steps:
            if (error := drive(session, request)) is not None:
                break
        event(f"fuzzed session: {session.state} {error.identifier if error else ''}")
        if company == "other_after":
            other = valid_join(rooms, 1)  # consumes the fuzzed producer with valid caps
        if other is not None:
            for message in other.take_outgoing():
                assert not isinstance(message, VoiceError), message
        session.close()
        if other is not None:
            other.close()
        assert not rooms.rooms and not rooms.sessions and not rooms.open_sessions
        assert len(media.engine._transports) == transports_before

    media.loop.run_until_complete(asyncio.wait_for(body(), 20))
