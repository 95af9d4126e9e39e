"""TableHold: one hold of the datapath's tables across many control-plane calls, handed to a
datapath thread that waits for them (TableLock.hand_back), and always released."""

from __future__ import annotations

import gc
import socket
import threading
import time

import pytest

from fastsfu import _rtp
from fastsfu.rtp import RtpPacket
from fastsfu.table_hold import TableHold

pytestmark = [pytest.mark.timeout(30)]

PACKETS = 20


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def forwarding_datapath() -> tuple[_rtp.Datapath, list[socket.socket]]:
    """A running datapath thread forwarding what `client` sends to the server socket."""
    # No queue-age drop: on a starved machine a burst could outwait it, and these tests are about
    # the hand-over, not the late-packet policy.
    dp = _rtp.Datapath(
        max_sockets=2, max_transports=4, max_producers=2, max_consumers=4, max_queue_age_ms=0
    )
    server, client, sink = udp(), udp(), udp()
    s = dp.add_socket(server.fileno(), socket.AF_INET, True)
    t_in = dp.add_transport(s)
    dp.set_transport_remote(t_in, *client.getsockname())
    t_out = dp.add_transport(s)
    dp.set_transport_remote(t_out, *sink.getsockname())
    dp.add_consumer(dp.add_producer(t_in, 1, 111, 48000, {}), t_out, 2, 100, {})
    dp.start()
    return dp, [server, client, sink]


def send_burst(client: socket.socket, server: socket.socket, first_seq: int) -> None:
    for seq in range(first_seq, first_seq + PACKETS):
        client.sendto(bytes(RtpPacket(111, seq, seq * 960, 1, payload=bytes(60))), server.getsockname())


def forwarded(dp: _rtp.Datapath) -> int:
    return int(dp.stats()["forwarded_packets"])  # under the (recursive) table mutex


def test_a_long_hold_lets_a_waiting_datapath_thread_forward() -> None:
    dp, (server, client, sink) = forwarding_datapath()
    try:
        # A plain hold starves the thread: what arrives meanwhile waits for the hold to end.
        with dp.tables_lock:
            before = forwarded(dp)
            send_burst(client, server, 0)
            time.sleep(0.05)
            assert forwarded(dp) == before
        deadline = time.monotonic() + 5
        while forwarded(dp) < before + PACKETS and time.monotonic() < deadline:
            time.sleep(0.005)
        # A TableHold ticked between items hands the tables over, and the packets go out during it.
        with TableHold(dp.tables_lock, budget=0.0) as hold:
            before = forwarded(dp)
            send_burst(client, server, PACKETS)
            deadline = time.monotonic() + 5
            while forwarded(dp) < before + PACKETS and time.monotonic() < deadline:
                time.sleep(0.001)  # an item's work
                hold.tick()
            assert forwarded(dp) == before + PACKETS
            assert hold.hand_backs >= 1
    finally:
        dp.close()
        for sock in (server, client, sink):
            sock.close()


def test_hand_back_only_from_the_outermost_hold_to_a_waiting_thread_and_release_on_error() -> None:
    dp = _rtp.Datapath(max_sockets=1, max_transports=1, max_producers=1, max_consumers=1)
    try:
        with dp.tables_lock:
            assert dp.tables_lock.hand_back() is False  # no thread waits
            with dp.tables_lock:
                assert dp.tables_lock.hand_back() is False  # nested: not ours to hand over
        with pytest.raises(RuntimeError), TableHold(dp.tables_lock, budget=0.0) as hold:
            hold.tick()
            raise RuntimeError("an item failed")
        # Released: another thread takes the tables at once.
        taken = threading.Event()

        def take() -> None:
            with dp.tables_lock:
                taken.set()

        other = threading.Thread(target=take, daemon=True)
        other.start()
        other.join(5)
        assert taken.is_set()
    finally:
        dp.close()


def test_a_hold_taken_through_the_gate_hands_the_tables_back_too() -> None:
    """A caller that waited for the thread's hand-off (it came in while the thread forwarded a
    batch) holds the gate as well as the tables: the thread then waits at the gate, and a long
    hold must still let it forward. Entered right after a burst, many times, so that the hold
    often starts while the thread works (it starved there for the whole hold before)."""
    dp, (server, client, sink) = forwarding_datapath()
    try:
        seq = 0
        for _ in range(40):
            before = forwarded(dp)
            send_burst(client, server, seq)
            seq += PACKETS
            with TableHold(dp.tables_lock, budget=0.0) as hold:
                deadline = time.monotonic() + 5
                while forwarded(dp) < before + PACKETS and time.monotonic() < deadline:
                    time.sleep(0.0005)
                    hold.tick()
                assert forwarded(dp) == before + PACKETS
    finally:
        dp.close()
        for sock in (server, client, sink):
            sock.close()


def test_no_garbage_collection_while_the_tables_are_held() -> None:
    """A collection inside a hold would keep a waiting datapath thread at the gate for all of
    it (41 ms seen in a join storm); the collector is off for the outermost hold, and back on,
    exception or not, unless the application had turned it off itself."""
    dp = _rtp.Datapath(max_sockets=4, max_transports=4, max_producers=4, max_consumers=4)
    lock = dp.tables_lock
    starts: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            starts.append(info["generation"])

    def cycles(n: int) -> None:
        for _ in range(n):
            a: list[object] = []
            a.append(a)

    gc.callbacks.append(on_gc)
    try:
        assert gc.isenabled()
        with lock:
            with lock:
                cycles(50_000)  # dozens of generation-0 thresholds' worth
                assert not gc.isenabled()
            assert not gc.isenabled() and starts == []
            with TableHold(lock) as hold:
                hold.tick()
                assert not gc.isenabled()
        assert gc.isenabled()
        cycles(5_000)
        assert starts, "the garbage made during the hold is collected after it"
        with pytest.raises(RuntimeError), lock:
            raise RuntimeError("inside a hold")
        assert gc.isenabled()
        gc.disable()
        with lock:
            pass
        assert not gc.isenabled()  # the application's choice stands
    finally:
        gc.enable()
        gc.callbacks.remove(on_gc)
