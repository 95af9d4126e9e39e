"""Python launcher for the native load generator/sink, plus helpers to run a SUT subprocess.

Import it (run.py, tests) or run it against an already running SUT: run_loadgen.py CONFIG --rate 50.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BENCH_DIR = str(Path(__file__).resolve().parents[1])
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchconfig  # noqa: E402

from loadgen import native  # noqa: E402

REPO_DIR = Path(_BENCH_DIR).parent
BASELINE_SCRIPT = Path(_BENCH_DIR) / "baseline" / "run_baseline.py"
FASTSFU_SCRIPT = Path(_BENCH_DIR) / "sut_fastsfu.py"
GEN_CPU = 0
SUT_CPU = 1
SINK_RCVBUF = 4 << 20
LG_OPEN_FIRST = 1  # loadgen.c: the sink opens every packet before reading the stamp (Discord)
DISCOVERY_TIMEOUT_S = 5.0
ERRLEN = 512
CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """Something in the harness broke (build, SUT start, generator setup)."""


# ---- ctypes mirrors of loadgen.c's structs (checked against lg_struct_sizes at load) ----


class LgParams(ctypes.Structure):
    _fields_ = [
        ("rate", ctypes.c_double),
        ("warmup_ns", ctypes.c_int64),
        ("duration_ns", ctypes.c_int64),
        ("drain_ns", ctypes.c_int64),
        ("verify_every", ctypes.c_int32),
        ("payload_size", ctypes.c_int32),
        ("sink_busy_poll", ctypes.c_int32),
        ("sender_rt", ctypes.c_int32),
        ("speakers", ctypes.c_int32),
        ("room_size", ctypes.c_int32),
        ("rtcp_rate", ctypes.c_double),
    ]


_U64 = ctypes.c_uint64
_I64 = ctypes.c_int64


class LgResult(ctypes.Structure):
    _fields_ = [
        *[(n, _U64) for n in ("sent_total", "sent_window", "send_errors", "protect_errors")],
        *[(n, _U64) for n in ("wire_min", "wire_max", "wire_sum")],
        ("max_send_lag_ns", _I64),
        *[(n, _U64) for n in ("expected", "received", "duplicates", "reorders", "lat_count", "lat_negative")],
        *[(n, _I64) for n in ("lat_min_ns", "lat_max_ns", "lat_sum_ns")],
        *[(n, _I64) for n in ("p50_ns", "p90_ns", "p99_ns", "p999_ns")],
        *[(n, _U64) for n in ("received_total", "out_of_window", "rx_batches")],
        *[(n, _U64) for n in ("bad_packets", "unknown_ssrc", "misrouted", "pt_mismatch")],
        *[(n, _U64) for n in ("no_stamp", "ext_not_rewritten")],
        *[(n, _U64) for n in ("verified", "verify_failures", "rtcp", "replayed")],
        *[(n, _U64) for n in ("rtcp_sent", "received_call")],
        *[(n, _I64) for n in ("window_ns", "elapsed_ns")],
        ("sender_rt_ok", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("klat_count", _U64),
        *[(n, _I64) for n in ("kp50_ns", "kp99_ns", "kp999_ns", "klat_max_ns")],
    ]


class LgSubResult(ctypes.Structure):
    _fields_ = [
        *[(n, _U64) for n in ("expected", "received", "duplicates", "reorders", "verify_failures")],
        ("lat_max_ns", _I64),
    ]


def _load_loadgen(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    sizes = [ctypes.c_int32() for _ in range(3)]
    lib.lg_struct_sizes(*[ctypes.byref(s) for s in sizes])
    expected = [ctypes.sizeof(LgParams), ctypes.sizeof(LgResult), ctypes.sizeof(LgSubResult)]
    got = [s.value for s in sizes]
    if got != expected:
        raise HarnessError(f"loadgen struct layout mismatch: C {got} vs Python {expected}")
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.lg_create.restype = vp
    lib.lg_create.argtypes = [
        i32,
        vp,
        vp,
        vp,
        vp,
        vp,
        vp,
        vp,
        vp,
        vp,
        i32,
        vp,
        vp,
        vp,
        i32,
        i32,
        i32,
        ctypes.c_uint64,
        i32,
        i32,
        ctypes.c_char_p,
        i32,
    ]
    lib.lg_set_rtcp.restype = None
    lib.lg_set_rtcp.argtypes = [vp, vp]
    lib.lg_fd.restype = i32
    lib.lg_fd.argtypes = [vp, i32]
    lib.lg_run_step.restype = i32
    lib.lg_run_step.argtypes = [
        vp,
        ctypes.POINTER(LgParams),
        ctypes.POINTER(LgResult),
        vp,
        ctypes.c_char_p,
        i32,
    ]
    lib.lg_destroy.restype = None
    lib.lg_destroy.argtypes = [vp]
    return lib


# ---- results ----


@dataclass
class SubResult:
    """One subscription (receiver <- sender) in one step."""

    receiver: int
    sender: int
    ssrc: int
    expected: int
    received: int
    duplicates: int
    reorders: int
    verify_failures: int
    lat_max_us: float

    @property
    def loss(self) -> int:
        return self.expected - self.received


@dataclass
class StepResult:
    """Everything the generator and sink measured in one step (window counts unless noted)."""

    rate: float
    duration_s: float
    raw: dict[str, int]
    subs: list[SubResult] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.raw["expected"]

    @property
    def received(self) -> int:
        return self.raw["received"]

    @property
    def loss(self) -> int:
        return self.expected - self.received

    @property
    def verify_failures(self) -> int:
        return self.raw["verify_failures"]

    def metrics(self) -> dict[str, Any]:
        """The per-step metrics as a flat JSON-ready dict (latencies in µs)."""
        r = self.raw
        exp = r["expected"]

        def us(ns: int) -> float | None:
            return None if ns < 0 or r["lat_count"] == 0 else round(ns / 1000, 1)

        def kus(ns: int) -> float | None:
            return None if ns < 0 or r["klat_count"] == 0 else round(ns / 1000, 1)

        return {
            "rate": round(self.rate, 3),
            "duration_s": self.duration_s,
            "sent": r["sent_window"],
            "offered_fwd_pps": round(exp / self.duration_s, 1),
            "received_fwd_pps": round(r["received"] / self.duration_s, 1),
            "expected": exp,
            "received": r["received"],
            "loss": exp - r["received"],
            "loss_ratio": (exp - r["received"]) / exp if exp else 0.0,
            "duplicates": r["duplicates"],
            "reorders": r["reorders"],
            "p50_us": us(r["p50_ns"]),
            "p90_us": us(r["p90_ns"]),
            "p99_us": us(r["p99_ns"]),
            "p999_us": us(r["p999_ns"]),
            # The same packets to the kernel's arrival stamp (loadgen.c, lg_result.klat_*): the
            # sink's own scheduling delay left out.
            "kp50_us": kus(r["kp50_ns"]),
            "kp99_us": kus(r["kp99_ns"]),
            "kp999_us": kus(r["kp999_ns"]),
            "klat_count": r["klat_count"],
            "lat_min_us": us(r["lat_min_ns"]),
            "lat_max_us": us(r["lat_max_ns"]),
            "lat_mean_us": round(r["lat_sum_ns"] / r["lat_count"] / 1000, 1) if r["lat_count"] else None,
            "verified": r["verified"],
            "verify_failures": r["verify_failures"],
            "received_total": r["received_total"],
            "rtcp_packets": r["rtcp"],
            "rtcp_sent": r["rtcp_sent"],
            "out_of_window": r["out_of_window"],
            "wire_bytes_min": r["wire_min"],
            "wire_bytes_max": r["wire_max"],
            "wire_bytes_avg": round(r["wire_sum"] / r["sent_total"], 1) if r["sent_total"] else None,
            "max_send_lag_us": round(r["max_send_lag_ns"] / 1000, 1),
            "send_errors": r["send_errors"] + r["protect_errors"],
            "sink_errors": {
                k: r[k]
                for k in (
                    "bad_packets",
                    "unknown_ssrc",
                    "misrouted",
                    "pt_mismatch",
                    "no_stamp",
                    "ext_not_rewritten",
                    "lat_negative",
                    "replayed",
                )
                if r[k]
            },
        }


# ---- the generator ----


class LoadGen:
    """Generator + sink for one config: owns the sockets and the SRTP sessions for a whole run.

    Sequence numbers, ROC and replay state continue from step to step, so the SUT must stay up
    between steps; start a new LoadGen for a new SUT process.

    Discord suites: the crypto is fastsfu's rtpsize AEAD (one AeadContext per direction and
    participant, both with the participant's key), the sink opens every packet to read its stamp,
    and each participant's socket does a real IP discovery against the SUT before the first step.
    """

    def __init__(
        self,
        config: dict[str, Any],
        lib_path: Path | None = None,
        seed: int = 1,
        rcvbuf: int = SINK_RCVBUF,
    ) -> None:
        native.check_libsrtp_version()
        self.config = benchconfig.validate_config(config)
        self._lib = _load_loadgen(lib_path or native.build_library(native.LOADGEN_SRC))
        suite = config["suite"]
        parts = config["participants"]
        cons = config["consumers"]
        n = len(parts)
        self.discord = benchconfig.is_discord(suite)
        # Contexts must outlive every C call that uses their pointers: they live on self.
        up = [native.make_context(suite, p["key_up"], outbound=True, ssrcs=(p["ssrc"],)) for p in parts]
        down = [native.make_context(suite, p["key_down"], outbound=False) for p in parts]
        self._up = [owner for owner, _ in up]
        self._down = [owner for owner, _ in down]
        protect_fn, unprotect_fn = native.crypto_functions(suite)
        self._arrays = [
            (ctypes.c_uint16 * n)(*[p["gen_port"] for p in parts]),
            (ctypes.c_uint16 * n)(*[p["sut_port"] for p in parts]),
            (ctypes.c_uint32 * n)(*[p["ssrc"] for p in parts]),
            (ctypes.c_uint8 * n)(*[p["pt"] for p in parts]),
            (ctypes.c_uint8 * n)(*[p["ext_id"] for p in parts]),
        ]
        up_ptrs = native.pointer_array([ptr for _, ptr in up])
        down_ptrs = native.pointer_array([ptr for _, ptr in down])
        nc = max(1, len(cons))
        c_recv = (ctypes.c_int32 * nc)(*[c["receiver"] for c in cons])
        c_send = (ctypes.c_int32 * nc)(*[c["sender"] for c in cons])
        c_ssrc = (ctypes.c_uint32 * nc)(*[c["ssrc"] for c in cons])
        self._keep = (up_ptrs, down_ptrs, c_recv, c_send, c_ssrc)
        err = ctypes.create_string_buffer(ERRLEN)
        a = self._arrays
        handle = self._lib.lg_create(
            n,
            a[0],
            a[1],
            a[2],
            a[3],
            a[4],
            protect_fn,
            up_ptrs,
            unprotect_fn,
            down_ptrs,
            len(cons),
            c_recv,
            c_send,
            c_ssrc,
            config["consumer_pt"],
            config["consumer_ext_id"],
            # Browsers put ssrc-audio-level on every Opus packet; Discord clients do not.
            0 if self.discord else benchconfig.LEVEL_EXT_ID,
            seed,
            rcvbuf,
            LG_OPEN_FIRST if self.discord else 0,
            err,
            ERRLEN,
        )
        if not handle:
            raise HarnessError(f"load generator setup failed: {err.value.decode()}")
        self._handle: int | None = handle
        if not self.discord:
            self._lib.lg_set_rtcp(handle, native.srtp_function("srtp_protect_rtcp"))
        self._subs = (LgSubResult * nc)()
        if self.discord:
            try:
                self.discover()
            except BaseException:
                self.close()
                raise

    def discover(self, timeout: float = DISCOVERY_TIMEOUT_S) -> None:
        """Discord IP discovery (docs/transports.md#ip-discovery) from every participant's own socket: the
        74-byte request with its SSRC, answered with the generator's address. This is what admits
        the generator's address at the SUT, as a Discord client's discovery does."""
        if self._handle is None:
            raise HarnessError("LoadGen is closed")
        parts = self.config["participants"]
        socks: dict[int, socket.socket] = {}
        try:
            for i in range(len(parts)):
                # A duplicate of the C socket (same port, same file description) that stays
                # blocking: readiness comes from select() and reads use MSG_DONTWAIT.
                socks[i] = socket.socket(fileno=os.dup(self._lib.lg_fd(self._handle, i)))
            pending = set(socks)
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for i in sorted(pending):
                    p = parts[i]
                    socks[i].sendto(struct.pack("!HHI66x", 1, 70, p["ssrc"]), ("127.0.0.1", p["sut_port"]))
                wait_until = min(deadline, time.monotonic() + 0.5)
                while pending and time.monotonic() < wait_until:
                    by_fd = {socks[i].fileno(): i for i in pending}
                    ready, _, _ = select.select(list(by_fd), [], [], max(0.0, wait_until - time.monotonic()))
                    for fd in ready:
                        i = by_fd[fd]
                        with contextlib.suppress(BlockingIOError):
                            data = socks[i].recv(2048, socket.MSG_DONTWAIT)
                            if _discovery_answer_ok(data, parts[i]):
                                pending.discard(i)
            if pending:
                raise HarnessError(f"IP discovery unanswered for participants {sorted(pending)[:10]}")
        finally:
            for s in socks.values():
                s.close()

    def run_step(
        self,
        rate: float = 50.0,
        duration: float = 3.0,
        warmup: float = 0.5,
        drain: float = 0.3,
        verify_every: int = 16,
        payload_size: int = 0,
        cpu: int | None = GEN_CPU,
        busy_poll: bool | int = True,
        sender_rt: bool = True,
        speakers: int = 0,
        rtcp_interval: float = 0.0,
    ) -> StepResult:
        """Run one step: `warmup` s of traffic not counted, `duration` s counted, `drain` s of receive only.

        rate 0 only receives (drains a backlog). speakers > 0: only the first `speakers` members
        of each room send (the others are muted and send nothing). rtcp_interval > 0: every
        participant sends an SRTCP receiver report per received talking stream every
        `rtcp_interval` s (SRTP suites only; 5 s is libwebrtc's audio report interval).
        The calling thread is pinned to `cpu` for the call (both C threads inherit it) and
        restored afterwards, so importing this module from pytest does not pin the test run.
        busy_poll/sender_rt: see lg_params in loadgen.c (busy_poll 2: polling at SCHED_IDLE).
        """
        if self._handle is None:
            raise HarnessError("LoadGen is closed")
        prm = LgParams(
            rate=rate,
            warmup_ns=int(warmup * 1e9),
            duration_ns=int(duration * 1e9),
            drain_ns=int(drain * 1e9),
            verify_every=verify_every,
            payload_size=payload_size,
            sink_busy_poll=int(busy_poll),
            sender_rt=int(sender_rt),
            speakers=speakers,
            room_size=benchconfig.room_size(self.config) if speakers else 0,
            rtcp_rate=self._rtcp_rate(speakers, rtcp_interval),
        )
        res = LgResult()
        err = ctypes.create_string_buffer(ERRLEN)
        previous = native.pin_current_thread(cpu)
        try:
            rc = self._lib.lg_run_step(
                self._handle, ctypes.byref(prm), ctypes.byref(res), self._subs, err, ERRLEN
            )
        finally:
            if previous is not None:
                os.sched_setaffinity(0, previous)
        if rc != 0:
            raise HarnessError(f"load generator step failed: {err.value.decode()}")
        raw = {name: getattr(res, name) for name, _ in LgResult._fields_}
        subs = [
            SubResult(
                receiver=c["receiver"],
                sender=c["sender"],
                ssrc=c["ssrc"],
                expected=s.expected,
                received=s.received,
                duplicates=s.duplicates,
                reorders=s.reorders,
                verify_failures=s.verify_failures,
                lat_max_us=s.lat_max_ns / 1000,
            )
            for c, s in zip(self.config["consumers"], self._subs, strict=False)
        ]
        return StepResult(rate=rate, duration_s=duration, raw=raw, subs=subs)

    def _rtcp_rate(self, speakers: int, interval: float) -> float:
        """Receiver reports per second per participant: one per received talking stream per interval."""
        if interval <= 0 or self.discord:
            return 0.0
        size = benchconfig.room_size(self.config)
        talking = min(speakers, size) if speakers > 0 else size
        # A talking member hears the others; a muted one hears all talkers (0 < talking <= size).
        return max(1, min(talking, size - 1)) / interval

    def close(self) -> None:
        if self._handle is not None:
            self._lib.lg_destroy(self._handle)
            self._handle = None

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _discovery_answer_ok(data: bytes, p: dict[str, Any]) -> bool:
    """A type 2 answer naming this participant's SSRC and its address as the SUT saw it."""
    if len(data) != 74:
        return False
    kind, length, ssrc, ip, port = struct.unpack("!HHI64sH", data)
    address = ip.split(b"\0", 1)[0].decode("ascii", "replace")
    return (kind, length, ssrc, address, port) == (2, 70, p["ssrc"], "127.0.0.1", p["gen_port"])


# ---- the system under test ----


def sut_command(kind: str, config_path: str | os.PathLike[str]) -> list[str]:
    """argv for a SUT: 'baseline' or 'fastsfu' (both obey READY / SIGTERM / final JSON line)."""
    script = {"baseline": BASELINE_SCRIPT, "fastsfu": FASTSFU_SCRIPT}[kind]
    return [sys.executable, str(script), str(config_path)]


def sut_environment() -> dict[str, str]:
    """This environment with the repository's src/ first on PYTHONPATH.

    The fastsfu SUT then imports the in-tree build (`setup.py build_ext --inplace`) even when
    the package is not installed in the venv; an installed package in src/ layout is the same code.
    """
    env = dict(os.environ)
    src = REPO_DIR / "src"
    if src.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    return env


class SutProcess:
    """A SUT subprocess: started pinned to a CPU, ready when it prints READY, stopped with SIGTERM.

    stdin is a pipe that is never written: a SUT that watches it sees EOF if this process dies.
    """

    def __init__(
        self,
        argv: list[str],
        cpu: int | None = SUT_CPU,
        ready_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        ready_line: str = "READY",
    ) -> None:
        preexec = None
        if cpu is not None:
            # Pin before the interpreter starts, so every thread the SUT creates inherits the mask.
            if shutil.which("taskset"):
                argv = ["taskset", "-c", str(cpu), *argv]
            else:
                preexec = functools.partial(os.sched_setaffinity, 0, {cpu})
        self.argv = argv
        if env is None:
            env = sut_environment()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO_DIR),
            preexec_fn=preexec,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.ready_text = self.wait_line(ready_line, ready_timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, word: str, timeout: float) -> str:
        """Read output until a line that is `word` or starts with `word` and a space; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"SUT {self.argv} did not print {word} within {timeout} s")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
                rc = self.proc.returncode
                raise HarnessError(f"SUT {self.argv} exited with {rc} before {word}: {self.output}")
            self.output.append(line)
            if line.strip() == word or line.startswith(word + " "):
                return line

    def send_line(self, text: str) -> None:
        """Write one line to the SUT's stdin (the split SUT's pipe exchange)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.rstrip("\n") + "\n")
        self.proc.stdin.flush()

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole SUT process from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # After "pid (comm) ", field 3 (state) is index 0: utime is field 14, stime field 15.
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_ns(self) -> int:
        """Nanoseconds on a CPU of the SUT's live threads (/proc/<pid>/task/*/schedstat): the
        clock-tick times above read 0 for a worker that ran under 10 ms in a short step."""
        total = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that just exited
                continue
        return total

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> dict[str, Any]:
        """SIGTERM, wait, and return the SUT's final JSON line ({} if it printed none)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(f"SUT {self.argv} ignored SIGTERM for {timeout} s; killed") from None
        self._reader.join(timeout=5)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line)
        self._close_pipes()
        for line in reversed(self.output):
            if line.startswith("{"):
                try:
                    return dict(json.loads(line))
                except ValueError:
                    break
        return {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> SutProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class SutGroup:
    """Several SUT worker processes acting as one SUT (sut_split.py): each prints `PIPE {json}`,
    gets the others' offers as one JSON list on stdin, then prints READY. CPU is summed over the
    workers (`cpu_times`) and also given per worker (`cpu_times_each`); the final counters are the
    workers' numeric counters summed, plus each worker's line under "workers"."""

    def __init__(
        self, argvs: list[list[str]], cpu: int | None = SUT_CPU, ready_timeout: float = 30.0
    ) -> None:
        self.procs: list[SutProcess] = []
        try:
            for argv in argvs:
                self.procs.append(SutProcess(argv, cpu=cpu, ready_timeout=ready_timeout, ready_line="PIPE"))
            offers = [json.loads(p.ready_text.split(" ", 1)[1]) for p in self.procs]
            for i, p in enumerate(self.procs):
                p.send_line(json.dumps([o for j, o in enumerate(offers) if j != i]))
            for p in self.procs:
                p.wait_line("READY", ready_timeout)
        except BaseException:
            self.kill()
            raise
        self.argv = [p.argv for p in self.procs]

    @property
    def output(self) -> list[str]:
        return [f"[{i}] {line}" for i, p in enumerate(self.procs) for line in p.output]

    @property
    def proc(self) -> subprocess.Popen[str]:
        """The first worker that exited, else the first (Harness reports its return code)."""
        return next((p.proc for p in self.procs if not p.alive()), self.procs[0].proc)

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def cpu_times_each(self) -> list[tuple[float, float]]:
        return [p.cpu_times() for p in self.procs]

    def cpu_ns_each(self) -> list[int]:
        return [p.cpu_ns() for p in self.procs]

    def cpu_times(self) -> tuple[float, float]:
        each = self.cpu_times_each()
        return sum(u for u, _ in each), sum(s for _, s in each)

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def stop(self, timeout: float = 15.0) -> dict[str, Any]:
        for p in self.procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        finals = [p.stop(timeout) for p in self.procs]
        out: dict[str, Any] = {"workers": finals, "ok": all(f.get("ok") for f in finals)}
        for key in {k for f in finals for k, v in f.items() if type(v) is int and k != "worker"}:
            out[key] = sum(int(f.get(key, 0)) for f in finals)
        return out

    def kill(self) -> None:
        for p in self.procs:
            p.kill()

    def __enter__(self) -> SutGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_sut(
    kind_or_argv: str | list[str],
    config_path: str | os.PathLike[str],
    cpu: int | None = SUT_CPU,
    ready_timeout: float = 30.0,
) -> SutProcess:
    """Start 'baseline', 'fastsfu' or an explicit argv on `config_path`; returns once READY."""
    argv = sut_command(kind_or_argv, config_path) if isinstance(kind_or_argv, str) else list(kind_or_argv)
    return SutProcess(argv, cpu=cpu, ready_timeout=ready_timeout)


# ---- system counters ----


def udp_sockets() -> dict[int, tuple[int, int]]:
    """(rx_queue bytes, drops) of every IPv4 UDP socket, keyed by local port (/proc/net/udp)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        cols = line.split()
        if len(cols) >= 13:
            port = int(cols[1].rsplit(":", 1)[1], 16)
            rxq = int(cols[4].split(":")[1], 16)
            q, d = out.get(port, (0, 0))
            out[port] = (q + rxq, d + int(cols[-1]))
    return out


def cpu_state_seconds(cpu: int) -> tuple[float, float]:
    """(idle + iowait, irq + softirq) seconds of one CPU from /proc/stat.

    Busy time is derived as wall time minus idle: the kernel keeps idle time exactly (NOHZ),
    while the other columns are tick samples. Without IRQ time accounting (this VM's kernel)
    softirq run in a task's syscall, e.g. loopback delivery of the SUT's sends, is also in
    that task's stime, so the softirq figure is informational and overlaps the SUT's CPU.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            return (v[3] + v[4]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK
    return 0.0, 0.0


def settle(gen: LoadGen, ports: list[int], timeout: float = 10.0, cpu: int | None = GEN_CPU) -> float:
    """Receive without sending until no socket in `ports` has queued data; returns seconds spent.

    After an overloaded step a SUT can hold seconds of packets in its socket buffers; the next
    step must not start behind that backlog.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        socks = udp_sockets()
        if all(socks.get(p, (0, 0))[0] == 0 for p in ports):
            break
        gen.run_step(rate=0, duration=0.2, warmup=0, drain=0, verify_every=0, cpu=cpu)
    return time.monotonic() - t0


def measure_step(
    gen: LoadGen,
    sut: SutProcess | SutGroup | None,
    rate: float,
    duration: float,
    warmup: float = 0.5,
    drain: float = 0.3,
    verify_every: int = 16,
    payload_size: int = 0,
    gen_cpu: int | None = GEN_CPU,
    sut_cpu: int | None = SUT_CPU,
    busy_poll: bool = True,
    sender_rt: bool = True,
    speakers: int = 0,
    rtcp_interval: float = 0.0,
) -> tuple[StepResult, dict[str, Any]]:
    """Run one step and add SUT CPU per forwarded packet and kernel socket drops to its metrics.

    CPU covers the whole call (warm-up and drain included), so it is divided by every forwarded
    packet the sink received during the call, not only the counted window. The user/sys split
    comes from tick sampling and is coarse; their sum is exact (scaled to the scheduler's runtime).
    """
    cfg = gen.config
    gen_ports = [p["gen_port"] for p in cfg["participants"]]
    sut_ports = [p["sut_port"] for p in cfg["participants"]]
    d0 = udp_sockets()
    c0 = sut.cpu_times() if sut else (0.0, 0.0)
    e0 = sut.cpu_times_each() if isinstance(sut, SutGroup) else []
    n0 = sut.cpu_ns_each() if isinstance(sut, SutGroup) else []
    i0 = cpu_state_seconds(sut_cpu) if sut_cpu is not None else (0.0, 0.0)
    t0 = time.monotonic()
    res = gen.run_step(
        rate,
        duration,
        warmup,
        drain,
        verify_every,
        payload_size,
        gen_cpu,
        busy_poll,
        sender_rt,
        speakers,
        rtcp_interval,
    )
    wall = time.monotonic() - t0
    c1 = sut.cpu_times() if sut else (0.0, 0.0)
    e1 = sut.cpu_times_each() if isinstance(sut, SutGroup) else []
    n1 = sut.cpu_ns_each() if isinstance(sut, SutGroup) else []
    i1 = cpu_state_seconds(sut_cpu) if sut_cpu is not None else (0.0, 0.0)
    d1 = udp_sockets()
    m = res.metrics()
    # Forwarded RTP of this call's own sends: what an earlier step left in the sink's sockets (a
    # backlog the SUT forwarded after that step, read only now) would make CPU per packet too low.
    fwd = res.raw["received_call"]
    m["stale_packets"] = res.raw["received_total"] - res.raw["rtcp"] - fwd
    user, system = c1[0] - c0[0], c1[1] - c0[1]
    size = benchconfig.room_size(cfg)
    talking = min(speakers, size) if speakers > 0 else size
    m["speakers_per_room"] = talking
    m["nominal_fwd_pps"] = round(rate * len(cfg["consumers"]) * talking / size, 1)
    if sut is not None:
        m["sut_cpu_util"] = round((user + system) / wall, 3)
        m["cpu_us_per_pkt"] = round((user + system) * 1e6 / fwd, 3) if fwd else None
        m["cpu_user_us_per_pkt"] = round(user * 1e6 / fwd, 3) if fwd else None
        m["cpu_sys_us_per_pkt"] = round(system * 1e6 / fwd, 3) if fwd else None
    if e0:
        # Each worker's CPU (user + sys) in this step, and its share of the workers' total.
        spent = [sum(b) - sum(a) for a, b in zip(e0, e1, strict=True)]
        m["worker_cpu_us_per_pkt"] = [round(x * 1e6 / fwd, 3) if fwd else None for x in spent]
        # Shares from the schedulers' nanosecond counts (tick-based times can read 0 in a short step).
        ran = [b - a for a, b in zip(n0, n1, strict=True)]
        m["worker_cpu_share"] = [round(x / sum(ran), 3) if sum(ran) else None for x in ran]
    if sut_cpu is not None:
        # Everything on the SUT's core, softirq and any other process there included.
        busy = wall - (i1[0] - i0[0])
        softirq = i1[1] - i0[1]
        m["core_busy_us_per_pkt"] = round(busy * 1e6 / fwd, 3) if fwd else None
        m["core_softirq_us_per_pkt"] = round(softirq * 1e6 / fwd, 3) if fwd else None
        if sut is not None:
            # Share of the SUT's core used by anything but the SUT (other processes, ksoftirqd):
            # a noisy step.
            m["core_other_util"] = round(max(0.0, busy - user - system) / wall, 3)

    def drops(ports: list[int]) -> int:
        # A set: Discord participants all share one SUT port.
        return sum(d1.get(p, (0, 0))[1] - d0.get(p, (0, 0))[1] for p in set(ports))

    m["sink_kernel_drops"] = drops(gen_ports)
    m["sut_kernel_drops"] = drops(sut_ports)
    m["sender_rt"] = bool(res.raw["sender_rt_ok"])
    # The generator, not the SUT, limited this step: pacing fell behind or the sink dropped.
    m["generator_limited"] = res.raw["max_send_lag_ns"] > 5_000_000 or m["sink_kernel_drops"] > 0
    return res, m


# ---- one SUT driven through the harness ----


class Harness:
    """A running SUT plus a LoadGen on the same config; see harness()."""

    def __init__(
        self,
        config: dict[str, Any],
        sut: SutProcess | SutGroup,
        gen: LoadGen,
        gen_cpu: int | None,
        sut_cpu: int | None,
    ) -> None:
        self.config = config
        self.sut = sut
        self.gen = gen
        self.gen_cpu = gen_cpu
        self.sut_cpu = sut_cpu
        self.final: dict[str, Any] = {}

    def step(self, rate: float = 50.0, duration: float = 1.0, **kw: Any) -> tuple[StepResult, dict[str, Any]]:
        """measure_step() against this SUT; raises HarnessError if the SUT has died."""
        if not self.sut.alive():
            raise HarnessError(f"SUT exited with {self.sut.proc.returncode}: {self.sut.output[-5:]}")
        kw.setdefault("gen_cpu", self.gen_cpu)
        kw.setdefault("sut_cpu", self.sut_cpu)
        return measure_step(self.gen, self.sut, rate, duration, **kw)

    def settle(self, timeout: float = 10.0) -> float:
        ports = sorted({p["sut_port"] for p in self.config["participants"]})
        return settle(self.gen, ports, timeout, self.gen_cpu)


@contextlib.contextmanager
def harness(
    config: dict[str, Any],
    sut: str | list[str] = "baseline",
    config_path: str | os.PathLike[str] | None = None,
    gen_cpu: int | None = GEN_CPU,
    sut_cpu: int | None = SUT_CPU,
    ready_timeout: float = 30.0,
    stop_timeout: float = 15.0,
    lib_path: Path | None = None,
    workers: int = 1,
) -> Iterator[Harness]:
    """Start a SUT ('baseline', 'fastsfu' or an argv taking the config path last) on `config`,
    open a LoadGen on the same config, yield a Harness; on exit stop the SUT and put its final
    JSON counters in `Harness.final`. The SUT is killed on any error.

        with harness(cfg, "baseline") as h:
            res, metrics = h.step(rate=50, duration=1.0, verify_every=1)
        h.final["decrypt_failures"]
    """
    with contextlib.ExitStack() as stack:
        if config_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastsfu-bench-"))
            config_path = Path(tmp) / "config.json"
        benchconfig.save_config(config, config_path)
        argv = sut_command(sut, config_path) if isinstance(sut, str) else [*sut, str(config_path)]
        proc: SutProcess | SutGroup
        if workers > 1:
            # One argv per worker: the split SUT (sut_split.py) takes its index and the count.
            head, tail = argv[:-1], argv[-1:]
            argvs = [[*head, "--worker", str(i), "--workers", str(workers), *tail] for i in range(workers)]
            proc = stack.enter_context(SutGroup(argvs, cpu=sut_cpu, ready_timeout=ready_timeout))
        else:
            proc = stack.enter_context(SutProcess(argv, cpu=sut_cpu, ready_timeout=ready_timeout))
        gen = stack.enter_context(LoadGen(config, lib_path=lib_path))
        h = Harness(config, proc, gen, gen_cpu, sut_cpu)
        yield h
        gen.close()
        h.final = proc.stop(timeout=stop_timeout)


# ---- CLI: drive an already running SUT ----


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config", help="config JSON written by benchconfig.save_config")
    ap.add_argument("--rate", type=float, action="append", help="per-publisher pps; repeat for several steps")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--drain", type=float, default=0.3)
    ap.add_argument("--verify-every", type=int, default=16)
    ap.add_argument("--verify-all", action="store_true")
    ap.add_argument("--payload", type=int, default=0, help="fixed payload size (0: Opus-like 80-120 B)")
    ap.add_argument("--cpu", type=int, default=GEN_CPU)
    ap.add_argument("--sink-sleep", action="store_true", help="sink sleeps in epoll_wait instead of polling")
    ap.add_argument("--lib", type=Path, help="prebuilt loadgen .so")
    args = ap.parse_args(argv)
    cfg = benchconfig.load_config(args.config)
    with LoadGen(cfg, lib_path=args.lib) as gen:
        for rate in args.rate or [50.0]:
            _, m = measure_step(
                gen,
                None,
                rate,
                args.duration,
                args.warmup,
                args.drain,
                1 if args.verify_all else args.verify_every,
                args.payload,
                args.cpu,
                None,
                busy_poll=not args.sink_sleep,
            )
            print(json.dumps(m), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
