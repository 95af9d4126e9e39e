"""The join storm end to end through run.py: fastsfu serves a small room at load while the storm
client, a process of its own, makes WebRTC joins (ICE, DTLS, produce, consume the room) and Discord
voice joins through fastsfu's gateway (IDENTIFY, IP discovery, SELECT_PROTOCOL, the room announced,
SPEAKING, media); every join of both kinds completes and leaves, the SUT reports each kind's loop
time, and no joiner's media reaches the room's receivers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import benchconfig  # noqa: E402
import run as bench_run  # noqa: E402
from loadgen import run_loadgen  # noqa: E402

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(180)]

_CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU, SUT_CPU = (_CPUS[0], _CPUS[1]) if len(_CPUS) >= 2 else (_CPUS[0], _CPUS[0])
ROOM = 10  # over discord/voice.py's JOIN_SLICE_MEMBERS: Discord joins run in slices


def test_storm_of_webrtc_and_discord_joins(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    argv = ["--join-storm", "4,2", "--join-hold", "0.5", "--size", str(ROOM), "--suite", "gcm"]
    argv += ["--warmup", "0.2", "--gen-cpu", str(GEN_CPU), "--sut-cpu", str(SUT_CPU), "--json", str(out)]
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        rc = bench_run.main(argv)
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # run.py's own handler: not for the test process
    summary = json.loads(out.read_text())
    res = summary["join_storm"][benchconfig.SUITE_GCM]
    assert rc == 0, res.get("client_final")
    # The clients ran in their own process, which reported the storm the SUT summarized.
    assert res["client_final"]["ok"] is True
    assert res["client_final"]["join_storms"] == res["join_storms"]
    (storm,) = res["join_storms"]
    assert (storm["joins"], storm["failures"]) == (8, 0), storm["failure_reasons"]
    for kind in ("webrtc", "discord"):
        row = storm["kinds"][kind]
        # 4 joins/s for 2 s, every other one a Discord join; each counted once its leave ended.
        assert (row["joins"], row["failures"]) == (4, 0), row
        loop, cpu, setup = row["loop_ms"], row["loop_cpu_ms"], row["setup_ms"]
        assert 0 < loop["p50"] <= loop["p99"] <= loop["max"]
        # The CPU time is over the same spans as the wall time, so never more than it.
        assert cpu["p50"] > 0 and cpu["max"] <= loop["max"] + 0.01
        # The spans lie within the join's life (setup, hold, leave) and leave out the hold, in which
        # a joiner only waits.
        hold_ms = 1000 * storm["hold_s"]
        assert loop["p50"] < hold_ms and loop["max"] <= setup["max"] + hold_ms + 500
    fixed, stormy = res["steps"]
    assert (fixed["phase"], stormy["phase"]) == ("fixed", "fixed_storm")
    # The joiners' own media (Discord RTP, their producers) reaches none of the room's receivers.
    assert stormy["sink_errors"] == {} and stormy["received"] > 0
    for step in (fixed, stormy):
        # The storm's sink polls at idle priority, so its latency is to the kernel's arrival
        # stamps (loadgen.c, klat_*): every counted packet has one, never later than the sink saw it.
        assert step["klat_count"] == step["received"], step
        assert 0 < step["kp50_us"] <= step["p50_us"] and step["kp99_us"] <= step["p99_us"], step
    assert res["sut_final"]["ok"] is True and res["sut_final"]["decrypt_failures"] == 0


def test_storm_control_refuses_bad_requests(tmp_path: Path) -> None:
    """The SUT's control socket answers a bad line, an unknown op or join, and a bad value with an
    error and goes on; a line over its bound ends only that connection; the next one is served."""
    cfg = benchconfig.make_config(1, 3, benchconfig.SUITE_GCM, benchconfig.find_free_base_port(3))
    path = benchconfig.save_config(cfg, tmp_path / "c.json")
    control = str(tmp_path / "c.sock")
    argv = [sys.executable, str(run_loadgen.FASTSFU_SCRIPT), "--cpu", "-1", "--storm-control", control]
    with run_loadgen.SutProcess([*argv, str(path)], cpu=None) as sut:

        def connect() -> Any:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(control)
            return s

        def ask(s: socket.socket, line: bytes) -> dict[str, Any]:
            s.sendall(line + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "the SUT closed the control socket"
                reply += chunk
            return dict(json.loads(reply))

        with contextlib.closing(connect()) as s:
            assert ask(s, b"not json") == {"id": None, "ok": False, "error": "bad request"}
            assert ask(s, b"[1, 2]") == {"id": None, "ok": False, "error": "bad request"}
            unknown = ask(s, b'{"id": 1, "op": "nope"}')
            assert unknown["id"] == 1 and not unknown["ok"] and "unknown op" in unknown["error"]
            gone = ask(s, b'{"id": 2, "op": "webrtc_close", "join": 99}')
            assert not gone["ok"] and "no such join" in gone["error"]
            bad = ask(s, b'{"id": 3, "op": "webrtc_connect", "join": "x"}')
            assert bad["id"] == 3 and not bad["ok"] and "ValueError" in bad["error"]
            hello = ask(s, b'{"id": 4, "op": "hello"}')
            assert hello["ok"] and hello["members"] == [1, 2, 3] and hello["gateway"].startswith("ws://")
            with contextlib.suppress(OSError):  # the SUT may close while we still write
                s.sendall(b"x" * (2 << 20) + b"\n")
            with contextlib.suppress(ConnectionResetError):
                while s.recv(65536):
                    pass  # until EOF: this connection is dropped
        with contextlib.closing(connect()) as s:
            assert ask(s, b'{"id": 1, "op": "hello"}')["ok"]
        final = sut.stop()
    assert final["ok"] is True and final["join_storms"] == []
