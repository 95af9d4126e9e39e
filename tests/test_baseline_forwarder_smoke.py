"""Smoke test of the loopback benchmark harness: the bare C forwarder, 1 room x 3, at 50 pps.

Also checks that the baseline's in-memory forward_one() matches a pure-Python rewrite + protect.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pylibsrtp
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
from baseline import run_baseline  # noqa: E402
from loadgen import native, run_loadgen  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(120)]

SUITES = [benchconfig.SUITE_CM, benchconfig.SUITE_GCM]
# Pin like the benchmark when two CPUs are available; on a single CPU leave affinity alone.
_CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU, SUT_CPU = (_CPUS[0], _CPUS[1]) if len(_CPUS) >= 2 else (None, None)


@pytest.fixture(scope="module")
def libs() -> dict[str, Path]:
    return native.build_all()


@pytest.mark.parametrize("suite", SUITES)
def test_baseline_forwards_every_packet(libs: dict[str, Path], suite: str, tmp_path: Path) -> None:
    cfg = benchconfig.make_config(1, 3, suite, benchconfig.find_free_base_port(3))
    argv = [
        sys.executable,
        str(run_loadgen.BASELINE_SCRIPT),
        "--cpu",
        str(SUT_CPU if SUT_CPU is not None else -1),
        "--lib",
        str(libs["forwarder"]),
    ]
    with run_loadgen.harness(
        cfg, argv, tmp_path / "config.json", gen_cpu=GEN_CPU, sut_cpu=SUT_CPU, lib_path=libs["loadgen"]
    ) as h:
        res, metrics = h.step(rate=50, duration=1.0, warmup=0.2, drain=0.3, verify_every=1)

    # Every participant hears both others, every packet, nothing else.
    heard: dict[int, set[int]] = {p["id"]: set() for p in cfg["participants"]}
    for sub in res.subs:
        assert sub.expected >= 45, sub  # 50 pps for 1 s, give or take the window edges
        assert sub.received == sub.expected, sub
        assert sub.duplicates == 0 and sub.verify_failures == 0, sub
        heard[sub.receiver].add(sub.sender)
    for pid, senders in heard.items():
        assert senders == {q for q in heard if q != pid}
    assert res.loss == 0 and metrics["loss"] == 0
    assert res.expected == sum(s.expected for s in res.subs) > 0

    # Every packet carried a valid tag, the rewritten PT and extension ID, and a sane stamp.
    raw = res.raw
    assert raw["verified"] == raw["received_total"] > 0
    assert raw["verify_failures"] == 0
    assert metrics["sink_errors"] == {}
    assert 0 < raw["lat_min_ns"] <= raw["lat_max_ns"] < 1_000_000_000
    assert metrics["p50_us"] is not None and 0 < metrics["p50_us"] < 1_000_000

    # The forwarder's own counters agree.
    final = h.final
    assert final["ok"] is True
    assert final["decrypt_failures"] == 0 and final["send_failures"] == 0
    assert final["forwarded"] == 2 * final["received"] >= raw["received_total"]


def _rtp(ssrc: int, seq: int, ts: int, ext_id: int, stamp: int, payload: bytes, pt: int = 111) -> bytes:
    """RTP with a one-byte extension block: `ext_id` carrying 8 bytes, then 3 bytes of padding."""
    ext = bytes([ext_id << 4 | 7]) + struct.pack("!Q", stamp) + b"\0\0\0"
    return struct.pack("!BBHII", 0x90, 0x80 | pt, seq, ts, ssrc) + b"\xbe\xde\x00\x03" + ext + payload


@pytest.mark.parametrize("suite", SUITES)
def test_forward_one_matches_python_reference(libs: dict[str, Path], suite: str) -> None:
    klen = benchconfig.KEY_LENGTHS[suite]
    key_up, key_down = os.urandom(klen).hex(), os.urandom(klen).hex()
    profile = native.PROFILES[suite]
    sender = native.make_session(suite, key_up, outbound=True)
    fw_up = native.make_session(suite, key_up, outbound=False)
    fw_down = native.make_session(suite, key_down, outbound=True, ssrcs=(0x10000001,))
    ref_down = pylibsrtp.Session(
        pylibsrtp.Policy(
            key=bytes.fromhex(key_down), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile
        )
    )
    receiver = native.make_session(suite, key_down, outbound=False)
    lib = libs["forwarder"]
    for i in range(5):
        seq, ts = (65530 + i) & 0xFFFF, 1000 + 960 * i
        payload = bytes(range(80 + 7 * i))
        wire_in = sender.protect(_rtp(1001, seq, ts, 3, 123456789 + i, payload))
        out = run_baseline.forward_one(wire_in, fw_up, fw_down, 0x10000001, lib_path=lib)
        # Marker bit kept, PT 111 -> 100, SSRC replaced, extension ID 3 -> 7, seq/ts unchanged.
        expected_plain = _rtp(0x10000001, seq, ts, 7, 123456789 + i, payload, pt=100)
        assert out == ref_down.protect(expected_plain)
        assert receiver.unprotect(out) == expected_plain
    with pytest.raises(ValueError, match="unprotect failed"):
        run_baseline.forward_one(b"\x80" + bytes(40), fw_up, fw_down, 0x10000001, lib_path=lib)
