"""ICE-lite server, sans-I/O (RFC 8445 §2.5): answers Binding checks, validates and selects tuples,
tracks consent freshness (RFC 7675) and ICE restarts. Bytes and `now` in; datagrams, a timer and
events out. It never raises on input: bad requests get an error response or a counted drop.
"""

from __future__ import annotations

import secrets
import struct
from collections import Counter, deque
from dataclasses import dataclass

from fastsfu import stun

# (ip, port) of a UDP path, or (ip, port, connection) of an ICE-TCP one: a TCP candidate pair is
# one connection (RFC 6544), told apart from a UDP path of the same address by its slot.
Address = tuple[str, int] | tuple[str, int, int]

DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675 §5.1
MIN_CONSENT_TIMEOUT, MAX_CONSENT_TIMEOUT = 10.0, 60.0  # clamped as mediasoup does
MAX_TUPLES = 8  # validated tuples remembered per transport (Chromium tries a handful)
MAX_PENDING = 64  # responses queued before the edge collects them


@dataclass(frozen=True)
class IceCredentials:
    """Our ufrag and password (RFC 8445 §5.3: at least 4 and 22 characters of ice-char)."""

    ufrag: str
    pwd: str

    @classmethod
    def generate(cls) -> IceCredentials:
        return cls(secrets.token_hex(8), secrets.token_hex(16))


@dataclass(frozen=True)
class IceSelectedTuple:
    """The tuple media goes to changed (first validation, nomination, or consent loss of another)."""

    addr: Address


@dataclass(frozen=True)
class IceDisconnected:
    """Consent for the selected tuple expired and no other validated tuple is fresh."""

    addr: Address


@dataclass(frozen=True)
class IceRestarted:
    """A check with the new credentials validated: the old ones are no longer accepted."""

    ufrag: str


IceEvent = IceSelectedTuple | IceDisconnected | IceRestarted


@dataclass
class _Tuple:
    last_valid: float
    nominated: bool = False
    nomination: int = -1


class IceServer:
    """One transport's ICE-lite agent: always controlled, never sends checks (RFC 8445 §6.1.1)."""

    def __init__(
        self, credentials: IceCredentials | None = None, consent_timeout: float = DEFAULT_CONSENT_TIMEOUT
    ) -> None:
        self.credentials = credentials or IceCredentials.generate()
        self._old: IceCredentials | None = None  # still accepted until the new ones validate
        self.consent_timeout = min(MAX_CONSENT_TIMEOUT, max(MIN_CONSENT_TIMEOUT, consent_timeout))
        self._tuples: dict[Address, _Tuple] = {}
        self._selected: Address | None = None
        self._outgoing: deque[tuple[bytes, Address]] = deque()
        self._events: deque[IceEvent] = deque()
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ the five verbs

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            msg = stun.parse_message(data)
        except stun.StunError:
            self.counters["malformed"] += 1
            return
        if msg.fingerprint_offset is not None and not stun.verify_fingerprint(msg):
            self.counters["bad_fingerprint"] += 1  # RFC 8489 §14.7: not a STUN message at all
            return
        if msg.message_type != stun.BINDING_REQUEST:
            # Indications (keepalives) and responses: an ICE-lite agent sends no requests.
            self.counters["ignored"] += 1
            return
        self._request(msg, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = list(self._outgoing)
        self._outgoing.clear()
        return out

    def get_timer(self) -> float | None:
        """When consent of the stalest validated tuple expires (the selected one's, or a fallback
        path's, which is then forgotten on time: an ICE-TCP path's connection closes with it)."""
        if not self._tuples:
            return None
        return min(t.last_valid for t in self._tuples.values()) + self.consent_timeout

    def handle_timer(self, now: float) -> None:
        for addr in [a for a, t in self._tuples.items() if t.last_valid + self.consent_timeout <= now]:
            self.counters["consent_expired"] += 1
            self._remove(addr)

    def _remove(self, addr: Address) -> None:
        del self._tuples[addr]
        if addr == self._selected:
            self._selected = None
            fallback = self._best_tuple()
            if fallback is None:
                self._events.append(IceDisconnected(addr))
            else:
                self._select(fallback)

    def forget(self, addr: Address) -> None:
        """A path is gone for good (its TCP connection closed): another validated one takes over, or
        IceDisconnected when none is left."""
        if addr in self._tuples:
            self.counters["paths_closed"] += 1
            self._remove(addr)

    def next_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ state

    @property
    def selected_tuple(self) -> Address | None:
        return self._selected

    @property
    def validated_tuples(self) -> list[Address]:
        return list(self._tuples)

    def restart(self, credentials: IceCredentials | None = None) -> IceCredentials:
        """New credentials (RFC 8445 §9); the current ones keep working until a check uses the new."""
        self._old = self.credentials
        self.credentials = credentials or IceCredentials.generate()
        return self.credentials

    def accepts_username(self, username: bytes) -> bool:
        """Whether a USERNAME ("<our ufrag>:<theirs>") is ours: finds the transport on a shared port."""
        return self._credentials_for(username) is not None

    # ------------------------------------------------------------------ request handling

    def _request(self, msg: stun.StunMessage, addr: Address, now: float) -> None:
        # Guard clauses in mediasoup's IceServer order (docs/transports.md#ice-lite).
        username = msg.get(stun.ATTR_USERNAME)
        if (
            msg.fingerprint_offset is None
            or msg.integrity_offset is None
            or username is None
            or not msg.has(stun.ATTR_PRIORITY)
        ):
            self._error(msg, addr, 400, signed=False)  # RFC 8489 §9.1.3
            return
        creds = self._credentials_for(username)
        if creds is None or not stun.verify_integrity(msg, creds.pwd.encode()):
            self._error(msg, addr, 401, signed=False)  # neither carries MESSAGE-INTEGRITY
            return
        unknown = [t for t, _ in msg.attributes if t < 0x8000 and t not in stun.KNOWN_REQUIRED]
        if unknown:
            self._error(
                msg,
                addr,
                420,
                creds,
                extra=[(stun.ATTR_UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown))],
            )
            return
        if msg.has(stun.ATTR_ICE_CONTROLLED):
            # We are controlled (ICE-lite), so a controlled peer is a role conflict (RFC 8445 §7.3.1.1).
            self._error(msg, addr, 487, creds)
            return
        if creds is self.credentials and self._old is not None:
            # The first check with the new credentials completes the restart; until then a
            # check with the old ones is still valid.
            self._old = None
            self._events.append(IceRestarted(self.credentials.ufrag))
        self._respond(msg, addr, creds)
        self._validated(msg, addr, now)

    def _credentials_for(self, username: bytes) -> IceCredentials | None:
        local = username.split(b":", 1)[0]
        for creds in (self.credentials, self._old):
            if creds is not None and local == creds.ufrag.encode() and b":" in username:
                return creds
        return None

    def _validated(self, msg: stun.StunMessage, addr: Address, now: float) -> None:
        entry = self._tuples.get(addr)
        if entry is None:
            if len(self._tuples) >= MAX_TUPLES:
                # Bounded state: forget the stalest tuple that is not carrying media.
                stale = min(
                    (a for a in self._tuples if a != self._selected), key=lambda a: self._tuples[a].last_valid
                )
                del self._tuples[stale]
                self.counters["tuples_evicted"] += 1
            entry = self._tuples[addr] = _Tuple(now)
        entry.last_valid = now
        self.counters["checks_ok"] += 1
        nomination = msg.get(stun.ATTR_NOMINATION)
        if nomination is not None and len(nomination) == 4:
            # Renomination: the highest NOMINATION value wins.
            value = struct.unpack("!I", nomination)[0] & 0xFFFFFF
            current = max((t.nomination for t in self._tuples.values()), default=-1)
            if value >= current:
                entry.nomination = value
                entry.nominated = True
                self._select(addr)
        elif msg.has(stun.ATTR_USE_CANDIDATE):
            entry.nominated = True  # RFC 8445 §7.3.1.5: the latest nomination wins
            self._select(addr)
        elif self._selected is None:
            self._select(addr)  # provisional selection before any nomination, as mediasoup does

    def _best_tuple(self) -> Address | None:
        if not self._tuples:
            return None
        return max(self._tuples, key=lambda a: (self._tuples[a].nominated, self._tuples[a].last_valid))

    def _select(self, addr: Address) -> None:
        if addr != self._selected:
            self._selected = addr
            self._events.append(IceSelectedTuple(addr))

    # ------------------------------------------------------------------ responses

    def _queue(self, data: bytes, addr: Address) -> None:
        if len(self._outgoing) >= MAX_PENDING:
            self.counters["responses_dropped"] += 1
            return
        self._outgoing.append((data, addr))

    def _respond(self, msg: stun.StunMessage, addr: Address, creds: IceCredentials) -> None:
        attrs = [
            (stun.ATTR_XOR_MAPPED_ADDRESS, stun.encode_xor_address(addr[0], addr[1], msg.transaction_id))
        ]
        self._queue(
            stun.build_message(stun.BINDING_SUCCESS, msg.transaction_id, attrs, creds.pwd.encode()), addr
        )

    def _error(
        self,
        msg: stun.StunMessage,
        addr: Address,
        code: int,
        creds: IceCredentials | None = None,
        signed: bool = True,
        extra: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.counters[f"error_{code}"] += 1
        attrs = [(stun.ATTR_ERROR_CODE, stun.encode_error_code(code)), *(extra or [])]
        key = creds.pwd.encode() if signed and creds is not None else None
        self._queue(stun.build_message(stun.BINDING_ERROR, msg.transaction_id, attrs, key), addr)
