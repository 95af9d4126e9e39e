"""ORTC-style RTP capability/parameter negotiation for an audio-only (Opus) SFU.

Dict shapes and matching rules follow mediasoup v3 so mediasoup-client works unchanged."""

from __future__ import annotations

import base64
import copy
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn, cast

from fastsfu.types import (
    RtcpFeedback,
    RtpCapabilities,
    RtpCodecCapability,
    RtpCodecParameters,
    RtpHeaderExtension,
    RtpHeaderExtensionDirection,
    RtpHeaderExtensionParameters,
    RtpParameters,
)

__all__ = [
    "SUPPORTED_RTP_CAPABILITIES",
    "URI_ABS_CAPTURE_TIME",
    "URI_ABS_SEND_TIME",
    "URI_AUDIO_LEVEL",
    "URI_MID",
    "URI_TRANSPORT_CC",
    "OrtcError",
    "ProducerRtpInfo",
    "can_consume",
    "extension_id_map",
    "generate_router_rtp_capabilities",
    "get_consumer_rtp_parameters",
    "get_producer_rtp_info",
    "random_cname",
    "random_ssrc",
    "red_payload_type",
    "validate_rtp_capabilities",
    "validate_rtp_parameters",
]

JsonDict = dict[str, Any]


class OrtcError(ValueError):
    """Invalid or unsupported RTP capabilities/parameters; the message names the field."""


URI_MID: Final = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_AUDIO_LEVEL: Final = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_ABS_SEND_TIME: Final = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_TRANSPORT_CC: Final = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
URI_ABS_CAPTURE_TIME: Final = "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time"


def _supported_ext(
    uri: str, preferred_id: int, direction: RtpHeaderExtensionDirection = "sendrecv"
) -> RtpHeaderExtension:
    return {
        "kind": "audio",
        "uri": uri,
        "preferredId": preferred_id,
        "preferredEncrypt": False,
        "direction": direction,
    }


# Everything this server can route. Opus is signalled as 48000/2 whatever the
# real channel count (RFC 7587 §7), so that is the only form we accept.
SUPPORTED_RTP_CAPABILITIES: RtpCapabilities = {
    "codecs": [
        {
            "kind": "audio",
            "mimeType": "audio/opus",
            "clockRate": 48000,
            "channels": 2,
            "parameters": {},
            # No NACK (the datapath keeps no retransmission buffer) and no transport-cc
            # feedback yet: neither is offered until the server can honour it.
            "rtcpFeedback": [],
        },
        # Redundant Opus (RFC 2198): forwarded to receivers that negotiate it, unwrapped to the
        # primary Opus block for the others (docs/transports.md#opus-red).
        {
            "kind": "audio",
            "mimeType": "audio/red",
            "clockRate": 48000,
            "channels": 2,
            "parameters": {},
            "rtcpFeedback": [],
        },
    ],
    # abs-send-time and transport-wide sequence numbers describe one hop, so they are
    # accepted from producers but never forwarded to consumers (recvonly, as in mediasoup).
    "headerExtensions": [
        _supported_ext(URI_MID, 1),
        _supported_ext(URI_ABS_SEND_TIME, 4, "recvonly"),
        _supported_ext(URI_TRANSPORT_CC, 5, "recvonly"),
        _supported_ext(URI_AUDIO_LEVEL, 10),
        _supported_ext(URI_ABS_CAPTURE_TIME, 13),
    ],
}

_DEFAULT_MEDIA_CODECS: Final[tuple[RtpCodecCapability, ...]] = (
    {"kind": "audio", "mimeType": "audio/opus", "clockRate": 48000, "channels": 2},
)

# Same allocation order as mediasoup: 100..127 first, then 96..99, so that
# routers built by either server hand out identical payload types.
_DYNAMIC_PAYLOAD_TYPES: Final[tuple[int, ...]] = (*range(100, 128), *range(96, 100))

# Codecs that ride along with a media codec rather than carrying media of their
# own (retransmission, redundancy, FEC, comfort noise, DTMF events).
_AUXILIARY_SUBTYPES: Final = frozenset({"rtx", "red", "ulpfec", "flexfec-03", "cn", "telephone-event"})

# RFC 6838 §4.2: type "/" subtype with restricted-name characters. Only audio
# and video make sense as RTP codec capabilities.
_MIME_RE: Final = re.compile(r"^(audio|video)/([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126})$", re.IGNORECASE)

_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")
_EXT_KINDS: Final = ("audio", "video", "")

_MAX_U32: Final = 0xFFFFFFFF


# --------------------------------------------------------------------------
# Small strict type checks (bool is a subclass of int in Python, JSON does not
# mix them, so every integer check excludes bool explicitly).
# --------------------------------------------------------------------------


def _fail(path: str, message: str) -> NoReturn:
    raise OrtcError(f"{path} {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dict(value: object, path: str) -> JsonDict:
    if not isinstance(value, dict):
        _fail(path, f"must be an object (dict), got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            _fail(path, f"keys must be strings, got {key!r}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(path, f"must be an array (list), got {type(value).__name__}")
    return value


def _int_in(value: object, path: str, lo: int, hi: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    _fail(path, f"must be an integer {lo}..{hi}, got {value!r}")


def _int_at_least(value: object, path: str, lo: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo:
        return value
    _fail(path, f"must be an integer >= {lo}, got {value!r}")


def _str(value: object, path: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str) or (non_empty and not value):
        what = "a non-empty string" if non_empty else "a string"
        _fail(path, f"must be {what}, got {value!r}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"must be a boolean, got {value!r}")
    return value


def _optional_list(obj: JsonDict, key: str, path: str) -> list[Any]:
    """Return obj[key] validated as a list, filling in [] when absent."""
    if key not in obj:
        obj[key] = []
    return _list(obj[key], f"{path}.{key}")


# --------------------------------------------------------------------------
# Per-object validators. All of them work in place on a deep copy made by the
# public entry points, so the caller's data is never modified.
# --------------------------------------------------------------------------


def _validate_parameters(obj: JsonDict, path: str) -> None:
    """Codec/extension ``parameters``: fmtp-style key/value pairs (RFC 8866 §6.15)."""
    params = _dict(obj.setdefault("parameters", {}), f"{path}.parameters")
    for key, value in params.items():
        if isinstance(value, str) or _is_number(value):
            continue
        _fail(f"{path}.parameters.{key}", f"must be a string or a number, got {value!r}")
    # apt links an RTX codec to its media codec by payload type (RFC 4588 §8.6).
    if "apt" in params:
        _int_in(params["apt"], f"{path}.parameters.apt", 0, 127)


def _validate_rtcp_feedback(obj: JsonDict, path: str) -> None:
    feedback = _optional_list(obj, "rtcpFeedback", path)
    for i, fb in enumerate(feedback):
        fb_path = f"{path}.rtcpFeedback[{i}]"
        fb = _dict(fb, fb_path)
        _str(fb.get("type"), f"{fb_path}.type", non_empty=True)
        # "a=rtcp-fb:pt nack" has no parameter; mediasoup spells that "".
        _str(fb.setdefault("parameter", ""), f"{fb_path}.parameter")


def _validate_codec_common(codec: JsonDict, path: str) -> str:
    """Checks shared by RtpCodecCapability and RtpCodecParameters; returns the kind."""
    mime = _str(codec.get("mimeType"), f"{path}.mimeType", non_empty=True)
    match = _MIME_RE.match(mime)
    if match is None:
        _fail(
            f"{path}.mimeType",
            f"must look like 'audio/<subtype>' or 'video/<subtype>', got {mime!r}",
        )
    kind = match.group(1).lower()

    _int_at_least(codec.get("clockRate"), f"{path}.clockRate", 1)

    if kind == "audio":
        # SDP rtpmap omits the channel count when it is 1 (RFC 8866 §6.6).
        _int_at_least(codec.setdefault("channels", 1), f"{path}.channels", 1)
    else:
        # Channels mean nothing for video; mediasoup drops the key too.
        codec.pop("channels", None)

    _validate_parameters(codec, path)
    _validate_rtcp_feedback(codec, path)
    return kind


def _validate_codec_capability(codec: object, path: str) -> JsonDict:
    codec = _dict(codec, path)
    kind = _validate_codec_common(codec, path)
    if "kind" in codec and codec["kind"] != kind:
        _fail(f"{path}.kind", f"must match the mimeType ({kind!r}), got {codec['kind']!r}")
    codec["kind"] = kind
    if "preferredPayloadType" in codec:
        _int_in(codec["preferredPayloadType"], f"{path}.preferredPayloadType", 0, 127)
    return codec


def _validate_header_extension_capability(ext: object, path: str) -> JsonDict:
    ext = _dict(ext, path)
    # An empty kind means "any kind" (older mediasoup v3 payloads use it).
    kind = ext.setdefault("kind", "")
    if kind not in _EXT_KINDS:
        _fail(f"{path}.kind", f"must be 'audio', 'video' or '', got {kind!r}")
    _str(ext.get("uri"), f"{path}.uri", non_empty=True)
    # RFC 8285 §5: ids 1-14 fit the one-byte form, up to 255 the two-byte form.
    _int_in(ext.get("preferredId"), f"{path}.preferredId", 1, 255)
    _bool(ext.setdefault("preferredEncrypt", False), f"{path}.preferredEncrypt")
    direction = ext.setdefault("direction", "sendrecv")
    if direction not in _DIRECTIONS:
        _fail(
            f"{path}.direction",
            f"must be one of {', '.join(_DIRECTIONS)}, got {direction!r}",
        )
    return ext


def _validate_codec_parameters(codec: object, path: str) -> JsonDict:
    codec = _dict(codec, path)
    # PT is a 7-bit field in the RTP header (RFC 3550 §5.1).
    _int_in(codec.get("payloadType"), f"{path}.payloadType", 0, 127)
    _validate_codec_common(codec, path)
    return codec


def _validate_header_extension_list(params: JsonDict, path: str) -> list[JsonDict]:
    exts = _optional_list(params, "headerExtensions", path)
    seen_ids: dict[int, int] = {}
    for i, ext in enumerate(exts):
        ext_path = f"{path}.headerExtensions[{i}]"
        ext = _dict(ext, ext_path)
        _str(ext.get("uri"), f"{ext_path}.uri", non_empty=True)
        ext_id = _int_in(ext.get("id"), f"{ext_path}.id", 1, 255)
        # RFC 8285 §5: each id maps to at most one extension per media section,
        # otherwise a received element could not be interpreted.
        if ext_id in seen_ids:
            _fail(
                f"{ext_path}.id",
                f"{ext_id} duplicates headerExtensions[{seen_ids[ext_id]}].id",
            )
        seen_ids[ext_id] = i
        _bool(ext.setdefault("encrypt", False), f"{ext_path}.encrypt")
        _validate_parameters(ext, ext_path)
    return exts


def _validate_encoding(encoding: object, path: str) -> None:
    encoding = _dict(encoding, path)
    if "ssrc" in encoding:
        _int_in(encoding["ssrc"], f"{path}.ssrc", 0, _MAX_U32)
    if "rid" in encoding:
        _str(encoding["rid"], f"{path}.rid", non_empty=True)
    if "rtx" in encoding:
        rtx = _dict(encoding["rtx"], f"{path}.rtx")
        _int_in(rtx.get("ssrc"), f"{path}.rtx.ssrc", 0, _MAX_U32)
    if "codecPayloadType" in encoding:
        _int_in(encoding["codecPayloadType"], f"{path}.codecPayloadType", 0, 127)
    if "maxBitrate" in encoding:
        bitrate = encoding["maxBitrate"]
        if not _is_number(bitrate) or bitrate < 0:
            _fail(f"{path}.maxBitrate", f"must be a number >= 0, got {bitrate!r}")
    if "scalabilityMode" in encoding:
        _str(encoding["scalabilityMode"], f"{path}.scalabilityMode")
    _bool(encoding.setdefault("dtx", False), f"{path}.dtx")


def _validate_rtcp(params: JsonDict, path: str) -> None:
    rtcp = _dict(params.setdefault("rtcp", {}), f"{path}.rtcp")
    if "cname" in rtcp:
        _str(rtcp["cname"], f"{path}.rtcp.cname", non_empty=True)
    # Reduced-size RTCP (RFC 5506) is what every WebRTC endpoint negotiates.
    _bool(rtcp.setdefault("reducedSize", True), f"{path}.rtcp.reducedSize")


def _validate_caps(caps: object, path: str) -> JsonDict:
    caps = copy.deepcopy(_dict(caps, path))
    for i, codec in enumerate(_optional_list(caps, "codecs", path)):
        _validate_codec_capability(codec, f"{path}.codecs[{i}]")
    # Duplicate preferredIds are legal here: the same URI is typically listed
    # once per kind with the same id.
    for i, ext in enumerate(_optional_list(caps, "headerExtensions", path)):
        _validate_header_extension_capability(ext, f"{path}.headerExtensions[{i}]")
    return caps


def _validate_params(params: object, path: str) -> JsonDict:
    params = copy.deepcopy(_dict(params, path))
    if "mid" in params:
        # RFC 5888 §4: identification-tag is a token, hence non-empty.
        _str(params["mid"], f"{path}.mid", non_empty=True)
    if "codecs" not in params:
        _fail(f"{path}.codecs", "is required")
    codecs = _list(params["codecs"], f"{path}.codecs")
    if not codecs:
        _fail(f"{path}.codecs", "must not be empty")
    seen_pts: dict[int, int] = {}
    for i, codec in enumerate(codecs):
        codec = _validate_codec_parameters(codec, f"{path}.codecs[{i}]")
        pt = codec["payloadType"]
        # The PT is the only thing identifying the format of a packet.
        if pt in seen_pts:
            _fail(
                f"{path}.codecs[{i}].payloadType",
                f"{pt} duplicates codecs[{seen_pts[pt]}].payloadType",
            )
        seen_pts[pt] = i
    _validate_header_extension_list(params, path)
    for i, encoding in enumerate(_optional_list(params, "encodings", path)):
        _validate_encoding(encoding, f"{path}.encodings[{i}]")
    _validate_rtcp(params, path)
    return params


# The validators below check every key they return (and fill in the optional ones), so the casts
# to mediasoup's shapes state what they verified at run time.


def validate_rtp_capabilities(caps: object) -> RtpCapabilities:
    """Validate RtpCapabilities; return a normalized deep copy with defaults filled in
    (codecs, headerExtensions, and each entry's optional keys are then present)."""
    return cast(RtpCapabilities, _validate_caps(caps, "rtpCapabilities"))


def validate_rtp_parameters(params: object) -> RtpParameters:
    """Validate (producer) RtpParameters; return a normalized deep copy with defaults filled in
    (headerExtensions, encodings, rtcp, and each entry's optional keys are then present)."""
    return cast(RtpParameters, _validate_params(params, "rtpParameters"))


# --------------------------------------------------------------------------
# Matching helpers.
# --------------------------------------------------------------------------


def _subtype(codec: Mapping[str, Any]) -> str:
    return str(codec["mimeType"]).split("/", 1)[1].lower()


def _is_media_codec(codec: Mapping[str, Any]) -> bool:
    return _subtype(codec) not in _AUXILIARY_SUBTYPES


def _is_red(codec: Mapping[str, Any]) -> bool:
    """Opus RED as fastsfu routes it: audio/red 48000/2 (RFC 2198, the form WebRTC uses)."""
    return _subtype(codec) == "red" and codec["clockRate"] == 48000 and codec.get("channels") == 2


def _red_codec(codecs: list[Any]) -> Any:
    return next((c for c in codecs if c.get("kind", "audio") == "audio" and _is_red(c)), None)


def _codecs_match(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same codec per mediasoup's (non-strict) rule: mime, clock rate, channels.

    Mime types compare case-insensitively (RFC 6838 §4.2). Opus needs nothing
    more: all its fmtp parameters are declarative (RFC 7587 §7).
    """
    if str(a["mimeType"]).lower() != str(b["mimeType"]).lower():
        return False
    if a["clockRate"] != b["clockRate"]:
        return False
    return a.get("channels") == b.get("channels")


def _fb_key(fb: RtcpFeedback) -> tuple[str, str]:
    return (fb["type"], fb.get("parameter", ""))


def _describe(codec: Mapping[str, Any]) -> str:
    desc = f"{codec['mimeType']}/{codec['clockRate']}"
    if "channels" in codec:
        desc += f"/{codec['channels']}"
    return desc


def _producer_codec(params: RtpParameters, path: str) -> RtpCodecParameters:
    """The codec carrying the producer's media: the first non-auxiliary one."""
    for codec in params["codecs"]:
        if _is_media_codec(codec):
            return codec
    _fail(f"{path}.codecs", "contains no media codec (only RTX/RED/FEC/CN/DTMF)")


def _router_codec_for(codec: RtpCodecParameters, router_caps: RtpCapabilities) -> RtpCodecCapability | None:
    for cap in router_caps.get("codecs", []):
        if cap["kind"] == "audio" and _is_media_codec(cap) and _codecs_match(codec, cap):
            return cap
    return None


def _ext_allows(ext: RtpHeaderExtension, directions: tuple[str, ...]) -> bool:
    return ext["kind"] in ("audio", "") and ext.get("direction", "sendrecv") in directions


# --------------------------------------------------------------------------
# Router capabilities.
# --------------------------------------------------------------------------


def generate_router_rtp_capabilities(
    media_codecs: list[RtpCodecCapability] | None = None,
) -> RtpCapabilities:
    """Build the router's RtpCapabilities from mediasoup-style RouterOptions.mediaCodecs."""
    path = "mediaCodecs"
    if media_codecs is None:
        media_codecs = [c.copy() for c in _DEFAULT_MEDIA_CODECS]
    requested = copy.deepcopy(_list(media_codecs, path))
    if not requested:
        _fail(path, "must not be empty (a router needs at least one codec)")

    supported = _validate_caps(SUPPORTED_RTP_CAPABILITIES, "SUPPORTED_RTP_CAPABILITIES")

    matches: list[tuple[JsonDict, JsonDict]] = []
    for i, media_codec in enumerate(requested):
        item_path = f"{path}[{i}]"
        media_codec = _validate_codec_capability(media_codec, item_path)
        if media_codec["kind"] != "audio":
            _fail(
                f"{item_path}.kind",
                f"{media_codec['kind']!r} is not supported: fastsfu is audio-only",
            )
        found = next((c for c in supported["codecs"] if _codecs_match(media_codec, c)), None)
        if found is None:
            _fail(
                item_path,
                f"unsupported codec {_describe(media_codec)} (supported: "
                + ", ".join(_describe(c) for c in supported["codecs"])
                + ")",
            )
        matches.append((media_codec, found))
    if any(_is_red(m) for m, _ in matches) and not any(_subtype(m) == "opus" for m, _ in matches):
        _fail(path, "audio/red needs audio/opus in the same list (its blocks are Opus)")
    # Media codecs before RED: mediasoup-client sends with the first codec of the list, and RED
    # is only ever sent beside Opus.
    matches.sort(key=lambda m: _is_red(m[0]))

    # Reserve every explicitly chosen payload type before auto-assigning, so an
    # explicit PT later in the list cannot collide with an earlier automatic one.
    taken: dict[int, int] = {}
    for i, (media_codec, found) in enumerate(matches):
        pt = media_codec.get("preferredPayloadType", found.get("preferredPayloadType"))
        if pt is None:
            continue
        if pt in taken:
            _fail(
                f"{path}[{i}].preferredPayloadType",
                f"{pt} duplicates mediaCodecs[{taken[pt]}]",
            )
        taken[pt] = i
    free = iter(pt for pt in _DYNAMIC_PAYLOAD_TYPES if pt not in taken)

    codecs: list[JsonDict] = []
    for i, (media_codec, found) in enumerate(matches):
        codec = copy.deepcopy(found)
        pt = media_codec.get("preferredPayloadType", found.get("preferredPayloadType"))
        if pt is None:
            pt = next(free, None)
            if pt is None:
                _fail(
                    f"{path}[{i}]",
                    "cannot be given a payload type: dynamic range 96..127 exhausted",
                )
        codec["preferredPayloadType"] = pt
        # The application's fmtp parameters (e.g. useinbandfec) win over ours.
        codec["parameters"] = {**codec["parameters"], **media_codec["parameters"]}
        codecs.append(codec)

    # Every entry was validated (ours by _validate_caps, the application's fmtp merged in).
    return cast(RtpCapabilities, {"codecs": codecs, "headerExtensions": supported["headerExtensions"]})


# --------------------------------------------------------------------------
# Producer side.
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProducerRtpInfo:
    """What the media path needs to know about an incoming audio stream."""

    ssrc: int
    payload_type: int
    clock_rate: int
    mime_type: str
    header_extensions: dict[int, str]  # id -> uri, only URIs the router understands
    cname: str | None
    red_payload_type: int | None = None  # audio/red beside Opus, when the router routes RED


def get_producer_rtp_info(params: RtpParameters, router_caps: RtpCapabilities) -> ProducerRtpInfo:
    """Check a producer's RtpParameters against the router; return its stream description."""
    path = "rtpParameters"
    params = validate_rtp_parameters(params)
    router = cast(RtpCapabilities, _validate_caps(router_caps, "routerRtpCapabilities"))

    codec = _producer_codec(params, path)
    router_codec = _router_codec_for(codec, router)
    if router_codec is None:
        _fail(
            f"{path}.codecs",
            f"unsupported codec [mimeType:{codec['mimeType']}, "
            f"payloadType:{codec['payloadType']}, {_describe(codec)}]: not in the router capabilities",
        )

    encodings = params.get("encodings", [])
    # One SSRC per audio producer: simulcast/RID-based streams are a video
    # feature and would need RID demultiplexing (RFC 8852) we do not do.
    if len(encodings) != 1:
        _fail(
            f"{path}.encodings",
            f"must contain exactly one encoding, got {len(encodings)}",
        )
    encoding = encodings[0]
    if "rid" in encoding:
        _fail(
            f"{path}.encodings[0].rid",
            "is not supported (no simulcast for audio); signal an ssrc",
        )
    if "ssrc" not in encoding:
        _fail(f"{path}.encodings[0].ssrc", "is required")

    router_uris = {
        ext["uri"] for ext in router.get("headerExtensions", []) if _ext_allows(ext, ("sendrecv", "recvonly"))
    }
    header_extensions = {
        ext["id"]: ext["uri"]
        for ext in params.get("headerExtensions", [])
        # Encrypted elements (RFC 6904) are opaque to us; ignore them.
        if ext["uri"] in router_uris and not ext.get("encrypt", False)
    }

    return ProducerRtpInfo(
        ssrc=encoding["ssrc"],
        payload_type=codec["payloadType"],
        clock_rate=codec["clockRate"],
        mime_type=router_codec["mimeType"],
        header_extensions=header_extensions,
        cname=params.get("rtcp", {}).get("cname"),
        red_payload_type=_producer_red_pt(params, router),
    )


def _producer_red_pt(params: RtpParameters, router: RtpCapabilities) -> int | None:
    """The producer's RED PT if it may send RED: it lists audio/red and the router routes it."""
    red = _red_codec(params["codecs"])
    if red is None or _red_codec(router.get("codecs", [])) is None:
        return None
    return int(red["payloadType"])


# --------------------------------------------------------------------------
# Consumer side.
# --------------------------------------------------------------------------


def _select_codecs(
    producer: RtpParameters, router: RtpCapabilities, remote: RtpCapabilities
) -> tuple[RtpCodecParameters, RtpCodecCapability, RtpCodecCapability] | None:
    """(producer codec, router codec, remote codec) or None when unconsumable."""
    codec = _producer_codec(producer, "producerRtpParameters")
    router_codec = _router_codec_for(codec, router)
    if router_codec is None:
        return None
    for remote_codec in remote.get("codecs", []):
        if remote_codec["kind"] == "audio" and _codecs_match(codec, remote_codec):
            return codec, router_codec, remote_codec
    return None


def _validated(
    producer_params: object, router_caps: object, remote_caps: object
) -> tuple[RtpParameters, RtpCapabilities, RtpCapabilities]:
    return (
        cast(RtpParameters, _validate_params(producer_params, "producerRtpParameters")),
        cast(RtpCapabilities, _validate_caps(router_caps, "routerRtpCapabilities")),
        cast(RtpCapabilities, _validate_caps(remote_caps, "remoteRtpCapabilities")),
    )


def can_consume(
    producer_params: RtpParameters, router_caps: RtpCapabilities, remote_caps: RtpCapabilities
) -> bool:
    """True when the remote endpoint can receive the producer's codec."""
    producer, router, remote = _validated(producer_params, router_caps, remote_caps)
    return _select_codecs(producer, router, remote) is not None


def get_consumer_rtp_parameters(
    producer_params: RtpParameters,
    router_caps: RtpCapabilities,
    remote_caps: RtpCapabilities,
    ssrc: int,
    mid: str | None = None,
) -> RtpParameters:
    """RtpParameters for a consumer, in the remote's own payload type and extension ids."""
    producer, router, remote = _validated(producer_params, router_caps, remote_caps)
    _int_in(ssrc, "ssrc", 0, _MAX_U32)
    if mid is not None:
        _str(mid, "mid", non_empty=True)
    params = consumer_rtp_parameters(producer, router, remote, ssrc, mid)
    if params is None:
        codec = _producer_codec(producer, "producerRtpParameters")
        _fail(
            "remoteRtpCapabilities.codecs",
            f"cannot consume: no codec matching {_describe(codec)}",
        )
    return params


def consumer_rtp_parameters(
    producer: RtpParameters, router: RtpCapabilities, remote: RtpCapabilities, ssrc: int, mid: str | None
) -> RtpParameters | None:
    """`get_consumer_rtp_parameters` for inputs that are already validated (a Producer's
    rtp_parameters, a Router's rtp_capabilities, what `validate_rtp_capabilities` returned), or
    None when the remote cannot receive the producer's codec. Validating costs far more than
    deriving, and a join in a room of N derives N of these on the event loop."""
    selected = _select_codecs(producer, router, remote)
    if selected is None:
        return None
    codec, router_codec, remote_codec = selected

    # Header extensions: the router must be willing to send the extension and
    # the remote willing to receive it; ids are the remote's, as it declared
    # them for its receive side (RFC 8285 §5, ids are chosen per endpoint).
    header_extensions: list[RtpHeaderExtensionParameters] = []
    used_ids: dict[int, str] = {}
    for router_ext in router.get("headerExtensions", []):
        uri = router_ext["uri"]
        if not _ext_allows(router_ext, ("sendrecv", "sendonly")):
            continue
        if any(e["uri"] == uri for e in header_extensions):
            continue
        remote_ext = next(
            (
                e
                for e in remote.get("headerExtensions", [])
                if e["uri"] == uri and _ext_allows(e, ("sendrecv", "recvonly"))
            ),
            None,
        )
        if remote_ext is None:
            continue
        ext_id = remote_ext["preferredId"]
        if ext_id in used_ids:
            _fail(
                "remoteRtpCapabilities.headerExtensions",
                f"preferredId {ext_id} is used for both {used_ids[ext_id]!r} and {uri!r}",
            )
        used_ids[ext_id] = uri
        header_extensions.append({"uri": uri, "id": ext_id, "encrypt": False, "parameters": {}})

    # RTCP feedback both ends support (RFC 4585 §4.2 negotiation: a feedback
    # type is only usable when both sides list it for the payload type).
    remote_fb = {_fb_key(fb) for fb in remote_codec.get("rtcpFeedback", [])}
    negotiated_uris = {e["uri"] for e in header_extensions}
    rtcp_feedback: list[RtcpFeedback] = []
    for fb in router_codec.get("rtcpFeedback", []):
        if _fb_key(fb) not in remote_fb:
            continue
        # Transport-wide feedback reports sequence numbers carried by its
        # header extension; without the extension the receiver has nothing to
        # report (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3).
        if fb["type"] == "transport-cc" and URI_TRANSPORT_CC not in negotiated_uris:
            continue
        # REMB likewise relies on abs-send-time timestamps.
        if fb["type"] == "goog-remb" and URI_ABS_SEND_TIME not in negotiated_uris:
            continue
        rtcp_feedback.append({"type": fb["type"], "parameter": fb.get("parameter", "")})

    payload_type = remote_codec.get("preferredPayloadType", router_codec.get("preferredPayloadType"))
    if payload_type is None:
        _fail(
            "remoteRtpCapabilities.codecs",
            f"{_describe(remote_codec)} has no preferredPayloadType",
        )

    consumer_codec: RtpCodecParameters = {
        "mimeType": router_codec["mimeType"],
        "payloadType": payload_type,
        "clockRate": router_codec["clockRate"],
    }
    if "channels" in router_codec:
        consumer_codec["channels"] = router_codec["channels"]
    # The producer's fmtp (e.g. stereo/useinbandfec as actually sent) describes
    # the stream the consumer receives, so it overrides the router defaults.
    # (Validated parameters hold only strings and numbers: a flat copy is a full copy.)
    consumer_codec["parameters"] = {**router_codec.get("parameters", {}), **codec.get("parameters", {})}
    consumer_codec["rtcpFeedback"] = rtcp_feedback

    codecs = [consumer_codec]
    red = _consumer_red_codec(producer, router, remote, payload_type)
    if red is not None:
        codecs.append(red)
    # mid first, as before: the JSON reads in mediasoup's order.
    result: RtpParameters = {"mid": mid, "codecs": codecs} if mid is not None else {"codecs": codecs}
    result["headerExtensions"] = header_extensions
    result["encodings"] = [{"ssrc": ssrc}]
    result["rtcp"] = {
        "cname": producer.get("rtcp", {}).get("cname") or random_cname(),
        "reducedSize": True,
    }
    return result


def _consumer_red_codec(
    producer: RtpParameters, router: RtpCapabilities, remote: RtpCapabilities, opus_pt: int
) -> RtpCodecParameters | None:
    """audio/red at the remote's PT when the producer may send RED and the remote receives it.

    Listed after Opus: the receiver gets RED packets as they come and plain Opus otherwise, and
    a producer without RED never gets RED wrapped around its packets (nothing to add). The fmtp
    names the Opus PT (RFC 2198 §5: "<primary>/<redundant>"); Chromium drops audio/red from its
    answer without it. mediasoup-client writes a parameter as `key=value`, and Chromium reads a
    value after an empty key as the fmtp of a format without key-value parameters, so the
    parameter's key is empty: `a=fmtp:101 =100/100`."""
    router_red = _red_codec(router.get("codecs", []))
    remote_red = _red_codec(remote.get("codecs", []))
    if router_red is None or remote_red is None or _red_codec(producer["codecs"]) is None:
        return None
    pt = remote_red.get("preferredPayloadType", router_red.get("preferredPayloadType"))
    if pt is None:
        return None
    return {
        "mimeType": router_red["mimeType"],
        "payloadType": pt,
        "clockRate": 48000,
        "channels": 2,
        "parameters": {"": f"{opus_pt}/{opus_pt}"},
        "rtcpFeedback": [],
    }


def red_payload_type(params: RtpParameters) -> int | None:
    """The audio/red PT of (consumer) RtpParameters, or None: RED is then unwrapped to Opus."""
    red = _red_codec(params["codecs"])
    return None if red is None else int(red["payloadType"])


def extension_id_map(params: RtpParameters) -> dict[str, int]:
    """uri -> id of the header extensions in any RtpParameters (first id wins per uri)."""
    path = "rtpParameters"
    copied = copy.deepcopy(_dict(params, path))
    mapping: dict[str, int] = {}
    for ext in _validate_header_extension_list(copied, path):
        mapping.setdefault(ext["uri"], ext["id"])
    return mapping


# --------------------------------------------------------------------------
# Identifiers.
# --------------------------------------------------------------------------


def random_ssrc() -> int:
    """Random SSRC in 1..2^32-1 (RFC 3550 §8.1 wants it random; 0 is avoided
    because some stacks treat it as "unset")."""
    return secrets.randbelow(_MAX_U32) + 1


def random_cname() -> str:
    """Random RTCP CNAME: base64 of 96 random bits, as RFC 7022 §5 recommends."""
    return base64.b64encode(secrets.token_bytes(12)).decode("ascii")
