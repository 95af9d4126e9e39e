"""User-space CPU per forwarded packet under real load, by perf sampling (tick-sampled rusage
cannot split user and system time at this resolution).

Runs each SUT at a fixed rate through the loopback harness, samples it with `perf record`
(cpu-clock, 4 kHz) for one step, and prints the user-space share of its CPU time times the
measured CPU microseconds per forwarded packet. Needs Debian's linux-perf (`perf`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
from loadgen import run_loadgen  # noqa: E402


def user_share(perf_data: Path) -> float:
    """Fraction of samples outside the kernel."""
    out = subprocess.run(
        ["perf", "report", "-i", str(perf_data), "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    kernel = sum(
        float(line.split("%")[0])
        for line in out.splitlines()
        if "%" in line and not line.startswith("#") and "[kernel" in line
    )
    return 1.0 - kernel / 100.0


def measure(sut: str, rate: float, duration: float, suite: str, workdir: Path) -> dict[str, float]:
    argv: str | list[str] = (
        "baseline" if sut == "baseline" else [sys.executable, str(run_loadgen.FASTSFU_SCRIPT)]
    )
    cfg = benchconfig.make_config(1, 50, suite, benchconfig.find_free_base_port(50))
    perf_data = workdir / f"{sut}.data"
    with run_loadgen.harness(cfg, argv) as h:
        h.step(rate, 1.0)  # warm up
        perf = subprocess.Popen(
            ["perf", "record", "-F", "4000", "-o", str(perf_data), "-p", str(h.sut.proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _, m = h.step(rate, duration)
        finally:
            perf.send_signal(2)
            perf.wait(timeout=60)
    share = user_share(perf_data)
    return {
        "received_fwd_pps": m["received_fwd_pps"],
        "loss": m["loss"],
        "p99_us": m["p99_us"],
        "cpu_us_per_pkt": m["cpu_us_per_pkt"],
        "user_share": round(share, 3),
        "user_us_per_pkt": round(share * m["cpu_us_per_pkt"], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--rate", type=float, default=50.0, help="per-publisher pps (50: 122.5k fwd pps in 1 x 50)"
    )
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--suite", default="cm")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        print("profile_sut: perf not found (apt-get install linux-perf)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            sut: measure(sut, args.rate, args.duration, args.suite, Path(tmp))
            for sut in ("baseline", "fastsfu")
        }
    for sut, r in results.items():
        print(json.dumps({"sut": sut, **r}))
    b, f = results["baseline"]["user_us_per_pkt"], results["fastsfu"]["user_us_per_pkt"]
    print(
        f"user-space us per forwarded packet: baseline {b}, fastsfu {f}, ratio {f / b:.2f}"
        if b
        else "no baseline"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
