"""The reference forwarder: the datapath's table API and forwarding rules in plain Python.

Tests feed it and the Cython datapath (fastsfu._rtp) the same calls and packets and compare every
output byte, drop counter and event (tests/test_datapath_differential.py, tests/fuzz/). It is a
specification, not shipped code.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fastsfu.rtp import (
    DROP_REASONS,
    EVENT_TUPLE_LEARNED,
    EVENT_UNKNOWN_SSRC,
    KIND_AUDIO_LEVEL,
    KIND_MID,
    LEVEL_RECENT,
    SLOW_DTLS,
    SLOW_OTHER,
    SLOW_RTCP,
    SLOW_STUN,
    Address,
    is_rtcp,
    iter_extensions,
    write_extensions,
)

MAX_DROPOUT, MAX_MISORDER = 3000, 100  # RFC 3550 A.1
RED_MAX_BLOCKS = 16  # RFC 2198 header blocks accepted per packet (docs/transports.md#opus-red)
SRTP_KEEPALIVE_SEQ = 4096
SRTP_REPLAY_ERRORS = ("replay check failed (bad index)", "replay check failed (index too old)")


class SrtpLike(Protocol):
    def protect(self, packet: bytes) -> bytes: ...
    def unprotect(self, packet: bytes) -> bytes: ...
    def protect_rtcp(self, packet: bytes) -> bytes: ...
    def unprotect_rtcp(self, packet: bytes) -> bytes: ...


@dataclass
class _Transport:
    sock: int
    comedia: bool
    remote: Address | None = None
    srtp_in: SrtpLike | None = None
    srtp_out: SrtpLike | None = None
    last_unknown_ssrc: int | None = None
    rx_packets: int = 0
    tx_packets: int = 0


@dataclass
class _Producer:
    transport: int
    ssrc: int
    pt: int
    clock_rate: int
    ext_kind: dict[int, int]
    red_pt: int = -1  # audio/red (RFC 2198) PT, -1: none
    consumers: list[int] = field(default_factory=list)
    paused: bool = False
    epoch: int = 0
    highest: int | None = None
    bad_seq: int | None = None
    base: int = 0
    expected_prior: int = 0
    last_auth_seq: int | None = None
    last_transit: int | None = None
    jitter_q4: int = 0
    packets: int = 0
    level_id: int = 0  # ssrc-audio-level read (RFC 6464) while an observer wants it
    levels: tuple[int, int, int, int] = (0, 0, 127, 0)  # count, sum, loudest, voiced
    recent: list[int] = field(default_factory=list)  # the interval's levels, one per packet


@dataclass
class _Consumer:
    producer: int
    transport: int
    ssrc: int
    pt: int
    ext_id: dict[int, int]
    mid: bytes
    paused: bool
    epoch: int
    passthrough: bool = False
    red_pt: int = -1  # RED forwarded with this PT; -1: unwrapped to Opus
    sync_needed: bool = True
    has_sent: bool = False
    sync_ext: int = 0
    highest_sent: int = 0
    seq_off: int = 0
    ts_off: int = 0
    last_seq: int = 0
    last_ts: int = 0
    last_ns: int = 0
    packets: int = 0


def _canonical(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class ReferenceForwarder:
    """The datapath's rules in plain Python; same table API as `fastsfu._rtp.Datapath`."""

    def __init__(self) -> None:
        self.sockets: dict[int, int | None] = {}  # socket -> comedia transport waiting for a remote
        self.transports: dict[int, _Transport] = {}
        self.producers: dict[int, _Producer] = {}
        self.consumers: dict[int, _Consumer] = {}
        self.tuples: dict[tuple[int, str, int], int] = {}
        self.ssrcs: dict[tuple[int, int], int] = {}
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.captured: list[tuple[int, Address, bytes]] = []
        self.events: list[tuple[int, int, int]] = []

    @staticmethod
    def _slot(table: Mapping[int, object]) -> int:
        i = 0
        while i in table:
            i += 1
        return i

    def add_socket(self, fd: int = -1, family: int = 2, timestamps: bool = False) -> int:
        s = self._slot(self.sockets)
        self.sockets[s] = None
        return s

    def add_transport(self, sock: int, comedia: bool = False) -> int:
        t = self._slot(self.transports)
        self.transports[t] = _Transport(sock, comedia)
        if comedia:
            self.sockets[sock] = t
        return t

    def set_transport_comedia(self, t: int, comedia: bool) -> None:
        tr = self.transports[t]
        if comedia == tr.comedia:
            return
        if comedia and tr.remote is None:
            self.sockets[tr.sock] = t
        elif not comedia and self.sockets[tr.sock] == t:
            self.sockets[tr.sock] = None
        tr.comedia = comedia

    def set_transport_remote(self, t: int, ip: str, port: int) -> None:
        tr = self.transports[t]
        self.clear_transport_remote(t)
        tr.remote = (_canonical(ip), port)
        self.tuples[(tr.sock, *tr.remote)] = t
        if self.sockets[tr.sock] == t:
            self.sockets[tr.sock] = None

    def clear_transport_remote(self, t: int) -> None:
        tr = self.transports[t]
        if tr.remote is not None:
            del self.tuples[(tr.sock, *tr.remote)]
            tr.remote = None
            if tr.comedia:
                self.sockets[tr.sock] = t

    def set_transport_srtp(self, t: int, inbound: SrtpLike | None, outbound: SrtpLike | None) -> None:
        self.transports[t].srtp_in, self.transports[t].srtp_out = inbound, outbound

    def remove_transport(self, t: int) -> None:
        for c in [c for c, co in self.consumers.items() if co.transport == t]:
            self.remove_consumer(c)
        for p in [p for p, pr in self.producers.items() if pr.transport == t]:
            self.remove_producer(p)
        self.clear_transport_remote(t)
        tr = self.transports.pop(t)
        if self.sockets.get(tr.sock) == t:
            self.sockets[tr.sock] = None

    def add_producer(
        self, t: int, ssrc: int, payload_type: int, clock_rate: int, ext_kinds: dict[int, int]
    ) -> int:
        if (t, ssrc) in self.ssrcs:
            raise ValueError(f"SSRC {ssrc} is already produced on this transport")
        p = self._slot(self.producers)
        self.producers[p] = _Producer(t, ssrc, payload_type, clock_rate, dict(ext_kinds))
        self.ssrcs[(t, ssrc)] = p
        return p

    def set_producer_red(self, p: int, red_pt: int) -> None:
        if not -1 <= red_pt < 128 or red_pt == self.producers[p].pt:
            raise ValueError("RED payload type must be 0..127 (or -1) and not the Opus one")
        self.producers[p].red_pt = red_pt

    def set_consumer_red(self, c: int, red_pt: int) -> None:
        if not -1 <= red_pt < 128 or red_pt == self.consumers[c].pt:
            raise ValueError("RED payload type must be 0..127 (or -1) and not the Opus one")
        self.consumers[c].red_pt = red_pt

    def set_producer_paused(self, p: int, paused: bool) -> None:
        pr = self.producers[p]
        if pr.paused and not paused:
            pr.epoch += 1
        pr.paused = paused

    def set_producer_levels(self, p: int, on: bool) -> bool:
        pr = self.producers[p]
        kinds = [eid for eid, kind in sorted(pr.ext_kind.items()) if kind == KIND_AUDIO_LEVEL]
        pr.level_id = kinds[0] if on and kinds else 0
        pr.levels = (0, 0, 127, 0)
        pr.recent = []
        return pr.level_id != 0

    def take_levels(self, slots: list[int]) -> list[tuple[int, int, int, int, bytes]]:
        """The sums, and the last LEVEL_RECENT levels in arrival order."""
        out = []
        for p in slots:
            pr = self.producers[p]
            out.append((*pr.levels, bytes(pr.recent[-LEVEL_RECENT:])))
            pr.levels = (0, 0, 127, 0)
            pr.recent = []
        return out

    def remove_producer(self, p: int) -> None:
        pr = self.producers[p]
        for c in list(pr.consumers):
            self.remove_consumer(c)
        del self.ssrcs[(pr.transport, pr.ssrc)]
        del self.producers[p]

    def add_consumer(
        self,
        p: int,
        t: int,
        ssrc: int,
        payload_type: int,
        ext_ids: dict[int, int],
        mid: bytes = b"",
        paused: bool = False,
        passthrough: bool = False,
    ) -> int:
        c = self._slot(self.consumers)
        pr = self.producers[p]
        self.consumers[c] = _Consumer(
            p, t, ssrc, payload_type, dict(ext_ids), mid, paused, pr.epoch, passthrough
        )
        pr.consumers.append(c)
        return c

    def set_consumer_paused(self, c: int, paused: bool) -> None:
        co = self.consumers[c]
        if co.paused and not paused:
            co.sync_needed = True
        co.paused = paused

    def remove_consumer(self, c: int) -> None:
        co = self.consumers.pop(c)
        self.producers[co.producer].consumers.remove(c)

    def take_captured(self) -> list[tuple[int, Address, bytes]]:
        out, self.captured = self.captured, []
        return out

    def take_events(self) -> list[tuple[int, int, int]]:
        out, self.events = self.events, []
        return out

    def drop_counts(self) -> dict[str, int]:
        return dict(self.drops)

    def _n_active(self, pr: _Producer) -> int:
        return sum(1 for c in pr.consumers if not self.consumers[c].paused)

    # ------------------------------------------------------------------ per packet

    def process(
        self, sock: int, data: bytes, ip: str, port: int, now_ns: int
    ) -> list[tuple[int, int, bytes, Address, int]] | None:
        """Same contract as `Datapath.process`: outputs go to `captured`, slow path is returned."""
        if not data:
            self.drops["malformed"] += 1
            return None
        b0 = data[0]
        src = (_canonical(ip), port)
        t = self.tuples.get((sock, *src), -1)
        if b0 <= 3:
            return [(SLOW_STUN, t, bytes(data), (ip, port), sock)]
        tentative = False
        if t < 0:
            comedia = self.sockets.get(sock)
            if 128 <= b0 <= 191 and comedia is not None:
                t, tentative = comedia, True
            else:
                known = 20 <= b0 <= 63 or 128 <= b0 <= 191
                self.drops["unknown_tuple" if known else "unknown_protocol"] += 1
                return None
        tr = self.transports[t]
        if 20 <= b0 <= 63:
            return [(SLOW_DTLS, t, bytes(data), (ip, port), sock)]
        if not 128 <= b0 <= 191:
            return [(SLOW_OTHER, t, bytes(data), (ip, port), sock)]
        if is_rtcp(data):
            if tentative or len(data) < 8 or b0 >> 6 != 2:
                self.drops["unknown_tuple" if tentative else "malformed"] += 1
                return None
            if tr.srtp_in is not None:
                try:
                    data = tr.srtp_in.unprotect_rtcp(bytes(data))
                except Exception:
                    self.drops["decrypt_failed"] += 1
                    return None
            return [(SLOW_RTCP, t, bytes(data), (ip, port), sock)]
        self._rtp(t, tr, bytes(data), src, now_ns, tentative)
        return None

    def _rtp(self, t: int, tr: _Transport, data: bytes, src: Address, now: int, tentative: bool) -> None:
        n = len(data)
        if n < 12 or data[0] >> 6 != 2:
            self.drops["malformed"] += 1
            return
        cc = data[0] & 0x0F
        hlen = 12 + 4 * cc
        ext_off = ext_len = profile = 0
        if data[0] & 0x10:
            if hlen + 4 > n:
                self.drops["malformed"] += 1
                return
            profile, words = struct.unpack_from("!HH", data, hlen)
            ext_off, ext_len = hlen + 4, 4 * words
            hlen = ext_off + ext_len
        if hlen > n:
            self.drops["malformed"] += 1
            return
        ssrc = struct.unpack_from("!I", data, 8)[0]
        p = self.ssrcs.get((t, ssrc))
        if p is None:
            self.drops["unknown_ssrc"] += 1
            if not tentative and tr.last_unknown_ssrc != ssrc:
                tr.last_unknown_ssrc = ssrc
                self.events.append((EVENT_UNKNOWN_SSRC, t, ssrc))
            return
        pr = self.producers[p]
        if data[1] & 0x7F not in (pr.pt, pr.red_pt):
            self.drops["unknown_pt"] += 1
            return
        seq = struct.unpack_from("!H", data, 2)[0]
        active = self._n_active(pr)
        decrypt = tr.srtp_in is not None and (
            tentative
            or (not pr.paused and (active > 0 or pr.level_id))
            or pr.last_auth_seq is None
            or (seq - pr.last_auth_seq) & 0xFFFF >= SRTP_KEEPALIVE_SEQ
        )
        if decrypt:
            assert tr.srtp_in is not None
            try:
                data = tr.srtp_in.unprotect(data)
            except Exception as exc:
                self.drops["srtp_replay" if str(exc) in SRTP_REPLAY_ERRORS else "decrypt_failed"] += 1
                return
            pr.last_auth_seq = seq
            n = len(data)
        if data[0] & 0x20 and (n <= hlen or data[-1] == 0 or hlen + data[-1] > n) or hlen > n:
            self.drops["malformed"] += 1
            return
        if tentative:
            self.set_transport_remote(t, *src)
            self.events.append((EVENT_TUPLE_LEARNED, t, 0))
        tr.rx_packets += 1
        ts = struct.unpack_from("!I", data, 4)[0]
        ext = self._track(pr, seq, ts, now)
        pr.packets += 1
        if ext < 0:
            self.drops["seq_jump"] += 1
            return
        if pr.paused:
            self.drops["producer_paused"] += 1
            return
        if pr.level_id:
            self._read_level(pr, data[ext_off : ext_off + ext_len], profile)
        if active == 0:
            self.drops["no_consumers"] += 1
            return
        red: tuple[int, int] | None = None  # (header blocks, primary offset) of a RED packet
        body = data[hlen : n - (data[-1] if data[0] & 0x20 else 0)]
        probe = not body  # padding only: a bandwidth probe, skipped by receivers (not by pipes)
        if data[1] & 0x7F == pr.red_pt and body:
            red = red_primary(body, pr.pt)
        for c in pr.consumers:
            self._forward(pr, self.consumers[c], data, hlen, ext_off, ext_len, profile, ext, now, red, probe)

    @staticmethod
    def _read_level(pr: _Producer, block: bytes, profile: int) -> None:
        """The first element with the level's ID: V bit and -dBov in its first byte (RFC 6464 §3)."""
        for eid, value in iter_extensions(block, profile):
            if eid == pr.level_id:
                if value:
                    count, total, loudest, voiced = pr.levels
                    level = value[0] & 0x7F
                    pr.levels = (count + 1, total + level, min(loudest, level), voiced + (value[0] >> 7))
                    pr.recent.append(level)
                return

    @staticmethod
    def _track(pr: _Producer, seq: int, ts: int, now: int) -> int:
        if pr.highest is None:
            pr.highest = pr.base = ext = seq
            pr.last_transit = None
        else:
            delta = (seq - pr.highest) & 0xFFFF
            if delta >= 0x8000:
                delta -= 0x10000
            if delta >= MAX_DROPOUT or delta < -MAX_MISORDER:
                if pr.bad_seq != seq:  # RFC 3550 A.1 probation: believe a jump on the next packet
                    pr.bad_seq = (seq + 1) & 0xFFFF
                    return -1
                pr.bad_seq = None
                pr.expected_prior += pr.highest - pr.base + 1
                ext = ((pr.highest + 65536) & ~0xFFFF) | seq
                pr.highest = pr.base = ext
                pr.epoch += 1
                pr.last_transit = None
                return ext
            ext = pr.highest + delta
            if delta <= 0:
                return ext
            pr.highest = ext
        arrival = ((now // 1000) * pr.clock_rate // 1_000_000) & 0xFFFFFFFF
        transit = (arrival - ts) & 0xFFFFFFFF
        if pr.last_transit is not None:
            d = (transit - pr.last_transit) & 0xFFFFFFFF
            d = abs(d - (1 << 32) if d >= 1 << 31 else d)
            pr.jitter_q4 = (pr.jitter_q4 + d - ((pr.jitter_q4 + 8) >> 4)) & 0xFFFFFFFF
        pr.last_transit = transit
        return ext

    def _forward(
        self,
        pr: _Producer,
        co: _Consumer,
        data: bytes,
        hlen: int,
        ext_off: int,
        ext_len: int,
        profile: int,
        ext: int,
        now: int,
        red: tuple[int, int] | None = None,
        probe: bool = False,
    ) -> None:
        dst = self.transports[co.transport]
        if co.paused:
            self.drops["consumer_paused"] += 1
            return
        if dst.remote is None:
            self.drops["no_remote"] += 1
            return
        if red == (0, 0):
            self.drops["red_malformed"] += 1
            return
        in_ts = struct.unpack_from("!I", data, 4)[0]
        if co.passthrough:
            pass  # a pipe: seq and ts as the producer sent them (offsets stay 0)
        elif co.sync_needed or co.epoch != pr.epoch:
            if co.has_sent:
                co.seq_off = (co.last_seq + 1 - ext) & 0xFFFF
                gap = ((now - co.last_ns) // 1000) * pr.clock_rate // 1_000_000 if now > co.last_ns else 0
                co.ts_off = (co.last_ts + max(gap, 1) - in_ts) & 0xFFFFFFFF
            else:
                co.seq_off = co.ts_off = 0
            co.sync_ext, co.highest_sent = ext, ext - 1
            co.sync_needed, co.epoch = False, pr.epoch
        elif ext < co.sync_ext:
            self.drops["stale_seq"] += 1
            return
        if probe and not co.passthrough:
            co.seq_off = (co.seq_off - 1) & 0xFFFF  # not sent; the receiver's sequence stays continuous
            return
        out_seq = (ext + co.seq_off) & 0xFFFF
        out_ts = (in_ts + co.ts_off) & 0xFFFFFFFF
        cc = data[0] & 0x0F
        elements: list[tuple[int, bytes]] = []
        mid_id = co.ext_id.get(KIND_MID, 0)
        if co.mid and mid_id:
            elements.append((mid_id, co.mid))
        if ext_off:
            for eid, value in iter_extensions(data[ext_off : ext_off + ext_len], profile):
                kind = pr.ext_kind.get(eid, 0)
                out_id = co.ext_id.get(kind, 0) if kind not in (0, KIND_MID) else 0
                if out_id:
                    elements.append((out_id, value))
        ext_block = write_extensions(elements)
        b0 = (data[0] & 0xEF) | (0x10 if ext_block else 0)
        pt, payload = co.pt, data[hlen:]
        if red is not None and co.red_pt < 0:
            # Unwrapped: the primary block alone, without the padding.
            b0 &= 0xDF
            payload = data[hlen + red[1] : len(data) - (data[-1] if data[0] & 0x20 else 0)]
        elif red is not None:
            pt, headers = co.red_pt, bytearray(payload)
            for i in range(red[0]):  # every block header names the receiver's Opus PT
                headers[4 * i] = (headers[4 * i] & 0x80) | co.pt
            payload = bytes(headers)
        out = (
            struct.pack("!BBHII", b0, (data[1] & 0x80) | pt, out_seq, out_ts, co.ssrc)
            + data[12 : 12 + 4 * cc]
            + ext_block
            + payload
        )
        if dst.srtp_out is not None:
            try:
                out = dst.srtp_out.protect(out)
            except Exception:
                self.drops["encrypt_failed"] += 1
                return
        if ext > co.highest_sent:
            co.highest_sent, co.last_seq, co.last_ts, co.last_ns = ext, out_seq, out_ts, now
        co.has_sent = True
        co.packets += 1
        dst.tx_packets += 1
        self.captured.append((dst.sock, dst.remote, out))


def red_primary(payload: bytes, opus_pt: int) -> tuple[int, int]:
    """(header blocks, primary offset) of a RED payload (RFC 2198 §3), or (0, 0) if malformed:
    a header or block past the end, too many blocks, a block that is not Opus, an empty primary."""
    pos = blocks = data = 0
    while True:
        if pos >= len(payload) or blocks == RED_MAX_BLOCKS or payload[pos] & 0x7F != opus_pt:
            return 0, 0
        blocks += 1
        if not payload[pos] & 0x80:
            pos += 1
            break
        if pos + 4 > len(payload):
            return 0, 0
        data += struct.unpack_from("!I", payload, pos)[0] & 0x3FF
        pos += 4
    if pos + data >= len(payload):
        return 0, 0
    return blocks, pos + data
