"""Launcher for the bare C forwarder baseline: python run_baseline.py CONFIG [--cpu 1].

Prints READY once its sockets are bound, forwards until SIGTERM/SIGINT (or EOF on a stdin pipe),
then prints one JSON line of counters. forward_one() runs the per-packet work on one packet in memory.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pylibsrtp

_BENCH_DIR = str(Path(__file__).resolve().parents[1])
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchconfig  # noqa: E402
from loadgen import native  # noqa: E402

ERRLEN = 512
STOP_JOIN_TIMEOUT_S = 10.0
TRANSFORM_ERRORS = {-1: "bad arguments", -2: "unprotect failed", -3: "malformed RTP", -4: "protect failed"}
COUNTER_NAMES = (
    "received",
    "forwarded",
    "decrypt_failures",
    "send_failures",
    "protect_failures",
    "dropped_malformed",
    "dropped_ssrc",
    "dropped_pt",
    "rx_batches",
    "tx_calls",
    "wakeups",
    "rtcp_received",
    "rtcp_failures",
)


class FwCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in COUNTER_NAMES]


@functools.cache
def load_library(path: Path | None = None) -> ctypes.CDLL:
    """Open forwarder.so (building it if needed) and declare its C signatures."""
    lib = ctypes.CDLL(str(path or native.build_library(native.FORWARDER_SRC)))
    if lib.fw_counters_size() != ctypes.sizeof(FwCounters):
        raise RuntimeError("forwarder counters layout mismatch between C and Python")
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.fw_create.restype = vp
    lib.fw_create.argtypes = [
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
        ctypes.c_char_p,
        i32,
    ]
    lib.fw_run.restype = i32
    lib.fw_run.argtypes = [vp]
    lib.fw_set_rtcp.restype = None
    lib.fw_set_rtcp.argtypes = [vp, vp]
    lib.fw_stop.restype = None
    lib.fw_stop.argtypes = [vp]
    lib.fw_get_counters.restype = None
    lib.fw_get_counters.argtypes = [vp, ctypes.POINTER(FwCounters)]
    lib.fw_destroy.restype = None
    lib.fw_destroy.argtypes = [vp]
    lib.fw_transform.restype = i32
    lib.fw_transform.argtypes = [
        vp,
        vp,
        vp,
        vp,
        ctypes.c_char_p,
        i32,
        vp,
        i32,
        ctypes.c_uint32,
        i32,
        i32,
        i32,
        ctypes.POINTER(ctypes.c_int),
    ]
    return lib


class Forwarder:
    """The C forwarder bound to a config's SUT ports, with one SRTP session per direction and participant."""

    def __init__(self, config: dict[str, Any], lib_path: Path | None = None, rcvbuf: int = 0) -> None:
        native.check_libsrtp_version()
        self._lib = load_library(lib_path)
        suite = config["suite"]
        parts = config["participants"]
        cons = config["consumers"]
        n = len(parts)
        by_receiver: dict[int, list[int]] = {p["id"]: [] for p in parts}
        for c in cons:
            by_receiver[c["receiver"]].append(c["ssrc"])
        # Upstream: inbound, keyed by what each participant sends. Downstream: outbound, with one
        # specific stream per consumer SSRC so the first forwarded packet does not allocate.
        # Both lists must stay referenced while C holds their srtp_t pointers.
        self._up = [
            native.make_session(suite, p["key_up"], outbound=False, ssrcs=(p["ssrc"],)) for p in parts
        ]
        self._down = [
            native.make_session(suite, p["key_down"], outbound=True, ssrcs=tuple(by_receiver[p["id"]]))
            for p in parts
        ]
        nc = max(1, len(cons))
        self._keep = (
            (ctypes.c_uint16 * n)(*[p["sut_port"] for p in parts]),
            (ctypes.c_uint16 * n)(*[p["gen_port"] for p in parts]),
            (ctypes.c_uint32 * n)(*[p["ssrc"] for p in parts]),
            (ctypes.c_uint8 * n)(*[p["pt"] for p in parts]),
            (ctypes.c_uint8 * n)(*[p["ext_id"] for p in parts]),
            native.pointer_array([native.session_pointer(s) for s in self._up]),
            native.pointer_array([native.session_pointer(s) for s in self._down]),
            (ctypes.c_int32 * nc)(*[c["receiver"] for c in cons]),
            (ctypes.c_int32 * nc)(*[c["sender"] for c in cons]),
            (ctypes.c_uint32 * nc)(*[c["ssrc"] for c in cons]),
        )
        k = self._keep
        err = ctypes.create_string_buffer(ERRLEN)
        handle = self._lib.fw_create(
            n,
            k[0],
            k[1],
            k[2],
            k[3],
            k[4],
            native.srtp_function("srtp_unprotect"),
            k[5],
            native.srtp_function("srtp_protect"),
            k[6],
            len(cons),
            k[7],
            k[8],
            k[9],
            config["consumer_pt"],
            config["consumer_ext_id"],
            rcvbuf,
            err,
            ERRLEN,
        )
        if not handle:
            raise RuntimeError(f"forwarder setup failed: {err.value.decode()}")
        self._handle: int | None = handle
        self._lib.fw_set_rtcp(handle, native.srtp_function("srtp_unprotect_rtcp"))

    def run(self) -> int:
        """Forward until stop(); blocks (without the GIL). Returns 0, or -1 if epoll failed."""
        assert self._handle is not None
        return int(self._lib.fw_run(self._handle))

    def stop(self) -> None:
        if self._handle is not None:
            self._lib.fw_stop(self._handle)

    def counters(self) -> dict[str, int]:
        assert self._handle is not None
        c = FwCounters()
        self._lib.fw_get_counters(self._handle, ctypes.byref(c))
        return {name: getattr(c, name) for name in COUNTER_NAMES}

    def close(self) -> None:
        if self._handle is not None:
            self._lib.fw_destroy(self._handle)
            self._handle = None


def _ctx(session_or_ptr: pylibsrtp.Session | int) -> int:
    if isinstance(session_or_ptr, int):
        return session_or_ptr
    return native.session_pointer(session_or_ptr)


def forward_one(
    packet: bytes,
    up: pylibsrtp.Session | int,
    down: pylibsrtp.Session | int,
    consumer_ssrc: int,
    consumer_pt: int = benchconfig.CONSUMER_PT,
    ext_from: int = benchconfig.PUBLISHER_EXT_ID,
    ext_to: int = benchconfig.CONSUMER_EXT_ID,
    lib_path: Path | None = None,
) -> bytes:
    """The baseline's per-packet work on one protected packet: unprotect with `up`, rewrite SSRC,
    PT and the one-byte extension ID for one consumer, protect with `down`; returns the output.

    `up`/`down` are pylibsrtp sessions or raw srtp_t ints (like the datapath's). Both sessions
    advance their replay/ROC state exactly as in the forwarder. Raises ValueError on failure.
    """
    lib = load_library(lib_path)
    out = ctypes.create_string_buffer(len(packet) + 160)
    status = ctypes.c_int()
    n = lib.fw_transform(
        native.srtp_function("srtp_unprotect"),
        _ctx(up),
        native.srtp_function("srtp_protect"),
        _ctx(down),
        packet,
        len(packet),
        out,
        len(out),
        consumer_ssrc,
        consumer_pt,
        ext_from,
        ext_to,
        ctypes.byref(status),
    )
    if n < 0:
        what = TRANSFORM_ERRORS.get(n, "?")
        raise ValueError(f"forward_one: {what} (srtp status {status.value})")
    return out.raw[:n]


def _watch_stdin(stop: threading.Event) -> None:
    """EOF on a stdin pipe means the orchestrator is gone: stop rather than linger."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--cpu", type=int, default=1, help="CPU to pin to (-1: leave affinity alone)")
    ap.add_argument("--lib", type=Path, help="prebuilt forwarder .so (default: build into benchmarks/.build)")
    ap.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF for the SUT sockets (0: kernel default)")
    args = ap.parse_args(argv)

    if args.cpu >= 0:
        # Before any thread exists, so the forwarding thread inherits the mask.
        try:
            os.sched_setaffinity(0, {args.cpu})
        except OSError as exc:
            print(f"run_baseline: cannot pin to CPU {args.cpu}: {exc}", file=sys.stderr)
    cfg = benchconfig.load_config(args.config)
    if benchconfig.is_discord(cfg["suite"]):
        print(f"run_baseline: the C baseline forwarder has no Discord mode ({cfg['suite']})", flush=True)
        return 2
    fw = Forwarder(cfg, lib_path=args.lib, rcvbuf=args.rcvbuf)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stdin_is_pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        stdin_is_pipe = False
    if stdin_is_pipe:
        # Only a pipe: /dev/null or a terminal would stop us at once or never.
        threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()

    rc: list[int] = []
    worker = threading.Thread(target=lambda: rc.append(fw.run()), name="forwarder")
    worker.start()
    print("READY", flush=True)
    # Wake regularly so signal handlers run and a dead worker is noticed.
    while not stop.wait(0.2) and worker.is_alive():
        pass
    fw.stop()
    worker.join(STOP_JOIN_TIMEOUT_S)
    if worker.is_alive():
        print("run_baseline: forwarder thread did not stop", file=sys.stderr)
        os._exit(2)
    counters = fw.counters()
    fw.close()
    counters["ok"] = rc == [0]
    print(json.dumps(counters), flush=True)
    return 0 if rc == [0] else 1


if __name__ == "__main__":
    sys.exit(main())
