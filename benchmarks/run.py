"""Loopback load benchmark: each SUT (bare C baseline, fastsfu, a pion/srtp Go forwarder) on core 1,
native generator/sink on core 0.

Prints one JSON line per step, then markdown tables of ratios to the C baseline (docs/benchmarks.md).
Discord suites (`--suite discord`) run fastsfu's Discord UDP transport and compare it with fastsfu's
SRTP AEAD_AES_128_GCM case of the same run; the C baseline has no Discord mode and skips them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
from hog import Hog  # noqa: E402
from loadgen import native, run_loadgen  # noqa: E402

# fastsfu runs with Settings() defaults, as a user runs it. fastsfu_nolimit: the same with its
# RTP queue-age drop disabled, i.e. with the baseline's queueing semantics (unbounded socket
# queues); its zero-loss rate is the like-for-like ratio. pion: a Go forwarder on pion/srtp v2
# (benchmarks/pion/), LiveKit's building blocks. fastsfu_sized (--sized-tables): tables sized to
# the load, as this benchmark ran fastsfu before.
SUTS = ("baseline", "fastsfu", "fastsfu_nolimit", "pion")
# Run only when named: fastsfu with its datapath on the event loop instead of its own thread;
# fastsfu with its PlainTransport sockets left unconnected (every send carries its address).
# fastsfu_split2: the members split over two fastsfu worker processes joined by plain-RTP
# PipeTransports (sut_split.py), i.e. a room spilled over two workers; CPU summed over both.
# fastsfu_nopriority: the datapath thread at the event loop's priority (datapath_priority 0).
OPTIONAL_SUTS = (
    "fastsfu_sized",
    "fastsfu_inline",
    "fastsfu_unconnected",
    "fastsfu_observer",
    "fastsfu_split2",
    "fastsfu_nopriority",
)
# SUTs that have no Discord mode.
SRTP_ONLY = ("baseline", "pion", "fastsfu_split2")
# Worker processes of a SUT (1 unless named here).
SUT_WORKERS = {"fastsfu_split2": 2}
SPLIT_SCRIPT = BENCH_DIR / "sut_split.py"
PION_BUILD = BENCH_DIR / "pion" / "build.sh"
PION_BUILD_TIMEOUT_S = 300
P99_FLOOR_US = 5000.0  # docs/benchmarks.md#the-loopback-load-benchmark: the baseline's validity floor
SETTLE_TIMEOUT_S = 15.0
# The reference the Discord suites are compared with (same SUT, same run).
DISCORD_REFERENCE = benchconfig.SUITE_GCM
NO_DISCORD = "no Discord mode: skipped"
SUITE_GROUPS = {
    "both": ["cm", "gcm"],
    # The Discord modes plus their same-run SRTP reference.
    "discord": [DISCORD_REFERENCE, *benchconfig.DISCORD_SUITES],
    "all": ["cm", "gcm", *benchconfig.DISCORD_SUITES],
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    add = ap.add_argument
    add(
        "--sut",
        choices=[*SUTS, *OPTIONAL_SUTS, "all"],
        action="append",
        help="system under test, repeatable; all: " + ", ".join(SUTS) + " [all]",
    )
    add(
        "--sized-tables",
        action="store_true",
        help="also run fastsfu_sized: engine tables sized to the load instead of Settings() defaults",
    )
    add("--quick", action="store_true", help="CI mode: short steps, coarse search (about 20 s per SUT)")
    add(
        "--suite",
        action="append",
        help="cm, gcm, both (cm + gcm), discord (gcm + both Discord modes: DISCORD_AES256_GCM, "
        "DISCORD_XCHACHA20), all, or a suite name; repeatable [cm]",
    )
    add("--rooms", type=int, default=1, help="scenario A: rooms [1]")
    add("--size", type=int, default=50, help="scenario A: participants per room, all talking [50]")
    add(
        "--stage",
        metavar="SPEAKERS,LISTENERS",
        help="instead of scenario A: one room of SPEAKERS talking and LISTENERS listening (e.g. 4,400); "
        "only the fixed step at --fixed-rate (and, without --fixed-only, a search) with the speakers talking",
    )
    add("--payload", default="opus", help="'opus' (80-120 B, varying) or a fixed payload size [opus]")
    add("--fixed-rate", type=float, default=50.0, help="per-publisher pps of the fixed-load steps [50]")
    add(
        "--low-speakers",
        type=int,
        default=10,
        help="talking members per room in the low fixed step, the rest muted (10 of 50: 24.5 k fwd pps); "
        "0 skips that step [10]",
    )
    add(
        "--rtcp-interval",
        type=float,
        default=5.0,
        help="seconds between a participant's SRTCP receiver reports for each stream it hears "
        "(libwebrtc's audio interval); 0: no RTCP from the generator, the benchmark's old traffic [5]",
    )
    add("--fixed-duration", type=float, help="counted seconds of each fixed step [3, quick 1.5]")
    add("--duration", type=float, help="counted seconds per search step [3, quick 1.5]")
    add("--warmup", type=float, default=0.5, help="uncounted seconds before each window [0.5]")
    add("--drain", type=float, default=0.3, help="receive-only seconds after each window [0.3]")
    add("--start-rate", type=float, default=50.0, help="per-publisher pps of the first search step [50]")
    add("--step-factor", type=float, help="rate multiplier per search step [1.10, quick 1.25]")
    add("--max-steps", type=int, help="search steps before refinement [25, quick 5]")
    add("--refine", type=int, help="bisection steps between last good and first bad [0, quick 1]")
    add("--repeat", type=int, default=1, help="repeat the search, report the median [1]")
    add("--fixed-only", action="store_true", help="run only the fixed step (no search, no 50%% step)")
    add(
        "--fixed-repeat",
        type=int,
        default=1,
        help="run the fixed step n times; the one with the median CPU per packet is reported [1]",
    )
    add(
        "--discord-search",
        action="store_true",
        help="with --quick: step-search the Discord suites too (by default quick runs only their fixed step)",
    )
    add(
        "--hog",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="after the usual fixed rounds, --hog-repeat more with a busy process pinned to the SUT's CPU "
        "burning FRACTION of it (e.g. 0.3: busy 3 ms, sleep 7 ms), for every system alike; "
        "SRTP suites only; 0: none [0]",
    )
    add("--hog-repeat", type=int, default=1, help="interleaved fixed rounds with the hog [1]")
    add(
        "--join-storm",
        metavar="RATE,SECONDS",
        help="instead of the usual run: fastsfu's fixed step of SECONDS, without and with RATE joins per "
        "second into the room, --fixed-repeat rounds (SRTP suites). The joining clients run in their own "
        "process (storm_client.py) on the generator's CPU: WebRTC joins (ICE, DTLS, produce, consume the "
        "room) and Discord voice joins through fastsfu's gateway (IDENTIFY, IP discovery, SELECT_PROTOCOL, "
        "consume the room, SPEAKING, a few packets); per join, the SUT's loop time by kind",
    )
    add(
        "--datapath-priority",
        type=int,
        metavar="NICE",
        help="fastsfu's datapath thread's lead over its event loop in nice levels [the server's default]",
    )
    add("--join-hold", type=float, default=1.0, help="seconds a storm joiner stays before leaving [1]")
    add(
        "--discord-share",
        type=float,
        default=0.5,
        help="share of the storm's joins that are Discord voice joins, the rest WebRTC [0.5]",
    )
    add("--verify-every", type=int, default=16, help="verify every n-th SRTP tag per subscription [16]")
    add("--verify-all", action="store_true", help="verify every packet's SRTP tag")
    add(
        "--sink-sleep",
        action="store_true",
        help="sink sleeps in epoll_wait instead of busy polling (with --join-storm: instead of "
        "polling at SCHED_IDLE)",
    )
    add("--gen-cpu", type=int, default=run_loadgen.GEN_CPU, help="CPU of the generator and sink [0]")
    add("--sut-cpu", type=int, default=run_loadgen.SUT_CPU, help="CPU of the SUT [1]")
    add("--build-dir", type=Path, default=native.DEFAULT_BUILD_DIR, help="[benchmarks/.build]")
    add("--cc", help="C compiler [$CC or cc]")
    add("--json", type=Path, help="write the JSON summary here")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (
        ("fixed_duration", 3.0, 1.5),
        ("duration", 3.0, 1.5),
        ("step_factor", 1.10, 1.25),
        ("max_steps", 25, 5),
        ("refine", 0, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.step_factor <= 1.0:
        ap.error("--step-factor must be > 1")
    if args.fixed_repeat < 1:
        ap.error("--fixed-repeat must be >= 1")
    if not 0.0 <= args.hog <= 1.0 or args.hog_repeat < 1:
        ap.error("--hog must be in [0, 1] and --hog-repeat >= 1")
    if args.join_storm:
        try:
            rate, secs = (float(x) for x in args.join_storm.split(","))
        except ValueError:
            ap.error("--join-storm RATE,SECONDS")
        if rate <= 0 or secs <= 0:
            ap.error("--join-storm: RATE and SECONDS must be > 0")
        if not 0.0 <= args.discord_share <= 1.0:
            ap.error("--discord-share must be in [0, 1]")
        args.storm_rate, args.storm_seconds = rate, secs
        # The storm client shares the sink's CPU at nice 19: a sink polling at normal priority
        # left it nothing (joins timed out). The sink polls at SCHED_IDLE instead (it takes what
        # the client leaves; latency from the kernel's arrival stamps, which its delays do not
        # touch). A sleeping sink (--sink-sleep) would make every SUT send to it pay the sink's
        # wake-up, a loopback artefact that took about a fifth of the SUT's core at 122.5 k.
        # Both steps of the comparison use the same sink.
        args.sink_mode = 0 if args.sink_sleep else 2
    else:
        args.sink_mode = 0 if args.sink_sleep else 1
    args.payload_size = 0 if args.payload == "opus" else int(args.payload)
    args.talkers = 0
    if args.stage:
        try:
            speakers, listeners = (int(x) for x in args.stage.split(","))
        except ValueError:
            ap.error("--stage SPEAKERS,LISTENERS")
        if speakers < 1 or listeners < 1:
            ap.error("--stage: SPEAKERS and LISTENERS must be >= 1")
        args.rooms, args.size, args.talkers = 1, speakers + listeners, speakers
    suites: list[str] = []
    for s in args.suite or ["cm"]:
        for one in SUITE_GROUPS.get(s.lower(), [s]):
            try:
                full_name = benchconfig.normalize_suite(one)
            except ValueError as exc:
                ap.error(str(exc))
            if full_name not in suites:
                suites.append(full_name)
    args.suites = suites
    args.verify = 1 if args.verify_all else args.verify_every
    return args


# ---- one SUT ----


class Runner:
    """Runs the fixed step, the step search and the half-load step against one SUT."""

    def __init__(self, args: argparse.Namespace, sut: str, suite: str, h: run_loadgen.Harness) -> None:
        self.args = args
        self.sut = sut
        self.suite = suite
        self.h = h
        self.steps: list[dict[str, Any]] = []
        self._backlog = False
        self.fixed_only = fixed_only(args, suite, sut)

    def step(self, phase: str, rate: float, duration: float, speakers: int = 0) -> dict[str, Any]:
        a = self.args
        speakers = speakers or a.talkers  # a stage: only its speakers ever talk
        if self._backlog:
            # The previous step left packets queued in the SUT: start clean.
            self.h.settle(SETTLE_TIMEOUT_S)
        _, m = self.h.step(
            rate=rate,
            duration=duration,
            warmup=a.warmup,
            drain=a.drain,
            verify_every=a.verify,
            payload_size=a.payload_size,
            busy_poll=a.sink_mode,
            speakers=speakers,
            rtcp_interval=a.rtcp_interval,
        )
        self._backlog = m["loss"] > 0
        line = {"sut": self.sut, "suite": self.suite, "phase": phase, **m}
        self.steps.append(line)
        print(json.dumps(line), flush=True)
        log(
            f"{self.sut} {phase} rate {rate:.1f}: "
            f"{m['received_fwd_pps']:.0f}/{m['offered_fwd_pps']:.0f} fwd pps, loss {m['loss']}, "
            f"p50 {m['p50_us']} us, p99 {m['p99_us']} us (kernel-stamped {m.get('kp99_us')} us), "
            f"cpu {m['cpu_us_per_pkt']} us/pkt"
        )
        if m["sink_errors"]:
            # e.g. unknown_ssrc: the SUT did not use the config's consumer SSRCs.
            log(f"{self.sut}: sink saw unexpected packets: {m['sink_errors']}")
        if m.get("core_other_util", 0) > 0.05 or m["generator_limited"]:
            log(
                f"{self.sut}: noisy step (other load on the SUT core {m.get('core_other_util')}, "
                f"generator limited {m['generator_limited']})"
            )
        return m

    def search(self) -> dict[str, Any]:
        """Raise the rate by step_factor until loss, then bisect `refine` times."""
        a = self.args
        rate = a.start_rate
        good: dict[str, Any] | None = None
        bad_rate: float | None = None
        for _ in range(a.max_steps):
            m = self.step("search", rate, a.duration)
            if m["loss"] == 0:
                if good is None or rate > good["rate"]:
                    good = m
                if bad_rate is not None:
                    break
                rate *= a.step_factor
            else:
                bad_rate = rate if bad_rate is None else min(bad_rate, rate)
                if good is not None:
                    break
                rate /= a.step_factor  # the start rate already loses: walk down
        for _ in range(a.refine):
            if good is None or bad_rate is None:
                break
            mid = math.sqrt(good["rate"] * bad_rate)
            m = self.step("refine", mid, a.duration)
            if m["loss"] == 0:
                good = m
            else:
                bad_rate = mid
        return {"good": good, "first_loss_rate": bad_rate}

    def fixed(self, phase: str = "fixed", speakers: int = 0) -> dict[str, Any]:
        """One run of a fixed step (run_suite interleaves them across the systems)."""
        a = self.args
        return self.step(phase, a.fixed_rate, a.fixed_duration, speakers)

    def pick_fixed(self, phase: str) -> dict[str, Any] | None:
        """Of the runs of a fixed step, the one with the median CPU per packet stands for all."""
        runs = [s for s in self.steps if s["phase"] == phase]
        ranked = sorted(runs, key=lambda m: m.get("cpu_us_per_pkt") or math.inf)
        return ranked[(len(ranked) - 1) // 2] if ranked else None

    def _fixed_repeats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase in FIXED_PHASES:
            runs = [s for s in self.steps if s["phase"] == phase]
            if len(runs) >= 2:
                out[f"{phase}_cpu_us_per_pkt_all"] = [s.get("cpu_us_per_pkt") for s in runs]
                out[f"{phase}_loss_all"] = [s["loss"] for s in runs]
        return out

    def run(self) -> dict[str, Any]:
        """The step search and the half-load step, after the fixed steps; returns the result."""
        a = self.args
        base: dict[str, Any] = {p: self.pick_fixed(p) for p in FIXED_PHASES}
        if self.fixed_only:
            return {**base, "fixed_only": True, **self._fixed_repeats(), "steps": self.steps}
        searches = [self.search() for _ in range(a.repeat)]
        goods = [s["good"] for s in searches if s["good"] is not None]
        zero_loss = statistics.median([g["offered_fwd_pps"] for g in goods]) if goods else 0.0
        best_rate = statistics.median([g["rate"] for g in goods]) if goods else 0.0
        p99_ok = [
            s["offered_fwd_pps"]
            for s in self.steps
            if s["phase"] in ("search", "refine") and s["loss"] == 0 and (s["p99_us"] or 0) <= P99_FLOOR_US
        ]
        half = self.step("half", best_rate / 2, a.duration) if best_rate > 0 else None
        others = [s.get("core_other_util") or 0.0 for s in self.steps]
        return {
            **base,
            **self._fixed_repeats(),
            "zero_loss_fwd_pps": zero_loss,
            "zero_loss_rate": best_rate,
            "zero_loss_p99_5ms_fwd_pps": max(p99_ok) if p99_ok else 0.0,
            "first_loss_rates": [s["first_loss_rate"] for s in searches],
            # No step lost packets: the SUT's knee lies above the highest rate tried.
            "zero_loss_is_lower_bound": any(s["first_loss_rate"] is None for s in searches),
            "max_core_other_util": max(others) if others else 0.0,
            "half": half,
            "steps": self.steps,
        }


def fixed_only(args: argparse.Namespace, suite: str, sut: str = "fastsfu") -> bool:
    """Only the fixed steps: --fixed-only; in --quick, a Discord suite (one step per mode keeps CI
    short) and the peers, whose fixed-load rows are what the peer table shows."""
    if args.fixed_only:
        return True
    if args.quick and benchconfig.is_discord(suite) and not args.discord_search:
        return True
    return bool(args.quick and sut in ("pion", "fastsfu_sized"))


def sut_argv(sut: str, args: argparse.Namespace, libs: dict[str, Path]) -> list[str]:
    """argv without the config path (the harness appends it)."""
    if sut == "baseline":
        return [
            sys.executable,
            str(run_loadgen.BASELINE_SCRIPT),
            "--cpu",
            str(args.sut_cpu),
            "--lib",
            str(libs["forwarder"]),
        ]
    if sut == "pion":
        # Pinned by the harness (taskset), so the Go runtime sees one CPU: GOMAXPROCS=1.
        return [str(libs["pion"])]
    if sut == "fastsfu_split2":
        # Both workers pinned to the SUT's CPU: the cost is summed, the capacity not shown.
        return [sys.executable, str(SPLIT_SCRIPT), "--cpu", str(args.sut_cpu)]
    argv = [sys.executable, str(run_loadgen.FASTSFU_SCRIPT), "--cpu", str(args.sut_cpu)]
    if sut == "fastsfu_nolimit":
        argv += ["--max-queue-age-ms", "0"]
    if sut == "fastsfu_inline":
        argv += ["--inline"]
    if sut == "fastsfu_unconnected":
        argv += ["--unconnected"]
    if sut == "fastsfu_observer":
        argv += ["--observer"]
    if sut == "fastsfu_sized":
        argv += ["--sized-tables"]
    if sut == "fastsfu_nopriority":
        argv += ["--datapath-priority", "0"]
    elif args.datapath_priority is not None:
        argv += ["--datapath-priority", str(args.datapath_priority)]
    return argv


def build_pion(build_dir: Path) -> Path:
    """Build the pion forwarder with benchmarks/pion/build.sh (Go and pion from Debian packages)."""
    out = build_dir / "pion-forwarder"
    try:
        proc = subprocess.run(
            ["bash", str(PION_BUILD), str(out)],
            capture_output=True,
            text=True,
            timeout=PION_BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise native.BuildError(f"{PION_BUILD.name}: {exc}") from exc
    if proc.returncode != 0:
        raise native.BuildError(f"{PION_BUILD.name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return out


HARNESS_ERRORS = (run_loadgen.HarnessError, OSError, ValueError)
HOG_SUFFIX = "_hog"
FIXED_PHASES = ("fixed", "fixed_low", "fixed" + HOG_SUFFIX, "fixed_low" + HOG_SUFFIX)
START_ATTEMPTS = 2


def fixed_phases(args: argparse.Namespace, suite: str) -> list[tuple[str, int]]:
    """(phase, talking members per room): the low load (a few talking, the rest muted), then all.
    Quick Discord runs skip the low step: the peer table, which shows it, is SRTP only."""
    if args.talkers:
        return [("fixed", args.talkers)]  # a stage has one load: its speakers
    low = args.low_speakers > 0 and not (args.quick and benchconfig.is_discord(suite))
    return [("fixed_low", args.low_speakers)] * low + [("fixed", 0)]


def run_suite(
    suite: str, suts: list[str], args: argparse.Namespace, libs: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """Every system of one suite, all started at once (each on its own ports, pinned to the SUT core):
    the fixed steps interleave the systems round by round, so a noisy moment on the shared machine
    hits them alike; then each system's step search runs in turn."""
    n = args.rooms * args.size
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    harnesses: dict[str, run_loadgen.Harness] = {}
    started: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for sut in suts:
            log(f"starting {sut} ({suite}, {args.rooms} x {args.size})")
            h = None
            for attempt in range(START_ATTEMPTS):
                try:
                    # Fresh ports for each SUT (the others hold theirs). Other programs on the
                    # machine may bind a port between the check and the SUT's bind: then retry
                    # elsewhere in the range.
                    start = 20000 if attempt == 0 else random.randrange(20000, 30000, 500)
                    base_port = benchconfig.find_free_base_port(n, start=start)
                    cfg = benchconfig.make_config(
                        args.rooms, args.size, suite, base_port, talkers=args.talkers
                    )
                    h = stack.enter_context(
                        run_loadgen.harness(
                            cfg,
                            sut_argv(sut, args, libs),
                            args.build_dir / f"config-{sut}-{suite}.json",
                            gen_cpu=args.gen_cpu,
                            sut_cpu=args.sut_cpu,
                            lib_path=libs["loadgen"],
                            workers=SUT_WORKERS.get(sut, 1),
                        )
                    )
                    break
                except (*HARNESS_ERRORS, RuntimeError) as exc:
                    log(f"{sut} ({suite}) failed to start (attempt {attempt + 1}): {exc}")
                    results[sut] = {"error": str(exc)}
            if h is None:
                continue
            results.pop(sut, None)
            harnesses[sut] = h
            runners[sut] = Runner(args, sut, suite, h)
            started[sut] = time.monotonic()
        for _ in range(args.fixed_repeat):
            for phase, speakers in fixed_phases(args, suite):
                for sut, runner in list(runners.items()):
                    try:
                        runner.fixed(phase, speakers)
                    except HARNESS_ERRORS as exc:
                        log(f"{sut} ({suite}) failed: {exc}")
                        results[sut] = {"error": str(exc)}
                        del runners[sut]
        hog_rounds(args, suite, runners, results)
        for sut, runner in list(runners.items()):
            try:
                results[sut] = runner.run()
            except HARNESS_ERRORS as exc:
                log(f"{sut} ({suite}) failed: {exc}")
                results[sut] = {"error": str(exc)}
                del runners[sut]
    # The harnesses have stopped their SUTs: each printed its final counters.
    for sut in runners:
        result, h = results[sut], harnesses[sut]
        result["sut_final"] = h.final
        # Throughput per core (docs/benchmarks.md#targets) = 1e6 / CPU us per fwd packet.
        for phase in ("fixed", "fixed_low", "half"):
            cpu = _get(result, phase, "cpu_us_per_pkt")
            result[f"{phase}_pps_per_core"] = round(1e6 / cpu) if cpu else None
        result["wall_s"] = round(time.monotonic() - started[sut], 1)
        log(f"{sut} done; final counters {h.final}")
        if not h.final:
            results[sut] = {"error": f"{sut} printed no final JSON line", **result}
    return results


def hog_rounds(
    args: argparse.Namespace, suite: str, runners: dict[str, Runner], results: dict[str, dict[str, Any]]
) -> None:
    """The fixed steps again, interleaved, with the hog pinned to the SUT's CPU (SRTP suites). Each
    step records the share of a CPU the hog actually took during it. Quick runs leave out
    fastsfu_nolimit (a variant of fastsfu) to keep CI short."""
    if args.hog <= 0 or benchconfig.is_discord(suite):
        return
    for _ in range(args.hog_repeat):
        with Hog(args.sut_cpu, args.hog) as hog:
            for phase, speakers in fixed_phases(args, suite):
                for sut, runner in list(runners.items()):
                    if args.quick and sut == "fastsfu_nolimit":
                        continue
                    cpu0, t0 = hog.cpu_seconds(), time.monotonic()
                    try:
                        runner.fixed(phase + HOG_SUFFIX, speakers)
                    except HARNESS_ERRORS as exc:
                        log(f"{sut} ({suite}) failed: {exc}")
                        results[sut] = {"error": str(exc)}
                        del runners[sut]
                        continue
                    share = (hog.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    runner.steps[-1]["hog_share"] = round(share, 3)
                    log(f"{sut} {phase}{HOG_SUFFIX}: hog took {share:.2f} of the SUT's CPU")


STORM_CLIENT = BENCH_DIR / "storm_client.py"
# Beyond the last join's start: its setup (storm_client.JOIN_TIMEOUT_S at most), its hold, its leave.
STORM_END_SLACK_S = 30.0


def run_storm(suite: str, args: argparse.Namespace, libs: dict[str, Path]) -> dict[str, Any]:
    """fastsfu's fixed step, alternately without and with a join storm, each step as long as the
    storm. The SUT serves the joins (sut_fastsfu.py --storm-control: its Discord gateway, and a
    control socket for the WebRTC joins' server steps); the joining clients run in their own process
    (storm_client.py) pinned to the generator's CPU, told to start as the storm step starts (they
    wait out its warm-up first)."""
    n = args.rooms * args.size
    cfg = benchconfig.make_config(args.rooms, args.size, suite, benchconfig.find_free_base_port(n))
    with tempfile.TemporaryDirectory(prefix="fastsfu-storm-") as tmp:
        control = str(Path(tmp) / "control.sock")  # short: a UNIX socket path has 107 bytes at most
        argv = [*sut_argv("fastsfu", args, libs), "--storm-control", control]
        # In a deployment the joiners are remote. Here they share the generator's CPU, at the
        # lowest priority: they take only what the generator and the busy-polling sink leave, so
        # their ECDHE and JSON do not show up as latency of the room's packets.
        client_argv = [
            "nice",
            "-n",
            "19",
            sys.executable,
            str(STORM_CLIENT),
            "--control",
            control,
            "--rate",
            str(args.storm_rate),
            "--seconds",
            str(args.storm_seconds),
            "--hold",
            str(args.join_hold),
            "--delay",
            str(args.warmup),
            "--discord-share",
            str(args.discord_share),
        ]
        with (
            run_loadgen.harness(
                cfg,
                argv,
                args.build_dir / f"config-storm-{suite}.json",
                gen_cpu=args.gen_cpu,
                sut_cpu=args.sut_cpu,
                lib_path=libs["loadgen"],
            ) as h,
            run_loadgen.SutProcess(client_argv, cpu=args.gen_cpu) as client,
        ):
            runner = Runner(args, "fastsfu", suite, h)
            for _ in range(args.fixed_repeat):
                runner.step("fixed", args.fixed_rate, args.storm_seconds)
                client.send_line("start")
                runner.step("fixed_storm", args.fixed_rate, args.storm_seconds)
                # The last joiners leave a hold after the window: not into the next step.
                done = client.wait_line("STORM", args.join_hold + STORM_END_SLACK_S)
                log(f"storm: {done[:300]}")
            client_final = client.stop()
    return {
        "steps": runner.steps,
        "join_storms": h.final.get("join_storms", []),
        "sut_final": h.final,
        "client_final": client_final,
    }


def storm_report(summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    a = summary["args"]
    for suite, res in summary.get("join_storm", {}).items():
        lines += [
            f"### Join storm (RATE,SECONDS {a['join_storm']}; hold {a['join_hold']} s; "
            f"Discord share {a['discord_share']}), fastsfu, {suite}, {summary['scenario']}",
            "",
            "| step | fwd pps | loss | p50 us | p99 us | p99.9 us | kernel-stamped p99 us | p99.9 us "
            "| CPU us/pkt |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in res["steps"]:
            lines.append(
                f"| {s['phase']} | {_fmt(s['offered_fwd_pps'])} | {s['loss']} | {_fmt(s['p50_us'])} "
                f"| {_fmt(s['p99_us'])} | {_fmt(s.get('p999_us'))} | {_fmt(s.get('kp99_us'))} "
                f"| {_fmt(s.get('kp999_us'))} | {_fmt(s.get('cpu_us_per_pkt'))} |"
            )
        lines += [
            "",
            "| storm | joins | failed | loop ms p50 | p99 | max | loop CPU ms p50 | p99 | max "
            "| join setup ms p50 | p99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, st in enumerate(res["join_storms"]):
            rows = [(f"{i + 1}", st), *((f"{i + 1} {k}", v) for k, v in st.get("kinds", {}).items())]
            for name, row in rows:
                lp, cp, su = row["loop_ms"], row.get("loop_cpu_ms", {}), row["setup_ms"]
                lines.append(
                    f"| {name} | {row['joins']} | {row['failures']} | {_fmt(lp['p50'])} | {_fmt(lp['p99'])} "
                    f"| {_fmt(lp['max'])} | {_fmt(cp.get('p50'))} | {_fmt(cp.get('p99'))} "
                    f"| {_fmt(cp.get('max'))} "
                    f"| {_fmt(su['p50'])} | {_fmt(su['p99'])} |"
                )
        lines += [
            "",
            "Loop ms: per join, the SUT's event-loop time of its server work. WebRTC: create, connect, "
            "produce, consume the room, close, and its STUN/DTLS datagram callbacks. Discord: its gateway "
            "connection's frames (IDENTIFY, SELECT_PROTOCOL, SPEAKING, the leave), the slices of its room "
            "join, writing its messages to its WebSocket, its IP discovery. Not counted: aiohttp's upgrade "
            "and frame parsing, the WebRTC control channel's JSON. The clients run in their own process on "
            "the generator's CPU. Loop CPU ms: the loop thread's CPU time over the same spans (the wall "
            "spans also hold waits for the core and for the GIL). Setup: the client's wall time from its "
            "first request to consuming the room (WebRTC: the produce answer; Discord: SPEAKING for every "
            "member). Each joiner's consumers add the room's streams to the SUT's work while it stays, "
            "which the fwd pps column (the room's own) leaves out. Kernel-stamped: the same packets' "
            "latency to the kernel's arrival stamp in the sink's socket (taken on loopback as the SUT's "
            "send enqueues the datagram), without the sink's own delay on the CPU it shares with the "
            "storm client.",
            "",
        ]
    return lines


# ---- report ----


def _get(res: dict[str, Any] | None, *path: str) -> float | None:
    cur: Any = res
    for key in path:
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return float(cur)


METRICS: list[tuple[str, tuple[str, ...]]] = [
    ("zero-loss fwd pps (step search)", ("zero_loss_fwd_pps",)),
    ("zero-loss fwd pps with p99 <= 5 ms", ("zero_loss_p99_5ms_fwd_pps",)),
    ("low fixed (few talking): received fwd pps", ("fixed_low", "received_fwd_pps")),
    ("low fixed: loss", ("fixed_low", "loss")),
    ("low fixed: SUT CPU us/pkt", ("fixed_low", "cpu_us_per_pkt")),
    ("fixed: received fwd pps", ("fixed", "received_fwd_pps")),
    ("fixed: loss", ("fixed", "loss")),
    ("fixed: p50 latency (us)", ("fixed", "p50_us")),
    ("fixed: p99 latency (us)", ("fixed", "p99_us")),
    ("fixed: p99.9 latency (us)", ("fixed", "p999_us")),
    ("fixed: SUT CPU us/pkt", ("fixed", "cpu_us_per_pkt")),
    ("fixed: fwd pps per core (1e6 / CPU us/pkt)", ("fixed_pps_per_core",)),
    ("50% load: SUT CPU us/pkt", ("half", "cpu_us_per_pkt")),
    ("50% load: fwd pps per core", ("half_pps_per_core",)),
    ("50% load: user us/pkt (tick-sampled)", ("half", "cpu_user_us_per_pkt")),
    ("50% load: sys us/pkt (tick-sampled)", ("half", "cpu_sys_us_per_pkt")),
    ("50% load: p50 latency (us)", ("half", "p50_us")),
    ("sink: tags verified (fixed)", ("fixed", "verified")),
    ("sink: tag verify failures (fixed)", ("fixed", "verify_failures")),
    ("SUT decrypt failures (whole run)", ("sut_final", "decrypt_failures")),
    ("SUT send failures (whole run)", ("sut_final", "send_failures")),
    ("generator RTCP receiver reports sent (fixed)", ("fixed", "rtcp_sent")),
    ("SUT RTCP packets taken in (whole run)", ("sut_final", "rtcp_received")),
    ("sent packet size, bytes (avg)", ("fixed", "wire_bytes_avg")),
    ("max other load on the SUT core (0-1)", ("max_core_other_util",)),
]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) >= 100:
        return f"{int(v):,}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or not den else f"{num / den:.2f}"


# Rows of the Discord-vs-SRTP comparison: (label, path into a SUT's result).
DISCORD_METRICS: list[tuple[str, tuple[str, ...]]] = [
    ("zero-loss fwd pps (step search)", ("zero_loss_fwd_pps",)),
    ("zero-loss fwd pps with p99 <= 5 ms", ("zero_loss_p99_5ms_fwd_pps",)),
    ("fixed: received fwd pps", ("fixed", "received_fwd_pps")),
    ("fixed: loss", ("fixed", "loss")),
    ("fixed: SUT CPU us/pkt", ("fixed", "cpu_us_per_pkt")),
    ("fixed: fwd pps per core (1e6 / CPU us/pkt)", ("fixed_pps_per_core",)),
    ("50% load: SUT CPU us/pkt", ("half", "cpu_us_per_pkt")),
    ("50% load: fwd pps per core", ("half_pps_per_core",)),
    ("fixed: p50 latency (us)", ("fixed", "p50_us")),
    ("fixed: p99 latency (us)", ("fixed", "p99_us")),
    ("sink: tags verified (fixed)", ("fixed", "verified")),
    ("sink: tag verify failures (fixed)", ("fixed", "verify_failures")),
    ("SUT decrypt failures (whole run)", ("sut_final", "decrypt_failures")),
    ("sent packet size, bytes (avg)", ("fixed", "wire_bytes_avg")),
]


def discord_report(summary: dict[str, Any]) -> list[str]:
    """fastsfu's Discord UDP transport against its own SRTP GCM case, per SUT, same run."""
    results = summary["results"]
    ref_suite = DISCORD_REFERENCE
    modes = [s for s in benchconfig.DISCORD_SUITES if s in results]
    if not modes:
        return []
    lines: list[str] = []
    out: dict[str, Any] = {}
    for sut in ("fastsfu", "fastsfu_nolimit"):
        ref = results.get(ref_suite, {}).get(sut)
        per_mode = [results[m].get(sut) for m in modes]
        if all(r is None for r in per_mode):
            continue
        title = "fastsfu" if sut == "fastsfu" else "fastsfu, no queue-age limit"
        head = " | ".join(f"Discord {m.removeprefix('DISCORD_')} | ratio" for m in modes)
        lines += [
            f"### Discord UDP transport vs SRTP ({title}), {summary['scenario']}",
            "",
            f"| metric | SRTP {ref_suite} | {head} |",
            "|---|---|" + "---|---|" * len(modes),
        ]
        rows: dict[str, Any] = {}
        for label, path in DISCORD_METRICS:
            r = _get(ref, *path)
            vals = [_get(res, *path) for res in per_mode]
            cells = " | ".join(f"{_fmt(v)} | {_ratio(v, r)}" for v in vals)
            lines.append(f"| {label} | {_fmt(r)} | {cells} |")
            row: dict[str, float | None] = {ref_suite: r}
            for m, v in zip(modes, vals, strict=True):
                row[m] = v
                row[f"{m}/{ref_suite}"] = v / r if v is not None and r else None
            rows[label] = row
        out[sut] = rows
        if ref is None:
            lines.append(f"\nNo {ref_suite} run for {sut} in this run: no ratios (add `--suite gcm`).")
        lines.append("")
    if out:
        lines.append(
            "Ratios are Discord / SRTP GCM of the same SUT in the same run. The Discord sink opens every "
            "packet (its send stamp is encrypted), the SRTP sink verifies a sample."
        )
        lines.append("")
    summary["discord_vs_srtp"] = out
    return lines


PEER_LABELS = {
    "baseline": "C baseline (libsrtp)",
    "fastsfu": "fastsfu (`fastsfu serve`'s defaults)",
    "fastsfu_nopriority": "fastsfu, datapath at the loop's priority",
    "fastsfu_nolimit": "fastsfu, no queue-age limit",
    "fastsfu_sized": "fastsfu, tables sized to the load",
    "fastsfu_inline": "fastsfu, datapath on the event loop",
    "fastsfu_unconnected": "fastsfu, unconnected sockets",
    "fastsfu_observer": "fastsfu, an active-speaker observer per room",
    "fastsfu_split2": "fastsfu, 2 workers joined by pipes",
    "pion": "pion/srtp v2 Go forwarder",
}


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min–max) of per-round values, or the one value."""
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def split_report(summary: dict[str, Any]) -> list[str]:
    """fastsfu split over two worker processes (fastsfu_split2) against one worker, same run: CPU per
    forwarded packet summed over the workers, its ratio to the single worker's round by round, each
    worker's share, and the extra CPU per packet crossing a pipe."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    a = summary["args"]
    # With members alternating between 2 workers, each talking producer crosses the pipe once and
    # reaches size - 1 receivers: one crossing per size - 1 forwarded packets.
    fwd_per_crossing = a["size"] - 1
    for suite, per_sut in summary["results"].items():
        split = per_sut.get("fastsfu_split2")
        if not split or not split.get("steps"):
            continue
        single, base = per_sut.get("fastsfu"), per_sut.get("baseline")
        lines += [
            f"### fastsfu on 2 workers joined by pipes vs 1 worker, {suite}, {summary['scenario']}",
            "",
            "| step | fwd pps | 1 worker: CPU us/pkt | 2 workers: CPU us/pkt (sum) | 2 / 1 per round "
            "| C baseline | 1 / baseline | 2 / baseline | worker shares | imbalance per round "
            "| extra us per pipe crossing | loss 1 / 2 | p99 us 1 / 2 | other load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows: dict[str, Any] = {}
        for phase in FIXED_PHASES:
            runs = [x for x in split["steps"] if x["phase"] == phase]
            if not runs:
                continue
            ones = [x for x in (single or {}).get("steps", []) if x["phase"] == phase]
            bases = [x for x in (base or {}).get("steps", []) if x["phase"] == phase]

            def cpus(steps: list[dict[str, Any]]) -> list[float]:
                return [x["cpu_us_per_pkt"] for x in steps if x.get("cpu_us_per_pkt")]

            c2, c1, cb = cpus(runs), cpus(ones), cpus(bases)
            vs_one = round_ratios(split, single, phase)
            shares = [x["worker_cpu_share"] for x in runs if all(x.get("worker_cpu_share") or [None])]
            imbalance = [abs(sh[0] - sh[1]) / max(sh) for sh in shares if len(sh) == 2 and max(sh)]
            extra = [(x2 - x1) * fwd_per_crossing for x2, x1 in zip(c2, c1, strict=False)]
            others = [x.get("core_other_util") or 0.0 for x in runs + ones + bases]
            med = statistics.median
            row = {
                "offered_fwd_pps": runs[0]["offered_fwd_pps"],
                "one_worker_cpu_us_per_pkt": c1,
                "two_workers_cpu_us_per_pkt": c2,
                "baseline_cpu_us_per_pkt": cb,
                "two_over_one": vs_one,
                "one_over_baseline": round_ratios(single, base, phase),
                "two_over_baseline": round_ratios(split, base, phase),
                "worker_shares": shares,
                "imbalance": imbalance,
                "extra_us_per_crossing": extra,
                "loss_one": [x["loss"] for x in ones],
                "loss_two": [x["loss"] for x in runs],
                "p99_one": [x["p99_us"] for x in ones],
                "p99_two": [x["p99_us"] for x in runs],
                "other_load": others,
            }
            rows[phase] = row
            share_txt = (
                " / ".join(f"{med([sh[i] for sh in shares]):.3f}" for i in range(len(shares[0])))
                if shares
                else "-"
            )
            lines.append(
                f"| {phase} | {_fmt(row['offered_fwd_pps'])} | {_spread(c1)} | {_spread(c2)} "
                f"| {_spread(vs_one)} | {_spread(cb)} | {_spread(row['one_over_baseline'])} "
                f"| {_spread(row['two_over_baseline'])} "
                f"| {share_txt} | {_spread(imbalance)} | {_spread(extra)} "
                f"| {max(row['loss_one'], default='-')} / {max(row['loss_two'])} "
                f"| {_fmt(med([v or 0.0 for v in row['p99_one']]) if ones else None)} "
                f"/ {_fmt(med([v or 0.0 for v in row['p99_two']]))} "
                f"| {min(others):.2f}–{max(others):.2f} |"
            )
        out[suite] = rows
        lines += [
            "",
            "CPU us/pkt: user + sys of the SUT's processes (both workers summed for 2) per forwarded "
            "packet, median of the rounds (range); ratios: round by round (each round runs every system "
            "once, back to back), median (range). Worker shares: each worker's part of the two workers' "
            "CPU (median); imbalance: |a - b| / max(a, b) per round (target <= 0.15). Extra us per pipe "
            f"crossing: (2 workers - 1 worker) x {fwd_per_crossing} forwarded packets per crossing. "
            "Loss: the largest of the rounds; other load: the share of the SUT's core taken by "
            "anything else during the steps (min–max).",
            "",
        ]
    summary["split"] = out
    return lines


def round_ratios(res: dict[str, Any] | None, base: dict[str, Any] | None, phase: str) -> list[float]:
    """CPU per packet over the baseline's in each round of a fixed step (rounds interleave the systems)."""
    if not res or not base:
        return []
    mine = [s.get("cpu_us_per_pkt") for s in res.get("steps", []) if s["phase"] == phase]
    theirs = [s.get("cpu_us_per_pkt") for s in base.get("steps", []) if s["phase"] == phase]
    return [m / t for m, t in zip(mine, theirs, strict=False) if m and t]


def peers_report(summary: dict[str, Any]) -> list[str]:
    """One table per SRTP suite: every system at both fixed loads, with ratios to the C baseline."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    for suite, per_sut in summary["results"].items():
        if benchconfig.is_discord(suite):
            continue
        base = per_sut.get("baseline")
        loads = []
        for phase in ("fixed_low", "fixed"):
            offered = [_get(r, phase, "offered_fwd_pps") for r in per_sut.values()]
            pps = next((v for v in offered if v), None)
            if pps:
                loads.append((phase, pps))
        if not loads:
            continue
        head = " | ".join(f"{pps / 1000:.1f} k: CPU us/pkt | ratio | loss | p99 us" for _, pps in loads)
        lines += [
            f"### Peers at fixed loads, {suite}, {summary['scenario']}",
            "",
            f"| system | {head} |",
            "|---|" + "---|---|---|---|" * len(loads),
        ]
        rows: dict[str, Any] = {}
        for sut in (*SUTS, *OPTIONAL_SUTS):
            res = per_sut.get(sut)
            if res is None or "fixed" not in res:
                continue
            cells = []
            row: dict[str, Any] = {}
            for phase, _ in loads:
                cpu, b = _get(res, phase, "cpu_us_per_pkt"), _get(base, phase, "cpu_us_per_pkt")
                loss, p99 = _get(res, phase, "loss"), _get(res, phase, "p99_us")
                rounds = round_ratios(res, base, phase)
                spread = f" ({min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else ""
                cells.append(f"{_fmt(cpu)} | {_ratio(cpu, b)}{spread} | {_fmt(loss)} | {_fmt(p99)}")
                ratio = cpu / b if cpu and b else None
                row[phase] = {
                    "cpu_us_per_pkt": cpu,
                    "ratio": ratio,
                    "round_ratios": rounds,
                    "loss": loss,
                    "p99_us": p99,
                }
            rows[sut] = row
            lines.append(f"| {PEER_LABELS.get(sut, sut)} | {' | '.join(cells)} |")
        out[suite] = rows
        lines += [
            "",
            "CPU us/pkt: the SUT process's user + sys time per forwarded packet (with --fixed-repeat, "
            "the run with the median CPU); ratio: to the C baseline of the same run, and in brackets the "
            "range of the per-round ratios (each round runs every system once, back to back). The low "
            "load has the first members of the room talking, the rest muted.",
            "",
        ]
    summary["peers"] = out
    return lines


def hog_report(summary: dict[str, Any]) -> list[str]:
    """Per SRTP suite, every system at both fixed loads with the hog on the SUT's CPU: CPU per packet
    and its ratio to the baseline (median run), the largest loss and p99 of any hog round."""
    lines: list[str] = []
    out: dict[str, Any] = {}
    frac = summary["args"].get("hog") or 0.0
    for suite, per_sut in summary["results"].items():
        if benchconfig.is_discord(suite) or frac <= 0:
            continue
        base = per_sut.get("baseline")
        phases = [
            p for p in ("fixed_low", "fixed") if any((r or {}).get(p + HOG_SUFFIX) for r in per_sut.values())
        ]
        if not phases:
            continue
        head = " | ".join(
            f"{p} + hog: CPU us/pkt | ratio | loss (max) | p99 us (max) | hog share" for p in phases
        )
        lines += [
            f"### With a CPU hog ({frac:.0%} of the SUT's core asked), {suite}, {summary['scenario']}",
            "",
            f"| system | {head} |",
            "|---|" + "---|---|---|---|---|" * len(phases),
        ]
        rows: dict[str, Any] = {}
        for sut in (*SUTS, *OPTIONAL_SUTS):
            res = per_sut.get(sut)
            # Quick runs leave fastsfu_nolimit out of the hog rounds: no row.
            if not res or not any(s["phase"].endswith(HOG_SUFFIX) for s in res.get("steps", [])):
                continue
            cells, row = [], {}
            for p in phases:
                ph = p + HOG_SUFFIX
                runs = [s for s in res["steps"] if s["phase"] == ph]
                if not runs:
                    cells.append("- | - | - | - | -")
                    continue
                cpu, b = _get(res, ph, "cpu_us_per_pkt"), _get(base, ph, "cpu_us_per_pkt")
                loss = max(s["loss"] for s in runs)
                p99 = max((s["p99_us"] or 0.0) for s in runs)
                shares = [s.get("hog_share") or 0.0 for s in runs]
                cells.append(
                    f"{_fmt(cpu)} | {_ratio(cpu, b)} | {_fmt(loss)} | {_fmt(p99)} | {min(shares):.2f}"
                    + (f"–{max(shares):.2f}" if len(shares) > 1 else "")
                )
                row[p] = {
                    "cpu_us_per_pkt": cpu,
                    "ratio": cpu / b if cpu and b else None,
                    "round_ratios": round_ratios(res, base, ph),
                    "loss_all": [s["loss"] for s in runs],
                    "p99_us_all": [s["p99_us"] for s in runs],
                    "hog_share_all": shares,
                }
            rows[sut] = row
            lines.append(f"| {PEER_LABELS.get(sut, sut)} | {' | '.join(cells)} |")
        out[suite] = rows
        lines += [
            "",
            "Hog: a process pinned to the SUT's core busy for a share of every 10 ms (benchmarks/hog.py); "
            "hog share: the CPU it took during each system's step (the scheduler splits the core, so a "
            "SUT that needs more than the rest gets less). Loss and p99: the largest over the hog rounds.",
            "",
        ]
    summary["hog"] = out
    return lines


def report(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for suite, per_sut in summary["results"].items():
        base, fast, nolimit = per_sut.get("baseline"), per_sut.get("fastsfu"), per_sut.get("fastsfu_nolimit")
        if benchconfig.is_discord(suite):
            lines += [
                f"### {suite} (Discord UDP transport), {summary['scenario']}",
                "",
                "| metric | fastsfu | fastsfu, no queue-age limit |",
                "|---|---|---|",
            ]
            for label, path in METRICS:
                lines.append(f"| {label} | {_fmt(_get(fast, *path))} | {_fmt(_get(nolimit, *path))} |")
            lines += _notes(per_sut)
            lines.append("")
            continue
        # The peers (pion, fastsfu_sized) get their own columns when they ran.
        extra = [s for s in ("pion", "fastsfu_sized") if per_sut.get(s)]
        extra_head = "".join(f" {PEER_LABELS[s]} | ratio |" for s in extra)
        lines += [
            f"### {suite}, {summary['scenario']}",
            "",
            f"| metric | baseline | fastsfu | ratio | fastsfu, no queue-age limit | ratio |{extra_head}",
            "|---|---|---|---|---|---|" + "---|---|" * len(extra),
        ]
        ratios: dict[str, float | None] = {}
        ratios_nolimit: dict[str, float | None] = {}
        ratios_extra: dict[str, dict[str, float | None]] = {s: {} for s in extra}
        for label, path in METRICS:
            b, f, u = _get(base, *path), _get(fast, *path), _get(nolimit, *path)
            ratio = f / b if b and f is not None else None
            ratio_u = u / b if b and u is not None else None
            ratios[label] = ratio
            ratios_nolimit[label] = ratio_u
            cells = ""
            for s in extra:
                v = _get(per_sut.get(s), *path)
                ratios_extra[s][label] = v / b if b and v is not None else None
                cells += f" {_fmt(v)} | {_ratio(v, b)} |"
            lines.append(
                f"| {label} | {_fmt(b)} | {_fmt(f)} | {'-' if ratio is None else f'{ratio:.2f}'} "
                f"| {_fmt(u)} | {'-' if ratio_u is None else f'{ratio_u:.2f}'} |{cells}"
            )
        summary["ratios"][suite] = ratios
        summary.setdefault("ratios_nolimit", {})[suite] = ratios_nolimit
        for s in extra:
            summary.setdefault(f"ratios_{s}", {})[suite] = ratios_extra[s]
        p50b, p50f = _get(base, "fixed", "p50_us"), _get(fast, "fixed", "p50_us")
        if p50b is not None and p50f is not None:
            summary["p50_diff_us"][suite] = p50f - p50b
            lines.append(f"\nfixed-load p50 difference fastsfu - baseline: {p50f - p50b:+.0f} us")
        if base and "fixed" in base:
            fx = base["fixed"]
            valid = fx["loss"] == 0 and (fx["p99_us"] or 0) <= P99_FLOOR_US
            summary["valid"][suite] = valid
            if not valid:
                lines.append("\n**Run invalid**: the baseline missed its own floor at the fixed load.")
        lines += _extra_suts(per_sut, base)
        lines += _notes(per_sut)
        lines.append("")
    lines += peers_report(summary)
    lines += hog_report(summary)
    lines += discord_report(summary)
    lines += split_report(summary)
    return "\n".join(lines)


def _extra_suts(per_sut: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """Rows for SUTs run only on request (fastsfu_inline, fastsfu_unconnected), with their ratio
    to the baseline."""
    lines: list[str] = []
    for name in ("fastsfu_inline", "fastsfu_unconnected", "fastsfu_observer"):
        res = per_sut.get(name)
        if res is None:
            continue
        lines += ["", f"| metric | {name} | ratio to baseline |", "|---|---|---|"]
        for label, path in METRICS:
            v = _get(res, *path)
            lines.append(f"| {label} | {_fmt(v)} | {_ratio(v, _get(base, *path))} |")
    return lines


def _notes(per_sut: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, res in per_sut.items():
        if res and res.get("zero_loss_is_lower_bound"):
            lines.append(f"\n{name}: no loss at any step; its zero-loss fwd pps is a lower bound.")
        if res and res.get("fixed_only"):
            lines.append(f"\n{name}: fixed step only (no step search, no 50% step).")
        if res and res.get("fixed_cpu_us_per_pkt_all"):
            lines.append(
                f"\n{name}: fixed step x{len(res['fixed_loss_all'])}, median CPU shown; "
                f"CPU us/pkt {res['fixed_cpu_us_per_pkt_all']}, loss {res['fixed_loss_all']}."
            )
        if res and "skipped" in res:
            lines.append(f"\n{name}: {res['skipped']}.")
        if res and "error" in res:
            lines.append(f"\n**{name} failed**: {res['error']}")
    return lines


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "libsrtp_version": hex(native.check_libsrtp_version()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        info["commit"] = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        # Uncommitted changes under src/ or benchmarks/: the measured code is not exactly the commit.
        info["dirty"] = bool(
            subprocess.run(
                ["git", "-C", str(BENCH_DIR.parent), "status", "--porcelain", "--", "src", "benchmarks"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        )
    return info


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into SystemExit so the context managers stop the SUT on the way out.
    raise SystemExit(128 + signum)


def storm_main(args: argparse.Namespace, libs: dict[str, Path], summary: dict[str, Any]) -> int:
    """--join-storm: only fastsfu, only the storm comparison, per SRTP suite."""
    failed = False
    summary["join_storm"] = {}
    for suite in args.suites:
        if benchconfig.is_discord(suite):
            log(f"{suite}: join storm runs on SRTP suites only: skipped")
            continue
        try:
            res = summary["join_storm"][suite] = run_storm(suite, args, libs)
        except (*HARNESS_ERRORS, RuntimeError) as exc:
            log(f"join storm ({suite}) failed: {exc}")
            failed = True
            continue
        if not res["client_final"].get("ok") or len(res["join_storms"]) != args.fixed_repeat:
            log(f"join storm ({suite}): a storm did not complete: {res['client_final']}")
            failed = True
    print("\n".join(storm_report(summary)), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    suts: list[str] = []
    for name in args.sut or ["all"]:
        for one in SUTS if name == "all" else (name,):
            if one not in suts:
                suts.append(one)
    if args.sized_tables and "fastsfu_sized" not in suts:
        suts.append("fastsfu_sized")
    if args.join_storm:
        suts = ["fastsfu"]  # the storm runs fastsfu alone: nothing else to build
    skipped: dict[str, str] = {}
    failed = False
    if not run_loadgen.FASTSFU_SCRIPT.exists():
        for name in [s for s in suts if s.startswith("fastsfu")]:
            msg = f"{run_loadgen.FASTSFU_SCRIPT.relative_to(BENCH_DIR.parent)} not found: {name} SUT skipped"
            log(msg)
            skipped[name] = msg
            suts.remove(name)
    if not suts:
        log("nothing to run")
        return 2
    try:
        libs = native.build_all(args.build_dir, args.cc)
    except native.BuildError as exc:
        log(f"build failed: {exc}")
        return 3
    log(f"built {libs['loadgen']} and {libs['forwarder']}")
    if "pion" in suts:
        try:
            libs["pion"] = build_pion(args.build_dir)
            log(f"built {libs['pion']}")
        except native.BuildError as exc:
            msg = f"pion forwarder not built ({exc}); scripts/pion_setup.sh installs Go and pion: skipped"
            log(msg)
            skipped["pion"] = msg
            suts.remove("pion")
            # CI installs the toolchain first (scripts/test.sh): a missing peer there is a failure.
            failed = os.environ.get("CI") == "true"

    scenario = f"scenario A: {args.rooms} x {args.size} all talking, payload {args.payload}"
    if args.talkers:
        scenario = (
            f"stage: {args.talkers} speakers, {args.size - args.talkers} listeners, payload {args.payload}"
        )
    summary: dict[str, Any] = {
        "machine": machine_info(),
        "scenario": scenario,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "skipped": skipped,
        "results": {},
        "ratios": {},
        "p50_diff_us": {},
        "valid": {},
    }
    t0 = time.monotonic()
    if args.join_storm:
        return storm_main(args, libs, summary)
    for suite in args.suites:
        per_sut: dict[str, Any] = {}
        for sut in suts:
            if sut in SRTP_ONLY and benchconfig.is_discord(suite):
                log(f"{suite}: {sut}: {NO_DISCORD}")
                per_sut[sut] = {"skipped": NO_DISCORD}
        per_sut.update(run_suite(suite, [s for s in suts if s not in per_sut], args, libs))
        failed = failed or any("error" in r for r in per_sut.values())
        # Report in the usual order, whatever order the systems finished in.
        summary["results"][suite] = {s: per_sut[s] for s in suts if s in per_sut}
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    table = report(summary)
    print(table, flush=True)
    for msg in skipped.values():
        print(f"Note: {msg}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        log(f"summary written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
