"""Benchmark configuration shared by the load generator and every system under test.

Builds, writes, loads and validates the JSON config (participants, keys, consumer SSRCs, ports).
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUITE_CM = "AES_CM_128_HMAC_SHA1_80"
SUITE_GCM = "AEAD_AES_128_GCM"
# Discord's `udp` transport (docs/transports.md#discord-udp): rtpsize AEAD, one 32-byte key per
# transport for both directions, every transport on the engine's one shared media port.
SUITE_DISCORD_AES = "DISCORD_AES256_GCM"
SUITE_DISCORD_XCHACHA = "DISCORD_XCHACHA20"
DISCORD_MODES = {
    SUITE_DISCORD_AES: "aead_aes256_gcm_rtpsize",
    SUITE_DISCORD_XCHACHA: "aead_xchacha20_poly1305_rtpsize",
}
SRTP_SUITES = (SUITE_CM, SUITE_GCM)
DISCORD_SUITES = tuple(DISCORD_MODES)
# Master key || master salt lengths (RFC 3711 / RFC 7714); Discord's secret_key.
KEY_LENGTHS = {SUITE_CM: 30, SUITE_GCM: 28, SUITE_DISCORD_AES: 32, SUITE_DISCORD_XCHACHA: 32}
SUITE_ALIASES = {
    "cm": SUITE_CM,
    "gcm": SUITE_GCM,
    "discord-aes": SUITE_DISCORD_AES,
    "discord-xchacha": SUITE_DISCORD_XCHACHA,
    **{name.lower(): name for name in KEY_LENGTHS},
    **{mode: suite for suite, mode in DISCORD_MODES.items()},
}

PUBLISHER_PT = 111
DISCORD_PT = 120  # what Discord clients send and accept, both ways (docs/transports.md#encryption-modes)
PUBLISHER_EXT_ID = 3
CONSUMER_PT = 100
CONSUMER_EXT_ID = 7
# ssrc-audio-level (RFC 6464) as browsers send it on every Opus packet, at the ID a
# mediasoup-client producer gets from fastsfu's router capabilities (ortc.py); kept on forwarding.
LEVEL_EXT_ID = 10
# Participant SSRCs are 1001, 1002, ...; consumer SSRCs start above 0x10000000 so the two never collide.
PARTICIPANT_SSRC_BASE = 1000
CONSUMER_SSRC_BASE = 0x10000000


@dataclass(frozen=True)
class Participant:
    """One endpoint: a SUT socket, a generator socket and one SRTP key per direction."""

    id: int
    room: int
    sut_port: int
    gen_port: int
    ssrc: int
    pt: int
    ext_id: int
    key_up: str
    key_down: str


@dataclass(frozen=True)
class Consumer:
    """The stream `sender` -> `receiver`, carried with its own SSRC towards the receiver."""

    receiver: int
    sender: int
    ssrc: int


@dataclass
class BenchConfig:
    """The whole config; `to_dict()` gives exactly the JSON shape the SUTs read."""

    suite: str
    participants: list[Participant] = field(default_factory=list)
    consumer_pt: int = CONSUMER_PT
    consumer_ext_id: int = CONSUMER_EXT_ID
    consumers: list[Consumer] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "participants": [asdict(p) for p in self.participants],
            "consumer_pt": self.consumer_pt,
            "consumer_ext_id": self.consumer_ext_id,
            "consumers": [asdict(c) for c in self.consumers],
        }


def normalize_suite(suite: str) -> str:
    """Accept the full suite name, a Discord mode name or the short aliases (`cm`, `gcm`, ...)."""
    try:
        return SUITE_ALIASES[suite.lower()]
    except KeyError:
        raise ValueError(f"unknown suite {suite!r}; use one of {', '.join(KEY_LENGTHS)}") from None


def is_discord(suite: str) -> bool:
    """A Discord `udp` transport suite rather than SRTP over a PlainTransport."""
    return normalize_suite(suite) in DISCORD_MODES


def port_gap(n_participants: int) -> int:
    """Distance between the SUT and generator port blocks: a round 1000 so ports are easy to read."""
    return 1000 * max(1, -(-n_participants // 1000))


def make_config(
    rooms: int, size: int, suite: str, base_port: int, seed: int = 1, talkers: int = 0
) -> dict[str, Any]:
    """Build a config: `rooms` rooms of `size` participants, everyone subscribed to everyone else;
    with `talkers` > 0 a stage: only the first `talkers` members of each room are heard (by all
    the others), the rest only listen.

    SUT ports are base_port + id, generator ports base_port + port_gap + id. Keys come from a
    seeded PRNG so that two runs (and both SUTs) see the same keys: they are test keys only.

    Discord suites: every participant's SUT port is base_port (the engine's shared media port),
    both directions use one key (key_down == key_up), and publishers and consumers use PT 120.
    """
    if rooms < 1 or size < 2 or not 0 <= talkers <= size:
        raise ValueError("need rooms >= 1, size >= 2 and 0 <= talkers <= size")
    suite = normalize_suite(suite)
    n = rooms * size
    gap = port_gap(n)
    if base_port < 1024 or base_port + gap + n > 65535:
        raise ValueError(f"port range {base_port}..{base_port + gap + n} is not usable")
    rng = random.Random(seed)
    klen = KEY_LENGTHS[suite]
    discord = suite in DISCORD_MODES
    cfg = BenchConfig(suite=suite, consumer_pt=DISCORD_PT if discord else CONSUMER_PT)
    for pid in range(n):
        key_up = rng.randbytes(klen).hex()
        key_down = rng.randbytes(klen).hex()
        cfg.participants.append(
            Participant(
                id=pid,
                room=pid // size,
                sut_port=base_port if discord else base_port + pid,
                gen_port=base_port + gap + pid,
                ssrc=PARTICIPANT_SSRC_BASE + pid + 1,
                pt=DISCORD_PT if discord else PUBLISHER_PT,
                ext_id=PUBLISHER_EXT_ID,
                key_up=key_up,
                key_down=key_up if discord else key_down,
            )
        )
    for room in range(rooms):
        members = range(room * size, (room + 1) * size)
        for sender in members[:talkers] if talkers else members:
            for receiver in members:
                if receiver != sender:
                    ssrc = CONSUMER_SSRC_BASE + len(cfg.consumers) + 1
                    cfg.consumers.append(Consumer(receiver=receiver, sender=sender, ssrc=ssrc))
    return cfg.to_dict()


def worker_of(p: dict[str, Any], workers: int) -> int:
    """The worker serving participant `p` when a room is split over `workers` processes: members
    alternate, so a room of 50 splits 25/25, a stage's talkers and listeners each split evenly,
    and each room of 2 has one member on either side of the pipe."""
    return int(p["id"]) % workers


def room_size(cfg: dict[str, Any]) -> int:
    """Participants per room (make_config builds rooms of equal size)."""
    return sum(1 for p in cfg["participants"] if p["room"] == cfg["participants"][0]["room"])


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check the shape and the invariants the native code relies on; returns `cfg` unchanged."""
    suite = normalize_suite(cfg["suite"])
    if suite != cfg["suite"]:
        raise ValueError("config suite must be spelled in full")
    parts = cfg["participants"]
    klen = KEY_LENGTHS[suite]
    for idx, p in enumerate(parts):
        Participant(**p)  # raises on missing or unknown keys
        if p["id"] != idx:
            raise ValueError("participant ids must be 0..n-1 in order")
        for k in ("key_up", "key_down"):
            if len(bytes.fromhex(p[k])) != klen:
                raise ValueError(f"participant {idx}: {k} must be {klen} bytes for {suite}")
        if suite in DISCORD_MODES:
            if p["key_down"] != p["key_up"] or p["sut_port"] != parts[0]["sut_port"]:
                raise ValueError(f"participant {idx}: Discord suites use one key and one shared SUT port")
            if p["pt"] != DISCORD_PT:
                raise ValueError(f"participant {idx}: Discord suites send PT {DISCORD_PT}")
    ssrcs: set[int] = set()
    for c in cfg["consumers"]:
        Consumer(**c)
        if c["ssrc"] in ssrcs:
            raise ValueError(f"duplicate consumer ssrc {c['ssrc']}")
        ssrcs.add(c["ssrc"])
        if parts[c["receiver"]]["room"] != parts[c["sender"]]["room"] or c["receiver"] == c["sender"]:
            raise ValueError(f"consumer {c} does not join two members of one room")
    for k in ("consumer_pt", "consumer_ext_id"):
        int(cfg[k])
    return cfg


def save_config(cfg: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the config as JSON (atomically, so a SUT never reads half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a config written by `save_config`."""
    return validate_config(json.loads(Path(path).read_text()))


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def find_free_base_port(n_participants: int, start: int = 20000, stop: int = 32000, step: int = 500) -> int:
    """Find a base port whose SUT and generator blocks are all bindable on 127.0.0.1 (UDP).

    Searches below the kernel's ephemeral range so that other programs' client sockets do not
    grab a port between this check and the SUT binding it.
    """
    gap = port_gap(n_participants)
    eph_lo, eph_hi = _ephemeral_range()
    for base in range(start, stop, step):
        ports = [base + i for i in range(n_participants)] + [base + gap + i for i in range(n_participants)]
        if ports[-1] > 65535 or any(eph_lo <= p <= eph_hi for p in ports):
            continue
        socks: list[socket.socket] = []
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no free UDP port range for {n_participants} participants in {start}..{stop}")
