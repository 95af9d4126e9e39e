"""Helpers for the DTLS tests: an in-memory network with a fake clock, pyOpenSSL peers, record inspection."""

from __future__ import annotations

import contextlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastsfu.dtls import DtlsCertificate, DtlsConnected, DtlsTransport
from fastsfu.dtls.crypto import SRTP_PROFILES
from fastsfu.dtls.record import Record, parse_records

CERT_A = DtlsCertificate.generate("server")
CERT_B = DtlsCertificate.generate("client")


def make_pair(
    server_kw: dict[str, Any] | None = None, client_kw: dict[str, Any] | None = None
) -> tuple[DtlsTransport, DtlsTransport]:
    server = DtlsTransport(CERT_A, "server", **(server_kw or {}))
    client = DtlsTransport(CERT_B, "client", **(client_kw or {}))
    server.set_remote_fingerprints(CERT_B.fingerprints())
    client.set_remote_fingerprints(CERT_A.fingerprints())
    return server, client


@dataclass
class SimResult:
    now: float
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    events: dict[str, list[Any]] = field(default_factory=lambda: {"server": [], "client": []})


def simulate(
    server: DtlsTransport,
    client: DtlsTransport,
    *,
    rng: random.Random | None = None,
    loss: float = 0.0,
    duplicate: float = 0.0,
    max_delay: float = 0.0,
    drop_batches: frozenset[tuple[str, int]] = frozenset(),
    done: Callable[[], bool] | None = None,
    max_time: float = 120.0,
    max_steps: int = 20000,
) -> SimResult:
    """Run both endpoints with a fake clock until `done` (default: both connected), bounded in time and steps.

    `drop_batches` drops whole transmissions: ("client", 1) is the first non-empty datagrams_to_send() output
    of the client (flight 1), ("server", 1) flight 4, ("client", 2) flight 5, ("server", 2) flight 6.
    """
    done = done or (lambda: server.state == "connected" and client.state == "connected")
    now = 0.0
    result = SimResult(now)
    server.start(now)
    client.start(now)
    queue: list[tuple[float, int, str, bytes]] = []
    counter = 0
    batches = {"server": 0, "client": 0}
    endpoints = {"server": server, "client": client}
    for _ in range(max_steps):
        for name, peer in (("client", "server"), ("server", "client")):
            out = endpoints[name].datagrams_to_send(now)
            if not out:
                continue
            batches[name] += 1
            if (name, batches[name]) in drop_batches:
                continue
            for data in out:
                result.sent.append((name, data))
                if rng is not None and rng.random() < loss:
                    continue
                copies = 2 if rng is not None and rng.random() < duplicate else 1
                for _ in range(copies):
                    delay = rng.uniform(0.0, max_delay) if rng is not None and max_delay else 0.0
                    heapq.heappush(queue, (now + delay, counter, peer, data))
                    counter += 1
        while queue and queue[0][0] <= now:
            _, _, name, data = heapq.heappop(queue)
            endpoints[name].receive_datagram(data, now)
        for name, endpoint in endpoints.items():
            timer = endpoint.get_timer()
            if timer is not None and timer <= now:
                endpoint.handle_timer(now)
            while (event := endpoint.next_event()) is not None:
                result.events[name].append(event)
        if done():
            break
        if any(e._out for e in endpoints.values()):
            continue
        if any(e.state in ("failed", "closed") for e in endpoints.values()) and not queue:
            break
        candidates = [queue[0][0]] if queue else []
        candidates += [t for t in (server.get_timer(), client.get_timer()) if t is not None]
        if not candidates:
            break
        now = max(now, min(candidates))
        if now > max_time:
            break
    result.now = now
    return result


def connected_event(events: list[Any]) -> DtlsConnected:
    found = [e for e in events if isinstance(e, DtlsConnected)]
    assert len(found) == 1, events
    return found[0]


def split_srtp_material(material: bytes, profile: int) -> tuple[bytes, bytes]:
    """RFC 5764 §4.2: client_key|server_key|client_salt|server_salt -> (client key+salt, server key+salt)."""
    p = SRTP_PROFILES[profile]
    k, s = p.key_length, p.salt_length
    return material[:k] + material[2 * k : 2 * k + s], material[k : 2 * k] + material[
        2 * k + s : 2 * k + 2 * s
    ]


def join_srtp_material(client: bytes, server: bytes, profile: int) -> bytes:
    k = SRTP_PROFILES[profile].key_length
    return client[:k] + server[:k] + client[k:] + server[k:]


def records_of(datagram: bytes) -> list[Record]:
    records, junk = parse_records(datagram)
    assert junk is None
    return records


def alerts_in(datagrams: list[bytes]) -> list[Record]:
    return [r for d in datagrams for r in records_of(d) if r.content_type == 21]


# ---- pyOpenSSL peers (aiortc's stack) ----


def ossl_connection(
    cert: DtlsCertificate,
    role: str,
    srtp: bytes = b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80",
    options: int = 0,
    cookie: bool = False,
    seen_peer: list[str] | None = None,
) -> Any:
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_tlsext_use_srtp(srtp)
    ctx.use_certificate(cert.certificate)
    ctx.use_privatekey(cert.private_key)
    if options:
        ctx.set_options(options)

    def verify(conn: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
        if seen_peer is not None:
            seen_peer.append(x509.digest("sha256").decode())
        return True  # WebRTC checks fingerprints, not chains (RFC 5763 §5)

    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    if cookie:
        ctx.set_cookie_generate_callback(lambda conn: b"0123456789abcdef")
        ctx.set_cookie_verify_callback(lambda conn, c: c == b"0123456789abcdef")
        ctx.set_options(0x00002000)  # SSL_OP_COOKIE_EXCHANGE
    conn = SSL.Connection(ctx, None)
    conn.set_ciphertext_mtu(1200)
    if role == "server":
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return conn


def ossl_step(conn: Any) -> list[bytes]:
    """Advance the handshake and collect what OpenSSL wrote (several datagrams may be concatenated)."""
    from OpenSSL import SSL

    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    out: list[bytes] = []
    while True:
        try:
            out.append(conn.bio_read(65536))
        except SSL.WantReadError:
            return out
