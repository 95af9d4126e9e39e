"""Per packet: no Python call and no allocation (docs/benchmarks.md#targets, 3), counted exactly.

A subprocess runs with PYTHONMALLOC=malloc and an LD_PRELOAD malloc counter, sends N and 10*N
SRTP packets to a real socket and drains them, inline or on the datapath thread; the counts must
not grow with N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def malloc_counter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lib = tmp_path_factory.mktemp("native") / "malloc_count.so"
    subprocess.run(
        ["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "native" / "malloc_count.c"), "-ldl"],
        check=True,
        timeout=60,
    )
    return lib


def probe(
    lib: Path, n: int, fanout: int, kind: str = "srtp", mode: str = "inline", variant: str = ""
) -> dict[str, int]:
    env = dict(os.environ, PYTHONMALLOC="malloc", LD_PRELOAD=str(lib))
    out = subprocess.run(
        [sys.executable, str(HERE / "native" / "drain_probe.py"), str(n), str(fanout), kind, mode]
        + ([variant] if variant else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["inline", "threaded"])
@pytest.mark.parametrize("fanout", [1, 10])
@pytest.mark.parametrize("kind", ["srtp", "aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"])
def test_counts_do_not_grow_with_packets(malloc_counter: Path, fanout: int, kind: str, mode: str) -> None:
    """SRTP, and Discord's AEAD modes (OpenSSL through _aead.h), alike; inline or threaded.
    The fan-out of 10 includes a pipe (passthrough) consumer and a recording tap; the producer's
    audio levels are on."""
    small = probe(malloc_counter, 32, fanout, kind, mode)
    large = probe(malloc_counter, 320, fanout, kind, mode)
    # n measured packets, 32 more under a profiler, 1 before measuring (the sink's frame size)
    assert small["forwarded"] == (32 + 33) * fanout and large["forwarded"] == (320 + 33) * fanout
    if fanout > 1:  # the recording tap copied every packet as well
        assert small["tapped"] == 32 + 33 and large["tapped"] == 320 + 33
    assert large["batches"] > small["batches"]  # recvmmsg takes 64 datagrams a batch
    assert small["levels"] == 32 + 33 and large["levels"] == 320 + 33  # every level was read
    assert small["control_allocations"] >= 10  # the counter sees Python objects being made
    if mode == "threaded":
        assert small["thread_profiled_calls"] >= 1  # the profiler does see the thread's Python calls
    # Draining, decrypting, rewriting, encrypting and sending: no allocation and no Python call.
    assert small["allocations"] == large["allocations"] == 0, (small, large)
    assert small["python_calls"] == large["python_calls"] == 0, (small, large)


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_red_unwrap_and_forward_do_no_per_packet_work(malloc_counter: Path, mode: str) -> None:
    """Opus RED (docs/transports.md#opus-red): unwrapped for half the receivers, forwarded with
    rewritten block PTs to the others, the primary block tapped: still nothing per packet."""
    small = probe(malloc_counter, 32, 10, "srtp", mode, "red")
    large = probe(malloc_counter, 320, 10, "srtp", mode, "red")
    assert small["forwarded"] == (32 + 33) * 10 and large["forwarded"] == (320 + 33) * 10
    assert small["tapped"] == 32 + 33 and large["tapped"] == 320 + 33
    assert small["allocations"] == large["allocations"] == 0, (small, large)
    assert small["python_calls"] == large["python_calls"] == 0, (small, large)


@pytest.mark.parametrize("mode", ["inline", "threaded"])
@pytest.mark.parametrize("fanout", [1, 10])
def test_tcp_counts_do_not_grow_with_packets(malloc_counter: Path, fanout: int, mode: str) -> None:
    """ICE-TCP (docs/transports.md, "ICE over TCP"): frames read from a connection, forwarded, and
    written framed to a TCP receiver, with no allocation and no Python call per packet either."""
    small = probe(malloc_counter, 32, fanout, "srtp", mode, "tcp")
    large = probe(malloc_counter, 320, fanout, "srtp", mode, "tcp")
    assert small["forwarded"] == (32 + 33) * fanout and large["forwarded"] == (320 + 33) * fanout
    assert small["control_allocations"] >= 10
    assert small["allocations"] == large["allocations"] == 0, (small, large)
    assert small["python_calls"] == large["python_calls"] == 0, (small, large)
