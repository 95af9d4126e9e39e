"""Where a low-load wake-up's CPU goes: per-thread CPU, context switches and syscalls of each SUT
at a fixed load (24.5 k fwd pps by default: 1 x 50, 10 talking, SRTCP reports every 5 s).

For each SUT it runs one long fixed step and, inside it, two windows: the first reads every
thread's CPU time and voluntary/involuntary context switches from /proc (no tracer attached),
the second counts syscalls by name and context switches per thread with `perf stat` on kernel
tracepoints (exact counts, little overhead). Counts are per inbound datagram (RTP + RTCP the
generator sent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
from loadgen import run_loadgen  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_snapshot(pid: int) -> dict[str, tuple[str, int, int, int]]:
    """tid -> (name, run ns, voluntary, involuntary context switches)."""
    out: dict[str, tuple[str, int, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            base = f"/proc/{pid}/task/{tid}"
            name = Path(f"{base}/comm").read_text().strip()
            run_ns = int(Path(f"{base}/schedstat").read_text().split()[0])
            status = Path(f"{base}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        vol = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        inv = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        out[tid] = (name, run_ns, vol, inv)
    return out


def threads_over(pid: int, seconds: float) -> list[dict[str, Any]]:
    a = thread_snapshot(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = thread_snapshot(pid)
    wall = time.monotonic() - t0
    rows = []
    for tid, (name, run_ns, vol, inv) in b.items():
        if tid in a:
            rows.append(
                {
                    "tid": int(tid),
                    "name": name,
                    "cpu_ms_per_s": round((run_ns - a[tid][1]) / 1e6 / wall, 2),
                    "voluntary_per_s": round((vol - a[tid][2]) / wall, 1),
                    "involuntary_per_s": round((inv - a[tid][3]) / wall, 1),
                }
            )
    return sorted(rows, key=lambda r: -r["cpu_ms_per_s"])


SYSCALLS = (
    "epoll_wait", "epoll_pwait", "recvmmsg", "recvfrom", "recvmsg", "sendmmsg", "sendto", "sendmsg",
    "read", "write", "futex", "nanosleep", "sched_yield",
)  # fmt: skip


def syscalls_over(pid: int, seconds: float) -> dict[str, dict[str, int]]:
    """Per thread name: syscall counts (kernel tracepoints) and context switches over `seconds`,
    with `perf stat` (software events and tracepoints; no hardware counters needed)."""
    events = [f"syscalls:sys_enter_{name}" for name in SYSCALLS] + ["context-switches", "cpu-migrations"]
    proc = subprocess.run(
        [
            "perf",
            "stat",
            "-x,",
            "--per-thread",
            "-e",
            ",".join(events),
            "-p",
            str(pid),
            "--",
            "sleep",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    out: dict[str, dict[str, int]] = {}
    for line in proc.stderr.splitlines():
        f = line.split(",")
        # thread-tid,count,unit,event,...
        if len(f) < 4 or not f[1].strip().isdigit():
            continue
        thread, count, event = f[0].strip(), int(f[1]), f[3].strip().removeprefix("syscalls:sys_enter_")
        if count:
            out.setdefault(thread, {})[event] = count
    return out


def measure(sut: str, suite: str, speakers: int, seconds: float, rtcp_interval: float) -> dict[str, Any]:
    cfg = benchconfig.make_config(1, 50, suite, benchconfig.find_free_base_port(50))
    argv: str | list[str] = "baseline"
    if sut == "fastsfu":
        argv = [sys.executable, str(run_loadgen.FASTSFU_SCRIPT)]
    elif sut == "pion":
        argv = [str(BENCH_DIR / ".build" / "pion-forwarder")]
    result: dict[str, Any] = {"sut": sut, "suite": suite}
    with run_loadgen.harness(cfg, argv) as h:
        h.step(50, 1.0, speakers=speakers, rtcp_interval=rtcp_interval)  # warm up
        pid = h.sut.proc.pid

        def windows() -> None:
            time.sleep(0.5)
            result["threads"] = threads_over(pid, seconds)
            result["syscalls"] = syscalls_over(pid, seconds)

        th = threading.Thread(target=windows)
        th.start()
        _, m = h.step(50, 2 * seconds + 2.0, speakers=speakers, rtcp_interval=rtcp_interval)
        th.join()
    rtp_in = 50.0 * speakers
    rtcp_in = rtcp_interval and (40 * speakers + speakers * (speakers - 1)) / rtcp_interval
    inbound = rtp_in + rtcp_in
    result["inbound_per_s"] = inbound
    result["fwd_pps"] = m["received_fwd_pps"]
    result["cpu_us_per_pkt"] = m["cpu_us_per_pkt"]
    result["core_other_util"] = m.get("core_other_util")
    result["loss"] = m["loss"]
    result["per_inbound"] = {
        thread: {k: round(v / seconds / inbound, 3) for k, v in sorted(counts.items())}
        for thread, counts in result["syscalls"].items()
    }
    result["threads_per_inbound"] = [
        {
            "name": r["name"],
            "cpu_us": round(r["cpu_ms_per_s"] * 1000 / inbound, 1),
            "voluntary": round(r["voluntary_per_s"] / inbound, 3),
            "involuntary": round(r["involuntary_per_s"] / inbound, 3),
        }
        for r in result["threads"]
        if r["cpu_ms_per_s"] > 0.05
    ]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sut", action="append", choices=["baseline", "fastsfu", "pion"])
    ap.add_argument("--suite", default="cm")
    ap.add_argument("--speakers", type=int, default=10, help="talking members of 50 [10: 24.5 k fwd pps]")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each window [4]")
    ap.add_argument("--rtcp-interval", type=float, default=5.0)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        print("profile_wakeup: perf not found (apt-get install linux-perf)", file=sys.stderr)
        return 2
    for sut in args.sut or ["baseline", "fastsfu"]:
        r = measure(sut, args.suite, args.speakers, args.seconds, args.rtcp_interval)
        print(json.dumps({k: v for k, v in r.items() if k not in ("threads", "syscalls")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
