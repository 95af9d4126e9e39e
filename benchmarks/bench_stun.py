"""ICE-lite answer cost (pytest-benchmark): parse + verify + answer one Binding check, in microseconds.

Issue 3's budget is at most 50 us per STUN answer; a check arrives every 2.5-5 s per client.
"""

from __future__ import annotations

import os
import struct

import pytest

from fastsfu import stun
from fastsfu.ice import IceCredentials, IceServer

CREDS = IceCredentials("benchufrag", "bench-password-0123456789")
PEER = ("127.0.0.1", 40000)
BATCH = 200


def requests(n: int) -> list[bytes]:
    attrs = [
        (stun.ATTR_USERNAME, f"{CREDS.ufrag}:chromium".encode()),
        (stun.ATTR_PRIORITY, struct.pack("!I", 1853824767)),
        (stun.ATTR_ICE_CONTROLLING, os.urandom(8)),
        (stun.ATTR_USE_CANDIDATE, b""),
        (0xC057, b"\x00\x01\x00\x0a"),
    ]
    return [
        stun.build_message(stun.BINDING_REQUEST, os.urandom(12), attrs, CREDS.pwd.encode()) for _ in range(n)
    ]


def test_stun_answer(benchmark: pytest.FixtureRequest) -> None:
    ice = IceServer(CREDS)
    batch = requests(BATCH)

    def answer_all() -> int:
        sent = 0
        for data in batch:
            ice.receive_datagram(data, PEER, 0.0)
            sent += len(ice.datagrams_to_send(0.0))
        return sent

    assert benchmark.pedantic(answer_all, rounds=15, iterations=1) == BATCH
    per_check_us = benchmark.stats.stats.median * 1e6 / BATCH
    benchmark.extra_info["us_per_answer"] = round(per_check_us, 1)
    print(f"\n  STUN check answered in {per_check_us:.1f} us (median), budget 50 us")
    assert ice.counters["checks_ok"] >= BATCH
