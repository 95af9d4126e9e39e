"""DTLS 1.2 (fastsfu.dtls) against itself (loss, reordering, fragments), pyOpenSSL, s_client; bad input."""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dtls_helpers import (
    CERT_A,
    CERT_B,
    alerts_in,
    connected_event,
    join_srtp_material,
    make_pair,
    ossl_connection,
    ossl_step,
    records_of,
    simulate,
    split_srtp_material,
)

from fastsfu.dtls import DtlsCertificate, DtlsClosed, DtlsConnected, DtlsFailed, DtlsTransport, crypto
from fastsfu.dtls import messages as m
from fastsfu.dtls.record import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_HANDSHAKE,
    DTLS_1_2,
    RecordLayer,
    ReplayWindow,
    encode_record,
    parse_records,
)

EXPORTER = b"EXTRACTOR-dtls_srtp"


def assert_mirrored(server_events: list, client_events: list) -> DtlsConnected:
    s, c = connected_event(server_events), connected_event(client_events)
    assert s.srtp_profile == c.srtp_profile and s.srtp_suite == c.srtp_suite
    assert s.local_key == c.remote_key and s.remote_key == c.local_key and s.local_key != s.remote_key
    assert s.peer_fingerprint == CERT_B.fingerprint() and c.peer_fingerprint == CERT_A.fingerprint()
    return s


# ---- crypto pieces ----


def test_prf_matches_openssl_tls1_prf() -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI missing")
    secret, seed = os.urandom(48), os.urandom(64)
    out = subprocess.run(
        [
            openssl,
            "kdf",
            "-keylen",
            "100",
            "-kdfopt",
            "digest:SHA256",
            "-kdfopt",
            f"hexsecret:{secret.hex()}",
            "-kdfopt",
            f"hexseed:{(b'test label' + seed).hex()}",
            "TLS1-PRF",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout.strip()
    assert crypto.prf(secret, b"test label", seed, 100).hex() == out.replace(":", "").lower()


def test_certificate_and_fingerprints() -> None:
    cert = DtlsCertificate.generate("fastsfu")
    fps = cert.fingerprints()
    assert [f["algorithm"] for f in fps] == ["sha-256", "sha-384", "sha-512"]
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fps[0]["value"])
    assert len(fps[2]["value"].split(":")) == 64
    again = DtlsCertificate.load_pem(cert.certificate_pem(), cert.private_key_pem())
    assert again.fingerprint() == cert.fingerprint() and again.der == cert.der
    with pytest.raises(ValueError):
        DtlsCertificate.load_pem(cert.certificate_pem(), DtlsCertificate.generate().private_key_pem())
    with pytest.raises(ValueError):
        cert.fingerprint("md5")


def test_fingerprint_matching_rules() -> None:
    der = CERT_B.der
    good = {f["algorithm"]: f["value"] for f in CERT_B.fingerprints()}
    bad = CERT_A.fingerprint("sha-256")
    assert crypto.match_fingerprint(der, [{"algorithm": "sha-256", "value": good["sha-256"].lower()}]) is None
    assert crypto.match_fingerprint(der, [{"algorithm": "SHA-512", "value": good["sha-512"]}]) is None
    # The strongest algorithm decides: a wrong sha-256 next to a right sha-512 passes, and the reverse fails.
    assert (
        crypto.match_fingerprint(
            der, [{"algorithm": "sha-256", "value": bad}, {"algorithm": "sha-512", "value": good["sha-512"]}]
        )
        is None
    )
    assert (
        crypto.match_fingerprint(
            der, [{"algorithm": "sha-256", "value": good["sha-256"]}, {"algorithm": "sha-384", "value": bad}]
        )
        is not None
    )
    assert crypto.match_fingerprint(der, [{"algorithm": "sha-1", "value": "AA:BB"}]) is not None
    assert crypto.match_fingerprint(der, []) is not None


def test_replay_window() -> None:
    w = ReplayWindow()
    for seq in (0, 1, 5, 3):
        assert w.is_fresh(seq)
        w.mark(seq)
    assert not w.is_fresh(3) and not w.is_fresh(5) and w.is_fresh(4) and w.is_fresh(2)
    w.mark(200)
    assert not w.is_fresh(100) and w.is_fresh(199) and not w.is_fresh(200) and w.is_fresh(137)
    assert not w.is_fresh(136)  # 64 behind the newest is outside the window


def test_record_layer_roundtrip_and_tamper() -> None:
    a, b = RecordLayer(), RecordLayer()
    key, iv = os.urandom(16), os.urandom(4)
    a.set_write_keys(1, key, iv)
    b.set_read_keys(1, key, iv)
    wire = a.seal(1, CT_APPLICATION_DATA, b"hello")
    assert len(wire) == 13 + 8 + 5 + 16
    (rec,), _ = parse_records(wire)
    assert b.open(rec) == b"hello"
    assert b.open(rec) == "replay"
    wire2 = bytearray(a.seal(1, CT_APPLICATION_DATA, b"hello"))
    wire2[-1] ^= 1
    (rec2,), _ = parse_records(bytes(wire2))
    assert b.open(rec2) == "bad_record"


# ---- our DTLS against itself ----


def test_self_handshake_default() -> None:
    server, client = make_pair()
    result = simulate(server, client)
    s = assert_mirrored(result.events["server"], result.events["client"])
    assert (s.srtp_profile, s.srtp_suite, len(s.local_key)) == (0x0007, "AEAD_AES_128_GCM", 28)
    assert server.get_timer() is None and client.get_timer() is None
    assert all(len(d) <= 1200 for _, d in result.sent)
    assert len(result.sent) == 4  # flights 1, 4, 5, 6: one datagram each at the default MTU
    assert not server.counters and not client.counters


@pytest.mark.parametrize(
    ("server_profiles", "client_profiles", "expected"),
    [
        ((0x0001,), (0x0007, 0x0001), 0x0001),
        ((0x0008, 0x0007), (0x0007, 0x0008), 0x0008),  # the server's preference wins
        ((0x0007, 0x0001), (0x0001,), 0x0001),
    ],
)
def test_self_srtp_profile_choice(server_profiles, client_profiles, expected) -> None:
    server, client = make_pair({"srtp_profiles": server_profiles}, {"srtp_profiles": client_profiles})
    result = simulate(server, client)
    s = assert_mirrored(result.events["server"], result.events["client"])
    assert s.srtp_profile == expected
    p = crypto.SRTP_PROFILES[expected]
    assert s.srtp_suite == p.suite and len(s.local_key) == p.key_length + p.salt_length


@pytest.mark.parametrize("lost", [("client", 1), ("server", 1), ("client", 2), ("server", 2)])
def test_self_whole_flight_lost(lost) -> None:
    server, client = make_pair()
    result = simulate(server, client, drop_batches=frozenset({lost}))
    assert_mirrored(result.events["server"], result.events["client"])
    assert 1.0 <= result.now < 3.0  # one retransmission after the initial 1 s timer
    if lost == ("server", 2):
        # Flight 6 has no timer: the client's flight 5 repeats and the server resends flight 6.
        assert client.counters["retransmit_timer"] == 1 and server.counters["retransmit_triggered"] == 1
    else:
        assert server.counters["retransmit_timer"] + client.counters["retransmit_timer"] >= 1


def test_self_retransmission_backoff_then_deadline() -> None:
    client = DtlsTransport(CERT_B, "client", handshake_timeout=30.0)
    client.start(0.0)
    sends = []
    now = 0.0
    for _ in range(50):
        if client.datagrams_to_send(now):
            sends.append(now)
        timer = client.get_timer()
        if timer is None:
            break
        now = timer
        client.handle_timer(now)
    assert sends == [0.0, 1.0, 3.0, 7.0, 15.0]  # RFC 6347 §4.2.4.1: 1 s doubling
    assert client.state == "failed" and now == 30.0
    event = client.next_event()
    assert isinstance(event, DtlsFailed) and "timed out" in event.reason
    assert client.get_timer() is None


def test_server_handshake_deadline() -> None:
    server = DtlsTransport(CERT_A, "server", handshake_timeout=5.0)
    server.start(100.0)
    assert server.get_timer() == 105.0
    server.handle_timer(104.9)
    assert server.state == "connecting"
    server.handle_timer(105.0)
    assert server.state == "failed" and isinstance(server.next_event(), DtlsFailed)
    server.receive_datagram(b"\x16\xfe\xfd" + bytes(20), 106.0)  # after the end: counted, ignored
    assert server.counters["after_close"] == 1 and server.next_event() is None


def test_self_tiny_mtu_fragments() -> None:
    server, client = make_pair({"mtu": 120}, {"mtu": 120})
    result = simulate(server, client)
    assert_mirrored(result.events["server"], result.events["client"])
    assert all(len(d) <= 120 for _, d in result.sent)
    # Each ~290-byte Certificate needs at least 3 fragments at this MTU.
    fragments = [
        f
        for _, d in result.sent
        for r in records_of(d)
        if r.content_type == CT_HANDSHAKE and r.epoch == 0
        for f in m.parse_handshake_fragments(r.fragment)
        if f.msg_type == m.HT_CERTIFICATE
    ]
    assert len(fragments) >= 6 and any(f.fragment_offset > 0 for f in fragments)


@pytest.mark.parametrize("seed", range(24))
def test_self_loss_reordering_duplication(seed: int) -> None:
    rng = random.Random(seed)
    mtu = rng.choice([100, 180, 400, 1200])
    kw = {"mtu": mtu, "handshake_timeout": 600.0, "hello_verify": seed % 3 == 0}
    server, client = make_pair(kw, {"mtu": mtu, "handshake_timeout": 600.0})
    result = simulate(server, client, rng=rng, loss=0.2, duplicate=0.3, max_delay=0.4, max_time=600.0)
    assert_mirrored(result.events["server"], result.events["client"])


def test_self_hello_verify_request() -> None:
    server, client = make_pair({"hello_verify": True})
    result = simulate(server, client)
    assert_mirrored(result.events["server"], result.events["client"])
    assert server.counters["hello_verify_request"] == 1 and client.counters["hello_verify_request"] == 1
    first_server = records_of(result.sent[1][1])[0]
    assert result.sent[1][0] == "server" and first_server.sequence == 0  # echoes the ClientHello's record seq


def test_server_fingerprints_after_handshake() -> None:
    server = DtlsTransport(CERT_A, "server")
    client = DtlsTransport(CERT_B, "client")
    client.set_remote_fingerprints(CERT_A.fingerprints())
    result = simulate(server, client, done=lambda: client.state == "connected")
    assert server.state == "connecting" and not result.events["server"] and server.next_event() is None
    assert server.get_timer() is not None  # the handshake deadline still runs
    server.set_remote_fingerprints([{"algorithm": "sha-512", "value": CERT_B.fingerprint("sha-512").lower()}])
    s = server.next_event()
    assert isinstance(s, DtlsConnected) and s.remote_key == connected_event(result.events["client"]).local_key
    assert server.state == "connected" and server.get_timer() is None


def test_server_wrong_fingerprint_after_handshake() -> None:
    server = DtlsTransport(CERT_A, "server")
    client = DtlsTransport(CERT_B, "client")
    client.set_remote_fingerprints(CERT_A.fingerprints())
    result = simulate(server, client, done=lambda: client.state == "connected")
    connected_event(result.events["client"])
    server.set_remote_fingerprints(CERT_A.fingerprints())  # not the client's certificate
    event = server.next_event()
    assert isinstance(event, DtlsFailed) and "sha-512" in event.reason and server.state == "failed"
    out = server.datagrams_to_send(0.0)
    (alert,) = alerts_in(out)
    assert alert.epoch == 1  # encrypted: the server already switched to epoch 1
    for d in out:
        client.receive_datagram(d, 0.0)
    assert client.state == "failed"
    failed = client.next_event()
    assert isinstance(failed, DtlsFailed) and "42" in failed.reason


@pytest.mark.parametrize("side", ["server", "client"])
def test_wrong_fingerprint_during_handshake(side: str) -> None:
    server, client = make_pair()
    wrong = [{"algorithm": "sha-256", "value": DtlsCertificate.generate().fingerprint()}]
    (server if side == "server" else client).set_remote_fingerprints(wrong)
    result = simulate(server, client, done=lambda: False, max_time=5.0)
    checker, other = (server, client) if side == "server" else (client, server)
    assert checker.state == "failed" and other.state == "failed"
    failed = [e for e in result.events[side] if isinstance(e, DtlsFailed)]
    assert len(failed) == 1 and "does not match" in failed[0].reason
    alerts = alerts_in([d for name, d in result.sent if name == side])
    assert (
        len(alerts) == 1 and alerts[0].epoch == 0 and alerts[0].fragment == bytes([2, 42])
    )  # bad_certificate
    assert not [e for e in result.events["server"] + result.events["client"] if isinstance(e, DtlsConnected)]


def test_no_common_srtp_profile() -> None:
    server, client = make_pair({"srtp_profiles": (0x0001,)}, {"srtp_profiles": (0x0007,)})
    result = simulate(server, client, done=lambda: False, max_time=5.0)
    assert server.state == "failed" and client.state == "failed"
    assert "SRTP" in result.events["server"][0].reason and "40" in result.events["client"][0].reason
    assert alerts_in([d for name, d in result.sent if name == "server"])[0].fragment == bytes([2, 40])


def test_close_notify() -> None:
    server, client = make_pair()
    simulate(server, client)
    while server.next_event() or client.next_event():
        pass
    client.close()
    assert client.state == "closed" and isinstance(client.next_event(), DtlsClosed)
    for d in client.datagrams_to_send(0.0):
        (alert,) = alerts_in([d])
        assert alert.epoch == 1
        server.receive_datagram(d, 0.0)
    assert server.state == "closed" and isinstance(server.next_event(), DtlsClosed)
    assert len(server.datagrams_to_send(0.0)) == 1  # our own close_notify in answer (RFC 5246 §7.2.1)


# ---- crafted ClientHellos ----


def client_hello(*, ems: bool = True, groups=(0x001D, 0x0017), profiles=(0x0007, 0x0001), extra=()) -> bytes:
    extensions = [
        (m.EXT_SUPPORTED_GROUPS, m.encode_uint16_list(list(groups))),
        (m.EXT_SIGNATURE_ALGORITHMS, m.encode_uint16_list([0x0804, 0x0403])),
        (m.EXT_USE_SRTP, m.encode_use_srtp(list(profiles))),
        (43, b"\x04\xfe\xfc\xfe\xfd"),  # supported_versions: ignored, so a 1.3 client falls back to 1.2
        *extra,
    ]
    if ems:
        extensions.append((m.EXT_EXTENDED_MASTER_SECRET, b""))
    hello = m.ClientHello(DTLS_1_2, os.urandom(32), b"", b"", [0x1301, 0xC02B, 0xC02F], [0], extensions)
    return m.encode_client_hello(hello)


def hs_datagram(
    msg_type: int,
    seq: int,
    body: bytes,
    record_seq: int,
    offset: int = 0,
    size: int | None = None,
    epoch: int = 0,
) -> bytes:
    size = len(body) - offset if size is None else size
    frag = m.encode_handshake_header(msg_type, len(body), seq, offset, size) + body[offset : offset + size]
    return encode_record(CT_HANDSHAKE, epoch, record_seq, frag)


def test_browser_sized_client_hello_reassembled_out_of_order() -> None:
    # Chromium-like: a 1216-byte X25519MLKEM768 share makes a ~1.4 kB ClientHello in 2 fragments.
    body = client_hello(groups=(0x11EC, 0x001D, 0x0017), extra=[(51, os.urandom(1220))])
    server = DtlsTransport(CERT_A, "server")
    server.start(0.0)
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 1, offset=700), 0.0)
    assert server.datagrams_to_send(0.0) == []
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 0, offset=0, size=900), 0.0)  # overlaps
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 2, offset=0, size=900), 0.0)  # duplicate
    out = server.datagrams_to_send(0.0)
    types = [f.msg_type for d in out for r in records_of(d) for f in m.parse_handshake_fragments(r.fragment)]
    assert types == [2, 11, 12, 13, 14]
    hello = m.parse_server_hello(m.parse_handshake_fragments(records_of(out[0])[0].fragment)[0].body)
    assert hello.cipher_suite == 0xC02B and hello.extension(43) is None and hello.extension(51) is None
    assert hello.extension(m.EXT_EXTENDED_MASTER_SECRET) == b""
    assert m.parse_use_srtp(hello.extension(m.EXT_USE_SRTP)) == ([0x0007], b"")
    assert hello.extension(m.EXT_RENEGOTIATION_INFO) is None  # not offered by this ClientHello
    ske = m.parse_server_key_exchange(
        [f for d in out for r in records_of(d) for f in m.parse_handshake_fragments(r.fragment)][2].body
    )
    assert ske.group == 0x001D  # X25519, never 0x11EC
    assert server.state == "connecting" and server.counters["replay"] == 0


@pytest.mark.parametrize(
    ("body", "alert", "reason"),
    [
        (client_hello(ems=False), 40, "extended_master_secret"),
        (client_hello(profiles=(0x0002,)), 40, "SRTP"),
        (client_hello(groups=(0x11EC, 0x0018)), 40, "group"),
        (client_hello()[:-3], 50, "ClientHello"),
    ],
)
def test_bad_client_hello(body: bytes, alert: int, reason: str) -> None:
    server = DtlsTransport(CERT_A, "server")
    server.start(0.0)
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 0), 0.0)
    event = server.next_event()
    assert isinstance(event, DtlsFailed) and reason in event.reason and server.state == "failed"
    (record,) = alerts_in(server.datagrams_to_send(0.0))
    assert record.fragment == bytes([2, alert])


def test_legacy_master_secret_when_allowed() -> None:
    server, client = make_pair({"require_ems": False})
    simulate(server, client)
    assert (
        server.state == "connected"
    )  # our client always offers EMS; a no-EMS peer is covered with pyOpenSSL


# ---- bad input ----


def connected_pair() -> tuple[DtlsTransport, DtlsTransport]:
    server, client = make_pair()
    result = simulate(server, client)
    assert_mirrored(result.events["server"], result.events["client"])
    return server, client


def test_garbage_and_malformed_records_are_dropped() -> None:
    server, client = connected_pair()
    rng = random.Random(7)
    for _ in range(300):
        server.receive_datagram(rng.randbytes(rng.randrange(0, 200)), 1.0)
    valid = client._records.seal(1, CT_APPLICATION_DATA, b"x" * 40)
    server.receive_datagram(valid[:-5], 1.0)  # truncated
    server.receive_datagram(valid[:9], 1.0)  # truncated header
    wrong_epoch = bytearray(valid)
    wrong_epoch[3:5] = (2).to_bytes(2, "big")
    server.receive_datagram(bytes(wrong_epoch), 1.0)
    tampered = bytearray(valid)
    tampered[20] ^= 0x80
    server.receive_datagram(bytes(tampered), 1.0)
    server.receive_datagram(valid, 1.0)
    server.receive_datagram(valid, 1.0)  # replayed
    server.receive_datagram(encode_record(CT_ALERT, 0, 999, bytes([2, 40])), 1.0)  # forged plaintext alert
    server.receive_datagram(encode_record(99, 0, 1000, b"zz"), 1.0)  # unknown content type
    server.receive_datagram(valid[:13] + b"\xff" * 2, 1.0)  # record length beyond the datagram
    assert server.state == "connected" and server.next_event() is None
    c = server.counters
    assert c["bad_record"] >= 4 and c["bad_epoch"] >= 1 and c["replay"] == 1 and c["application_data"] == 1
    assert c["plaintext_alert"] == 1
    assert server.datagrams_to_send(1.0) == []
    # Still usable: a genuine close_notify from the peer is honoured.
    client.close()
    for d in client.datagrams_to_send(1.0):
        server.receive_datagram(d, 1.0)
    assert server.state == "closed"


def test_garbage_during_handshake_does_not_break_it() -> None:
    server, client = make_pair()
    rng = random.Random(3)
    server.start(0.0)
    for _ in range(200):
        server.receive_datagram(rng.randbytes(rng.randrange(1, 300)), 0.0)
    assert server.state == "connecting"
    result = simulate(server, client)
    assert_mirrored(result.events["server"], result.events["client"])


def test_client_hello_flood_after_connect() -> None:
    server, client = connected_pair()
    body = client_hello()
    for i in range(200):
        server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, i % 8, body, 100 + i), 2.0)
    # A renegotiation attempt inside the encrypted epoch is refused the same way (RFC 5746 is not offered).
    frag = m.encode_handshake(m.HT_CLIENT_HELLO, 5, body)
    server.receive_datagram(client._records.seal(1, CT_HANDSHAKE, frag), 2.0)
    assert server.counters["client_hello_after_handshake"] == 201
    assert server.state == "connected" and server.datagrams_to_send(2.0) == [] and server.next_event() is None


def test_server_resends_flight_6_when_flight_5_repeats() -> None:
    server, client = make_pair()
    result = simulate(server, client, done=lambda: server.state == "connected")
    flight5 = [d for name, d in result.sent if name == "client"][-1]
    assert server.datagrams_to_send(0.0)  # flight 6, lost
    server.receive_datagram(flight5, 5.0)  # the very same records: replays, ignored
    assert server.datagrams_to_send(5.0) == [] and server.counters["replay"] >= 1
    client.handle_timer(client.get_timer())  # the client's retransmission has fresh record numbers
    for d in client.datagrams_to_send(5.0):
        server.receive_datagram(d, 5.0)
    resent = server.datagrams_to_send(5.0)
    assert resent and [r.epoch for d in resent for r in records_of(d)] == [0, 1]  # CCS, Finished
    for d in resent:
        client.receive_datagram(d, 5.0)
    assert client.state == "connected"


def test_reassembly_memory_caps() -> None:
    server = DtlsTransport(CERT_A, "server")
    server.start(0.0)
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, bytes(20000), 0, size=100), 0.0)
    assert server.counters["too_big"] == 1
    for i in range(12):  # 12 partial 16 KiB messages exceed 64 KiB in total
        msg_type = m.HT_CLIENT_HELLO if i == 0 else m.HT_CERTIFICATE
        server.receive_datagram(hs_datagram(msg_type, i, bytes(16000), 1 + i, size=50), 0.0)
    assert server.counters["too_big"] >= 2 and server.state == "connecting"


def test_mismatched_fragment_is_dropped() -> None:
    server = DtlsTransport(CERT_A, "server")
    server.start(0.0)
    body = client_hello()
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 0, size=50), 0.0)
    other = m.encode_handshake_header(m.HT_CLIENT_HELLO, len(body) + 1, 0, 50, 10) + bytes(10)
    server.receive_datagram(encode_record(CT_HANDSHAKE, 0, 1, other), 0.0)
    assert server.counters["bad_fragment"] == 1
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, 2, offset=50), 0.0)
    assert len(server.datagrams_to_send(0.0)) == 1  # flight 4


# ---- pyOpenSSL (aiortc's DTLS stack) ----


def run_against_openssl(
    ours: DtlsTransport,
    conn,
    *,
    drop_first_ours: bool = False,
    drop_first_theirs: bool = False,
    max_rounds: int = 40,
) -> list:
    from OpenSSL import SSL

    events: list = []
    now = 0.0
    ours.start(now)
    dropped_ours = dropped_theirs = False
    for _ in range(max_rounds):
        try:
            theirs = ossl_step(conn)
        except SSL.Error as exc:
            theirs = []
            events.append(f"openssl-error: {exc}")
        if (
            theirs
            and drop_first_theirs
            and not dropped_theirs
            and ours.state == "connecting"
            and ours._step != "wait_client_hello"
            and ours.role == "server"
        ):
            dropped_theirs = True  # lose OpenSSL's flight 5
            theirs = []
        for d in theirs:
            ours.receive_datagram(d, now)
        out = ours.datagrams_to_send(now)
        if out and drop_first_ours and not dropped_ours:
            dropped_ours = True
            out = []
        for d in out:
            conn.bio_write(d)
        while (e := ours.next_event()) is not None:
            events.append(e)
        if ours.state != "connecting" and not out and not theirs:
            try:
                ossl_step(conn)
            except SSL.Error as exc:
                events.append(f"openssl-error: {exc}")
            break
        if not out and not theirs:
            # Idle: fire whichever timer is due first; OpenSSL's runs on the real clock (at most ~1 s here).
            their_timer = conn.DTLSv1_get_timeout()
            our_timer = ours.get_timer()
            if their_timer is not None and (our_timer is None or now + their_timer < our_timer):
                time.sleep(their_timer + 0.01)
                now += their_timer + 0.01
                conn.DTLSv1_handle_timeout()
            elif our_timer is not None:
                now = our_timer
                ours.handle_timer(now)
    return events


@pytest.mark.parametrize("our_role", ["server", "client"])
@pytest.mark.parametrize("srtp", [b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80", b"SRTP_AES128_CM_SHA1_80"])
def test_openssl_interop(our_role: str, srtp: bytes) -> None:
    pytest.importorskip("OpenSSL")
    seen: list[str] = []
    ours = DtlsTransport(CERT_A, our_role)
    ours.set_remote_fingerprints(CERT_B.fingerprints())
    conn = ossl_connection(CERT_B, "client" if our_role == "server" else "server", srtp=srtp, seen_peer=seen)
    events = run_against_openssl(ours, conn)
    event = connected_event(events)
    profile = {b"SRTP_AEAD_AES_128_GCM": 0x0007, b"SRTP_AES128_CM_SHA1_80": 0x0001}[
        conn.get_selected_srtp_profile()
    ]
    assert event.srtp_profile == profile == (0x0007 if b"GCM" in srtp else 0x0001)
    p = crypto.SRTP_PROFILES[profile]
    material = conn.export_keying_material(EXPORTER, 2 * (p.key_length + p.salt_length))
    client_key, server_key = split_srtp_material(material, profile)
    expected = (server_key, client_key) if our_role == "server" else (client_key, server_key)
    assert (event.local_key, event.remote_key) == expected
    assert event.peer_fingerprint == CERT_B.fingerprint()
    assert seen and seen[0] == CERT_A.fingerprint()  # OpenSSL saw our certificate
    assert conn.get_cipher_name() == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_openssl_client_with_hello_verify_server() -> None:
    pytest.importorskip("OpenSSL")
    ours = DtlsTransport(CERT_A, "server", hello_verify=True)
    ours.set_remote_fingerprints(CERT_B.fingerprints())
    events = run_against_openssl(ours, ossl_connection(CERT_B, "client"))
    connected_event(events)
    assert ours.counters["hello_verify_request"] == 1


def test_our_client_with_openssl_cookie_exchange() -> None:
    pytest.importorskip("OpenSSL")
    ours = DtlsTransport(CERT_A, "client")
    ours.set_remote_fingerprints(CERT_B.fingerprints())
    conn = ossl_connection(CERT_B, "server", cookie=True)
    events = run_against_openssl(ours, conn)
    event = connected_event(events)
    material = conn.export_keying_material(EXPORTER, 56)
    assert ours.counters["hello_verify_request"] == 1
    assert event.local_key == split_srtp_material(material, 0x0007)[0]


@pytest.mark.parametrize("which", ["ours", "theirs"])
def test_openssl_loss_and_retransmission(which: str) -> None:
    pytest.importorskip("OpenSSL")
    ours = DtlsTransport(CERT_A, "server")
    ours.set_remote_fingerprints(CERT_B.fingerprints())
    conn = ossl_connection(CERT_B, "client")
    events = run_against_openssl(
        ours, conn, drop_first_ours=which == "ours", drop_first_theirs=which == "theirs"
    )
    event = connected_event(events)
    if which == "ours":  # our flight 4 was lost: our timer (or OpenSSL's repeated flight 3) resends it
        assert ours.counters["retransmit_timer"] + ours.counters["retransmit_triggered"] >= 1
    client_key, server_key = split_srtp_material(conn.export_keying_material(EXPORTER, 56), 0x0007)
    assert (event.local_key, event.remote_key) == (server_key, client_key)


def test_openssl_client_without_ems() -> None:
    pytest.importorskip("OpenSSL")
    no_ems = 0x00000001  # SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL 3)
    strict = DtlsTransport(CERT_A, "server")
    strict.set_remote_fingerprints(CERT_B.fingerprints())
    events = run_against_openssl(strict, ossl_connection(CERT_B, "client", options=no_ems))
    failed = [e for e in events if isinstance(e, DtlsFailed)]
    assert failed and "extended_master_secret" in failed[0].reason
    assert any("handshake failure" in str(e) for e in events), events
    legacy = DtlsTransport(CERT_A, "server", require_ems=False)
    legacy.set_remote_fingerprints(CERT_B.fingerprints())
    conn = ossl_connection(CERT_B, "client", options=no_ems)
    event = connected_event(run_against_openssl(legacy, conn))
    assert event.remote_key == split_srtp_material(conn.export_keying_material(EXPORTER, 56), 0x0007)[0]


def test_openssl_sees_bad_certificate_alert() -> None:
    OpenSSL = pytest.importorskip("OpenSSL")
    ours = DtlsTransport(CERT_A, "server")
    ours.set_remote_fingerprints([{"algorithm": "sha-256", "value": CERT_A.fingerprint()}])
    conn = ossl_connection(CERT_B, "client")
    events = run_against_openssl(ours, conn)
    assert any(isinstance(e, DtlsFailed) for e in events)
    assert any("bad certificate" in str(e) for e in events), events
    with pytest.raises(OpenSSL.SSL.Error):
        conn.do_handshake()


# ---- openssl s_client over UDP on 127.0.0.1 ----


@pytest.mark.loopback
@pytest.mark.parametrize("hello_verify", [False, True])
def test_openssl_s_client_udp(tmp_path: Path, hello_verify: bool) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI missing")
    (tmp_path / "cert.pem").write_bytes(CERT_B.certificate_pem())
    (tmp_path / "key.pem").write_bytes(CERT_B.private_key_pem())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DtlsTransport(CERT_A, "server", hello_verify=hello_verify)
    server.set_remote_fingerprints(CERT_B.fingerprints())
    proc = subprocess.Popen(
        [
            openssl,
            "s_client",
            "-dtls1_2",
            "-connect",
            f"127.0.0.1:{port}",
            "-use_srtp",
            "SRTP_AES128_CM_SHA1_80",
            "-keymatexport",
            "EXTRACTOR-dtls_srtp",
            "-keymatexportlen",
            "60",
            "-cert",
            str(tmp_path / "cert.pem"),
            "-key",
            str(tmp_path / "key.pem"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    events: list = []
    try:
        start = time.monotonic()
        server.start(start)
        peer = None
        while time.monotonic() - start < 15 and server.state not in ("closed", "failed"):
            readable, _, _ = select.select([sock], [], [], 0.05)
            now = time.monotonic()
            if readable:
                data, peer = sock.recvfrom(65536)
                server.receive_datagram(data, now)
            timer = server.get_timer()
            if timer is not None and now >= timer:
                server.handle_timer(now)
            for out in server.datagrams_to_send(now):
                assert peer is not None
                sock.sendto(out, peer)
            while (e := server.next_event()) is not None:
                events.append(e)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        sock.close()
    text = output.decode(errors="replace")
    event = connected_event(events)
    assert isinstance(events[-1], DtlsClosed)  # s_client sends close_notify at stdin EOF
    match = re.search(r"Keying material: ([0-9A-F]+)", text)
    assert match, text
    assert event.srtp_profile == 0x0001 and event.srtp_suite == "AES_CM_128_HMAC_SHA1_80"
    assert bytes.fromhex(match.group(1)) == join_srtp_material(event.remote_key, event.local_key, 0x0001)
    assert "Extended master secret: yes" in text and "ECDHE-ECDSA-AES128-GCM-SHA256" in text
    assert server.counters["hello_verify_request"] == (1 if hello_verify else 0)


def test_reordered_flight_5_records_are_held_until_keys_exist() -> None:
    server, client = make_pair()
    server.start(0.0)
    client.start(0.0)
    for d in client.datagrams_to_send(0.0):
        server.receive_datagram(d, 0.0)
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.0)
    (flight5,) = client.datagrams_to_send(0.0)
    records, _ = parse_records(flight5)
    assert [r.epoch for r in records] == [0, 0, 0, 0, 1]  # Certificate, CKE, CertificateVerify, CCS, Finished
    pieces = [encode_record(r.content_type, r.epoch, r.sequence, r.fragment, r.version) for r in records]
    for piece in reversed(pieces):  # Finished (epoch 1) first: held, then opened once the keys exist
        server.receive_datagram(piece, 0.0)
    assert server.state == "connected" and server.counters["bad_epoch"] == 0
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.0)
    assert client.state == "connected"


def test_dtls_1_0_only_client_gets_protocol_version() -> None:
    server = DtlsTransport(CERT_A, "server")
    hello = m.parse_client_hello(client_hello())
    hello.version = 0xFEFF
    server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, m.encode_client_hello(hello), 0), 0.0)
    (record,) = alerts_in(server.datagrams_to_send(0.0))
    assert record.fragment == bytes([2, 70]) and server.state == "failed"


def test_trickled_fragments_are_bounded() -> None:
    server = DtlsTransport(CERT_A, "server")
    body = client_hello(extra=[(51, bytes(300))])
    assert len(body) > 120
    for i in range(60):  # 1-byte fragments with holes between them
        server.receive_datagram(hs_datagram(m.HT_CLIENT_HELLO, 0, body, i, offset=2 * i, size=1), 0.0)
    assert server.counters["too_fragmented"] == 60 - 32
    assert server.state == "connecting" and server.datagrams_to_send(0.0) == []


def test_deadline_while_waiting_for_fingerprints() -> None:
    server = DtlsTransport(CERT_A, "server", handshake_timeout=10.0)
    client = DtlsTransport(CERT_B, "client")
    client.set_remote_fingerprints(CERT_A.fingerprints())
    simulate(server, client, done=lambda: client.state == "connected")
    server.handle_timer(10.0)
    event = server.next_event()
    assert isinstance(event, DtlsFailed) and "fingerprints" in event.reason
