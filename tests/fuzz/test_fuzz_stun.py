"""Fuzz the STUN codec and the ICE-lite server with random bytes and mutated valid Binding requests."""

from __future__ import annotations

import os
import struct

from hypothesis import given
from hypothesis import strategies as st
from mutations import budget, corpus, seeded

from fastsfu import stun
from fastsfu.ice import MAX_PENDING, MAX_TUPLES, IceCredentials, IceServer

CREDS = IceCredentials("srvufrag", "server-password-0123456789")
TID = bytes(range(12))


def binding_request(*extra: tuple[int, bytes], key: bytes | None = CREDS.pwd.encode()) -> bytes:
    attrs = [
        (stun.ATTR_USERNAME, f"{CREDS.ufrag}:client".encode()),
        (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
        (stun.ATTR_ICE_CONTROLLING, os.urandom(8)),
        *extra,
    ]
    return stun.build_message(stun.BINDING_REQUEST, TID, attrs, key)


SEEDS = [
    binding_request(),  # MESSAGE-INTEGRITY and FINGERPRINT, as Chromium sends it
    binding_request((stun.ATTR_USE_CANDIDATE, b"")),
    binding_request((stun.ATTR_NOMINATION, struct.pack("!I", 7)), (0xC057, b"\x00\x01\x00\x0a")),
    binding_request((0x0042, b"x")),  # unknown comprehension-required: 420
    binding_request(key=None),
    stun.build_message(stun.BINDING_INDICATION, TID, []),
    stun.build_message(
        stun.BINDING_SUCCESS, TID, [(stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address("::1", 9, TID))]
    ),
    stun.build_message(stun.BINDING_ERROR, TID, [(stun.ATTR_ERROR_CODE, stun.encode_error_code(487))]),
    *corpus("stun"),
]
DATAGRAMS = seeded(SEEDS)


@budget(1000)
@given(DATAGRAMS)
def test_stun_codec_raises_only_stun_error(data: bytes) -> None:
    try:
        msg = stun.parse_message(data)
    except stun.StunError:
        return
    assert msg.raw == data and msg.transaction_id == data[8:20]
    assert isinstance(stun.verify_integrity(msg, CREDS.pwd.encode()), bool)
    assert isinstance(stun.verify_fingerprint(msg), bool)
    for attr_type, value in msg.attributes:
        try:
            if attr_type == stun.ATTR_XOR_MAPPED_ADDRESS:
                stun.decode_xor_address(value, msg.transaction_id)
            elif attr_type == stun.ATTR_ERROR_CODE:
                stun.decode_error_code(value)
        except stun.StunError:
            pass


ADDRS = st.sampled_from([("127.0.0.1", 40000 + i) for i in range(MAX_TUPLES + 2)] + [("::1", 5)])


@budget(400)
@given(st.lists(st.tuples(DATAGRAMS, ADDRS, st.floats(0, 100)), min_size=1, max_size=12))
def test_ice_server_never_raises_and_answers_in_stun(
    steps: list[tuple[bytes, tuple[str, int], float]],
) -> None:
    ice = IceServer(CREDS)
    now = 0.0
    for data, addr, dt in steps:
        now += dt
        ice.receive_datagram(data, addr, now)
        out = ice.datagrams_to_send(now)
        assert len(out) <= MAX_PENDING
        for response, to in out:
            assert to == addr  # answers go back to where the request came from (RFC 8489 §6.3)
            msg = stun.parse_message(response)
            assert msg.message_type in (stun.BINDING_SUCCESS, stun.BINDING_ERROR)
            assert msg.transaction_id == data[8:20]
            assert stun.verify_fingerprint(msg)
        timer = ice.get_timer()
        if timer is not None and timer <= now:
            ice.handle_timer(now)
        while ice.next_event() is not None:
            pass
        # Consistent state: the selected tuple is one of the validated ones, and bounded.
        assert len(ice.validated_tuples) <= MAX_TUPLES
        assert ice.selected_tuple is None or ice.selected_tuple in ice.validated_tuples
