"""The Harmony voice session state machine, driven in memory with the JSON real clients send
(docs/harmony.md#session-flow): flow, fan-out, ResumeConsumer, leave, policies and bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fastsfu import Engine
from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.dtls import DtlsCertificate, DtlsClosed, DtlsFailed
from fastsfu.harmony import VoiceError, VoiceRooms, VoiceSession, VoiceSettings

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
GUILD, CHANNEL = 1, 2**60 + 7  # Harmony IDs exceed 2^53

# mediasoup-client 3.24.1 recvRtpCapabilities in Chromium 156: Opus at the router PT, audio-level only.
CLIENT_CAPS = {
    "codecs": [
        {
            "mimeType": "audio/opus",
            "kind": "audio",
            "preferredPayloadType": 100,
            "clockRate": 48000,
            "channels": 2,
            "parameters": {"minptime": 10, "useinbandfec": 1},
            "rtcpFeedback": [],
        }
    ],
    "headerExtensions": [
        {
            "kind": "audio",
            "uri": "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "preferredId": 10,
            "preferredEncrypt": False,
            "direction": "recvonly",
        }
    ],
}


def chromium_producer(ssrc: int) -> dict[str, Any]:
    return {
        "mid": "0",
        "codecs": [
            {
                "mimeType": "audio/opus",
                "payloadType": 111,
                "clockRate": 48000,
                "channels": 2,
                "parameters": {"minptime": 10, "useinbandfec": 1},
                "rtcpFeedback": [],
            }
        ],
        "headerExtensions": [
            {
                "uri": "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
                "id": 1,
                "encrypt": False,
                "parameters": {},
            },
            {"uri": "urn:ietf:params:rtp-hdrext:sdes:mid", "id": 4, "encrypt": False, "parameters": {}},
        ],
        "encodings": [{"ssrc": ssrc, "dtx": False}],
        "rtcp": {"cname": f"c{ssrc}", "reducedSize": True},
        "msid": "a b",
    }


def run(fn: Callable[[VoiceRooms], Awaitable[None]], settings: VoiceSettings | None = None) -> None:
    async def main() -> None:
        async with Engine() as engine:
            await fn(VoiceRooms(engine, settings))

    asyncio.run(asyncio.wait_for(main(), 30))


def join(rooms: VoiceRooms, user: int, ssrc: int | None = None) -> tuple[VoiceSession, Resp]:
    s = rooms.open_session(user)
    s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
    s.handle(
        Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS)))
    )
    dtls = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
    s.handle(
        Req(
            join_channel=Req.JoinChannel(
                rtp_paramaters=json.dumps(chromium_producer(ssrc or 1000 + user)),
                producer_dtls_paramaters=dtls,
                consumer_dtls_paramaters=dtls,
            )
        )
    )
    out = s.take_outgoing()
    assert [m.WhichOneof("message") for m in out] == [
        "initialized",
        "prepared_for_join_channel",
        "joined_channel",
    ]
    return s, out[-1]


def messages(s: VoiceSession) -> list[Any]:
    return s.take_outgoing()


def test_flow_replies_and_transport_options() -> None:
    async def body(rooms: VoiceRooms) -> None:
        s = rooms.open_session(7)
        assert s.timeout() == 10.0
        s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        (init,) = messages(s)
        caps = json.loads(init.initialized.rtp_capabilities)
        assert caps["codecs"][0]["mimeType"] == "audio/opus" and caps["codecs"][0]["channels"] == 2
        s.handle(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS)))
        )
        (prep,) = messages(s)
        c, p = (
            prep.prepared_for_join_channel.consumer_transport_options,
            prep.prepared_for_join_channel.producer_transport_options,
        )
        assert c.id.startswith('"') and json.loads(c.id) != json.loads(p.id)  # JSON-quoted IDs
        cand = json.loads(c.ice_candidates[0])
        assert cand["ip"] == cand["address"] and cand["protocol"] == "udp"
        assert json.loads(c.ice_parameters)["iceLite"] is True
        assert json.loads(c.dtls_parameters)["role"] == "auto"
        assert s.timeout() == 30.0

    run(body)


def test_fan_out_goes_to_each_member_once_never_to_the_joiner() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, joined_a = join(rooms, 1)
        assert list(joined_a.joined_channel.other_users) == []
        b, joined_b = join(rooms, 2)
        (others,) = [list(joined_b.joined_channel.other_users)]
        assert [o.user_id for o in others] == [1]
        (to_a,) = messages(a)
        assert to_a.user_joined.data.user_id == 2
        # A's consumer lives on A's consumer transport, built from A's capabilities.
        consumer_id = json.loads(to_a.user_joined.data.consumer_id)
        assert consumer_id in a.consumers and consumer_id in a.consumer_transport.consumers
        params = json.loads(to_a.user_joined.data.rtp_parameters)
        assert params["codecs"][0]["payloadType"] == 100 and params["encodings"][0]["ssrc"]
        c, _ = join(rooms, 3)
        assert [m.user_joined.data.user_id for m in messages(a)] == [3]
        assert [m.user_joined.data.user_id for m in messages(b)] == [3]
        assert messages(c) == []
        assert len(rooms.rooms) == 1

    run(body)


def test_resume_accepts_quoted_and_bare_ids_and_only_own_consumers() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, _ = join(rooms, 1)
        b, joined = join(rooms, 2)
        quoted = joined.joined_channel.other_users[0].consumer_id
        consumer = b.consumers[json.loads(quoted)]
        assert consumer.paused
        b.handle(Req(resume_consumer=Req.ResumeConsumer(consumer_id=quoted)))
        assert not consumer.paused
        b.handle(Req(resume_consumer=Req.ResumeConsumer(consumer_id=quoted)))  # idempotent
        a_consumer_id = json.loads(messages(a)[0].user_joined.data.consumer_id)
        b.handle(
            Req(resume_consumer=Req.ResumeConsumer(consumer_id=a_consumer_id))
        )  # someone else's: ignored
        assert a.consumers[a_consumer_id].paused
        a.handle(Req(resume_consumer=Req.ResumeConsumer(consumer_id=a_consumer_id)))  # bare form
        assert not a.consumers[a_consumer_id].paused
        a.handle(Req(resume_consumer=Req.ResumeConsumer(consumer_id='"not-a-consumer"')))  # unknown: ignored

    run(body)


def test_leave_sends_user_left_once_and_frees_the_room() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, _ = join(rooms, 1)
        b, _ = join(rooms, 2)
        (joined,) = messages(a)
        a_consumer = a.consumers[json.loads(joined.user_joined.data.consumer_id)]  # A hearing B
        assert not a_consumer.closed
        b.close()
        b.close()
        assert [m.user_left.user_id for m in messages(a)] == [2]
        assert a_consumer.closed and a_consumer.id not in a.consumer_transport.consumers
        assert a.consumers == {}  # no stale entries after the producer left
        assert b.producer is not None and b.producer.closed
        assert b.producer_transport.closed and b.consumer_transport.closed
        assert list(rooms.rooms.values())[0].members.keys() == {1}
        a.close()
        assert rooms.rooms == {} and rooms.sessions == {}

    run(body)


def test_a_session_that_never_joined_sends_no_user_left() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, _ = join(rooms, 1)
        s = rooms.open_session(2)
        s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        s.close()
        assert messages(a) == []
        a.close()
        assert rooms.rooms == {}

    run(body)


def test_duplicate_session_is_replaced_with_user_left_before_the_new_join() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, _ = join(rooms, 1)
        old, _ = join(rooms, 2)
        messages(a)
        new, _ = join(rooms, 2)
        (err,) = messages(old)
        assert isinstance(err, VoiceError) and err.identifier == "fastsfu.voice-session-replaced"
        assert [m.WhichOneof("message") for m in messages(a)] == ["user_left", "user_joined"]
        assert rooms.sessions[2] is new

    run(body)


def test_duplicate_session_rejected_by_policy() -> None:
    async def body(rooms: VoiceRooms) -> None:
        join(rooms, 1)
        s = rooms.open_session(1)
        with pytest.raises(VoiceError) as exc:
            s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        assert (
            exc.value.identifier == "fastsfu.voice-already-connected"
            and exc.value.grpc_code == "ALREADY_EXISTS"
        )

    run(body, VoiceSettings(duplicate_session="reject"))


def test_room_limit() -> None:
    async def body(rooms: VoiceRooms) -> None:
        join(rooms, 1)
        join(rooms, 2)
        with pytest.raises(VoiceError, match="voice-room-full"):
            rooms.open_session(3).handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))

    run(body, VoiceSettings(max_users_per_room=2))


@pytest.mark.parametrize(
    ("step", "request_", "identifier"),
    [
        (0, Req(join_channel=Req.JoinChannel()), "fastsfu.voice-unexpected-message"),
        (0, Req(), "fastsfu.voice-unexpected-message"),  # an empty frame: no oneof set
        (
            1,
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities="{not json")),
            "fastsfu.voice-invalid-json",
        ),
        (
            1,
            Req(
                prepare_for_join_channel=Req.PrepareForJoinChannel(
                    rtp_capabilities=json.dumps(
                        {
                            "codecs": [
                                {
                                    "mimeType": "audio/PCMU",
                                    "kind": "audio",
                                    "preferredPayloadType": 0,
                                    "clockRate": 8000,
                                }
                            ]
                        }
                    )
                )
            ),
            "fastsfu.voice-incompatible-capabilities",
        ),
        (
            2,
            Req(
                join_channel=Req.JoinChannel(
                    rtp_paramaters="[", producer_dtls_paramaters="{}", consumer_dtls_paramaters="{}"
                )
            ),
            "fastsfu.voice-invalid-json",
        ),
        (
            2,
            Req(
                join_channel=Req.JoinChannel(
                    rtp_paramaters="{}",
                    producer_dtls_paramaters='{"fingerprints": []}',
                    consumer_dtls_paramaters="{}",
                )
            ),
            "fastsfu.voice-bad-dtls-parameters",
        ),
    ],
)
def test_bad_input_gives_the_right_error(step: int, request_: Req, identifier: str) -> None:
    async def body(rooms: VoiceRooms) -> None:
        s = rooms.open_session(9)
        steps = [
            Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)),
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS))),
        ]
        for r in steps[:step]:
            s.handle(r)
        with pytest.raises(VoiceError) as exc:
            s.handle(request_)
        assert exc.value.identifier == identifier
        s.close()
        assert rooms.rooms == {}  # nothing left behind

    run(body)


def test_echoed_server_fingerprint_and_bad_producer_are_refused() -> None:
    async def body(rooms: VoiceRooms) -> None:
        s = rooms.open_session(5)
        s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        s.handle(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS)))
        )
        prep = messages(s)[-1].prepared_for_join_channel
        echoed = json.loads(prep.producer_transport_options.dtls_parameters)
        echoed["role"] = "client"
        ok = json.dumps({"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]})
        with pytest.raises(VoiceError, match="voice-bad-dtls-parameters"):
            s.handle(
                Req(
                    join_channel=Req.JoinChannel(
                        rtp_paramaters=json.dumps(chromium_producer(1)),
                        producer_dtls_paramaters=json.dumps(echoed),
                        consumer_dtls_paramaters=ok,
                    )
                )
            )
        s2 = rooms.open_session(6)
        s2.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        s2.handle(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS)))
        )
        video = chromium_producer(2)
        video["codecs"][0]["mimeType"] = "video/VP8"
        with pytest.raises(VoiceError, match="voice-create-producer"):
            s2.handle(
                Req(
                    join_channel=Req.JoinChannel(
                        rtp_paramaters=json.dumps(video),
                        producer_dtls_paramaters=ok,
                        consumer_dtls_paramaters=ok,
                    )
                )
            )

    run(body)


def test_authorize_hook_refuses() -> None:
    def authorize(user: int, guild: int, channel: int) -> None:
        if user == 13:
            raise VoiceError("h.not-enough-permissions", "not allowed here")

    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine, authorize=authorize)
            with pytest.raises(VoiceError, match="not-enough-permissions") as exc:
                rooms.open_session(13).handle(
                    Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL))
                )
            assert exc.value.grpc_code == "PERMISSION_DENIED"
            assert rooms.rooms == {}

    asyncio.run(main())


def test_a_dead_transport_ends_the_session_with_transport_failed() -> None:
    async def body(rooms: VoiceRooms) -> None:
        a, _ = join(rooms, 1)
        b, _ = join(rooms, 2)
        messages(a)
        assert b.producer_transport is not None
        b.producer_transport.close()  # what ICE consent expiry does (RFC 7675)
        (err,) = messages(b)
        assert isinstance(err, VoiceError) and err.identifier == "fastsfu.voice-transport-failed"
        assert err.grpc_code == "UNAVAILABLE"
        assert [m.user_left.user_id for m in messages(a)] == [2]
        assert b.state == "closed" and 2 not in rooms.sessions
        assert a.consumer_transport is not None
        a.consumer_transport._on_dtls_event(DtlsFailed("bad record MAC"))  # a DTLS failure on A's side
        await asyncio.sleep(0)  # the transport closes itself on the next loop step
        (err,) = messages(a)
        assert err.identifier == "fastsfu.voice-transport-failed" and rooms.rooms == {}
        assert err.human_message == "DTLS failed: bad record MAC"
        # A client that closes its DTLS association (close_notify) has left on purpose: the
        # session ends as a leave, without an error, and the others get UserLeft.
        c, _ = join(rooms, 3)
        d, _ = join(rooms, 4)
        messages(c)
        assert d.consumer_transport is not None
        d.consumer_transport._on_dtls_event(DtlsClosed())
        await asyncio.sleep(0)
        assert messages(d) == [] and d.state == "closed" and d.left_by_peer
        assert [m.user_left.user_id for m in messages(c)] == [4]

    run(body)


GOOD_DTLS = {"role": "client", "fingerprints": DtlsCertificate.generate().fingerprints()[:1]}
# Values a broken or hostile client may put in any JSON string field: not JSON, JSON of the wrong
# shape, wrong types inside the right shape, and nesting deep enough to exhaust a recursive parser.
BAD_JSON = [
    "",
    "{",
    "null",
    "[]",
    "5",
    '"x"',
    "NaN",
    "[" * 50_000 + "]" * 50_000,
    "{}",
    '{"codecs": 5}',
    '{"codecs": [5]}',
    '{"codecs": [{"mimeType": 5}]}',
    '{"codecs": [{"mimeType": "audio/opus", "clockRate": "48000", "payloadType": "x"}]}',
    '{"codecs": [{"mimeType": "audio/opus", "clockRate": 48000, "channels": 2, "payloadType": 111}],'
    ' "encodings": {"ssrc": 1}}',
    '{"codecs": [{"mimeType": "audio/opus", "clockRate": 48000, "channels": 2, "payloadType": 111}],'
    ' "encodings": [{"ssrc": -1}], "headerExtensions": [{"uri": 5, "id": "x"}]}',
    '{"headerExtensions": 7, "codecs": []}',
    '{"fingerprints": "x"}',
    '{"fingerprints": [5, null, {"algorithm": 5, "value": null}]}',
    '{"role": 7, "fingerprints": [{"algorithm": "sha-256", "value": "zz"}]}',
    '{"role": "server", "fingerprints": [{"algorithm": "md5", "value": "AA:BB"}]}',
]
FIELD_ERRORS = {
    "rtp_capabilities": {"fastsfu.voice-invalid-json", "fastsfu.voice-incompatible-capabilities"},
    "rtp_paramaters": {"fastsfu.voice-invalid-json", "fastsfu.voice-create-producer"},
    "producer_dtls_paramaters": {"fastsfu.voice-invalid-json", "fastsfu.voice-bad-dtls-parameters"},
    "consumer_dtls_paramaters": {"fastsfu.voice-invalid-json", "fastsfu.voice-bad-dtls-parameters"},
}


@pytest.mark.parametrize("field", sorted(FIELD_ERRORS))
def test_invalid_json_in_any_string_field_is_a_clear_error(field: str) -> None:
    """Every bad value ends that session with the field's documented error (never an internal
    error or an exception escaping the state machine); a member already in the room is unaffected."""

    async def body(rooms: VoiceRooms) -> None:
        member, _ = join(rooms, 1)
        for i, bad in enumerate(BAD_JSON):
            s = rooms.open_session(100 + i)
            s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
            caps = bad if field == "rtp_capabilities" else json.dumps(CLIENT_CAPS)
            with pytest.raises(VoiceError) as exc:
                s.handle(Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)))
                fields = {
                    "rtp_paramaters": json.dumps(chromium_producer(5000 + i)),
                    "producer_dtls_paramaters": json.dumps(GOOD_DTLS),
                    "consumer_dtls_paramaters": json.dumps(GOOD_DTLS),
                }
                fields[field] = bad
                s.handle(Req(join_channel=Req.JoinChannel(**fields)))
            assert exc.value.identifier in FIELD_ERRORS[field], (bad[:80], exc.value)
            s.close()
            assert list(rooms.rooms[(GUILD, CHANNEL)].members) == [1]
            assert messages(member) == []  # no UserJoined / UserLeft for a join that failed
        member.close()
        assert rooms.rooms == {} and rooms.sessions == {}

    run(body)


def test_a_join_that_fails_half_way_takes_back_its_user_joined() -> None:
    """The router runs out of consumers in the middle of the join commit: the member that already
    heard UserJoined hears UserLeft, the joiner gets voice-create-consumer, the room goes on."""

    async def main() -> None:
        from fastsfu import Settings

        async with Engine(Settings(max_consumers_per_router=4)) as engine:
            rooms = VoiceRooms(engine)
            one, _ = join(rooms, 1)
            two, _ = join(rooms, 2)  # consumers 1<-2 and 2<-1
            assert [m.WhichOneof("message") for m in messages(one)] == ["user_joined"]
            with pytest.raises(VoiceError) as exc:
                join(rooms, 3)  # 3<-1 and 1<-3 fit, 3<-2 does not
            assert exc.value.identifier == "fastsfu.voice-create-consumer"
            rooms.sessions[3].close()
            heard = [m.WhichOneof("message") for m in messages(one)]
            assert heard == ["user_joined", "user_left"], heard
            assert messages(two) == []
            assert sorted(rooms.rooms[(GUILD, CHANNEL)].members) == [1, 2]
            assert len(one.consumers) == 1 and len(two.consumers) == 1  # only each other's

    asyncio.run(asyncio.wait_for(main(), 30))


# pymediasoup 1.5.0 (docs/harmony.md#dtls-roles): send transport hard-coded DTLS "server" with a
# sha-512 fingerprint, recv transport "client"; PT 96, mid 1, audio-level 2, rtcp.mux.
PYMEDIASOUP_RTP = {
    "mid": "0",
    "codecs": [
        {
            "mimeType": "audio/opus",
            "clockRate": 48000,
            "channels": 2,
            "rtcpFeedback": [],
            "parameters": {},
            "payloadType": 96,
        }
    ],
    "headerExtensions": [
        {"uri": "urn:ietf:params:rtp-hdrext:sdes:mid", "id": 1, "encrypt": False, "parameters": {}},
        {"uri": "urn:ietf:params:rtp-hdrext:ssrc-audio-level", "id": 2, "encrypt": False, "parameters": {}},
    ],
    "encodings": [{"ssrc": 1091587578, "dtx": False}],
    "rtcp": {"cname": "3f87fbe4-98a8-4d9e-9e22-8345972ed01e", "reducedSize": True, "mux": True},
}


def test_pymediasoup_json_joins_and_makes_us_the_dtls_client_of_its_send_transport() -> None:
    async def body(rooms: VoiceRooms) -> None:
        chromium, _ = join(rooms, 1)
        s = rooms.open_session(2)
        s.handle(Req(initialize=Req.Initialize(guild_id=GUILD, channel_id=CHANNEL)))
        s.handle(
            Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=json.dumps(CLIENT_CAPS)))
        )
        sha512 = [f for f in DtlsCertificate.generate().fingerprints() if f["algorithm"] == "sha-512"]
        assert sha512
        s.handle(
            Req(
                join_channel=Req.JoinChannel(
                    rtp_paramaters=json.dumps(PYMEDIASOUP_RTP),
                    producer_dtls_paramaters=json.dumps({"role": "server", "fingerprints": sha512}),
                    consumer_dtls_paramaters=json.dumps({"role": "client", "fingerprints": sha512}),
                )
            )
        )
        out = messages(s)
        assert [m.WhichOneof("message") for m in out][-1] == "joined_channel"
        assert s.producer is not None and s.producer.ssrc == 1091587578
        assert s.producer_transport is not None and s.producer_transport._dtls_role == "client"
        assert s.consumer_transport is not None and s.consumer_transport._dtls_role == "server"
        # The Chromium member's consumer of it uses the router's PT and that member's own IDs.
        (joined,) = [m.user_joined.data for m in messages(chromium)]
        params = json.loads(joined.rtp_parameters)
        assert params["codecs"][0]["payloadType"] == 100
        assert [e["uri"] for e in params["headerExtensions"]] == [
            "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
        ]

    run(body)
