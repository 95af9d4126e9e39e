"""The generated protocol.voice.v1 modules match Harmony's wire schema (docs/harmony.md#wire-schema): field
numbers, oneof names, the typos, the RPC path, and bytes on the wire."""

from __future__ import annotations

from pathlib import Path

from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse


def fields(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_field_numbers_and_names_are_harmonys() -> None:
    assert fields(voice_pb2.UserConsumerOptions) == {
        "user_id": 1,
        "producer_id": 2,
        "consumer_id": 3,
        "rtp_parameters": 4,
    }
    assert fields(voice_pb2.TransportOptions) == {
        "id": 1,
        "dtls_parameters": 2,
        "ice_candidates": 3,
        "ice_parameters": 4,
    }
    assert voice_pb2.TransportOptions.DESCRIPTOR.fields_by_name["ice_candidates"].is_repeated
    assert fields(Req) == {
        "initialize": 1,
        "prepare_for_join_channel": 2,
        "join_channel": 3,
        "resume_consumer": 4,
    }
    assert fields(Resp) == {
        "initialized": 1,
        "prepared_for_join_channel": 2,
        "joined_channel": 3,
        "user_joined": 4,
        "user_left": 5,
    }
    assert fields(Req.JoinChannel) == {
        "rtp_paramaters": 1,
        "producer_dtls_paramaters": 2,
        "consumer_dtls_paramaters": 3,
    }  # typos included
    assert fields(Req.Initialize) == {"guild_id": 1, "channel_id": 2}
    assert fields(Resp.PreparedForJoinChannel) == {
        "consumer_transport_options": 1,
        "producer_transport_options": 2,
    }
    assert [o.name for o in Req.DESCRIPTOR.oneofs] == [o.name for o in Resp.DESCRIPTOR.oneofs] == ["message"]
    assert fields(hrpc_pb2.Error) == {"identifier": 1, "human_message": 2, "details": 3}


def test_rpc_path_and_package() -> None:
    service = voice_pb2.DESCRIPTOR.services_by_name["VoiceService"]
    assert voice_pb2.DESCRIPTOR.package == "protocol.voice.v1"
    method = service.methods_by_name["StreamMessage"]
    assert (method.client_streaming, method.server_streaming) == (True, True)
    assert "/protocol.voice.v1.VoiceService/StreamMessage" in Path(voice_pb2_grpc.__file__).read_text()


def test_bytes_on_the_wire() -> None:
    # Initialize{guild_id=1, channel_id=300}: field 1 (LEN) wrapping 08 01 10 ac 02.
    msg = Req(initialize=Req.Initialize(guild_id=1, channel_id=300))
    assert msg.SerializeToString() == bytes.fromhex("0a05080110ac02")
    assert msg.WhichOneof("message") == "initialize"
    left = Resp(user_left=Resp.UserLeft(user_id=2**63 + 5))  # Harmony IDs exceed 2^53
    assert Resp.FromString(left.SerializeToString()).user_left.user_id == 2**63 + 5
    assert left.SerializeToString()[0] == (5 << 3) | 2
