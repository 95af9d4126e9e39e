"""aiortc as a WebRTC client of fastsfu in tests: one ICE-lite + DTLS leg per server transport."""

from __future__ import annotations

import array
import math
from typing import Any

from aiortc import (
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
    RTCIceCandidate,
    RTCIceGatherer,
    RTCIceParameters,
    RTCIceTransport,
)
from aiortc.mediastreams import AudioStreamTrack


class VoiceTrack(AudioStreamTrack):
    """aiortc's silent track, or a 440 Hz tone while `talking`: aiortc writes the ssrc-audio-level
    it computes from this audio (RFC 6464) when the extension is negotiated."""

    talking = False

    async def recv(self) -> Any:
        frame = await super().recv()
        if self.talking:
            pcm = array.array(
                "h",
                (
                    int(12000 * math.sin(2 * math.pi * 440 * (frame.pts + i) / 8000))
                    for i in range(frame.samples)
                ),
            )
            frame.planes[0].update(pcm.tobytes())
        return frame


class AiortcLeg:
    """aiortc's ORTC ICE and DTLS transports towards one fastsfu WebRtcTransport.

    aiortc is ICE-controlling against our ICE-lite, so its DTLS role is server unless forced.
    """

    def __init__(self, role: str | None = None) -> None:
        self.gatherer = RTCIceGatherer(iceServers=[])
        self.ice = RTCIceTransport(self.gatherer)
        self.dtls = RTCDtlsTransport(self.ice, [RTCCertificate.generateCertificate()])
        self.role = role or "server"
        if role is not None:
            # In ORTC mode aiortc picks its DTLS role from its ICE role and ignores the remote's;
            # its private setter forces the other role.
            self.dtls._set_role(role)

    def dtls_parameters(self) -> dict[str, Any]:
        """Our side as mediasoup dtlsParameters, for the server's connect()."""
        fps = [
            {"algorithm": f.algorithm, "value": f.value} for f in self.dtls.getLocalParameters().fingerprints
        ]
        return {"role": self.role, "fingerprints": fps}

    async def start(
        self,
        candidates: list[dict[str, Any]],
        ice_parameters: dict[str, Any],
        dtls_parameters: dict[str, Any],
    ) -> None:
        """ICE against the server's candidates (end-of-candidates included), then DTLS."""
        for c in candidates:
            await self.ice.addRemoteCandidate(
                RTCIceCandidate(
                    component=1,
                    foundation=c["foundation"],
                    ip=c["ip"],
                    port=c["port"],
                    priority=c["priority"],
                    protocol="udp",
                    type="host",
                )
            )
        await self.ice.addRemoteCandidate(None)
        await self.ice.start(
            RTCIceParameters(
                usernameFragment=ice_parameters["usernameFragment"],
                password=ice_parameters["password"],
                iceLite=True,
            )
        )
        fingerprints = [
            RTCDtlsFingerprint(f["algorithm"], f["value"]) for f in dtls_parameters["fingerprints"]
        ]
        await self.dtls.start(RTCDtlsParameters(fingerprints=fingerprints, role="auto"))

    async def stop(self) -> None:
        await self.dtls.stop()
        await self.ice.stop()
