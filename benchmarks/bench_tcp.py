"""CPU per forwarded packet to ICE-TCP receivers vs UDP receivers (docs/transports.md, "ICE over TCP").

One producer's SRTP (AES-CM-80, 160-byte packets) arrives on a real UDP socket and is forwarded by
an inline Datapath to `--fanout` receivers that are either UDP tuples of the shared socket
(sendmmsg) or accepted loopback TCP connections (RFC 4571 frames, one send() per connection and
batch). Per round, `--batch` packets are queued on the input socket, then one poll() is timed with
the thread's CPU clock (user + system: the kernel's send path is what differs), then the sinks are
drained untimed. Rounds alternate UDP / TCP; prints the median and range of each, in ns per
forwarded packet, and one JSON line.

    .venv/bin/python benchmarks/bench_tcp.py [--fanout 10] [--rounds 15] [--batch 256] [--per-round 20]

Results and their reading: benchmarks/README.md, "ICE-TCP receivers vs UDP receivers".
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from typing import Any

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

SUITE = "AES_CM_128_HMAC_SHA1_80"


class Setup:
    """A datapath with one producer and `fanout` receivers of one kind."""

    def __init__(self, kind: str, fanout: int) -> None:
        self.kind = kind
        self.dp = _rtp.Datapath(max_sockets=64, max_transports=64, max_producers=4, max_consumers=64)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        sock = self.dp.add_socket(self.server.fileno(), socket.AF_INET, False)
        key = generate_key(SUITE)
        self.protect = SrtpContext(SUITE, key, False).protect
        inbound = SrtpContext(SUITE, key, True)
        inbound.add_stream(1)
        t_in = self.dp.add_transport(sock)
        self.dp.set_transport_remote(t_in, *self.client.getsockname())
        self.dp.set_transport_srtp(t_in, inbound, None)
        p = self.dp.add_producer(t_in, 1, 111, 48000, {})
        self.keep: list[Any] = [inbound]
        self.sinks: list[socket.socket] = []
        listener = socket.create_server(("127.0.0.1", 0)) if kind == "tcp" else None
        for i in range(fanout):
            t = self.dp.add_transport(sock)
            if listener is not None:
                sink = socket.create_connection(listener.getsockname())
                conn, addr = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.keep.append(conn)
                slot = self.dp.add_tcp_connection(conn.fileno(), socket.AF_INET, addr[0], addr[1])
                self.dp.set_transport_tcp(t, slot)
            else:
                sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sink.bind(("127.0.0.1", 0))
                self.dp.set_transport_remote(t, *sink.getsockname())
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sink.setblocking(False)
            self.sinks.append(sink)
            out = SrtpContext(SUITE, generate_key(SUITE), False)
            out.add_stream(100 + i)
            self.dp.set_transport_srtp(t, None, out)
            self.keep.append(out)
            self.dp.add_consumer(p, t, 100 + i, 100, {})
        if listener is not None:
            listener.close()
        self.seq = 0
        self.buf = bytearray(1 << 16)

    def round(self, batch: int) -> tuple[int, int]:
        """(thread CPU ns of the poll() calls, packets forwarded) for one batch."""
        dest = self.server.getsockname()
        for _ in range(batch):
            pkt = RtpPacket(111, self.seq & 0xFFFF, self.seq * 960, 1, payload=bytes(148))
            self.client.sendto(self.protect(bytes(pkt)), dest)
            self.seq += 1
        fwd0 = self.dp.stats()["forwarded_packets"]
        start = time.thread_time_ns()
        while self.dp.poll(1 << 30) is not None:
            pass
        spent = time.thread_time_ns() - start
        forwarded = self.dp.stats()["forwarded_packets"] - fwd0
        for sink in self.sinks:
            while True:
                try:
                    if not sink.recv_into(self.buf):
                        break
                except BlockingIOError:
                    break
        return spent, forwarded

    def check(self) -> None:
        drops = self.dp.stats()["drops"]
        assert drops["tcp_overflow"] == drops["send_failed"] == 0, drops
        assert not self.dp.take_tcp_closed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fanout", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-round", type=int, default=20, help="batches per round")
    args = ap.parse_args()
    setups = {kind: Setup(kind, args.fanout) for kind in ("udp", "tcp")}
    for s in setups.values():
        s.round(args.batch)  # warm up
    results: dict[str, list[float]] = {"udp": [], "tcp": []}
    for r in range(args.rounds):
        for kind in ("udp", "tcp") if r % 2 == 0 else ("tcp", "udp"):
            spent = forwarded = 0
            for _ in range(args.per_round):
                cpu, fwd = setups[kind].round(args.batch)
                spent += cpu
                forwarded += fwd
            assert forwarded == args.batch * args.per_round * args.fanout, (kind, forwarded)
            results[kind].append(spent / forwarded)
    for s in setups.values():
        s.check()
    summary = {
        kind: {
            "median_ns": round(statistics.median(v), 1),
            "min_ns": round(min(v), 1),
            "max_ns": round(max(v), 1),
        }
        for kind, v in results.items()
    }
    ratio = summary["tcp"]["median_ns"] / summary["udp"]["median_ns"]
    for kind, s in summary.items():
        print(f"{kind}: {s['median_ns']} ns per forwarded packet [{s['min_ns']}-{s['max_ns']}]")
    print(f"tcp / udp: {ratio:.3f}")
    print(
        json.dumps(
            {"fanout": args.fanout, "rounds": args.rounds, "batch": args.batch, **summary, "ratio": ratio}
        )
    )


if __name__ == "__main__":
    main()
