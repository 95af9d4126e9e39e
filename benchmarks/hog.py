"""A CPU hog for the load benchmark's noisy rounds: a process pinned to one CPU that burns a given
fraction of it (busy, then sleep, in 10 ms periods) until told to stop.

    python benchmarks/hog.py --cpu 1 --fraction 0.3     # runs until SIGTERM or EOF on stdin
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

PERIOD_S = 0.010  # busy FRACTION of each 10 ms, sleep the rest


def burn(fraction: float, period: float = PERIOD_S, stop_after: float | None = None) -> None:
    """Busy-loop `fraction` of every period (by the process's own CPU clock, so time the scheduler
    gives to others does not count as burnt), sleep the rest; until SIGTERM or `stop_after` s."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    end = None if stop_after is None else time.monotonic() + stop_after
    parent = os.getppid()
    next_period = time.monotonic()
    # A new parent: the benchmark died without stopping us; stop too rather than burn on.
    while not stopping and (end is None or time.monotonic() < end) and os.getppid() == parent:
        cpu0 = time.process_time()
        while time.process_time() - cpu0 < fraction * period:
            pass
        next_period += period
        delay = next_period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_period = time.monotonic()  # fell behind (the CPU is contended): do not catch up


class Hog:
    """The hog as a child process pinned to `cpu`; `share()` is the CPU it used per wall second
    since it started (read from /proc/<pid>/stat)."""

    def __init__(self, cpu: int | None, fraction: float) -> None:
        self.cpu = cpu
        self.fraction = fraction
        self.proc: subprocess.Popen[bytes] | None = None
        self._t0 = 0.0

    def start(self) -> Hog:
        argv = [sys.executable, str(Path(__file__).resolve()), "--fraction", str(self.fraction)]
        if self.cpu is not None:
            argv += ["--cpu", str(self.cpu)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        self._t0 = time.monotonic()
        return self

    def cpu_seconds(self) -> float:
        """user + sys seconds of the hog so far (0 once it has been reaped)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float:
        """Fraction of one CPU the hog has used since start()."""
        wall = time.monotonic() - self._t0
        return self.cpu_seconds() / wall if wall > 0 else 0.0

    def stop(self, timeout: float = 5.0) -> float:
        """Stop the hog; returns its achieved share (measured just before stopping)."""
        if self.proc is None:
            return 0.0
        share = self.share()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return share

    def __enter__(self) -> Hog:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, required=True, help="share of the CPU to burn (0-1)")
    ap.add_argument("--cpu", type=int, help="CPU to pin to")
    ap.add_argument("--seconds", type=float, help="stop after this long [until SIGTERM]")
    args = ap.parse_args(argv)
    if not 0.0 < args.fraction <= 1.0:
        ap.error("--fraction must be in (0, 1]")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    burn(args.fraction, stop_after=args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
