"""The soak benchmark's reference call, in its own process: two Discord `udp` members at 50 pps each,
a sequence number in every sealed payload, so loss is exact (stdin `mark`: packets sent so far;
any other line: stop and print the report)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from discord_helpers import AES, Client, discover, ref_open, rtp_packet  # noqa: E402

from fastsfu.discord.crypto import rtp_clear_length  # noqa: E402

PACKET_INTERVAL = 0.020  # Opus at 20 ms: 50 pps
PAYLOAD = struct.Struct("!QQ")  # our sequence number, CLOCK_MONOTONIC send time (ns)
PADDING = bytes(64)  # an Opus-sized payload: 80 B in all
LATE_MS = (20.0, 100.0)  # reported thresholds: a tight jitter buffer, then one any client still plays
HEARTBEAT_EVERY = 1.0  # s; each beat acks what we received (v8 seq_ack), so nothing piles up server-side


class Member:
    """One reference member: gateway session (JSON over WebSocket) plus its UDP client."""

    def __init__(self, user_id: int, token: str) -> None:
        self.user_id, self.token = user_id, token
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.udp: Client | None = None
        self.seq_ack = -1
        self.ssrc_of: dict[int, int] = {}  # user -> SSRC, from op 5
        self.joins: list[int] = []  # op 11 user IDs, in order
        self.leaves: list[int] = []  # op 13 user IDs
        self.sent = 0
        self.received = bytearray()  # one flag per partner sequence number
        self.duplicates = 0
        self.late = [0 for _ in LATE_MS]
        self.max_latency_ms = 0.0
        self.latencies: list[float] = []
        self.other_packets = 0  # RTP from churn members that produced
        self.bad_packets = 0  # would not open or parse
        self.partner_ssrc = -1
        self.closed_code: int | None = None

    async def connect(self, url: str, http: aiohttp.ClientSession, server_id: str) -> None:
        self.ws = await http.ws_connect(url, heartbeat=None)
        hello = await self.recv()
        assert hello["op"] == 8, hello
        ident = {"server_id": server_id, "user_id": str(self.user_id), "session_id": f"ref{self.user_id}"}
        await self.send(0, ident | {"token": self.token})
        ready = await self.expect(2)
        udp = Client(ready["d"]["ssrc"], AES)
        udp.server = (ready["d"]["ip"], ready["d"]["port"])
        udp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        await discover(udp)
        ip, port = udp.address
        await self.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": AES}})
        udp.key = bytes((await self.expect(4))["d"]["secret_key"])
        self.udp = udp
        await self.send(5, {"speaking": 1, "delay": 0, "ssrc": udp.ssrc})

    async def send(self, op: int, d: Any) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps({"op": op, "d": d}))

    async def recv(self) -> dict[str, Any]:
        assert self.ws is not None
        msg = await asyncio.wait_for(self.ws.receive(), 10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"reference member {self.user_id}: {msg.type} {msg.data}")
        data: dict[str, Any] = json.loads(msg.data)
        self.note(data)
        return data

    async def expect(self, op: int) -> dict[str, Any]:
        while (data := await self.recv())["op"] != op:
            pass
        return data

    def note(self, data: dict[str, Any]) -> None:
        if isinstance(data.get("seq"), int):
            self.seq_ack = data["seq"]
        d: Any = data.get("d")
        if data["op"] == 11:
            self.joins += [int(u) for u in d["user_ids"]]
        elif data["op"] == 13:
            self.leaves.append(int(d["user_id"]))
        elif data["op"] == 5 and "user_id" in d:
            self.ssrc_of[int(d["user_id"])] = d["ssrc"]

    async def pump(self) -> None:
        """Read gateway events until the socket ends (counted as a failure by the caller)."""
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.note(json.loads(msg.data))
        self.closed_code = self.ws.close_code

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            await self.send(3, {"t": time.monotonic_ns(), "seq_ack": self.seq_ack})

    def talk(self) -> None:
        assert self.udp is not None
        body = PAYLOAD.pack(self.sent, time.monotonic_ns()) + PADDING
        self.udp.send_rtp(rtp_packet(self.udp.ssrc, self.sent & 0xFFFF, body))
        self.sent += 1

    def readable(self) -> None:
        """Drain the socket: count the partner's sequence numbers, latency, and anything else."""
        assert self.udp is not None
        while True:
            try:
                data = self.udp.sock.recv(2048)
            except BlockingIOError:
                return
            now = time.monotonic_ns()
            if len(data) < 12 or not 128 <= data[0] < 192 or 192 <= data[1] <= 223:
                continue  # IP discovery answers and RTCP reports
            ssrc = struct.unpack_from("!I", data, 8)[0]
            if ssrc != self.partner_ssrc:
                self.other_packets += 1
                continue
            try:
                plain, _ = ref_open(AES, self.udp.key, data, rtp_clear_length(data))
                seq, stamp = PAYLOAD.unpack_from(plain, len(plain) - len(PADDING) - PAYLOAD.size)
            except Exception:
                self.bad_packets += 1
                continue
            if seq >= len(self.received):
                self.received.extend(bytes(seq + 1 - len(self.received) + 4096))
            if self.received[seq]:
                self.duplicates += 1
                continue
            self.received[seq] = 1
            latency = (now - stamp) / 1e6
            self.max_latency_ms = max(self.max_latency_ms, latency)
            self.latencies.append(latency)
            for i, limit in enumerate(LATE_MS):
                self.late[i] += latency > limit

    def report(self, partner: Member) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else 0.0

        received = sum(self.received)
        # The partner's own join (op 11 either way round) is the call itself, not churn.
        joins = [u for u in self.joins if u != partner.user_id]
        leaves = [u for u in self.leaves if u != partner.user_id]
        return {
            "user": self.user_id,
            "expected": partner.sent,
            "received": received,
            "lost": partner.sent - received,
            "duplicates": self.duplicates,
            "bad_packets": self.bad_packets,
            **{f"late_over_{int(limit)}ms": n for limit, n in zip(LATE_MS, self.late, strict=True)},
            "latency_ms": {
                "p50": pct(0.5),
                "p99": pct(0.99),
                "p99.9": pct(0.999),
                "max": self.max_latency_ms,
            },
            "churn_packets_received": self.other_packets,
            "joins_seen": len(joins),
            "leaves_seen": len(leaves),
            "joined_never_left": sorted(set(joins) - set(leaves))[:20],
            "left_never_joined": sorted(set(leaves) - set(joins))[:20],
            "partner_left": partner.user_id in self.leaves,
            "lost_seqs": [i for i in range(partner.sent) if i >= len(self.received) or not self.received[i]],
            "gateway_closed": self.closed_code,
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = json.loads(args.tokens)
    a, b = (Member(int(user), token) for user, token in tokens.items())
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        await a.connect(args.url, http, args.server_id)
        await b.connect(args.url, http, args.server_id)
        tasks = [asyncio.ensure_future(t) for m in (a, b) for t in (m.pump(), m.beat())]
        for me, partner in ((a, b), (b, a)):
            assert me.udp is not None
            for _ in range(100):  # op 5 from the server names the partner's SSRC on our side
                if partner.user_id in me.ssrc_of:
                    break
                await asyncio.sleep(0.02)
            me.partner_ssrc = me.ssrc_of[partner.user_id]
            loop.add_reader(me.udp.sock.fileno(), me.readable)
        command = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
        print("ready", flush=True)
        start = loop.time()
        ticks = 0
        while True:
            # An absolute schedule: a late wake-up sends the missed packets at once, never fewer.
            while start + ticks * PACKET_INTERVAL <= loop.time():
                a.talk()
                b.talk()
                ticks += 1
            await asyncio.wait([command], timeout=max(start + ticks * PACKET_INTERVAL - loop.time(), 0))
            if command.done():
                if command.result().strip() != "mark":
                    break  # "stop", or stdin closed
                # Packets sent so far: the caller splits the loss by phase at these marks.
                print(json.dumps({"sent": [a.sent, b.sent]}), flush=True)
                command = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
        await asyncio.sleep(args.drain)  # what is still in flight
        for m in (a, b):
            assert m.udp is not None
            loop.remove_reader(m.udp.sock.fileno())
            m.readable()
        out = {"seconds": round(loop.time() - start, 3), "members": [a.report(b), b.report(a)]}
        for t in tasks:
            t.cancel()
        for m in (a, b):
            assert m.ws is not None and m.udp is not None
            await m.ws.close()
            m.udp.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True, help="Discord voice gateway URL (ws://host:port/?v=8)")
    ap.add_argument("--server-id", required=True)
    ap.add_argument("--tokens", required=True, help='JSON {"user": "token", ...} for the two members')
    ap.add_argument("--drain", type=float, default=0.5, help="seconds to wait for packets in flight")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
