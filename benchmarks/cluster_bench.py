"""Issue 11's measurements in one command: fastsfu on 2 worker processes joined by pipes against 1
worker, the C baseline beside them, in the same run (run.py's fixed steps, interleaved round by round):

- a room of 50, everyone talking (and 10 of 50 talking), split 25/25;
- a stage, 4 speakers and 400 listeners, split 200/200 (speakers 2/2);
- rooms of 2 split 1/1, where every forwarded packet crosses one pipe: the hop, kernel included;

then the NATS messages per Harmony join and leave in a `--workers 2` cluster (bus_messages.py).
Prints each part's tables, then one summary; --json writes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bus_messages  # noqa: E402
import run  # noqa: E402

SUTS = ["--sut", "baseline", "--sut", "fastsfu", "--sut", "fastsfu_split2"]
# (name, run.py arguments): the pairs run at 250 pps per publisher so that the hop is measured at
# a load (25 k fwd pps) where the workers batch, not only one packet per wake-up.
SCENARIOS = [
    ("room of 50", []),
    ("stage 4 + 400", ["--stage", "4,400"]),
    (
        "rooms of 2 (one hop per packet)",
        ["--rooms", "50", "--size", "2", "--fixed-rate", "250", "--low-speakers", "0"],
    ),
]


def log(msg: str) -> None:
    print(f"[cluster-bench] {msg}", file=sys.stderr, flush=True)


def run_scenario(args: argparse.Namespace, extra: list[str], out: Path) -> dict[str, Any]:
    argv = [*SUTS, "--fixed-only", "--fixed-repeat", str(args.repeat), "--json", str(out)]
    for suite in args.suite:
        argv += ["--suite", suite]
    if args.quick:
        argv.append("--quick")
    if args.fixed_duration:
        argv += ["--fixed-duration", str(args.fixed_duration)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # run.py's JSON lines and tables: kept for the log below
        rc = run.main(argv + extra)
    text = buf.getvalue()
    tables = [line for line in text.splitlines() if not line.startswith("{")]
    print("\n".join(tables), flush=True)
    if rc != 0:
        raise RuntimeError(f"run.py {' '.join(argv + extra)} failed ({rc})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def summary_lines(parts: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| scenario | suite | step | fwd pps | 1 worker us/pkt | 2 workers us/pkt | 2 / 1 "
        "| C baseline us/pkt | 2 / baseline | worker shares | imbalance | extra us per crossing "
        "| loss 1 / 2 | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sp = run._spread
    for name, res in parts.items():
        for suite, rows in res.get("split", {}).items():
            for phase, r in rows.items():
                shares = r["worker_shares"]
                share_txt = (
                    " / ".join(f"{statistics.median(s[i] for s in shares):.3f}" for i in range(2))
                    if shares
                    else "-"
                )
                lines.append(
                    f"| {name} | {suite} | {phase} | {run._fmt(r['offered_fwd_pps'])} "
                    f"| {sp(r['one_worker_cpu_us_per_pkt'])} | {sp(r['two_workers_cpu_us_per_pkt'])} "
                    f"| {sp(r['two_over_one'])} | {sp(r['baseline_cpu_us_per_pkt'])} "
                    f"| {sp(r['two_over_baseline'])} "
                    f"| {share_txt} | {sp(r['imbalance'])} | {sp(r['extra_us_per_crossing'])} "
                    f"| {max(r['loss_one'], default=0)} / {max(r['loss_two'], default=0)} "
                    f"| {min(r['other_load']):.2f}–{max(r['other_load']):.2f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one round of short steps, a few joins (~1 min)")
    ap.add_argument("--repeat", type=int, help="interleaved rounds of every fixed step [5, quick 1]")
    ap.add_argument("--fixed-duration", type=float, help="counted seconds per step [run.py's: 3, quick 1.5]")
    ap.add_argument("--suite", action="append", help="run.py suites, repeatable [gcm]")
    ap.add_argument("--no-bus", action="store_true", help="skip the bus messages part")
    ap.add_argument("--only", choices=[n for n, _ in SCENARIOS], action="append", help="only these scenarios")
    ap.add_argument("--json", type=Path, default=run.native.DEFAULT_BUILD_DIR / "cluster-bench.json")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.suite = args.suite or ["gcm"]
    t0 = time.monotonic()
    parts: dict[str, dict[str, Any]] = {}
    for i, (name, extra) in enumerate(SCENARIOS):
        if args.only and name not in args.only:
            continue
        log(f"{name}")
        parts[name] = run_scenario(args, extra, args.json.with_name(f"{args.json.stem}-{i}.json"))
    bus: dict[str, Any] | None = None
    if not args.no_bus:
        log("bus messages per join and leave")
        bus_args = ["--joins", "4", "--each", "1", "--max-joins", "8"] if args.quick else []
        ns = bus_messages.parse_args(bus_args)
        bus = bus_messages.run(ns)
    print("\n### Summary: 2 workers joined by pipes vs 1 worker, same run\n")
    print("\n".join(summary_lines(parts)))
    if bus is not None:
        print("\n### Bus messages per join and per leave (`--workers 2`)\n")
        print(bus_messages.summarize(bus))
    wall = round(time.monotonic() - t0, 1)
    print(f"\nwall {wall} s, commit {next(iter(parts.values()))['machine'].get('commit') if parts else '-'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "split": {n: p.get("split") for n, p in parts.items()},
                "runs": parts,
                "bus": bus,
                "wall_s": wall,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
