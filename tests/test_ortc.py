"""Tests for fastsfu.ortc: capability/parameter validation and producer/consumer negotiation."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest

from fastsfu import ortc
from fastsfu.ortc import (
    SUPPORTED_RTP_CAPABILITIES,
    URI_ABS_CAPTURE_TIME,
    URI_ABS_SEND_TIME,
    URI_AUDIO_LEVEL,
    URI_MID,
    URI_TRANSPORT_CC,
    OrtcError,
    ProducerRtpInfo,
    can_consume,
    extension_id_map,
    generate_router_rtp_capabilities,
    get_consumer_rtp_parameters,
    get_producer_rtp_info,
    random_cname,
    random_ssrc,
    validate_rtp_capabilities,
    validate_rtp_parameters,
)

URI_CSRC_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:csrc-audio-level"

# What mediasoup-client (Chrome handler) sends in transport.produce() for a
# microphone track: Chrome's own PT 111 and extmap ids 1..4.
CHROME_PRODUCER_PARAMS: dict[str, Any] = {
    "mid": "0",
    "codecs": [
        {
            "mimeType": "audio/opus",
            "payloadType": 111,
            "clockRate": 48000,
            "channels": 2,
            "parameters": {"minptime": 10, "useinbandfec": 1},
            "rtcpFeedback": [{"type": "transport-cc", "parameter": ""}, {"type": "nack", "parameter": ""}],
        }
    ],
    "headerExtensions": [
        {"uri": URI_MID, "id": 4, "encrypt": False, "parameters": {}},
        {"uri": URI_ABS_SEND_TIME, "id": 2, "encrypt": False, "parameters": {}},
        {"uri": URI_TRANSPORT_CC, "id": 3, "encrypt": False, "parameters": {}},
        {"uri": URI_AUDIO_LEVEL, "id": 1, "encrypt": False, "parameters": {}},
        {"uri": URI_CSRC_AUDIO_LEVEL, "id": 9, "encrypt": False, "parameters": {}},
    ],
    "encodings": [{"ssrc": 2849112350, "dtx": False}],
    "rtcp": {"cname": "Mf3kPz0Ue7hq1ZbA", "reducedSize": True},
}


def remote_caps(
    *,
    opus_pt: int = 109,
    ids: dict[str, int] | None = None,
    opus_fb: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """device.rtpCapabilities as mediasoup-client reports them, with tunable values."""
    ext_ids = (
        {URI_MID: 7, URI_ABS_SEND_TIME: 8, URI_TRANSPORT_CC: 9, URI_AUDIO_LEVEL: 11, URI_ABS_CAPTURE_TIME: 14}
        if ids is None
        else ids
    )
    fb = (
        [{"type": "transport-cc", "parameter": ""}, {"type": "nack", "parameter": ""}]
        if opus_fb is None
        else opus_fb
    )
    return {
        "codecs": [
            {
                "mimeType": "audio/opus",
                "kind": "audio",
                "preferredPayloadType": opus_pt,
                "clockRate": 48000,
                "channels": 2,
                "parameters": {"minptime": 10, "useinbandfec": 1},
                "rtcpFeedback": fb,
            },
            {
                "mimeType": "video/VP8",
                "kind": "video",
                "preferredPayloadType": 101,
                "clockRate": 90000,
                "parameters": {},
                "rtcpFeedback": [
                    {"type": "nack", "parameter": "pli"},
                    {"type": "goog-remb", "parameter": ""},
                ],
            },
            {
                "mimeType": "video/rtx",
                "kind": "video",
                "preferredPayloadType": 102,
                "clockRate": 90000,
                "parameters": {"apt": 101},
                "rtcpFeedback": [],
            },
        ],
        "headerExtensions": [
            *(
                {
                    "kind": "audio",
                    "uri": uri,
                    "preferredId": i,
                    "preferredEncrypt": False,
                    "direction": "sendrecv",
                }
                for uri, i in ext_ids.items()
            ),
            # Same URI for video with another id: must not leak into an audio consumer.
            {
                "kind": "video",
                "uri": URI_MID,
                "preferredId": 3,
                "preferredEncrypt": False,
                "direction": "sendrecv",
            },
        ],
    }


@pytest.fixture
def router_caps() -> dict[str, Any]:
    return generate_router_rtp_capabilities()


# --------------------------------------------------------------------------
# Supported / router capabilities
# --------------------------------------------------------------------------


def test_supported_capabilities_shape() -> None:
    codec, red = SUPPORTED_RTP_CAPABILITIES["codecs"]
    assert (codec["mimeType"], codec["clockRate"], codec["channels"], codec["kind"]) == (
        "audio/opus",
        48000,
        2,
        "audio",
    )
    # Opus RED (RFC 2198) in WebRTC's form, routed only beside Opus (docs/transports.md#opus-red).
    assert (red["mimeType"], red["clockRate"], red["channels"], red["rtcpFeedback"]) == (
        "audio/red",
        48000,
        2,
        [],
    )
    # Neither NACK nor transport-cc is offered until the server honours them.
    assert codec["rtcpFeedback"] == []
    ids = {e["uri"]: e["preferredId"] for e in SUPPORTED_RTP_CAPABILITIES["headerExtensions"]}
    assert ids == {
        URI_MID: 1,
        URI_AUDIO_LEVEL: 10,
        URI_ABS_SEND_TIME: 4,
        URI_TRANSPORT_CC: 5,
        URI_ABS_CAPTURE_TIME: 13,
    }
    per_hop = {URI_ABS_SEND_TIME, URI_TRANSPORT_CC}  # accepted, never forwarded
    for ext in SUPPORTED_RTP_CAPABILITIES["headerExtensions"]:
        direction = "recvonly" if ext["uri"] in per_hop else "sendrecv"
        assert (ext["kind"], ext["direction"], ext["preferredEncrypt"]) == ("audio", direction, False)
    # The table is already in normalized form.
    assert validate_rtp_capabilities(SUPPORTED_RTP_CAPABILITIES) == SUPPORTED_RTP_CAPABILITIES


def test_default_router_caps(router_caps: dict[str, Any]) -> None:
    (codec,) = router_caps["codecs"]
    assert codec["mimeType"] == "audio/opus"
    assert codec["preferredPayloadType"] == 100
    assert codec["channels"] == 2
    assert router_caps["headerExtensions"] == SUPPORTED_RTP_CAPABILITIES["headerExtensions"]
    # Result is independent of the module-level table.
    router_caps["headerExtensions"][0]["preferredId"] = 99
    codec["rtcpFeedback"].append({"type": "nack", "parameter": ""})
    assert SUPPORTED_RTP_CAPABILITIES["headerExtensions"][0]["preferredId"] == 1
    assert SUPPORTED_RTP_CAPABILITIES["codecs"][0]["rtcpFeedback"] == []


def test_router_caps_explicit_pt_and_parameters() -> None:
    media_codecs = [
        {
            "kind": "audio",
            "mimeType": "audio/OPUS",
            "clockRate": 48000,
            "channels": 2,
            "parameters": {"usedtx": 1},
        },
        # Explicit PT 100 later in the list: the automatic one above must avoid it.
        {
            "kind": "audio",
            "mimeType": "audio/opus",
            "clockRate": 48000,
            "channels": 2,
            "preferredPayloadType": 100,
        },
    ]
    before = copy.deepcopy(media_codecs)
    caps = generate_router_rtp_capabilities(media_codecs)
    assert [c["preferredPayloadType"] for c in caps["codecs"]] == [101, 100]
    assert caps["codecs"][0]["parameters"] == {"usedtx": 1}
    assert caps["codecs"][1]["parameters"] == {}
    # Canonical mimeType spelling comes from the supported table.
    assert caps["codecs"][0]["mimeType"] == "audio/opus"
    assert media_codecs == before


@pytest.mark.parametrize(
    ("media_codecs", "needle"),
    [
        ([{"kind": "video", "mimeType": "video/VP8", "clockRate": 90000}], "mediaCodecs[0].kind"),
        ([{"kind": "audio", "mimeType": "audio/PCMU", "clockRate": 8000}], "unsupported codec audio/PCMU"),
        # Opus is always signalled as 2 channels (RFC 7587); channels defaults to 1.
        (
            [{"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000}],
            "unsupported codec audio/opus/48000/1",
        ),
        (
            [{"kind": "audio", "mimeType": "audio/opus", "clockRate": 16000, "channels": 2}],
            "unsupported codec",
        ),
        (
            [
                {"mimeType": "audio/opus", "clockRate": 48000, "channels": 2, "preferredPayloadType": 111},
                {"mimeType": "audio/opus", "clockRate": 48000, "channels": 2, "preferredPayloadType": 111},
            ],
            "mediaCodecs[1].preferredPayloadType",
        ),
        (
            [{"mimeType": "audio/opus", "clockRate": 48000, "channels": 2, "preferredPayloadType": True}],
            "mediaCodecs[0].preferredPayloadType",
        ),
        ([], "mediaCodecs must not be empty"),
        ({"mimeType": "audio/opus"}, "mediaCodecs must be an array"),
        (["audio/opus"], "mediaCodecs[0] must be an object"),
    ],
)
def test_router_caps_rejected(media_codecs: Any, needle: str) -> None:
    with pytest.raises(OrtcError) as exc:
        generate_router_rtp_capabilities(media_codecs)
    assert needle in str(exc.value)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def test_validate_rtp_parameters_round_trip() -> None:
    params = copy.deepcopy(CHROME_PRODUCER_PARAMS)
    params["someVendorKey"] = {"x": [1, 2]}
    out = validate_rtp_parameters(params)
    # Already complete, so normalization is the identity (unknown keys kept)...
    assert out == params
    # ...and a deep copy: mutating the result must not touch the input.
    out["codecs"][0]["parameters"]["minptime"] = 20
    out["someVendorKey"]["x"].append(3)
    assert params["codecs"][0]["parameters"]["minptime"] == 10
    assert params["someVendorKey"] == {"x": [1, 2]}


def test_validate_rtp_parameters_fills_defaults() -> None:
    params = {"codecs": [{"mimeType": "audio/PCMU", "payloadType": 0, "clockRate": 8000}]}
    out = validate_rtp_parameters(params)
    assert out["codecs"][0] == {
        "mimeType": "audio/PCMU",
        "payloadType": 0,
        "clockRate": 8000,
        "channels": 1,
        "parameters": {},
        "rtcpFeedback": [],
    }
    assert out["headerExtensions"] == []
    assert out["encodings"] == []
    assert out["rtcp"] == {"reducedSize": True}
    assert "mid" not in out
    assert params == {"codecs": [{"mimeType": "audio/PCMU", "payloadType": 0, "clockRate": 8000}]}

    out = validate_rtp_parameters(
        {
            "codecs": [
                {
                    "mimeType": "audio/opus",
                    "payloadType": 111,
                    "clockRate": 48000,
                    "channels": 2,
                    "rtcpFeedback": [{"type": "nack"}],
                }
            ],
            "headerExtensions": [{"uri": URI_MID, "id": 1}],
            "encodings": [{"ssrc": 0}],
            "rtcp": {"cname": "c"},
        }
    )
    assert out["codecs"][0]["rtcpFeedback"] == [{"type": "nack", "parameter": ""}]
    assert out["headerExtensions"] == [{"uri": URI_MID, "id": 1, "encrypt": False, "parameters": {}}]
    assert out["encodings"] == [{"ssrc": 0, "dtx": False}]
    assert out["rtcp"] == {"cname": "c", "reducedSize": True}


def test_validate_rtp_capabilities_fills_defaults() -> None:
    caps = {
        "codecs": [
            {"mimeType": "audio/PCMA", "clockRate": 8000, "preferredPayloadType": 8},
            {
                "mimeType": "video/H264",
                "clockRate": 90000,
                "channels": 1,
                "parameters": {"packetization-mode": 1},
            },
        ],
        "headerExtensions": [{"kind": "audio", "uri": URI_MID, "preferredId": 1}],
        "fecMechanisms": [],
    }
    out = validate_rtp_capabilities(caps)
    assert out["codecs"][0] == {
        "mimeType": "audio/PCMA",
        "kind": "audio",
        "clockRate": 8000,
        "preferredPayloadType": 8,
        "channels": 1,
        "parameters": {},
        "rtcpFeedback": [],
    }
    # Channels mean nothing for video and are dropped, as mediasoup does.
    assert "channels" not in out["codecs"][1]
    assert out["codecs"][1]["kind"] == "video"
    assert out["headerExtensions"] == [
        {
            "kind": "audio",
            "uri": URI_MID,
            "preferredId": 1,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        }
    ]
    assert out["fecMechanisms"] == []
    assert "kind" not in caps["codecs"][0]
    assert validate_rtp_capabilities({}) == {"codecs": [], "headerExtensions": []}
    # Duplicate preferredIds across kinds are normal in capabilities.
    assert len(validate_rtp_capabilities(remote_caps())["headerExtensions"]) == 6


def _opus(**overrides: Any) -> dict[str, Any]:
    codec: dict[str, Any] = {"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}
    codec.update(overrides)
    return codec


def _params(**overrides: Any) -> dict[str, Any]:
    params = copy.deepcopy(CHROME_PRODUCER_PARAMS)
    params.update(overrides)
    return params


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ("not a dict", "rtpParameters must be an object"),
        (None, "rtpParameters must be an object"),
        ({}, "rtpParameters.codecs is required"),
        (_params(codecs=[]), "rtpParameters.codecs must not be empty"),
        (_params(codecs={"0": _opus()}), "rtpParameters.codecs must be an array"),
        (
            _params(codecs=[_opus(payloadType=True)]),
            "rtpParameters.codecs[0].payloadType must be an integer 0..127",
        ),
        (
            _params(codecs=[_opus(payloadType=128)]),
            "rtpParameters.codecs[0].payloadType must be an integer 0..127",
        ),
        (_params(codecs=[_opus(payloadType="111")]), "rtpParameters.codecs[0].payloadType"),
        (_params(codecs=[_opus(payloadType=-1)]), "rtpParameters.codecs[0].payloadType"),
        (_params(codecs=[_opus(), _opus()]), "rtpParameters.codecs[1].payloadType 111 duplicates"),
        (_params(codecs=[_opus(mimeType="opus")]), "rtpParameters.codecs[0].mimeType"),
        (_params(codecs=[_opus(mimeType="application/opus")]), "rtpParameters.codecs[0].mimeType"),
        (_params(codecs=[_opus(mimeType=None)]), "rtpParameters.codecs[0].mimeType"),
        (_params(codecs=[_opus(clockRate=0)]), "rtpParameters.codecs[0].clockRate"),
        (_params(codecs=[_opus(clockRate=48000.0)]), "rtpParameters.codecs[0].clockRate"),
        (_params(codecs=[_opus(clockRate=False)]), "rtpParameters.codecs[0].clockRate"),
        (_params(codecs=[_opus(channels=0)]), "rtpParameters.codecs[0].channels"),
        (_params(codecs=[_opus(parameters=[])]), "rtpParameters.codecs[0].parameters must be an object"),
        (_params(codecs=[_opus(parameters={"stereo": True})]), "rtpParameters.codecs[0].parameters.stereo"),
        (_params(codecs=[_opus(parameters={"stereo": None})]), "rtpParameters.codecs[0].parameters.stereo"),
        (_params(codecs=[_opus(parameters={"apt": "111"})]), "rtpParameters.codecs[0].parameters.apt"),
        (
            _params(codecs=[_opus(rtcpFeedback=[{"parameter": ""}])]),
            "rtpParameters.codecs[0].rtcpFeedback[0].type",
        ),
        (_params(codecs=[_opus(rtcpFeedback={})]), "rtpParameters.codecs[0].rtcpFeedback must be an array"),
        (
            _params(codecs=[_opus(rtcpFeedback=[{"type": "nack", "parameter": 1}])]),
            "rtpParameters.codecs[0].rtcpFeedback[0].parameter",
        ),
        (_params(headerExtensions=[{"uri": URI_MID, "id": 0}]), "rtpParameters.headerExtensions[0].id"),
        (_params(headerExtensions=[{"uri": URI_MID, "id": 256}]), "rtpParameters.headerExtensions[0].id"),
        (_params(headerExtensions=[{"uri": URI_MID, "id": True}]), "rtpParameters.headerExtensions[0].id"),
        (
            _params(headerExtensions=[{"uri": URI_MID, "id": 3}, {"uri": URI_AUDIO_LEVEL, "id": 3}]),
            "rtpParameters.headerExtensions[1].id 3 duplicates",
        ),
        (_params(headerExtensions=[{"id": 3}]), "rtpParameters.headerExtensions[0].uri"),
        (_params(headerExtensions=[{"uri": "", "id": 3}]), "rtpParameters.headerExtensions[0].uri"),
        (_params(headerExtensions=[{"uri": URI_MID, "id": 3, "encrypt": 1}]), "headerExtensions[0].encrypt"),
        (_params(headerExtensions={}), "rtpParameters.headerExtensions must be an array"),
        (
            _params(encodings=[{"ssrc": 2**32}]),
            "rtpParameters.encodings[0].ssrc must be an integer 0..4294967295",
        ),
        (_params(encodings=[{"ssrc": -1}]), "rtpParameters.encodings[0].ssrc"),
        (_params(encodings=[{"ssrc": True}]), "rtpParameters.encodings[0].ssrc"),
        (_params(encodings=[{"ssrc": 1.5}]), "rtpParameters.encodings[0].ssrc"),
        (_params(encodings=[{"ssrc": 1, "dtx": "no"}]), "rtpParameters.encodings[0].dtx"),
        (_params(encodings=[{"ssrc": 1, "rtx": {}}]), "rtpParameters.encodings[0].rtx.ssrc"),
        (_params(encodings=[{"ssrc": 1, "maxBitrate": -5}]), "rtpParameters.encodings[0].maxBitrate"),
        (_params(encodings=["x"]), "rtpParameters.encodings[0] must be an object"),
        (_params(encodings=None), "rtpParameters.encodings must be an array"),
        (_params(rtcp="cname"), "rtpParameters.rtcp must be an object"),
        (_params(rtcp={"cname": 5}), "rtpParameters.rtcp.cname"),
        (_params(rtcp={"reducedSize": 1}), "rtpParameters.rtcp.reducedSize"),
        (_params(mid=0), "rtpParameters.mid"),
        (_params(mid=""), "rtpParameters.mid"),
    ],
)
def test_invalid_rtp_parameters(params: Any, needle: str) -> None:
    with pytest.raises(OrtcError) as exc:
        validate_rtp_parameters(params)
    assert needle in str(exc.value)
    # Producer negotiation goes through the same validation.
    with pytest.raises(OrtcError):
        get_producer_rtp_info(params, generate_router_rtp_capabilities())


def _cap_codec(**overrides: Any) -> dict[str, Any]:
    codec: dict[str, Any] = {"mimeType": "audio/opus", "clockRate": 48000, "channels": 2}
    codec.update(overrides)
    return codec


def _cap_ext(**overrides: Any) -> dict[str, Any]:
    ext: dict[str, Any] = {"kind": "audio", "uri": URI_MID, "preferredId": 1}
    ext.update(overrides)
    return ext


@pytest.mark.parametrize(
    ("caps", "needle"),
    [
        ([], "rtpCapabilities must be an object"),
        ({"codecs": "opus"}, "rtpCapabilities.codecs must be an array"),
        (
            {"codecs": [_cap_codec(preferredPayloadType=False)]},
            "rtpCapabilities.codecs[0].preferredPayloadType",
        ),
        (
            {"codecs": [_cap_codec(preferredPayloadType=300)]},
            "rtpCapabilities.codecs[0].preferredPayloadType",
        ),
        ({"codecs": [_cap_codec(kind="video")]}, "rtpCapabilities.codecs[0].kind"),
        ({"codecs": [_cap_codec(clockRate=None)]}, "rtpCapabilities.codecs[0].clockRate"),
        ({"codecs": [_cap_codec(mimeType="audio/")]}, "rtpCapabilities.codecs[0].mimeType"),
        ({"headerExtensions": [_cap_ext(preferredId=0)]}, "rtpCapabilities.headerExtensions[0].preferredId"),
        (
            {"headerExtensions": [_cap_ext(preferredId=True)]},
            "rtpCapabilities.headerExtensions[0].preferredId",
        ),
        ({"headerExtensions": [_cap_ext(kind="data")]}, "rtpCapabilities.headerExtensions[0].kind"),
        ({"headerExtensions": [_cap_ext(direction="both")]}, "rtpCapabilities.headerExtensions[0].direction"),
        ({"headerExtensions": [_cap_ext(preferredEncrypt="no")]}, "headerExtensions[0].preferredEncrypt"),
        ({"headerExtensions": [_cap_ext(uri=None)]}, "rtpCapabilities.headerExtensions[0].uri"),
        ({"headerExtensions": "x"}, "rtpCapabilities.headerExtensions must be an array"),
    ],
)
def test_invalid_rtp_capabilities(caps: Any, needle: str) -> None:
    with pytest.raises(OrtcError) as exc:
        validate_rtp_capabilities(caps)
    assert needle in str(exc.value)


def test_ortc_error_is_value_error() -> None:
    assert issubclass(OrtcError, ValueError)


# --------------------------------------------------------------------------
# Producer
# --------------------------------------------------------------------------


def test_producer_rtp_info_chrome(router_caps: dict[str, Any]) -> None:
    params = copy.deepcopy(CHROME_PRODUCER_PARAMS)
    info = get_producer_rtp_info(params, router_caps)
    assert info == ProducerRtpInfo(
        ssrc=2849112350,
        payload_type=111,
        clock_rate=48000,
        mime_type="audio/opus",
        # csrc-audio-level is not something the router understands: dropped.
        header_extensions={4: URI_MID, 2: URI_ABS_SEND_TIME, 3: URI_TRANSPORT_CC, 1: URI_AUDIO_LEVEL},
        cname="Mf3kPz0Ue7hq1ZbA",
    )
    assert params == CHROME_PRODUCER_PARAMS
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.ssrc = 1  # type: ignore[misc]


def test_producer_rtp_info_details(router_caps: dict[str, Any]) -> None:
    # Mime case-insensitive, no cname, encrypted extension ignored, RED skipped
    # in favour of the first real media codec.
    params = _params(
        codecs=[
            {"mimeType": "audio/red", "payloadType": 63, "clockRate": 48000, "channels": 2},
            _opus(mimeType="AUDIO/Opus", payloadType=96),
        ],
        headerExtensions=[
            {"uri": URI_AUDIO_LEVEL, "id": 1, "encrypt": True},
            {"uri": URI_MID, "id": 2},
        ],
        rtcp={},
    )
    info = get_producer_rtp_info(params, router_caps)
    assert info.payload_type == 96
    assert info.mime_type == "audio/opus"
    assert info.header_extensions == {2: URI_MID}
    assert info.cname is None

    # Header extensions limited to what the router lists.
    narrow = copy.deepcopy(router_caps)
    narrow["headerExtensions"] = [e for e in narrow["headerExtensions"] if e["uri"] == URI_AUDIO_LEVEL]
    assert get_producer_rtp_info(CHROME_PRODUCER_PARAMS, narrow).header_extensions == {1: URI_AUDIO_LEVEL}


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (
            _params(codecs=[{"mimeType": "audio/PCMU", "payloadType": 0, "clockRate": 8000}]),
            "unsupported codec",
        ),
        (_params(codecs=[_opus(channels=1)]), "unsupported codec"),
        (_params(codecs=[_opus(clockRate=16000)]), "unsupported codec"),
        (
            _params(codecs=[{"mimeType": "video/VP8", "payloadType": 96, "clockRate": 90000}]),
            "unsupported codec",
        ),
        (
            _params(codecs=[{"mimeType": "audio/telephone-event", "payloadType": 126, "clockRate": 8000}]),
            "rtpParameters.codecs contains no media codec",
        ),
        (_params(encodings=[]), "rtpParameters.encodings must contain exactly one encoding"),
        (_params(encodings=[{"ssrc": 1}, {"ssrc": 2}]), "rtpParameters.encodings must contain exactly one"),
        (_params(encodings=[{"rid": "r0"}]), "rtpParameters.encodings[0].rid"),
        (_params(encodings=[{"ssrc": 5, "rid": "r0"}]), "rtpParameters.encodings[0].rid"),
        (_params(encodings=[{"dtx": True}]), "rtpParameters.encodings[0].ssrc is required"),
    ],
)
def test_producer_rejected(router_caps: dict[str, Any], params: dict[str, Any], needle: str) -> None:
    with pytest.raises(OrtcError) as exc:
        get_producer_rtp_info(params, router_caps)
    assert needle in str(exc.value)


def test_producer_rejected_when_router_lacks_codec() -> None:
    # A router (hand-built caps) with no opus cannot take an opus producer.
    router = {"codecs": [{"mimeType": "audio/PCMU", "clockRate": 8000, "preferredPayloadType": 0}]}
    with pytest.raises(OrtcError, match="unsupported codec"):
        get_producer_rtp_info(CHROME_PRODUCER_PARAMS, router)


# --------------------------------------------------------------------------
# Consumer
# --------------------------------------------------------------------------


def test_consumer_params_use_remote_values(router_caps: dict[str, Any]) -> None:
    remote = remote_caps()
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote, ssrc=123456, mid="3")
    assert params["mid"] == "3"
    (codec,) = params["codecs"]
    # The remote's PT (109), not the router's (100) nor the producer's (111).
    assert codec["payloadType"] == 109
    assert codec["mimeType"] == "audio/opus"
    assert (codec["clockRate"], codec["channels"]) == (48000, 2)
    assert codec["parameters"] == {"minptime": 10, "useinbandfec": 1}
    assert codec["rtcpFeedback"] == []  # the router offers none
    # Remote ids, audio kind only (the video MID entry with id 3 is ignored); the per-hop
    # extensions (abs-send-time, transport-cc) are recvonly on the router and not forwarded.
    assert params["headerExtensions"] == [
        {"uri": URI_MID, "id": 7, "encrypt": False, "parameters": {}},
        {"uri": URI_AUDIO_LEVEL, "id": 11, "encrypt": False, "parameters": {}},
        {"uri": URI_ABS_CAPTURE_TIME, "id": 14, "encrypt": False, "parameters": {}},
    ]
    assert params["encodings"] == [{"ssrc": 123456}]
    assert params["rtcp"] == {"cname": "Mf3kPz0Ue7hq1ZbA", "reducedSize": True}
    # The output is itself valid RtpParameters that our validator accepts unchanged
    # except for defaults (dtx).
    assert validate_rtp_parameters(params)["codecs"] == params["codecs"]
    assert extension_id_map(params) == {
        URI_MID: 7,
        URI_AUDIO_LEVEL: 11,
        URI_ABS_CAPTURE_TIME: 14,
    }
    # No input was modified.
    assert remote == remote_caps()


def test_consumer_params_other_values(router_caps: dict[str, Any]) -> None:
    remote = remote_caps(opus_pt=120, ids={URI_AUDIO_LEVEL: 2, URI_MID: 5})
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote, ssrc=7)
    assert "mid" not in params
    assert params["codecs"][0]["payloadType"] == 120
    # Only extensions the remote can receive survive.
    assert extension_id_map(params) == {URI_MID: 5, URI_AUDIO_LEVEL: 2}
    assert params["codecs"][0]["rtcpFeedback"] == []


def _router_with_feedback(router_caps: dict[str, Any]) -> dict[str, Any]:
    # A router that offers NACK and transport-cc (hand-built: the default offers neither).
    router = copy.deepcopy(router_caps)
    router["codecs"][0]["rtcpFeedback"] = [
        {"type": "nack", "parameter": ""},
        {"type": "transport-cc", "parameter": ""},
    ]
    for ext in router["headerExtensions"]:
        ext["direction"] = "sendrecv"
    return router


def test_consumer_params_feedback_intersection(router_caps: dict[str, Any]) -> None:
    remote = remote_caps(
        opus_fb=[{"type": "transport-cc", "parameter": ""}, {"type": "nack", "parameter": "pli"}]
    )
    router = _router_with_feedback(router_caps)
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router, remote, ssrc=7)
    assert params["codecs"][0]["rtcpFeedback"] == [{"type": "transport-cc", "parameter": ""}]


def test_consumer_params_transport_cc_needs_its_extension(router_caps: dict[str, Any]) -> None:
    remote = remote_caps(opus_pt=120, ids={URI_AUDIO_LEVEL: 2, URI_MID: 5})
    router = _router_with_feedback(router_caps)
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router, remote, ssrc=7)
    # Transport-cc feedback is useless without its header extension.
    assert params["codecs"][0]["rtcpFeedback"] == [{"type": "nack", "parameter": ""}]


def test_consumer_params_merge_producer_over_router() -> None:
    router = generate_router_rtp_capabilities(
        [
            {
                "kind": "audio",
                "mimeType": "audio/opus",
                "clockRate": 48000,
                "channels": 2,
                "parameters": {"usedtx": 1, "minptime": 20},
            }
        ]
    )
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router, remote_caps(), ssrc=1)
    assert params["codecs"][0]["parameters"] == {"usedtx": 1, "minptime": 10, "useinbandfec": 1}


def test_consumer_header_extension_directions(router_caps: dict[str, Any]) -> None:
    remote = remote_caps()
    for ext in remote["headerExtensions"]:
        if ext["uri"] == URI_AUDIO_LEVEL:
            ext["direction"] = "sendonly"  # the remote will not receive it
        if ext["uri"] == URI_MID:
            ext["direction"] = "recvonly"
    router = copy.deepcopy(router_caps)
    for ext in router["headerExtensions"]:
        if ext["uri"] == URI_ABS_CAPTURE_TIME:
            ext["direction"] = "recvonly"  # the router will not send it
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router, remote, ssrc=1)
    # MID is all that is left: audio-level the remote will not receive, abs-capture-time the
    # router will not send, and the per-hop extensions are recvonly on the router.
    assert set(extension_id_map(params)) == {URI_MID}


def test_consumer_kindless_remote_extension(router_caps: dict[str, Any]) -> None:
    remote = remote_caps(ids={})
    remote["headerExtensions"].append({"uri": URI_AUDIO_LEVEL, "preferredId": 6})
    params = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote, ssrc=1)
    assert extension_id_map(params) == {URI_AUDIO_LEVEL: 6}


def test_consumer_generates_cname(router_caps: dict[str, Any]) -> None:
    producer = _params(rtcp={"reducedSize": True})
    a = get_consumer_rtp_parameters(producer, router_caps, remote_caps(), ssrc=1)
    b = get_consumer_rtp_parameters(producer, router_caps, remote_caps(), ssrc=1)
    assert isinstance(a["rtcp"]["cname"], str) and a["rtcp"]["cname"]
    assert a["rtcp"]["cname"] != b["rtcp"]["cname"]


def test_consumer_remote_duplicate_ids_rejected(router_caps: dict[str, Any]) -> None:
    remote = remote_caps(ids={URI_MID: 3, URI_AUDIO_LEVEL: 3})
    with pytest.raises(OrtcError, match=r"remoteRtpCapabilities.headerExtensions.*preferredId 3"):
        get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote, ssrc=1)


def test_can_consume(router_caps: dict[str, Any]) -> None:
    assert can_consume(CHROME_PRODUCER_PARAMS, router_caps, remote_caps())
    # Mime comparison is case-insensitive.
    upper = remote_caps()
    upper["codecs"][0]["mimeType"] = "audio/OPUS"
    assert can_consume(CHROME_PRODUCER_PARAMS, router_caps, upper)


def test_cannot_consume_pcmu_only_remote(router_caps: dict[str, Any]) -> None:
    remote = {
        "codecs": [{"kind": "audio", "mimeType": "audio/PCMU", "preferredPayloadType": 0, "clockRate": 8000}],
        "headerExtensions": [],
    }
    assert can_consume(CHROME_PRODUCER_PARAMS, router_caps, remote) is False
    with pytest.raises(OrtcError, match="cannot consume"):
        get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote, ssrc=1)


@pytest.mark.parametrize(
    "remote",
    [
        {"codecs": [], "headerExtensions": []},
        # Mono opus is a different codec as far as matching goes.
        {"codecs": [{"mimeType": "audio/opus", "preferredPayloadType": 111, "clockRate": 48000}]},
        # Video-only remote.
        {"codecs": [{"mimeType": "video/VP8", "preferredPayloadType": 96, "clockRate": 90000}]},
    ],
)
def test_cannot_consume_other_remotes(router_caps: dict[str, Any], remote: dict[str, Any]) -> None:
    assert not can_consume(CHROME_PRODUCER_PARAMS, router_caps, remote)


def test_cannot_consume_when_router_lacks_codec() -> None:
    router = {"codecs": [{"mimeType": "audio/PCMU", "clockRate": 8000, "preferredPayloadType": 0}]}
    assert not can_consume(CHROME_PRODUCER_PARAMS, router, remote_caps())


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ssrc": True}, "ssrc must be an integer"),
        ({"ssrc": 2**32}, "ssrc must be an integer"),
        ({"ssrc": 1, "mid": ""}, "mid must be a non-empty string"),
        ({"ssrc": 1, "mid": 1}, "mid must be a non-empty string"),
    ],
)
def test_consumer_bad_arguments(router_caps: dict[str, Any], kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(OrtcError, match=needle):
        get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, remote_caps(), **kwargs)


def test_consumer_bad_remote_caps(router_caps: dict[str, Any]) -> None:
    remote = remote_caps()
    remote["codecs"][0]["preferredPayloadType"] = "109"
    with pytest.raises(OrtcError, match=r"remoteRtpCapabilities\.codecs\[0\]\.preferredPayloadType"):
        can_consume(CHROME_PRODUCER_PARAMS, router_caps, remote)
    with pytest.raises(OrtcError, match="remoteRtpCapabilities must be an object"):
        get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router_caps, "caps", ssrc=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def test_extension_id_map() -> None:
    assert extension_id_map(CHROME_PRODUCER_PARAMS) == {
        URI_MID: 4,
        URI_ABS_SEND_TIME: 2,
        URI_TRANSPORT_CC: 3,
        URI_AUDIO_LEVEL: 1,
        URI_CSRC_AUDIO_LEVEL: 9,
    }
    assert extension_id_map({"codecs": []}) == {}
    with pytest.raises(OrtcError, match=r"rtpParameters\.headerExtensions\[1\]\.id"):
        extension_id_map({"headerExtensions": [{"uri": URI_MID, "id": 1}, {"uri": URI_AUDIO_LEVEL, "id": 1}]})
    with pytest.raises(OrtcError, match="rtpParameters must be an object"):
        extension_id_map([])  # type: ignore[arg-type]


def test_random_ssrc(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {random_ssrc() for _ in range(200)}
    assert all(isinstance(v, int) and 1 <= v <= 2**32 - 1 for v in values)
    assert len(values) > 190
    # Boundaries of the underlying draw map to 1 and 2^32-1, never 0.
    monkeypatch.setattr(ortc.secrets, "randbelow", lambda n: 0)
    assert random_ssrc() == 1
    monkeypatch.setattr(ortc.secrets, "randbelow", lambda n: n - 1)
    assert random_ssrc() == 2**32 - 1


def test_random_cname() -> None:
    names = {random_cname() for _ in range(50)}
    assert len(names) == 50
    assert all(isinstance(n, str) and len(n) == 16 for n in names)


# --------------------------------------------------------------------------
# Opus RED (RFC 2198, docs/transports.md#opus-red)
# --------------------------------------------------------------------------

RED_ROUTER_CODECS: list[Any] = [
    {"kind": "audio", "mimeType": "audio/red", "clockRate": 48000, "channels": 2},
    {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2},
]


def with_red(params: dict[str, Any], red_pt: int = 63) -> dict[str, Any]:
    params = copy.deepcopy(params)
    params["codecs"].append(
        {"mimeType": "audio/red", "payloadType": red_pt, "clockRate": 48000, "channels": 2, "parameters": {}}
    )
    return params


def red_remote_caps(red_pt: int = 63) -> dict[str, Any]:
    caps = remote_caps()
    caps["codecs"].insert(
        0,
        {
            "mimeType": "audio/red",
            "kind": "audio",
            "preferredPayloadType": red_pt,
            "clockRate": 48000,
            "channels": 2,
        },
    )
    return caps


def test_router_lists_red_after_opus_with_its_own_payload_type() -> None:
    caps = generate_router_rtp_capabilities(copy.deepcopy(RED_ROUTER_CODECS))
    assert [(c["mimeType"], c["preferredPayloadType"]) for c in caps["codecs"]] == [
        ("audio/opus", 100),
        ("audio/red", 101),
    ]
    with pytest.raises(OrtcError, match="needs audio/opus"):
        generate_router_rtp_capabilities([copy.deepcopy(RED_ROUTER_CODECS[0])])


def test_producer_red_payload_type_only_when_the_router_routes_red() -> None:
    red_router = generate_router_rtp_capabilities(copy.deepcopy(RED_ROUTER_CODECS))
    info = get_producer_rtp_info(with_red(CHROME_PRODUCER_PARAMS), red_router)
    assert (info.payload_type, info.red_payload_type) == (111, 63)
    plain = get_producer_rtp_info(with_red(CHROME_PRODUCER_PARAMS), generate_router_rtp_capabilities())
    assert (plain.payload_type, plain.red_payload_type) == (111, None)
    assert get_producer_rtp_info(CHROME_PRODUCER_PARAMS, red_router).red_payload_type is None


def test_consumer_gets_red_only_when_producer_and_receiver_have_it() -> None:
    router = generate_router_rtp_capabilities(copy.deepcopy(RED_ROUTER_CODECS))
    both = get_consumer_rtp_parameters(with_red(CHROME_PRODUCER_PARAMS), router, red_remote_caps(120), 5)
    assert [(c["mimeType"], c["payloadType"]) for c in both["codecs"]] == [
        ("audio/opus", 109),
        ("audio/red", 120),
    ]
    assert ortc.red_payload_type(both) == 120
    # A receiver without RED: Opus only (the datapath unwraps RED for it).
    opus_only = get_consumer_rtp_parameters(with_red(CHROME_PRODUCER_PARAMS), router, remote_caps(), 5)
    assert [c["mimeType"] for c in opus_only["codecs"]] == ["audio/opus"]
    assert ortc.red_payload_type(opus_only) is None
    # A producer without RED: nothing to forward as RED, whatever the receiver can take.
    no_red = get_consumer_rtp_parameters(CHROME_PRODUCER_PARAMS, router, red_remote_caps(), 5)
    assert [c["mimeType"] for c in no_red["codecs"]] == ["audio/opus"]
