"""The `webrtc` protocol's SDP (docs/discord.md#the-webrtc-protocol): parse the browser's fragment from
SELECT_PROTOCOL and write the server's template answer for op 4.

The fragment has no m= lines, mids or candidates: only ICE credentials, the DTLS fingerprint,
the browser's Opus payload type and its header-extension IDs. SSRCs come later, from SPEAKING.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastsfu.dtls.crypto import FINGERPRINT_ALGORITHMS
from fastsfu.types import DtlsFingerprint, IceCandidate, IceParameters, RtpCapabilities, RtpParameters

# Extensions a forwarded stream may carry to a browser (the ones fastsfu rewrites per receiver).
FORWARDED_EXTENSIONS = ("urn:ietf:params:rtp-hdrext:ssrc-audio-level",)
MAX_FRAGMENT = 16 * 1024


class SdpError(ValueError):
    """A fragment fastsfu cannot use: the gateway closes with 4020 (bad request)."""


@dataclass
class WebRtcOffer:
    ice_ufrag: str
    ice_pwd: str
    fingerprints: list[DtlsFingerprint]
    opus_pt: int = 111
    extensions: dict[str, int] = field(default_factory=dict)  # URI -> ID

    def rtp_capabilities(self) -> RtpCapabilities:
        """What this browser receives: Opus at its PT and the extensions it declared."""
        return {
            "codecs": [
                {
                    "kind": "audio",
                    "mimeType": "audio/opus",
                    "preferredPayloadType": self.opus_pt,
                    "clockRate": 48000,
                    "channels": 2,
                    "parameters": {"minptime": 10, "useinbandfec": 1},
                }
            ],
            "headerExtensions": [
                {"kind": "audio", "uri": uri, "preferredId": ext_id, "direction": "sendrecv"}
                for uri, ext_id in self.extensions.items()
                if uri in FORWARDED_EXTENSIONS
            ],
        }

    def rtp_parameters(self, ssrc: int) -> RtpParameters:
        """A producer of this browser's audio: its PT, its extension IDs, the SSRC from SPEAKING."""
        return {
            "codecs": [
                {"mimeType": "audio/opus", "payloadType": self.opus_pt, "clockRate": 48000, "channels": 2}
            ],
            "headerExtensions": [{"uri": uri, "id": ext_id} for uri, ext_id in self.extensions.items()],
            "encodings": [{"ssrc": ssrc}],
            "rtcp": {"cname": f"discord-webrtc-{ssrc}", "reducedSize": True},
        }


def parse_fragment(text: str, codecs: Any = None) -> WebRtcOffer:
    """The attributes the browser's fragment carries (`a=` lines, `\\n` or `\\r\\n`); `codecs` (op 1's
    list) may name Opus's payload type instead of an `a=rtpmap` line."""
    if not isinstance(text, str) or len(text) > MAX_FRAGMENT:
        raise SdpError("the SDP fragment must be a string of at most 16 KiB")
    ufrag = pwd = None
    fingerprints: list[DtlsFingerprint] = []
    opus_pt: int | None = None
    extensions: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("a="):
            continue
        name, _, value = line[2:].partition(":")
        if name == "ice-ufrag":
            ufrag = value.strip()
        elif name == "ice-pwd":
            pwd = value.strip()
        elif name == "fingerprint":
            algorithm, _, digest = value.strip().partition(" ")
            if algorithm.lower() in FINGERPRINT_ALGORITHMS and digest:
                fingerprints.append({"algorithm": algorithm.lower(), "value": digest.strip().upper()})
        elif name == "rtpmap":
            pt, _, encoding = value.partition(" ")
            if encoding.lower().startswith("opus/48000") and pt.isdigit() and 0 <= int(pt) < 128:
                opus_pt = opus_pt if opus_pt is not None else int(pt)
        elif name == "extmap":
            ext_id, _, uri = value.partition(" ")
            ext_id = ext_id.split("/", 1)[0]
            if ext_id.isdigit() and 1 <= int(ext_id) <= 255 and uri.strip():
                extensions[uri.strip().split(" ", 1)[0]] = int(ext_id)
    if opus_pt is None and isinstance(codecs, list):
        for codec in codecs:
            if isinstance(codec, dict) and str(codec.get("name", "")).lower() == "opus":
                declared = codec.get("payload_type")
                if isinstance(declared, int) and not isinstance(declared, bool) and 0 <= declared < 128:
                    opus_pt = declared
                    break
    if not ufrag or not pwd:
        raise SdpError("the SDP fragment has no a=ice-ufrag / a=ice-pwd")
    if not fingerprints:
        raise SdpError("the SDP fragment has no a=fingerprint with sha-256, sha-384 or sha-512")
    return WebRtcOffer(ufrag, pwd, fingerprints, opus_pt if opus_pt is not None else 111, extensions)


def answer(
    ip: str,
    port: int,
    ice: IceParameters,
    fingerprint: DtlsFingerprint,
    tcp_candidate: IceCandidate | None = None,
) -> str:
    """Op 4's `sdp`: the template answer (the browser builds the full remote answer from it).
    With ICE-TCP on, the passive TCP candidate follows the UDP one (RFC 6544's `tcptype` syntax)."""
    fp = f"a=fingerprint:{fingerprint['algorithm']} {fingerprint['value']}"
    lines = [
        f"m=audio {port} ICE/SDP",
        fp,
        f"c=IN IP4 {ip}",
        f"a=rtcp:{port}",
        f"a=ice-ufrag:{ice['usernameFragment']}",
        f"a=ice-pwd:{ice['password']}",
        fp,
        f"a=candidate:1 1 UDP 4261412862 {ip} {port} typ host",
    ]
    if tcp_candidate is not None:
        c = tcp_candidate
        lines.append(f"a=candidate:2 1 TCP {c['priority']} {c['ip']} {c['port']} typ host tcptype passive")
    return "\n".join([*lines, ""])
