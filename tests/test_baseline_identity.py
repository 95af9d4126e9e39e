"""The Cython datapath and the benchmark's bare C forwarder produce byte-identical output for the
same keys and input (docs/benchmarks.md#the-bare-c-baseline): the benchmark compares equal work."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
from baseline import run_baseline  # noqa: E402
from loadgen import native  # noqa: E402


@pytest.fixture(scope="module")
def forwarder_lib() -> Path:
    return native.build_all()["forwarder"]


@pytest.mark.parametrize("suite", [benchconfig.SUITE_CM, benchconfig.SUITE_GCM])
def test_same_bytes_as_the_c_baseline(forwarder_lib: Path, suite: str) -> None:
    up, down = generate_key(suite), generate_key(suite)
    # fastsfu, programmed as the benchmark's SUT is: PT 111 -> 100, extension ID 3 -> 7, no MID.
    dp = _rtp.Datapath()
    dp.set_output_mode(_rtp.OUTPUT_CAPTURE)
    sock = dp.add_socket(-1, socket.AF_INET, False)
    t_in, t_out = dp.add_transport(sock), dp.add_transport(sock)
    dp.set_transport_remote(t_in, "127.0.0.1", 1000)
    dp.set_transport_remote(t_out, "127.0.0.1", 1001)
    dp.set_transport_srtp(t_in, SrtpContext(suite, up, True), None)
    dp.set_transport_srtp(t_out, None, SrtpContext(suite, down, False))
    kind = 3  # abs-capture-time
    p = dp.add_producer(t_in, 1001, benchconfig.PUBLISHER_PT, 48000, {benchconfig.PUBLISHER_EXT_ID: kind})
    dp.add_consumer(p, t_out, 0x10000001, benchconfig.CONSUMER_PT, {kind: benchconfig.CONSUMER_EXT_ID})
    # The baseline with its own sessions on the same keys.
    base_up = SrtpContext(suite, up, inbound=True)
    base_down = SrtpContext(suite, down, inbound=False)
    sender = SrtpContext(suite, up, inbound=False)
    for seq in range(500, 540):
        stamp = (10**12 + seq).to_bytes(8, "big")
        packet = sender.protect(
            bytes(
                RtpPacket(
                    111,
                    seq,
                    seq * 960,
                    1001,
                    marker=seq == 500,
                    extensions=[(3, stamp)],
                    payload=bytes(range(seq % 40, seq % 40 + 90)),
                )
            )
        )
        dp.process(sock, packet, "127.0.0.1", 1000, 0)
        ((_, _, ours),) = dp.take_captured()
        theirs = run_baseline.forward_one(
            packet, base_up.session, base_down.session, 0x10000001, lib_path=forwarder_lib
        )
        assert ours == theirs, f"seq {seq}"
        receiver = RtpPacket.parse(SrtpContext(suite, down, inbound=True).unprotect(ours))
        assert (receiver.payload_type, receiver.extensions) == (100, [(7, stamp)])
