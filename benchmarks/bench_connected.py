"""Kernel CPU per datagram the datapath sends on a connected vs an unconnected socket (docs/datapath.md).

One Datapath socket sends 120-byte datagrams in sendmmsg batches of 32 to a loopback receiver that
this process drains; rounds alternate connected / unconnected. Prints one JSON line: median system
CPU µs per datagram of each (send and receive; the receive side is the same in both).

    .venv/bin/python benchmarks/bench_connected.py [--packets 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics

from fastsfu import _rtp

BATCH = 32


def one_round(connected: bool, packets: int) -> float:
    """System CPU µs per datagram for `packets` datagrams sent (and drained) in batches."""
    dp = _rtp.Datapath(max_sockets=1, max_transports=1, max_producers=1, max_consumers=1)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
    ):
        tx.bind(("127.0.0.1", 0))
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        rx.setblocking(False)
        sock = dp.add_socket(tx.fileno(), socket.AF_INET, False)
        t = dp.add_transport(sock)
        dp.set_socket_connect(sock, connected)
        dp.set_transport_remote(t, "127.0.0.1", rx.getsockname()[1])
        assert (dp.socket_peer(sock) == t) == connected
        data = bytes([0x80, 200]) + bytes(118)  # RTCP-shaped: send_rtcp takes it as is
        buf = bytearray(2048)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        for _ in range(packets // BATCH):
            for _ in range(BATCH):
                dp.send_rtcp(t, data, False)
            dp.flush()
            for _ in range(BATCH):
                try:
                    rx.recv_into(buf)
                except BlockingIOError:
                    break
        spent = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        dp.remove_transport(t)
        dp.remove_socket(sock)
    dp.close()
    return spent * 1e6 / (packets // BATCH * BATCH)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    runs: dict[str, list[float]] = {"connected": [], "unconnected": []}
    for _ in range(args.rounds):
        runs["connected"].append(one_round(True, args.packets))
        runs["unconnected"].append(one_round(False, args.packets))
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    out = {
        "sys_us_per_datagram": med,
        "ratio_connected_to_unconnected": round(med["connected"] / med["unconnected"], 3),
        "rounds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
