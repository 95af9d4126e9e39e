"""Subprocess for test_no_per_packet_work: drains N SRTP packets through a real socket and
prints (allocations, python calls, forwarded) measured around the drain calls only."""

from __future__ import annotations

import ctypes
import json
import socket
import sys

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

SUITE = "AES_CM_128_HMAC_SHA1_80"


def main(n: int, fanout: int) -> None:
    counter = ctypes.CDLL(None).malloc_count
    counter.restype = ctypes.c_uint64
    dp = _rtp.Datapath()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    sock = dp.add_socket(server.fileno(), socket.AF_INET, True)
    up = generate_key(SUITE)
    t_in = dp.add_transport(sock)
    dp.set_transport_remote(t_in, *client.getsockname())
    inbound = SrtpContext(SUITE, up, True)
    inbound.add_stream(1)
    dp.set_transport_srtp(t_in, inbound, None)
    p = dp.add_producer(t_in, 1, 111, 48000, {1: 2})
    keep = []
    for i in range(fanout):
        t = dp.add_transport(sock)
        dp.set_transport_remote(t, "127.0.0.1", sink.getsockname()[1] if i == 0 else 9 + i)
        out = SrtpContext(SUITE, generate_key(SUITE), False)
        out.add_stream(100 + i)
        dp.set_transport_srtp(t, None, out)
        dp.add_consumer(p, t, 100 + i, 100, {2: 3}, b"0")
        keep.append(out)
    sender = SrtpContext(SUITE, up, False)
    packets = [
        sender.protect(bytes(RtpPacket(111, s, s * 960, 1, extensions=[(1, b"\x80")], payload=bytes(100))))
        for s in range(n + 32)
    ]
    poll = dp.poll  # what the Engine calls when the epoll fd is readable
    destination = server.getsockname()

    def window(chunk: list[bytes]) -> int:
        """Allocations while draining one chunk of datagrams already queued on the socket."""
        for data in chunk:
            client.sendto(data, destination)
        before = counter()
        while poll(1 << 30) is not None:
            pass
        return counter() - before

    window([])  # warm up lazy initialisation
    overhead = min(window([]) for _ in range(3))  # reading the counter itself
    chunks = [packets[i : i + 32] for i in range(0, n + 32, 32)]  # n measured, then 32 more
    allocations = sum(window(chunk) - overhead for chunk in chunks[:-1])
    # Python-level calls, counted with a profiler in a separate window (it allocates itself).
    calls = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += 1

    for data in chunks[-1]:
        client.sendto(data, destination)
    sys.setprofile(profile)
    poll(1 << 30)
    sys.setprofile(None)
    calls -= 1  # the setprofile(None) call itself
    # Control: the counter does see Python allocations (the measurement is not vacuous).
    before = counter()
    control = [bytes(k) for k in range(1, 11)]
    control_allocations = counter() - before - overhead
    del control
    stats = dp.stats()
    print(
        json.dumps(
            {
                "allocations": allocations,
                "python_calls": calls,
                "control_allocations": control_allocations,
                "forwarded": stats["forwarded_packets"],
                "batches": stats["batches"],
            }
        )
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
