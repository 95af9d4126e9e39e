"""How long control-plane calls wait for the datapath thread's table mutex (docs/datapath.md).

A separate process blasts plain RTP at one producer with fan-out F as fast as it can, so the
datapath thread never idles; meanwhile this process times `add_consumer` + `remove_consumer`
pairs and `stats()` reads. The same calls are timed with no load (idle), and with the load but
the thread stopped (what CPU contention alone costs on this machine); the thread's forwarding
rate is measured with and without the calls (what they cost it). Prints one JSON line.

    .venv/bin/python benchmarks/bench_table_lock.py [--fanout 10] [--seconds 3] [--cpu 1 --load-cpu 0]

As in run.py, this process (the event loop's thread and the datapath thread) is pinned to one
core and the load to the other.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket

BLASTER = """
import socket, sys, time
dest = (sys.argv[1], int(sys.argv[2]))
end = time.monotonic() + float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[4])))
packets = [bytes.fromhex(h) for h in sys.argv[5:]]
n = 0
while time.monotonic() < end:
    for p in packets:
        s.sendto(p, dest)
    n += len(packets)
print(n)
"""


def percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[int(len(samples) * 0.99)], 1),
        "max_us": round(samples[-1], 1),
    }


def timed_calls(dp: _rtp.Datapath, p: int, t: int, seconds: float) -> dict[str, dict[str, float]]:
    change: list[float] = []
    read: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        c = dp.add_consumer(p, t, 999, 100, {})
        dp.remove_consumer(c)
        t1 = time.perf_counter()
        dp.stats()
        t2 = time.perf_counter()
        change.append((t1 - t0) * 1e6)
        read.append((t2 - t1) * 1e6)
        time.sleep(0.0005)
    return {"add+remove consumer": percentiles(change), "stats()": percentiles(read)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fanout", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cpu", type=int, default=1, help="CPU of this process, both threads (-1: any)")
    ap.add_argument("--load-cpu", type=int, default=0, help="CPU of the load process (-1: any)")
    args = ap.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    blaster_port = probe.getsockname()[1]
    probe.close()
    dp = _rtp.Datapath(max_sockets=2, max_transports=args.fanout + 2, max_producers=2)
    s = dp.add_socket(server.fileno(), socket.AF_INET, True)
    t_in = dp.add_transport(s)
    dp.set_transport_remote(t_in, "127.0.0.1", blaster_port)
    p = dp.add_producer(t_in, 1, 111, 48000, {})
    for i in range(args.fanout):
        t = dp.add_transport(s)
        dp.set_transport_remote(t, "127.0.0.1", sink.getsockname()[1] if i == 0 else 9 + i)  # 9+: nobody
        dp.add_consumer(p, t, 100 + i, 100, {})
    dp.start()
    idle = timed_calls(dp, p, t_in, 1.0)
    packets = [bytes(RtpPacket(111, seq, seq * 960, 1, payload=bytes(100))).hex() for seq in range(64)]
    host, port = server.getsockname()
    argv = [sys.executable, "-c", BLASTER, host, str(port), str(3 * args.seconds + 1), str(blaster_port)]
    load_cpu = args.load_cpu
    blaster = subprocess.Popen(
        [*argv, *packets],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {load_cpu})) if load_cpu >= 0 else None,
    )
    time.sleep(0.5)
    before = dp.stats()
    loaded = timed_calls(dp, p, t_in, args.seconds)
    after = dp.stats()
    # The thread's side: the same flood with no control-plane call (what the calls cost it).
    time.sleep(args.seconds)
    quiet = dp.stats()
    dp.stop()
    contention_only = timed_calls(dp, p, t_in, args.seconds)
    blaster.wait(30)
    dp.close()
    print(
        json.dumps(
            {
                "fanout": args.fanout,
                "forwarded_pps_under_load": round(
                    (after["forwarded_packets"] - before["forwarded_packets"]) / args.seconds
                ),
                "forwarded_pps_no_calls": round(
                    (quiet["forwarded_packets"] - after["forwarded_packets"]) / args.seconds
                ),
                "batches_per_s_under_load": round((after["batches"] - before["batches"]) / args.seconds),
                "hand_offs_per_s_under_load": round(
                    (after["table_hand_offs"] - before["table_hand_offs"]) / args.seconds
                ),
                "idle": idle,
                "loaded": loaded,
                "loaded_thread_stopped": contention_only,
            }
        )
    )


if __name__ == "__main__":
    main()
