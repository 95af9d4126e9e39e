"""The load benchmark's split SUT (benchmarks/sut_split.py, `run.py --sut fastsfu_split2`): two fastsfu
worker processes, each serving half of the members, joined by plain-RTP PipeTransports. It starts,
forwards every stream to every member across the pipe, reports each worker's CPU share, and stops.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
import run as bench_run  # noqa: E402
from loadgen import native, run_loadgen  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(180)]

_CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU, SUT_CPU = (_CPUS[0], _CPUS[1]) if len(_CPUS) >= 2 else (None, None)
STEP = {"rate": 50, "duration": 1.0, "warmup": 0.2, "drain": 0.3, "verify_every": 1}


@pytest.fixture(scope="module")
def libs() -> dict[str, Path]:
    return native.build_all()


def split_argv() -> list[str]:
    # No queue-age drop: on a shared machine a stall would drop packets by design; here every
    # packet must arrive.
    cpu = str(SUT_CPU if SUT_CPU is not None else -1)
    return [sys.executable, str(bench_run.SPLIT_SCRIPT), "--cpu", cpu, "--max-queue-age-ms", "0"]


@pytest.mark.parametrize("talkers", [0, 2], ids=["room", "stage"])
def test_split_sut_forwards_across_the_pipe_and_stops(
    libs: dict[str, Path], tmp_path: Path, talkers: int
) -> None:
    """A room of 6 (everyone talking) or a stage (2 speakers, 4 listeners) split 3/3: every
    subscription gets every packet with valid SRTP, including those whose speaker is on the other
    worker (they crossed the pipe, once per speaker); both workers use CPU; both exit on SIGTERM
    with their counters."""
    cfg = benchconfig.make_config(
        1, 6, benchconfig.SUITE_GCM, benchconfig.find_free_base_port(6), talkers=talkers
    )
    parts = cfg["participants"]
    with run_loadgen.harness(
        cfg,
        split_argv(),
        tmp_path / "c.json",
        gen_cpu=GEN_CPU,
        sut_cpu=SUT_CPU,
        lib_path=libs["loadgen"],
        workers=2,
    ) as h:
        res, m = h.step(**STEP, speakers=talkers)
        group = h.sut
        assert isinstance(group, run_loadgen.SutGroup) and group.alive()
    assert not group.alive()  # stopped

    assert m["loss"] == 0 and m["sink_errors"] == {}, m
    crossing = [
        s
        for s in res.subs
        if benchconfig.worker_of(parts[s.sender], 2) != benchconfig.worker_of(parts[s.receiver], 2)
    ]
    assert crossing and len(crossing) < len(res.subs)
    for sub in res.subs:
        assert sub.expected >= 45 and sub.received == sub.expected, sub
        assert sub.duplicates == 0 and sub.verify_failures == 0, sub
    raw = res.raw
    assert raw["verified"] == raw["received_total"] - raw["rtcp"] > 0 and raw["verify_failures"] == 0
    assert len(m["worker_cpu_share"]) == 2 and sum(m["worker_cpu_share"]) == pytest.approx(1, abs=0.01)

    final = h.final
    assert final["ok"] is True and len(final["workers"]) == 2
    assert final["decrypt_failures"] == 0 and final["send_failures"] == 0
    senders = {c["sender"] for c in cfg["consumers"]}
    for w, counters in enumerate(final["workers"]):
        assert counters["worker"] == w and counters["participants"] == 3
        assert counters["consumers"] == sum(1 for c in cfg["consumers"] if c["receiver"] % 2 == w)
        # Each speaker of the other worker crossed the pipe once per packet, whatever its fan-out.
        far = [s for s in senders if s % 2 != w]
        sent_far = sum(min(x.expected for x in res.subs if x.sender == s) for s in far)
        assert counters["pipes"] == 1
        assert sent_far <= counters["pipe_rx_packets"] < 2 * sent_far, (counters, sent_far)
        # recv_error aside: a connected socket's report to a generator port already closed at the
        # end comes back as ECONNREFUSED on the next receive.
        assert {k: v for k, v in counters["drops"].items() if k != "recv_error"} == {}, counters


def test_run_reports_two_workers_against_one(libs: dict[str, Path], tmp_path: Path) -> None:
    """run.py with fastsfu and fastsfu_split2 (short fixed steps): the split table compares them
    round by round, with each worker's share and the extra CPU per pipe crossing."""
    out = tmp_path / "run.json"
    argv = ["--quick", "--fixed-only", "--suite", "gcm", "--sut", "fastsfu", "--sut", "fastsfu_split2"]
    argv += ["--size", "4", "--low-speakers", "0", "--fixed-duration", "0.5", "--fixed-repeat", "2"]
    argv += ["--gen-cpu", str(GEN_CPU or 0), "--sut-cpu", str(SUT_CPU or 0), "--json", str(out)]
    assert bench_run.main(argv) == 0
    summary = json.loads(out.read_text())
    row = summary["split"][benchconfig.SUITE_GCM]["fixed"]
    assert row["offered_fwd_pps"] == pytest.approx(50 * 4 * 3, rel=0.05)
    assert len(row["two_over_one"]) == 2 and all(r > 0 for r in row["two_over_one"])
    assert len(row["worker_shares"]) == 2 and len(row["extra_us_per_crossing"]) == 2
    assert row["loss_two"] == [0, 0]
    split = summary["results"][benchconfig.SUITE_GCM]["fastsfu_split2"]
    assert split["sut_final"]["pipe_rx_packets"] > 0
