"""SRTP through C function pointers equals pylibsrtp's own API, for every suite, both ways."""

from __future__ import annotations

import base64
import socket

import pylibsrtp
import pytest

from fastsfu import _rtp, srtp
from fastsfu.rtp import RtpPacket

SUITES = sorted(srtp.SUITES)


def test_bundled_libsrtp_is_2x() -> None:
    # The datapath calls the 2.x in-place signature; 3.x changed it (docs/transports.md#srtp).
    assert srtp.libsrtp_version() >> 24 == 2


def test_null_function_pointers_are_refused() -> None:
    with pytest.raises(ValueError):
        _rtp.install_srtp_functions(0, 0, 0, 0)


@pytest.mark.parametrize("suite", SUITES)
def test_datapath_protect_is_byte_identical_to_pylibsrtp(suite: str) -> None:
    up, down = srtp.generate_key(suite), srtp.generate_key(suite)
    dp = _rtp.Datapath()
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    a, b = dp.add_transport(sock), dp.add_transport(sock)
    dp.set_transport_remote(a, "127.0.0.1", 1000)
    dp.set_transport_remote(b, "127.0.0.1", 1001)
    dp.set_transport_srtp(a, srtp.SrtpContext(suite, up, True), None)
    out_ctx = srtp.SrtpContext(suite, down, False)
    dp.set_transport_srtp(b, None, out_ctx)
    p = dp.add_producer(a, 42, 111, 48000, {})
    dp.add_consumer(p, b, 4242, 100, {})
    # The sender and the oracle use pylibsrtp's Python API with plain templates.
    profile = srtp.suite(suite).profile
    sender = pylibsrtp.Session(pylibsrtp.Policy(up, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile))
    oracle = pylibsrtp.Session(
        pylibsrtp.Policy(down, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    )
    receiver = pylibsrtp.Session(
        pylibsrtp.Policy(down, pylibsrtp.Policy.SSRC_ANY_INBOUND, srtp_profile=profile)
    )
    for seq in range(65530, 65550):  # across a rollover (RFC 3711 §3.3.1)
        plain = bytes(
            RtpPacket(111, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, 42, payload=bytes([seq & 0xFF]) * 90)
        )
        dp.process(sock, sender.protect(plain), "127.0.0.1", 1000, 0)
        ((_, _, got),) = dp.take_captured()
        expected_plain = bytes(
            RtpPacket(100, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, 4242, payload=bytes([seq & 0xFF]) * 90)
        )
        assert got == oracle.protect(expected_plain)
        assert receiver.unprotect(got) == expected_plain


@pytest.mark.parametrize("suite", SUITES)
def test_a_consumers_own_session_protects_byte_identically(suite: str) -> None:
    """A consumer with a session of its own (`stream_session`, docs/transports.md#srtp) sends
    what the transport's session would have sent, across a rollover, while a second consumer
    on the same transport still uses the transport's session."""
    up, down = srtp.generate_key(suite), srtp.generate_key(suite)
    dp = _rtp.Datapath()
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    a, b = dp.add_transport(sock), dp.add_transport(sock)
    dp.set_transport_remote(a, "127.0.0.1", 1000)
    dp.set_transport_remote(b, "127.0.0.1", 1001)
    dp.set_transport_srtp(a, srtp.SrtpContext(suite, up, True), None)
    out_ctx = srtp.SrtpContext(suite, down, False)
    out_ctx.add_stream(4343)
    dp.set_transport_srtp(b, None, out_ctx)
    p = dp.add_producer(a, 42, 111, 48000, {})
    dp.add_consumer(p, b, 4242, 100, {}, outbound=out_ctx.stream_session(4242))
    dp.add_consumer(p, b, 4343, 100, {})
    assert out_ctx.streams == {4343}
    profile = srtp.suite(suite).profile
    sender = pylibsrtp.Session(pylibsrtp.Policy(up, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile))
    oracle = pylibsrtp.Session(
        pylibsrtp.Policy(down, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    )
    for seq in range(65530, 65550):  # across a rollover (RFC 3711 §3.3.1)
        plain = bytes(
            RtpPacket(111, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, 42, payload=bytes([seq & 0xFF]) * 90)
        )
        dp.process(sock, sender.protect(plain), "127.0.0.1", 1000, 0)
        got = [data for _, _, data in dp.take_captured()]
        expected = [
            bytes(
                RtpPacket(100, seq & 0xFFFF, seq * 960 & 0xFFFFFFFF, ssrc, payload=bytes([seq & 0xFF]) * 90)
            )
            for ssrc in (4242, 4343)
        ]
        assert got == [oracle.protect(e) for e in expected]
    # Had 4242's packets gone through the transport's session, libsrtp would have cloned a stream
    # for it from the template there.
    with pytest.raises(pylibsrtp.Error):
        out_ctx.session.remove_stream(4242)


@pytest.mark.parametrize("suite", SUITES)
def test_rtcp_protect_in_c_unprotects_with_pylibsrtp(suite: str) -> None:
    key = srtp.generate_key(suite)
    dp = _rtp.Datapath()
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    t = dp.add_transport(sock)
    dp.set_transport_remote(t, "127.0.0.1", 1000)
    dp.set_transport_srtp(t, None, srtp.SrtpContext(suite, key, False))
    rr = b"\x80\xc9\x00\x01\x00\x00\x00\x07"
    assert dp.send_rtcp(t, rr)
    ((_, dest, got),) = dp.take_captured()
    assert dest == ("127.0.0.1", 1000)
    receiver = srtp.SrtpContext(suite, key, inbound=True)
    assert receiver.unprotect_rtcp(got) == rr


def test_srtp_parameters_round_trip_and_errors() -> None:
    key = srtp.generate_key("AEAD_AES_128_GCM")
    params = srtp.srtp_parameters("AEAD_AES_128_GCM", key)
    assert srtp.parse_srtp_parameters(params) == (srtp.SUITES["AEAD_AES_128_GCM"], key)
    bad = [
        None,
        {"cryptoSuite": "NULL_CIPHER", "keyBase64": params["keyBase64"]},
        {"cryptoSuite": "AEAD_AES_128_GCM", "keyBase64": 5},
        {"cryptoSuite": "AEAD_AES_128_GCM", "keyBase64": "%%%"},
        {"cryptoSuite": "AEAD_AES_128_GCM", "keyBase64": base64.b64encode(b"short").decode()},
    ]
    for p in bad:
        with pytest.raises(srtp.SrtpError):
            srtp.parse_srtp_parameters(p)


def test_key_lengths_follow_rfc_profiles() -> None:
    # RFC 7714 §14.2 / RFC 5764 §4.1.2: master key || master salt.
    assert {n: s.master_length for n, s in srtp.SUITES.items()} == {
        "AEAD_AES_256_GCM": 44,
        "AEAD_AES_128_GCM": 28,
        "AES_CM_128_HMAC_SHA1_80": 30,
        "AES_CM_128_HMAC_SHA1_32": 30,
    }
