"""The load benchmark's CPU hog (benchmarks/hog.py) burns about the share of a CPU it is asked for,
measured from its own CPU time, and stops when told."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from hog import Hog  # noqa: E402

pytestmark = [pytest.mark.timeout(30)]


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_hog_burns_its_share_and_stops(fraction: float) -> None:
    # Not pinned: on a shared machine the least busy CPU gives it what it asks. Wide tolerance:
    # other processes may take some of its CPU, and tick-granular accounting rounds.
    hog = Hog(None, fraction).start()
    try:
        time.sleep(1.2)
        share = hog.share()
        assert hog.proc is not None and hog.proc.poll() is None
    finally:
        achieved = hog.stop()
    assert 0.5 * fraction <= share <= fraction + 0.2, share
    assert abs(achieved - share) < 0.2
    assert hog.proc.poll() is not None  # reaped: it stopped when told
    # Stopped means no more CPU burnt.
    assert hog.cpu_seconds() == 0.0


def test_idle_share_is_not_burnt() -> None:
    """A low fraction stays low: the hog sleeps the rest of each period instead of spinning."""
    with Hog(None, 0.1) as hog:
        time.sleep(1.0)
        share = hog.share()
    assert share <= 0.3, share
