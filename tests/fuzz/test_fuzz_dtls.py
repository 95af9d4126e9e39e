"""Fuzz the DTLS record layer, the handshake message parsers and DtlsTransport in both roles, at every
step of a real handshake: mutated or random datagrams never raise, and the endpoints end consistent."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from dtls_helpers import alerts_in, make_pair
from hypothesis import given
from hypothesis import strategies as st
from mutations import apply_edits, budget, corpus, edits, mutated, seeded

from fastsfu.dtls import DtlsConnected, DtlsTransport
from fastsfu.dtls import messages as m
from fastsfu.dtls.handshake import DtlsClosed, DtlsFailed
from fastsfu.dtls.record import CT_HANDSHAKE, parse_records

STATES = {"new", "connecting", "connected", "failed", "closed"}
PARSERS: dict[int, Callable[[bytes], Any]] = {
    m.HT_CLIENT_HELLO: m.parse_client_hello,
    m.HT_SERVER_HELLO: m.parse_server_hello,
    m.HT_HELLO_VERIFY_REQUEST: m.parse_hello_verify_request,
    m.HT_CERTIFICATE: m.parse_certificate,
    m.HT_SERVER_KEY_EXCHANGE: m.parse_server_key_exchange,
    m.HT_CERTIFICATE_REQUEST: m.parse_certificate_request,
    m.HT_CLIENT_KEY_EXCHANGE: m.parse_client_key_exchange,
    m.HT_CERTIFICATE_VERIFY: m.parse_certificate_verify,
}


def exchange(
    server: DtlsTransport,
    client: DtlsTransport,
    tamper: Callable[[int, str, bytes], list[bytes]] | None = None,
    rounds: int = 12,
) -> list[tuple[str, bytes]]:
    """Deliver datagrams in lockstep (fake clock, no loss); `tamper(index, sender, datagram)` says
    what the receiver gets instead. Then a few retransmission timers. Returns what was sent."""
    sent: list[tuple[str, bytes]] = []
    now = 0.0
    client.start(now)
    for _ in range(rounds):
        moved = False
        for name, src, dst in (("client", client, server), ("server", server, client)):
            for datagram in src.datagrams_to_send(now):
                moved = True
                sent.append((name, datagram))
                for delivered in tamper(len(sent), name, datagram) if tamper else [datagram]:
                    dst.receive_datagram(delivered, now)
        if not moved:
            timers = [t for t in (server.get_timer(), client.get_timer()) if t is not None]
            if not timers or now > 10.0:
                break
            now = max(now, min(timers))
            server.handle_timer(now)
            client.handle_timer(now)
    return sent


def transcript(mtu: int) -> list[tuple[str, bytes]]:
    """A real handshake's datagrams (client flights 1, 3, 5; server 2, 4, 6)."""
    server, client = make_pair({"hello_verify": True, "mtu": mtu}, {"mtu": mtu})
    sent = exchange(server, client)
    assert server.state == client.state == "connected"
    return sent


TRANSCRIPT = transcript(300)  # a small MTU: the Certificate and others arrive in fragments
RECORD_SEEDS = [d for _, d in TRANSCRIPT + transcript(1200)] + corpus("dtls")
MESSAGE_SEEDS: dict[int, list[bytes]] = {}  # whole message bodies by type
for _, _datagram in transcript(1200):
    for _record in parse_records(_datagram)[0]:
        if _record.content_type == CT_HANDSHAKE and _record.epoch == 0:
            for _frag in m.parse_handshake_fragments(_record.fragment):
                if _frag.fragment_offset == 0 and len(_frag.body) == _frag.length:
                    MESSAGE_SEEDS.setdefault(_frag.msg_type, []).append(_frag.body)


def check_consistent(t: DtlsTransport, connected_before: bool = False) -> DtlsConnected | None:
    """A valid state, at most one final event that matches it, and no bug turned into a failure;
    returns the DtlsConnected event if there was one."""
    assert t.state in STATES
    events = []
    while (event := t.next_event()) is not None:
        events.append(event)
    for event in events:
        if isinstance(event, DtlsFailed):
            assert not event.reason.startswith("internal error"), event.reason
    finals = [e for e in events if isinstance(e, DtlsFailed | DtlsClosed)]
    assert len(finals) <= 1
    if t.state == "failed":
        assert finals and isinstance(finals[0], DtlsFailed)
    if t.state == "connected" and not connected_before:
        assert any(isinstance(e, DtlsConnected) for e in events)
    if t.state in ("failed", "closed"):
        assert t.get_timer() is None
    connected = [e for e in events if isinstance(e, DtlsConnected)]
    assert len(connected) <= 1
    return connected[0] if connected else None


@budget(500)
@given(seeded(RECORD_SEEDS, random_max=512))
def test_record_parser_never_raises(data: bytes) -> None:
    records, junk = parse_records(data)
    assert junk in (None, "bad_record", "too_big")
    for record in records:
        if record.content_type == CT_HANDSHAKE:
            with contextlib.suppress(m.DecodeError):
                m.parse_handshake_fragments(record.fragment)


@budget(500)
@given(st.sampled_from([body for bodies in MESSAGE_SEEDS.values() for body in bodies]).flatmap(mutated))
def test_handshake_message_parsers_raise_only_decode_error(body: bytes) -> None:
    for parser in PARSERS.values():  # every parser on every message: each has its own framing
        with contextlib.suppress(m.DecodeError):
            parser(body)


@budget(300)
@given(
    st.data(),
    st.integers(1, len(TRANSCRIPT) + 1),
    st.sampled_from(["replace", "inject", "random"]),
    st.booleans(),
    st.sampled_from([300, 1200]),
)
def test_transport_mid_handshake(
    data: st.DataObject, index: int, how: str, hello_verify: bool, mtu: int
) -> None:
    """Tamper with the index-th datagram of a real handshake (either direction): both endpoints
    survive, end in a valid state, and report a protocol failure rather than an internal error."""
    server, client = make_pair({"hello_verify": hello_verify, "mtu": mtu}, {"mtu": mtu})
    # Drawn up front: whether the index-th datagram exists must not change what is drawn.
    noise = data.draw(st.binary(max_size=600) if how == "random" else st.just(b""), label="random")
    edit_list = data.draw(edits(6), label="edits")

    def tamper(i: int, sender: str, datagram: bytes) -> list[bytes]:
        if i != index:
            return [datagram]
        if how == "random":
            return [noise, datagram]
        bad = apply_edits(datagram, edit_list)
        return [bad] if how == "replace" else [bad, datagram]

    exchange(server, client, tamper)
    ours, theirs = check_consistent(server), check_consistent(client)
    if ours is not None and theirs is not None:
        # Whatever was tampered with, two endpoints that both connected agree on the SRTP keys.
        assert (ours.local_key, ours.remote_key) == (theirs.remote_key, theirs.local_key)


@budget(300)
@given(seeded(RECORD_SEEDS, random_max=512), st.sampled_from(["server", "client"]), st.booleans())
def test_fresh_transport_never_raises(data: bytes, role: str, started: bool) -> None:
    server, client = make_pair({"hello_verify": True})
    t = server if role == "server" else client
    if started:
        t.start(0.0)
    t.receive_datagram(data, 0.0)
    t.datagrams_to_send(0.0)
    check_consistent(t)


@budget(150)
@given(st.data(), st.lists(seeded(RECORD_SEEDS, random_max=512), max_size=4))
def test_connected_transport_never_raises(data: st.DataObject, foreign: list[bytes]) -> None:
    """A connected server gets mutations of this association's own records (the client's flights,
    replayed: a retransmission request; its encrypted close_notify) and foreign or random ones."""
    server, client = make_pair({"mtu": 300}, {"mtu": 300})
    own = [d for name, d in exchange(server, client) if name == "client"]
    assert server.state == client.state == "connected"
    for t in (server, client):
        while t.next_event() is not None:
            pass
    client.close()
    own += client.datagrams_to_send(1.0)  # epoch 1: an authenticated alert
    mine = data.draw(st.lists(st.sampled_from(own).flatmap(mutated), min_size=1, max_size=4), label="own")
    for datagram in mine + foreign:
        server.receive_datagram(datagram, 1.0)
    server.datagrams_to_send(1.0)
    check_consistent(server, connected_before=True)


# ---- regressions found by the targets above (docs/fuzzing.md) ----

P256_OID = bytes.fromhex("2a8648ce3d030107")  # 1.2.840.10045.3.1.7, prime256v1
X509_V3 = bytes.fromhex("a003020102")  # [0] EXPLICIT Version INTEGER 2 (RFC 5280 §4.1.2.1)


@pytest.mark.parametrize("victim", ["server", "client"])
@pytest.mark.parametrize(
    ("original", "corrupted", "alert"),
    [
        # One bit flipped in the curve OID (1.2.840... -> 1.3.840...): cryptography raised
        # UnsupportedAlgorithm; RFC 5246 §7.2.2 unsupported_certificate.
        (P256_OID, b"\x2b" + P256_OID[1:], m.ALERT_UNSUPPORTED_CERTIFICATE),
        # Version 2 -> 10: cryptography raised x509.InvalidVersion; RFC 5246 §7.2.2 bad_certificate.
        (X509_V3, X509_V3[:-1] + b"\x0a", m.ALERT_BAD_CERTIFICATE),
    ],
    ids=["unknown-curve", "bad-version"],
)
def test_corrupt_peer_certificate_is_a_certificate_alert(
    victim: str, original: bytes, corrupted: bytes, alert: int
) -> None:
    """Found by test_transport_mid_handshake: a peer certificate that cryptography refuses with an
    exception other than ValueError was reported as an internal error (alert 80); it is a
    certificate alert (RFC 5246 §7.2.2), whichever role receives it."""
    server, client = make_pair()
    sender = "client" if victim == "server" else "server"

    def tamper(i: int, name: str, datagram: bytes) -> list[bytes]:
        if name == sender and original in datagram:
            return [datagram.replace(original, corrupted, 1)]
        return [datagram]

    sent = exchange(server, client, tamper)
    t = server if victim == "server" else client
    event = check_consistent(t)
    assert event is None and t.state == "failed"
    alerts = alerts_in([d for name, d in sent if name == victim])
    assert [(a.fragment[0], a.fragment[1]) for a in alerts] == [(m.ALERT_FATAL, alert)]
