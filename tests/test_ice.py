"""ICE-lite server, sans-I/O with a fake clock: answers, error codes, nomination, consent, restart."""

from __future__ import annotations

import os
import random
import struct

import aioice.stun as aioice_stun

from fastsfu import stun
from fastsfu.ice import (
    MAX_TUPLES,
    IceCredentials,
    IceDisconnected,
    IceRestarted,
    IceSelectedTuple,
    IceServer,
)

CREDS = IceCredentials("srvufrag", "server-password-0123456789")
PEER = ("127.0.0.1", 40000)
PEER2 = ("127.0.0.1", 40002)


def check(
    ufrag: str = CREDS.ufrag,
    pwd: str = CREDS.pwd,
    use_candidate: bool = False,
    controlled: bool = False,
    nomination: int | None = None,
    extra: list[tuple[int, bytes]] | None = None,
    drop: int | None = None,
    integrity: bool = True,
) -> tuple[bytes, bytes]:
    """A Binding request as a full (controlling) agent sends it."""
    tid = os.urandom(12)
    attrs = [
        (stun.ATTR_USERNAME, f"{ufrag}:client".encode()),
        (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
        (stun.ATTR_ICE_CONTROLLED if controlled else stun.ATTR_ICE_CONTROLLING, os.urandom(8)),
        (0xC057, b"\x00\x01\x00\x0a"),  # GOOG-NETWORK-INFO, comprehension-optional: ignored
    ]
    if use_candidate:
        attrs.append((stun.ATTR_USE_CANDIDATE, b""))
    if nomination is not None:
        attrs.append((stun.ATTR_NOMINATION, struct.pack("!I", nomination)))
    attrs += extra or []
    if drop is not None:
        attrs = [a for a in attrs if a[0] != drop]
    return stun.build_message(stun.BINDING_REQUEST, tid, attrs, pwd.encode() if integrity else None), tid


def answer(
    ice: IceServer, data: bytes, addr: tuple[str, int] = PEER, now: float = 0.0
) -> stun.StunMessage | None:
    ice.receive_datagram(data, addr, now)
    out = ice.datagrams_to_send(now)
    if not out:
        return None
    ((raw, dest),) = out
    assert dest == addr
    return stun.parse_message(raw)


def events(ice: IceServer) -> list[object]:
    out = []
    while (e := ice.next_event()) is not None:
        out.append(e)
    return out


def error_code(msg: stun.StunMessage) -> int:
    assert msg.message_type == stun.BINDING_ERROR
    return stun.decode_error_code(msg.get(stun.ATTR_ERROR_CODE))[0]


def test_success_response_is_signed_and_maps_the_source() -> None:
    ice = IceServer(CREDS)
    req, tid = check(use_candidate=True)
    resp = answer(ice, req)
    assert resp.message_type == stun.BINDING_SUCCESS and resp.transaction_id == tid
    assert stun.decode_xor_address(resp.get(stun.ATTR_XOR_MAPPED_ADDRESS), tid) == PEER
    assert stun.verify_integrity(resp, CREDS.pwd.encode()) and stun.verify_fingerprint(resp)
    assert events(ice) == [IceSelectedTuple(PEER)]
    # An independent implementation agrees.
    theirs = aioice_stun.parse_message(
        stun.build_message(resp.message_type, tid, resp.attributes[:1], CREDS.pwd.encode())
    )
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == PEER


def test_missing_attributes_get_400_unsigned() -> None:
    for missing in (stun.ATTR_USERNAME, stun.ATTR_PRIORITY, stun.ATTR_MESSAGE_INTEGRITY):
        ice = IceServer(CREDS)
        req, _ = check(drop=missing, integrity=missing != stun.ATTR_MESSAGE_INTEGRITY)
        resp = answer(ice, req)
        assert error_code(resp) == 400 and resp.integrity_offset is None
        assert ice.selected_tuple is None
    # No FINGERPRINT either: 400.
    ice = IceServer(CREDS)
    bare = stun.build_message(
        stun.BINDING_REQUEST,
        os.urandom(12),
        [(stun.ATTR_USERNAME, b"srvufrag:c"), (stun.ATTR_PRIORITY, b"\0\0\0\1")],
        CREDS.pwd.encode(),
        fingerprint=False,
    )
    assert error_code(answer(ice, bare)) == 400


def test_unknown_ufrag_or_wrong_password_get_401() -> None:
    ice = IceServer(CREDS)
    assert error_code(answer(ice, check(ufrag="someoneelse")[0])) == 401
    assert error_code(answer(ice, check(pwd="not-the-password-at-all")[0])) == 401
    assert ice.selected_tuple is None and ice.counters["error_401"] == 2


def test_controlled_peer_is_a_role_conflict() -> None:
    ice = IceServer(CREDS)
    resp = answer(ice, check(controlled=True)[0])
    assert error_code(resp) == 487 and stun.verify_integrity(resp, CREDS.pwd.encode())
    assert ice.selected_tuple is None


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    ice = IceServer(CREDS)
    resp = answer(ice, check(extra=[(0x0777, b"\x01\x02\x03\x04")])[0])
    assert error_code(resp) == 420
    assert resp.get(stun.ATTR_UNKNOWN_ATTRIBUTES) == b"\x07\x77"


def test_bad_fingerprint_garbage_indications_and_responses_get_no_answer() -> None:
    ice = IceServer(CREDS)
    req, _ = check()
    bad = req[:-1] + bytes([req[-1] ^ 1])
    assert answer(ice, bad) is None
    assert answer(ice, b"\x00\x01garbage") is None
    indication = stun.build_message(stun.BINDING_INDICATION, os.urandom(12), [])
    assert answer(ice, indication) is None
    assert (ice.counters["bad_fingerprint"], ice.counters["malformed"], ice.counters["ignored"]) == (1, 1, 1)


def test_fuzzed_requests_never_raise() -> None:
    rng = random.Random(3)
    ice = IceServer(CREDS)
    for _ in range(2000):
        data = bytearray(check(use_candidate=rng.random() < 0.5)[0])
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        ice.receive_datagram(bytes(data), PEER, 0.0)
        ice.datagrams_to_send(0.0)
    assert sum(ice.counters.values()) >= 2000


def test_provisional_selection_then_nomination_moves_media() -> None:
    ice = IceServer(CREDS)
    answer(ice, check()[0], PEER)
    assert events(ice) == [IceSelectedTuple(PEER)]  # first validated tuple, before nomination
    answer(ice, check()[0], PEER2)
    assert events(ice) == [] and ice.selected_tuple == PEER
    answer(ice, check(use_candidate=True)[0], PEER2)
    assert events(ice) == [IceSelectedTuple(PEER2)]


def test_renomination_highest_value_wins() -> None:
    ice = IceServer(CREDS)
    answer(ice, check(nomination=5)[0], PEER)
    answer(ice, check(nomination=3)[0], PEER2)
    assert ice.selected_tuple == PEER
    answer(ice, check(nomination=9)[0], PEER2)
    assert ice.selected_tuple == PEER2


def test_consent_expiry_falls_back_then_disconnects() -> None:
    ice = IceServer(CREDS, consent_timeout=30.0)
    answer(ice, check(use_candidate=True)[0], PEER, now=0.0)
    answer(ice, check()[0], PEER2, now=10.0)
    events(ice)
    assert ice.get_timer() == 30.0
    answer(ice, check()[0], PEER, now=20.0)  # consent refreshed
    assert ice.get_timer() == 40.0  # the stalest path's expiry: PEER2, last seen at 10
    ice.handle_timer(45.0)  # PEER2 expired; PEER still fresh
    assert ice.validated_tuples == [PEER] and events(ice) == []
    assert ice.get_timer() == 50.0
    ice.handle_timer(50.0)
    assert events(ice) == [IceDisconnected(PEER)] and ice.selected_tuple is None and ice.get_timer() is None


def test_consent_loss_of_the_selected_tuple_moves_to_a_fresh_one() -> None:
    ice = IceServer(CREDS)
    answer(ice, check(use_candidate=True)[0], PEER, now=0.0)
    answer(ice, check()[0], PEER2, now=25.0)
    events(ice)
    ice.handle_timer(30.0)
    assert events(ice) == [IceSelectedTuple(PEER2)]


def test_consent_timeout_is_clamped() -> None:
    assert IceServer(CREDS, consent_timeout=1).consent_timeout == 10.0
    assert IceServer(CREDS, consent_timeout=999).consent_timeout == 60.0


def test_restart_accepts_old_credentials_until_the_new_ones_validate() -> None:
    ice = IceServer(CREDS)
    new = IceCredentials("newufrag", "new-password-0123456789xx")
    ice.restart(new)
    assert ice.accepts_username(b"srvufrag:x") and ice.accepts_username(b"newufrag:x")
    assert answer(ice, check()[0]).message_type == stun.BINDING_SUCCESS  # old still fine
    resp = answer(ice, check(ufrag=new.ufrag, pwd=new.pwd)[0])
    assert resp.message_type == stun.BINDING_SUCCESS and stun.verify_integrity(resp, new.pwd.encode())
    assert IceRestarted("newufrag") in events(ice)
    assert error_code(answer(ice, check()[0])) == 401  # the old ones are gone now
    assert not ice.accepts_username(b"srvufrag:x")


def test_tuple_state_is_bounded() -> None:
    ice = IceServer(CREDS)
    answer(ice, check(use_candidate=True)[0], PEER, now=0.0)
    for i in range(50):
        answer(ice, check()[0], ("127.0.0.1", 50000 + i), now=float(i))
    assert len(ice.validated_tuples) == MAX_TUPLES and PEER in ice.validated_tuples
    assert ice.selected_tuple == PEER and ice.counters["tuples_evicted"] == 50 + 1 - MAX_TUPLES
