"""Soak benchmark: join/leave cycles per protocol against a real `fastsfu serve` beside a talking
reference call; RSS, fds and /metrics gauges per 1,000 cycles, gauges and fds back after each
protocol, exact reference loss. `--quick` is the CI size; a failed check exits 1."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
for _path in (BENCH_DIR, SRC_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from soak_clients import (  # noqa: E402
    PROTOCOLS,
    Target,
    cycle_discord,
    cycle_grpc,
    cycle_hrpc,
    loopback_only_aiortc,
)

from fastsfu.dtls import DtlsCertificate  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402

GUILD, CHANNEL, SERVER_ID = 10, 20, "41"
REFERENCE_USERS = (1, 2)
# /metrics gauges that must come back to the reference call's values after the churn.
GAUGES = (
    "fastsfu_rooms",
    "fastsfu_routers",
    "fastsfu_room_members",
    "fastsfu_voice_sessions",
    "fastsfu_voice_streams_open",
    "fastsfu_transports",
    "fastsfu_producers",
    "fastsfu_consumers",
    'fastsfu_discord_sessions{state="identifying"}',
    'fastsfu_discord_sessions{state="active"}',
    'fastsfu_discord_sessions{state="suspended"}',
    "fastsfu_discord_connections",
)
# The reference call alone: one room, two Discord members, each with a transport, a producer and a
# consumer of the other.
REFERENCE_GAUGES = {
    "fastsfu_rooms": 1,
    "fastsfu_routers": 1,
    "fastsfu_room_members": 2,
    "fastsfu_transports": 2,
    "fastsfu_producers": 2,
    "fastsfu_consumers": 2,
    'fastsfu_discord_sessions{state="active"}': 2,
    "fastsfu_discord_connections": 2,
}
SERVER_START_TIMEOUT = 30.0
CYCLE_TIMEOUT = 30.0
GC_OFF_LAUNCHER = (
    "import gc, sys; gc.disable(); from fastsfu.server.cli import main; sys.exit(main(sys.argv[1:]))"
)
METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if (m := METRIC_LINE.match(line)) is not None:
            out[m.group(1)] = float(m.group(2))
    return out


@dataclass
class Server:
    """`fastsfu serve` as a subprocess: its own ports on loopback, a test token secret."""

    proc: subprocess.Popen[str]
    urls: dict[str, str]
    stderr_path: Path
    stdout_tail: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_lines(self) -> list[str]:
        return self.stderr_path.read_text(errors="replace").splitlines()


def start_server(tmp: Path, secret: str, args: argparse.Namespace) -> Server:
    config = tmp / "soak.toml"
    config.write_text(f'[discord.rooms]\n"{SERVER_ID}" = [{GUILD}, {CHANNEL}]\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    # --server-gc-off (a diagnostic): the same CLI with Python's cyclic GC disabled, to tell GC
    # pauses from other stalls of the server's event loop.
    launcher = ["-c", GC_OFF_LAUNCHER] if args.server_gc_off else ["-m", "fastsfu.server.cli"]
    cmd = [
        sys.executable, *launcher, "serve", "--config", str(config),
        "--listen-ip", "127.0.0.1", "--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "0",
        "--token-secret", secret, "--rate-limit-burst", "0", "--max-users-per-room", "1000",
        "--discord-resume-grace", str(args.discord_resume_grace), "--log-level", args.log_level,
    ]  # fmt: skip
    stderr_path = tmp / "server.stderr"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    server = Server(proc, {}, stderr_path)
    patterns = {
        "hrpc": r"hRPC (ws://\S+)",
        "grpc": r"gRPC (\S+:\d+)",
        "metrics": r"metrics (http://\S+)",
        "discord": r"Discord voice gateway (ws://\S+)",
    }
    lines: deque[str] = deque()
    reader = threading.Thread(target=_read_lines, args=(proc, lines, server.stdout_tail), daemon=True)
    reader.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while len(server.urls) < len(patterns):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"fastsfu serve did not start: {server.stderr_lines()[-20:]}")
        while lines:
            line = lines.popleft()
            for name, pattern in patterns.items():
                if (m := re.search(pattern, line)) is not None:
                    server.urls[name] = m.group(1)
        time.sleep(0.05)
    return server


def _read_lines(proc: subprocess.Popen[str], lines: deque[str], tail: deque[str]) -> None:
    """Keep reading the server's stdout (a full pipe would block it)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        tail.append(line.rstrip())


def stop_server(server: Server) -> int | None:
    """SIGTERM (a graceful shutdown), then kill after 10 s; by PID only."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def proc_sample(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB), threads, open fds and CPU time of the server process."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key.lower()] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    # utime + stime (fields 14 and 15 of /proc/<pid>/stat, after the parenthesised name), in ms
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    out["cpu_ms"] = (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")
    return out


class Soak:
    """The churn against one server: cycles per protocol, samples, settle checks."""

    def __init__(self, args: argparse.Namespace, server: Server, secret: str, reference: Reference) -> None:
        self.args, self.server, self.reference = args, server, reference
        auth = TokenAuth(secret)
        hrpc = server.urls["hrpc"].replace("ws://", "http://", 1)
        self.target = Target(
            hrpc, server.urls["grpc"], server.urls["discord"], auth, GUILD, CHANNEL, SERVER_ID
        )
        self.metrics_url = server.urls["metrics"]
        self.cert = DtlsCertificate.generate()
        self.next_user = 1000
        self.samples: list[dict[str, Any]] = []
        self.failures: Counter[str] = Counter()
        self.cycles: Counter[str] = Counter()
        self.full_cycles: Counter[str] = Counter()
        self.aborted_cycles: Counter[str] = Counter()
        self.durations: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
        self.http: aiohttp.ClientSession | None = None

    async def metrics(self) -> dict[str, float]:
        assert self.http is not None
        async with self.http.get(self.metrics_url) as resp:
            return parse_metrics(await resp.text())

    async def sample(self, label: str) -> dict[str, Any]:
        m = await self.metrics()
        s: dict[str, Any] = {
            "label": label,
            "t": round(time.monotonic() - self.t0, 3),
            "reference_sent": await asyncio.to_thread(self.reference.mark),
            "cycles": dict(self.cycles),
            **proc_sample(self.server.pid),
            "gauges": {g: m.get(g, 0.0) for g in GAUGES},
            "counters": {k: v for k, v in m.items() if k.endswith("_total") or "_total{" in k},
        }
        self.samples.append(s)
        if not self.args.quiet:
            gauges = " ".join(f"{k.removeprefix('fastsfu_')}={v:g}" for k, v in s["gauges"].items() if v)
            print(
                f"[{s['t']:7.1f}s] {label:<16} rss {s['vmrss'] / 1024:7.1f} MiB  fds {s['fds']:4}  "
                f"threads {s['threads']:3}  {gauges}",
                flush=True,
            )
        return s

    async def one_cycle(self, protocol: str, index: int) -> None:
        user = self.next_user
        self.next_user += 1
        full = protocol != "discord" and self.args.full_every > 0 and index % self.args.full_every == 0
        every = self.args.abort_every
        abort = every > 0 and index % every == every // 2
        assert self.http is not None
        t = self.target
        if protocol == "hrpc":
            work = cycle_hrpc(t, self.http, user, self.cert, full, abort)
        elif protocol == "grpc":
            work = cycle_grpc(t, user, self.cert, full, abort)
        else:
            work = cycle_discord(t, self.http, user, abort)
        start = time.monotonic()
        try:
            await asyncio.wait_for(work, CYCLE_TIMEOUT)
        except Exception as exc:
            # Where in the cycle it failed: the innermost frame of the soak clients.
            frames = [
                f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith("soak_clients.py")
            ]
            where = f" at {frames[-1].lineno} `{frames[-1].line}`" if frames else ""
            self.failures[f"{protocol}: {type(exc).__name__}: {str(exc)[:160]}{where}"] += 1
        else:
            self.durations[protocol].append(time.monotonic() - start)
            self.full_cycles[protocol] += full
            self.aborted_cycles[protocol] += abort
        self.cycles[protocol] += 1

    async def run_cycles(self, protocol: str, n: int, sample: bool) -> None:
        """n cycles, `concurrency` in flight; a sample every `sample_every` completed cycles."""
        issued = 0
        done = 0

        async def worker() -> None:
            nonlocal issued, done
            while issued < n:
                index = issued
                issued += 1
                await self.one_cycle(protocol, index)
                done += 1
                if sample and done % self.args.sample_every == 0 and done < n:
                    await self.sample(f"{protocol} {done}")

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    async def settle(self, baseline: dict[str, float], fds: int | None = None) -> float:
        """Wait until the gauges equal `baseline` (Discord sessions end after the resume grace) and
        the server holds no more than `fds` descriptors (a client's last TCP connection may still
        be closing), up to the settle timeout: what is left then is a leak."""
        start = time.monotonic()
        deadline = start + self.args.settle_timeout
        while time.monotonic() < deadline:
            m = await self.metrics()
            if all(m.get(g, 0.0) == baseline.get(g, 0.0) for g in GAUGES) and (
                fds is None or proc_sample(self.server.pid)["fds"] <= fds
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(self.args.settle)  # let the process free what the last leaves released
        return time.monotonic() - start

    async def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        async with aiohttp.ClientSession() as self.http:
            start = await self.sample("start")  # the reference call alone
            expected_reference = {g: float(REFERENCE_GAUGES.get(g, 0)) for g in GAUGES}
            ref_ok = start["gauges"] == expected_reference
            await asyncio.sleep(self.args.idle)  # the reference call's loss without churn
            idle = await self.sample("idle")
            windows = [("idle", start, idle)]
            for protocol in self.args.protocols:  # first-use allocations (gRPC's poller, aiohttp, ...)
                await self.run_cycles(protocol, self.args.warmup, sample=False)
            await self.settle(start["gauges"])
            base = await self.sample("baseline")
            windows.append(("warmup", idle, base))
            phases = []
            for protocol in self.args.protocols:
                before = self.samples[-1]
                t = time.monotonic()
                await self.run_cycles(protocol, self.args.cycles, sample=True)
                elapsed = time.monotonic() - t
                end = await self.sample(f"{protocol} {self.args.cycles}")
                settle_s = await self.settle(base["gauges"], before["fds"])
                after = await self.sample(f"{protocol} settled")
                phases.append(self.phase(protocol, before, end, after, elapsed, settle_s))
                windows += [(f"{protocol} churn", before, end), (f"{protocol} settle", end, after)]
            final = self.samples[-1]
        return {
            "windows": [(name, a["reference_sent"], b["reference_sent"]) for name, a, b in windows],
            "reference_gauges_ok": ref_ok,
            "start": start,
            "baseline": base,
            "final": final,
            "phases": phases,
        }

    def phase(
        self,
        protocol: str,
        before: dict[str, Any],
        end: dict[str, Any],
        after: dict[str, Any],
        elapsed: float,
        settle_s: float,
    ) -> dict[str, Any]:
        n = self.args.cycles
        points = [s for s in self.samples if s["label"].startswith(protocol + " ") and s is not after]
        durations = sorted(self.durations[protocol][-n:])
        # RSS slope over the phase's samples (KiB per 1,000 cycles): least squares, so one early
        # step (arena growth) does not dominate as it would in a first-to-last difference.
        xs = [before["cycles"].get(protocol, 0)] + [s["cycles"][protocol] for s in points]
        ys = [before["vmrss"]] + [s["vmrss"] for s in points]
        slope = statistics.linear_regression(xs, ys).slope * 1000 if len(set(xs)) > 1 else 0.0
        # Growth over the phase's second half only: a plateau (heap high-water mark, allocator
        # pools) reads ~0 there, a leak keeps its slope.
        mid = next(i for i, x in enumerate(xs) if x >= xs[0] + n / 2)
        late = (ys[-1] - ys[mid]) * 1000 / (xs[-1] - xs[mid]) if xs[-1] > xs[mid] else 0.0
        return {
            "protocol": protocol,
            "cycles": n,
            "full_ice_dtls_cycles": self.full_cycles[protocol],
            "aborted_cycles": self.aborted_cycles[protocol],
            "seconds": round(elapsed, 2),
            "cycles_per_s": round(n / elapsed, 1),
            "cycle_ms": {
                "p50": round(durations[len(durations) // 2] * 1000, 1) if durations else None,
                "p99": round(durations[int(len(durations) * 0.99)] * 1000, 1) if durations else None,
            },
            "server_cpu_ms_per_cycle": round((end["cpu_ms"] - before["cpu_ms"]) / n, 2),
            "rss_kib_delta_settled": after["vmrss"] - before["vmrss"],
            "rss_kib_per_1000_cycles": round((after["vmrss"] - before["vmrss"]) * 1000 / n, 1),
            "rss_kib_per_1000_cycles_slope": round(slope, 1),
            "rss_kib_per_1000_cycles_second_half": round(late, 1),
            "fds_peak_delta": max(s["fds"] for s in [*points, end]) - before["fds"],
            "fds_delta_settled": after["fds"] - before["fds"],
            "threads_delta_settled": after["threads"] - before["threads"],
            "gauges_at_end_of_churn": {k: v for k, v in end["gauges"].items() if v},
            "settle_s": round(settle_s, 2),
            "gauges_back": after["gauges"] == before["gauges"],
        }


class Reference:
    """The reference call's process (soak_reference.py)."""

    def __init__(self, url: str, auth: TokenAuth) -> None:
        tokens = {str(u): auth.mint(u) for u in REFERENCE_USERS}
        cmd = [
            sys.executable, str(BENCH_DIR / "soak_reference.py"),
            "--url", url, "--server-id", SERVER_ID, "--tokens", json.dumps(tokens),
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _readline(self, timeout: float) -> str:
        """One line of its stdout, or "" after `timeout` seconds (a thread: pipes have no timeout)."""
        result: list[str] = []
        stdout = self.proc.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        if (line := self._readline(timeout)).strip() != "ready":
            self.kill()
            raise RuntimeError(f"reference call did not start: {line!r}")

    def mark(self, timeout: float = 10.0) -> list[int]:
        """Packets each member has sent so far (the loss is split by phase at these marks)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        sent: list[int] = json.loads(self._readline(timeout))["sent"]
        return sent

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate("stop\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self.proc.returncode != 0:
            raise RuntimeError(f"reference call failed ({self.proc.returncode}): {out[-2000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def verdict(report: dict[str, Any]) -> list[str]:
    """Every failed check, as one line each (empty: the soak passed)."""
    problems = []
    if not report["soak"]["reference_gauges_ok"]:
        problems.append(
            f"before the churn, gauges were not the reference call's: {report['soak']['start']['gauges']}"
        )
    for p in report["soak"]["phases"]:
        if not p["gauges_back"]:
            problems.append(f"{p['protocol']}: gauges did not return to baseline within the settle timeout")
        if p["fds_delta_settled"] > 0:
            problems.append(f"{p['protocol']}: open fds grew by {p['fds_delta_settled']}")
    for m in report["reference"]["members"]:
        if m["lost"] or m["bad_packets"] or m["duplicates"]:
            problems.append(
                f"reference member {m['user']}: lost {m['lost']} of {m['expected']}, "
                f"{m['bad_packets']} bad, {m['duplicates']} duplicated"
            )
        if m["joins_seen"] != m["leaves_seen"] or m["joined_never_left"] or m["left_never_joined"]:
            problems.append(
                f"reference member {m['user']}: saw {m['joins_seen']} joins but {m['leaves_seen']} leaves "
                f"(joined, never left: {m['joined_never_left']}; "
                f"left, never joined: {m['left_never_joined']})"
            )
        if m["partner_left"]:
            problems.append(f"reference member {m['user']}: told that the other reference member left")
        if m["gateway_closed"] is not None:
            problems.append(f"reference member {m['user']}: gateway closed ({m['gateway_closed']})")
    errors = sum(
        n for kind, n in report["server_log_kinds"].items() if kind.startswith(("ERROR", "CRITICAL"))
    )
    if errors:
        problems.append(f"the server logged {errors} errors (see server_log_kinds)")
    if report["failures"]:
        problems.append(f"{sum(report['failures'].values())} cycles failed: {dict(report['failures'])}")
    return problems


def loss_by_window(
    windows: list[tuple[str, list[int], list[int]]], members: list[dict[str, Any]]
) -> dict[str, Any]:
    """Each reference member's lost packets by what the server was doing when they were sent."""
    out: dict[str, Any] = {}
    for name, start, end in windows:
        row = {}
        for i, m in enumerate(members):
            partner = 1 - i  # a member's loss is counted in its partner's sequence numbers
            lo, hi = start[partner], end[partner]
            row[str(m["user"])] = {"sent": hi - lo, "lost": sum(lo <= q < hi for q in m["lost_seqs"])}
        out[name] = row
    return out


def log_kinds(lines: list[str]) -> dict[str, int]:
    """The server's log lines by kind: level and message with numbers and timestamps taken out."""
    kinds: Counter[str] = Counter()
    for line in lines:
        text = re.sub(r"^\S+ \S+ ", "", line)  # the text format's date and time
        kinds[re.sub(r"0x[0-9a-f]+|\d+", "N", text)[:160]] += 1
    return dict(kinds.most_common(20))


def counter_deltas(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a.get(k, 0.0) for k in sorted(b) if b[k] - a.get(k, 0.0)}


async def main_async(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    server = start_server(tmp, secret, args)
    reference: Reference | None = None
    try:
        reference = Reference(server.urls["discord"], TokenAuth(secret))
        await asyncio.to_thread(reference.wait_ready)
        soak = Soak(args, server, secret, reference)
        result = await soak.run()
        ref = await asyncio.to_thread(reference.finish)
        reference = None
    finally:
        if reference is not None:
            reference.kill()
        code = stop_server(server)
    stderr = server.stderr_lines()
    base, final = result["baseline"], result["final"]
    ref["loss_by_window"] = loss_by_window(result.pop("windows"), ref["members"])
    total = args.cycles * len(args.protocols)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "soak": result,
        "reference": ref,
        "summary": {
            "cycles": total,
            "rss_mib": [round(base["vmrss"] / 1024, 1), round(final["vmrss"] / 1024, 1)],
            "rss_kib_per_1000_cycles": round((final["vmrss"] - base["vmrss"]) * 1000 / total, 1),
            "fds": [base["fds"], final["fds"]],
            "threads": [base["threads"], final["threads"]],
            "gauges_final": {k: v for k, v in final["gauges"].items() if v},
            "counter_deltas": counter_deltas(base["counters"], final["counters"]),
        },
        "failures": dict(soak.failures),
        "server_exit": code,
        "server_log_lines": len(stderr),
        "server_log_kinds": log_kinds(stderr),
        "server_log_tail": stderr[-40:],
    }


def print_summary(report: dict[str, Any]) -> None:
    print(
        "\nprotocol  cycles  full  cyc/s  CPU ms/cyc  p50 ms  p99 ms  RSS KiB/1k (slope) 2nd half  fds d  "
        "gauges back  settle s"
    )
    for p in report["soak"]["phases"]:
        print(
            f"{p['protocol']:<8} {p['cycles']:>7} {p['full_ice_dtls_cycles']:>5} {p['cycles_per_s']:>6} "
            f"{p['server_cpu_ms_per_cycle']:>11} "
            f"{p['cycle_ms']['p50']!s:>7} {p['cycle_ms']['p99']!s:>7} "
            f"{p['rss_kib_per_1000_cycles']:>10} ({p['rss_kib_per_1000_cycles_slope']:>7}) "
            f"{p['rss_kib_per_1000_cycles_second_half']:>9} "
            f"{p['fds_delta_settled']:>5}  {p['gauges_back']!s:>11} {p['settle_s']:>9}"
        )
    s = report["summary"]
    print(
        f"whole run: {s['cycles']} cycles, RSS {s['rss_mib'][0]} -> {s['rss_mib'][1]} MiB "
        f"({s['rss_kib_per_1000_cycles']} KiB per 1,000 cycles), fds {s['fds'][0]} -> {s['fds'][1]}, "
        f"threads {s['threads'][0]} -> {s['threads'][1]}"
    )
    print(f"gauges at the end: {s['gauges_final']}")
    print(f"counters over the churn: {s['counter_deltas']}")
    for name, row in report["reference"]["loss_by_window"].items():
        parts = [f"{user}: {v['lost']}/{v['sent']}" for user, v in row.items()]
        print(f"reference loss during {name}: {'; '.join(parts)}")
    for m in report["reference"]["members"]:
        print(
            f"reference {m['user']}: {m['received']}/{m['expected']} received, lost {m['lost']}, "
            f"late >20 ms {m['late_over_20ms']}, >100 ms {m['late_over_100ms']}, latency {m['latency_ms']}, "
            f"joins/leaves seen {m['joins_seen']}/{m['leaves_seen']}, "
            f"churn packets {m['churn_packets_received']}"
        )
    if report["server_log_lines"]:
        print(f"server logged {report['server_log_lines']} lines:")
        for kind, count in report["server_log_kinds"].items():
            print(f"  {count:6} x {kind}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=3000, help="join/leave cycles per protocol")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: hrpc,grpc,discord")
    ap.add_argument("--concurrency", type=int, default=4, help="cycles in flight")
    ap.add_argument(
        "--full-every", type=int, default=100, help="every Nth Harmony cycle does ICE+DTLS (0: none)"
    )
    ap.add_argument(
        "--abort-every", type=int, default=10, help="every Nth cycle vanishes after joining (0: none)"
    )
    ap.add_argument("--sample-every", type=int, default=1000, help="cycles between RSS/fd/gauge samples")
    ap.add_argument("--warmup", type=int, default=50, help="cycles per protocol before the baseline sample")
    ap.add_argument(
        "--discord-resume-grace",
        type=float,
        default=0.5,
        help="the server's resume grace: a closed Discord socket stays a member this long",
    )
    ap.add_argument(
        "--server-gc-off", action="store_true", help="diagnostic: run the server with gc.disable()"
    )
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of the reference call alone, first")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait after the gauges settled")
    ap.add_argument("--settle-timeout", type=float, default=20.0, help="seconds for the gauges to settle")
    ap.add_argument("--log-level", default="warning", help="the server's log level")
    ap.add_argument("--json", type=Path, help="write the full report here")
    ap.add_argument("--quiet", action="store_true", help="no per-sample lines")
    ap.add_argument(
        "--quick", action="store_true", help="CI size: 300 cycles per protocol, samples every 100"
    )
    args = ap.parse_args(argv)
    args.protocols = [p for p in args.protocols.split(",") if p]
    if not args.protocols or any(p not in PROTOCOLS for p in args.protocols):
        ap.error(f"--protocols: choose from {','.join(PROTOCOLS)}")
    if args.quick:
        args.cycles, args.sample_every, args.warmup, args.full_every, args.idle = 300, 100, 20, 50, 2.0
    if args.cycles < 1 or args.concurrency < 1 or args.sample_every < 1:
        ap.error("--cycles, --concurrency and --sample-every must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loopback_only_aiortc()
    t = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastsfu-soak-") as tmp:
        report = asyncio.run(main_async(args, Path(tmp)))
    report["seconds"] = round(time.monotonic() - t, 1)
    report["problems"] = verdict(report)
    print_summary(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    for problem in report["problems"]:
        print(f"SOAK FAILED: {problem}", file=sys.stderr)
    print(f"soak: {report['seconds']} s, {'FAILED' if report['problems'] else 'passed'}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
