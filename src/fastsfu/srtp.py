"""SRTP profiles, keys and contexts: pylibsrtp sessions whose libsrtp state the datapath uses from C.

Importing this module checks pylibsrtp's bundled libsrtp is 2.x and hands its entry points to
`fastsfu._rtp` (docs/transports.md#srtp); nothing here runs per packet.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import secrets
from dataclasses import dataclass
from typing import Any

import pylibsrtp
from pylibsrtp import _binding

from fastsfu import _rtp
from fastsfu.types import SrtpParameters


class SrtpError(ValueError):
    """Bad SRTP parameters (unknown suite, wrong key length)."""


@dataclass(frozen=True)
class SrtpSuite:
    """One SRTP protection profile: mediasoup's cryptoSuite name and libsrtp's profile."""

    name: str
    profile: int
    key_length: int
    salt_length: int
    dtls_id: int  # RFC 5764 §4.1.2 / RFC 7714 §14.2 protection profile value

    @property
    def master_length(self) -> int:
        return self.key_length + self.salt_length


SUITES: dict[str, SrtpSuite] = {
    s.name: s
    for s in (
        SrtpSuite("AEAD_AES_256_GCM", pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 32, 12, 0x0008),
        SrtpSuite("AEAD_AES_128_GCM", pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 16, 12, 0x0007),
        SrtpSuite("AES_CM_128_HMAC_SHA1_80", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 16, 14, 0x0001),
        SrtpSuite("AES_CM_128_HMAC_SHA1_32", pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 16, 14, 0x0002),
    )
}
DEFAULT_SUITE = "AES_CM_128_HMAC_SHA1_80"

# Replay window for inbound streams (RFC 3711 §3.3.2, at least 64): 128 packets is 2.5 s of
# Opus at 50 pps. libsrtp shifts the whole bit vector per packet, so a 1024-packet window cost
# ~0.15 us more per unprotect (measured with benchmarks/bench_datapath.py).
REPLAY_WINDOW = 128


def suite(name: str) -> SrtpSuite:
    try:
        return SUITES[name]
    except KeyError:
        raise SrtpError(f"unsupported SRTP crypto suite {name!r} (supported: {', '.join(SUITES)})") from None


def generate_key(suite_name: str) -> bytes:
    """Fresh master key || salt for a suite."""
    return secrets.token_bytes(suite(suite_name).master_length)


def parse_srtp_parameters(params: Any) -> tuple[SrtpSuite, bytes]:
    """mediasoup SrtpParameters {"cryptoSuite", "keyBase64"} -> (suite, key||salt)."""
    if not isinstance(params, dict):
        raise SrtpError("srtpParameters must be an object with cryptoSuite and keyBase64")
    s = suite(params.get("cryptoSuite", ""))
    b64 = params.get("keyBase64")
    if not isinstance(b64, str):
        raise SrtpError("srtpParameters.keyBase64 must be a string")
    try:
        key = base64.b64decode(b64, validate=True)
    except ValueError:
        raise SrtpError("srtpParameters.keyBase64 is not valid base64") from None
    if len(key) != s.master_length:
        raise SrtpError(f"srtpParameters.keyBase64 must decode to {s.master_length} bytes for {s.name}")
    return s, key


def srtp_parameters(suite_name: str, key: bytes) -> SrtpParameters:
    return {"cryptoSuite": suite_name, "keyBase64": base64.b64encode(key).decode("ascii")}


class SrtpContext:
    """One libsrtp session (one direction of one transport).

    `address` is the `srtp_t` the datapath calls from C. Streams are added per SSRC when a
    producer or consumer is created, so libsrtp never allocates on the first packet of a stream.
    """

    def __init__(self, suite_name: str, key: bytes, inbound: bool) -> None:
        self.suite = suite(suite_name)
        if len(key) != self.suite.master_length:
            raise SrtpError(f"{self.suite.name} needs a {self.suite.master_length}-byte key||salt")
        self._key = bytes(key)
        self.inbound = inbound
        # The template covers SSRCs we have no stream for: inbound RTCP from receivers' own SSRCs.
        template = self._policy(
            pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND, 0
        )
        self.session = pylibsrtp.Session(policy=template)
        self.address: int = int(_binding.ffi.cast("uintptr_t", self.session._srtp[0]))
        self._streams: set[int] = set()

    def _policy(self, ssrc_type: int, ssrc: int) -> pylibsrtp.Policy:
        policy = pylibsrtp.Policy(
            key=self._key, ssrc_type=ssrc_type, ssrc_value=ssrc, srtp_profile=self.suite.profile
        )
        if self.inbound:
            policy.window_size = REPLAY_WINDOW
        else:
            policy.allow_repeat_tx = True  # RTCP resends and tests that replay the same packet
        return policy

    def add_stream(self, ssrc: int) -> None:
        if ssrc not in self._streams:
            self.session.add_stream(self._policy(pylibsrtp.Policy.SSRC_SPECIFIC, ssrc))
            self._streams.add(ssrc)

    def remove_stream(self, ssrc: int) -> None:
        if ssrc in self._streams:
            self.session.remove_stream(ssrc)
            self._streams.discard(ssrc)

    @property
    def streams(self) -> frozenset[int]:
        """SSRCs with a stream of their own in this session (the template covers the rest)."""
        return frozenset(self._streams)

    def forget_stream(self, ssrc: int) -> None:
        """Drop the stream libsrtp cloned from the template for `ssrc` (an RTCP sender SSRC), if any."""
        if ssrc not in self._streams:
            with contextlib.suppress(pylibsrtp.Error):  # it never sent RTCP: no clone
                self.session.remove_stream(ssrc)

    def stream_session(self, ssrc: int) -> SrtpStream:
        """A session of its own for one outbound SSRC, with this context's key: one stream, no
        template. libsrtp finds a stream by walking its session's list, so in a shared session
        every packet of a consumer walks past its transport's other consumers (cold memory at
        low load: benchmarks/README.md, "Where the time goes at 24.5 k")."""
        if self.inbound:
            raise SrtpError("stream sessions are for outbound streams")
        return SrtpStream(self._policy(pylibsrtp.Policy.SSRC_SPECIFIC, ssrc))

    # Python-level operations: the reference forwarder and tests; never the datapath.
    def protect(self, packet: bytes) -> bytes:
        return self.session.protect(packet)

    def unprotect(self, packet: bytes) -> bytes:
        return self.session.unprotect(packet)

    def protect_rtcp(self, packet: bytes) -> bytes:
        return self.session.protect_rtcp(packet)

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        return self.session.unprotect_rtcp(packet)


class SrtpStream:
    """A libsrtp session holding exactly one stream; `address` is its `srtp_t` for the datapath.

    Made with `srtp_create` directly: pylibsrtp's Session would add a 1.5 KB buffer per stream
    that the datapath never uses."""

    __slots__ = ("_srtp", "address")  # one per consumer: kept small

    def __init__(self, policy: pylibsrtp.Policy) -> None:
        ffi, lib = _binding.ffi, _binding.lib
        srtp = ffi.new("srtp_t *")
        status = lib.srtp_create(srtp, policy._policy)
        if status != 0:
            raise SrtpError(f"srtp_create failed (libsrtp status {status})")
        self._srtp = ffi.gc(srtp, _srtp_dealloc)
        self.address: int = int(ffi.cast("uintptr_t", srtp[0]))


def _srtp_dealloc(srtp: Any) -> None:
    _binding.lib.srtp_dealloc(srtp[0])


def libsrtp_version() -> int:
    """The bundled libsrtp's version word (major << 24 | minor << 16 | micro)."""
    return int(ctypes.CDLL(_binding.__file__).srtp_get_version())


def _install() -> None:
    # libsrtp 3.x changed srtp_protect to (ctx, in, in_len, out, *out_len, mki): refuse to run.
    major = libsrtp_version() >> 24
    if major != 2:
        raise ImportError(f"fastsfu needs pylibsrtp bundling libsrtp 2.x, found major version {major}")
    ffi, lib = _binding.ffi, _binding.lib

    def address(name: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))

    _rtp.install_srtp_functions(
        address("srtp_protect"),
        address("srtp_unprotect"),
        address("srtp_protect_rtcp"),
        address("srtp_unprotect_rtcp"),
    )


_install()
