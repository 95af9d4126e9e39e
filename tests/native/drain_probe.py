"""Subprocess for test_no_per_packet_work: drains N protected packets (SRTP, or a Discord AEAD
mode) through a real socket and prints (allocations, python calls, forwarded) measured around the
drain calls only: inline (the event loop's poll() call) or on the datapath thread. With a fan-out
above 1 the last consumer is a pipe (passthrough) consumer, and a recording tap copies every packet.
With "red", the packets are Opus RED (RFC 2198): every other consumer unwraps them, the rest get RED.
With "tcp" the sender and the first receiver are ICE-TCP connections (RFC 4571 frames)."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key

SUITE = "AES_CM_128_HMAC_SHA1_80"


def protection(
    kind: str,
) -> tuple[Callable[[], Any], Callable[[bytes], bytes], Callable[[Any, int, Any, Any], None]]:
    """(make an outbound context, protect a client packet, install contexts on a transport)."""
    if kind == "srtp":
        up = generate_key(SUITE)
        sender = SrtpContext(SUITE, up, False)

        def install_srtp(dp: Any, t: int, inbound: Any, outbound: Any) -> None:
            if inbound is not None:
                inbound.add_stream(1)
            dp.set_transport_srtp(t, inbound, outbound)

        return (
            lambda: (SrtpContext(SUITE, up, True), lambda ssrc: _out_srtp(ssrc)),  # type: ignore[return-value]
            sender.protect,
            install_srtp,
        )
    from fastsfu.discord.crypto import AeadContext, rtp_clear_length

    key = os.urandom(32)
    client = AeadContext(kind, key)

    def install_aead(dp: Any, t: int, inbound: Any, outbound: Any) -> None:
        dp.set_transport_aead(t, inbound if inbound is not None else outbound)

    return (
        lambda: (AeadContext(kind, key), lambda ssrc: AeadContext(kind, os.urandom(32))),  # type: ignore[return-value]
        lambda packet: client.seal(packet, rtp_clear_length(packet)),
        install_aead,
    )


def _out_srtp(ssrc: int) -> SrtpContext:
    out = SrtpContext(SUITE, generate_key(SUITE), False)
    out.add_stream(ssrc)
    return out


def red_payload(s: int) -> bytes:
    """One redundant 40-byte Opus block (the previous frame's), then a 100-byte primary."""
    return bytes([0x80 | 111]) + (960 << 10 | 40).to_bytes(3, "big") + bytes([111]) + bytes(140)


class FramedClient:
    """The sending client over TCP: sendto() writes one RFC 4571 frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendto(self, data: bytes, _addr: object) -> None:
        self.sock.sendall(len(data).to_bytes(2, "big") + data)


def tcp_pair(listener: socket.socket, dp: Any) -> tuple[socket.socket, socket.socket, int]:
    """(client end, server end, datapath slot) of one accepted loopback connection."""
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    server, addr = listener.accept()
    server.setblocking(False)
    return client, server, dp.add_tcp_connection(server.fileno(), socket.AF_INET, addr[0], addr[1])


def main(n: int, fanout: int, kind: str, threaded: bool, variant: str = "") -> None:
    red, tcp = variant == "red", variant == "tcp"
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
    contexts, protect, install = protection(kind)
    inbound, make_outbound = contexts()
    t_in = dp.add_transport(sock)
    dp.set_transport_remote(t_in, *client.getsockname())
    if tcp:
        listener = socket.create_server(("127.0.0.1", 0))
        tcp_client, tcp_in, slot_in = tcp_pair(listener, dp)
        tcp_sink, tcp_out, slot_out = tcp_pair(listener, dp)
        dp.set_transport_tcp(t_in, slot_in)
        client = FramedClient(tcp_client)  # type: ignore[assignment]
        sink = tcp_sink
        sink.settimeout(10)
    install(dp, t_in, inbound, None)
    p = dp.add_producer(t_in, 1, 111, 48000, {1: 2})
    assert dp.set_producer_levels(p, True)  # ssrc-audio-level read per packet (an observer's)
    if red:
        dp.set_producer_red(p, 63)
    keep = [inbound]
    for i in range(fanout):
        t = dp.add_transport(sock)
        dp.set_transport_remote(t, "127.0.0.1", sink.getsockname()[1] if i == 0 else 9 + i)
        if tcp and i == 0:
            dp.set_transport_tcp(t, slot_out)
        if fanout > 1 and i == fanout - 1:
            # A pipe consumer (passthrough): the producer's SSRC, PT, extension ID, seq and ts.
            out = make_outbound(1)
            install(dp, t, None, out)
            dp.add_consumer(p, t, 1, 111, {2: 1}, b"", False, True)
        else:
            out = make_outbound(100 + i)
            install(dp, t, None, out)
            c = dp.add_consumer(p, t, 100 + i, 100, {2: 3}, b"0")
            if red and i % 2:
                dp.set_consumer_red(c, 101)  # RED forwarded, its block PTs rewritten to 100
        keep.append(out)
    # With a fan-out above 1, a recording tap too (docs/recording.md): a direct consumer copying
    # each decrypted payload into a ring the probe never drains (512 slots: room for them all).
    tap = dp.add_tap(512) if fanout > 1 else -1
    if tap >= 0:
        dp.add_direct_consumer(p, tap)
    packets = [
        protect(
            bytes(
                RtpPacket(
                    63 if red else 111,
                    s,
                    s * 960,
                    1,
                    extensions=[(1, b"\x80")],
                    payload=red_payload(s) if red else bytes(100),
                )
            )
        )
        for s in range(n + 33)
    ]
    first, packets = packets[0], packets[1:]
    poll = dp.poll  # what the Engine calls when the epoll fd is readable
    destination = server.getsockname()
    # Threaded: Python calls on the datapath thread are counted by a profiler installed in it.
    thread_calls = 0

    def thread_profile(frame: object, event: str, arg: object) -> None:
        nonlocal thread_calls
        thread_calls += 1

    if threaded:
        threading.setprofile(thread_profile)  # for threads started from here on: the datapath's
        dp.start()
        threading.setprofile(None)  # type: ignore[arg-type]
        sink.settimeout(10)
        lock = dp.tables_lock
        received = bytearray(4096)
    # One packet before measuring: its size at the sink is every forwarded packet's (the same
    # header, extensions and payload), so that a TCP sink reads exactly one frame per recv.
    client.sendto(first, destination)
    if not threaded:
        poll(1 << 30)
    frame = len(sink.recv(4096))
    wait_all = socket.MSG_WAITALL if tcp else 0

    def window(chunk: list[bytes]) -> int:
        """Allocations while draining one chunk of datagrams already queued on the socket."""
        if not threaded:
            for data in chunk:
                client.sendto(data, destination)
            before = counter()
            while poll(1 << 30) is not None:
                pass
            return counter() - before
        with lock:  # the thread waits for the tables: the chunk is handled after `before`
            for data in chunk:
                client.sendto(data, destination)
            before = counter()
        for _ in chunk:  # consumer 0's copies reach the sink once their batch is sent
            sink.recv_into(received, frame, wait_all)
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

    profiled = thread_calls  # the thread's own start-up (its run() call): the profiler is in it
    if threaded:
        thread_calls = 0
        window(chunks[-1])
        calls = thread_calls
    else:
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
    ((level_count, _, _, _, _),) = dp.take_levels([p])
    tapped = dp.tap_stats(tap)["packets"] if tap >= 0 else 0
    dp.close()
    if tcp:
        assert stats["drops"]["tcp_overflow"] == 0 and not dp.take_tcp_closed()
    print(
        json.dumps(
            {
                "allocations": allocations,
                "python_calls": calls,
                "control_allocations": control_allocations,
                "thread_profiled_calls": profiled,
                "forwarded": stats["forwarded_packets"],
                "batches": stats["batches"],
                "levels": level_count,
                "tapped": tapped,
            }
        )
    )


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3] if len(sys.argv) > 3 else "srtp",
        len(sys.argv) > 4 and sys.argv[4] == "threaded",
        sys.argv[5] if len(sys.argv) > 5 else "",
    )
