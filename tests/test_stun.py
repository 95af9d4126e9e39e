"""STUN codec: RFC 5769 test vectors, round trips, malformed input, and aioice as an independent peer."""

from __future__ import annotations

import random

import aioice.stun as aioice_stun
import pytest

from fastsfu import stun

PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# RFC 5769 §2.1-2.3 sample messages (padding bytes are spaces, as in the RFC).
SAMPLE_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
SAMPLE_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
SAMPLE_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)


def test_rfc5769_sample_request() -> None:
    msg = stun.parse_message(SAMPLE_REQUEST)
    assert msg.message_type == stun.BINDING_REQUEST and msg.transaction_id == TID
    assert msg.get(stun.ATTR_USERNAME) == b"evtj:h6vY"
    assert msg.get(stun.ATTR_SOFTWARE) == b"STUN test client"
    assert msg.get(stun.ATTR_PRIORITY) == bytes.fromhex("6e0001ff")
    assert msg.has(stun.ATTR_ICE_CONTROLLED)
    assert stun.verify_integrity(msg, PASSWORD)
    assert stun.verify_fingerprint(msg)
    assert not stun.verify_integrity(msg, b"wrong password")


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        (SAMPLE_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_sample_responses(raw: bytes, address: tuple[str, int]) -> None:
    msg = stun.parse_message(raw)
    assert msg.message_type == stun.BINDING_SUCCESS
    assert stun.decode_xor_address(msg.get(stun.ATTR_XOR_MAPPED_ADDRESS), msg.transaction_id) == address
    assert stun.verify_integrity(msg, PASSWORD) and stun.verify_fingerprint(msg)
    # Our encoder produces the same XOR-MAPPED-ADDRESS value.
    assert stun.encode_xor_address(*address, TID) == msg.get(stun.ATTR_XOR_MAPPED_ADDRESS)


def test_tampering_breaks_integrity_and_fingerprint() -> None:
    for i in range(20, len(SAMPLE_REQUEST) - 8):
        data = bytearray(SAMPLE_REQUEST)
        data[i] ^= 0x01
        try:
            msg = stun.parse_message(bytes(data))
        except stun.StunError:
            continue
        assert not (stun.verify_integrity(msg, PASSWORD) and stun.verify_fingerprint(msg)), i


def test_build_round_trip_with_integrity_and_fingerprint() -> None:
    attrs = [
        (stun.ATTR_USERNAME, b"abc:de"),
        (stun.ATTR_PRIORITY, b"\x00\x00\x00\x01"),
        (stun.ATTR_USE_CANDIDATE, b""),
    ]
    raw = stun.build_message(stun.BINDING_REQUEST, TID, attrs, b"secret")
    msg = stun.parse_message(raw)
    assert msg.attributes[:3] == attrs
    assert stun.verify_integrity(msg, b"secret") and stun.verify_fingerprint(msg)
    assert (
        msg.attributes[-1][0] == stun.ATTR_FINGERPRINT
        and msg.attributes[-2][0] == stun.ATTR_MESSAGE_INTEGRITY
    )
    assert stun.is_stun(raw)


def test_error_code_and_unknown_attributes() -> None:
    value = stun.encode_error_code(487)
    assert stun.decode_error_code(value) == (487, "Role Conflict")
    assert stun.encode_unknown_attributes([0x0030, 0x7FFF]) == b"\x00\x30\x7f\xff"


def test_dual_stack_view_of_an_ipv4_peer() -> None:
    assert stun.encode_xor_address("::ffff:127.0.0.1", 5000, TID) == stun.encode_xor_address(
        "127.0.0.1", 5000, TID
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        SAMPLE_REQUEST[:19],
        b"\xc0" + SAMPLE_REQUEST[1:],  # leading bits set
        SAMPLE_REQUEST[:4] + b"\x00\x00\x00\x00" + SAMPLE_REQUEST[8:],  # no magic cookie
        SAMPLE_REQUEST[:2] + b"\x00\x57" + SAMPLE_REQUEST[4:],  # length not a multiple of 4
        SAMPLE_REQUEST[:-4],  # length does not match the datagram
        SAMPLE_REQUEST[:2]
        + b"\x00\x08"
        + SAMPLE_REQUEST[4:20]
        + b"\x00\x06\x00\x40\x00\x00\x00\x00",  # attr past end
        stun.build_message(stun.BINDING_REQUEST, TID, []) + b"\x00\x24\x00\x04abcd",  # after FINGERPRINT
    ],
)
def test_malformed_messages_raise_stun_error(data: bytes) -> None:
    if data.endswith(b"abcd"):
        data = data[:2] + (len(data) - 20).to_bytes(2, "big") + data[4:]
    with pytest.raises(stun.StunError):
        stun.parse_message(data)


def test_random_bytes_never_raise_anything_but_stun_error() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        base = bytearray(
            rng.choice([SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, rng.randbytes(rng.randint(0, 80))])
        )
        for _ in range(rng.randint(0, 4)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        try:
            msg = stun.parse_message(bytes(base))
        except stun.StunError:
            continue
        stun.verify_integrity(msg, PASSWORD)
        stun.verify_fingerprint(msg)


def test_aioice_parses_and_verifies_what_we_build() -> None:
    raw = stun.build_message(
        stun.BINDING_SUCCESS,
        TID,
        [(stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address("10.1.2.3", 4444, TID))],
        b"pwd",
    )
    theirs = aioice_stun.parse_message(raw)
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("10.1.2.3", 4444)
    theirs.check_message_integrity(b"pwd")  # raises if wrong
    assert "FINGERPRINT" in theirs.attributes


def test_we_parse_and_verify_what_aioice_builds() -> None:
    req = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.REQUEST,
        attributes={
            "USERNAME": "ours:theirs",
            "PRIORITY": 1234,
            "USE-CANDIDATE": None,
            "ICE-CONTROLLING": 99,
        },
    )
    req.add_message_integrity(b"pwd")
    req.add_fingerprint()
    msg = stun.parse_message(bytes(req))
    assert msg.get(stun.ATTR_USERNAME) == b"ours:theirs" and msg.has(stun.ATTR_USE_CANDIDATE)
    assert stun.verify_integrity(msg, b"pwd") and stun.verify_fingerprint(msg)
