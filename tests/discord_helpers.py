"""A Discord client's UDP side for tests, with crypto from other libraries than ours
(cryptography's AES-GCM, PyNaCl's XChaCha20-Poly1305): docs/transports.md#discord-udp."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl as ssl_module
import struct
from typing import Any

import aiohttp
import nacl.bindings
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fastsfu.discord.crypto import MODES, rtp_clear_length

AES, XCHACHA = MODES


def ref_seal(mode: str, key: bytes, packet: bytes, clear: int, counter: int) -> bytes:
    """Discord's wire layout, built with other libraries: clear ‖ ciphertext ‖ tag ‖ counter (BE)."""
    suffix = counter.to_bytes(4, "big")
    if mode == AES:
        sealed = AESGCM(key).encrypt(suffix + bytes(8), packet[clear:], packet[:clear])
    else:
        sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            packet[clear:], packet[:clear], suffix + bytes(20), key
        )
    return packet[:clear] + sealed + suffix


def ref_open(mode: str, key: bytes, packet: bytes, clear: int) -> tuple[bytes, int]:
    counter = packet[-4:]
    body = packet[clear:-4]
    if mode == AES:
        plain = AESGCM(key).decrypt(counter + bytes(8), body, packet[:clear])
    else:
        plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            body, packet[:clear], counter + bytes(20), key
        )
    return packet[:clear] + plain, int.from_bytes(counter, "big")


def rtp_packet(ssrc: int, seq: int, payload: bytes, *, csrcs: int = 0, extension: bytes = b"") -> bytes:
    b0 = 0x80 | csrcs | (0x10 if extension else 0)
    header = struct.pack("!BBHII", b0, 120, seq, seq * 960, ssrc) + b"".join(
        struct.pack("!I", 0xC0 + i) for i in range(csrcs)
    )
    if extension:
        padded = extension + bytes(-len(extension) % 4)
        header += struct.pack("!HH", 0xBEDE, len(padded) // 4) + padded
    return header + payload


class Client:
    """A Discord client's UDP side, with the reference crypto above."""

    def __init__(self, ssrc: int, mode: str, host: str = "127.0.0.1") -> None:
        self.ssrc = ssrc
        self.mode = mode
        self.key = b""
        self.counter = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.server: tuple[str, int] = ("127.0.0.1", 0)
        self.rtcp: list[bytes] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return host, port

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def discovery(self) -> None:
        self.send(struct.pack("!HHI66x", 1, 70, self.ssrc))

    def send_rtp(self, packet: bytes, counter: int | None = None) -> bytes:
        if counter is None:
            counter, self.counter = self.counter, self.counter + 1
        sealed = ref_seal(self.mode, self.key, packet, rtp_clear_length(packet), counter)
        self.send(sealed)
        return sealed

    async def recv(self, timeout: float = 2.0) -> bytes:
        """The next datagram that is not RTCP (the server's reports come on their own timers;
        djs drops them by payload type too)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), max(deadline - loop.time(), 0))
            if len(data) >= 2 and 192 <= data[1] <= 223 and len(data) != 74:
                self.rtcp.append(data)
                continue
            return data

    async def recv_none(self, wait: float = 0.2) -> None:
        with pytest.raises(TimeoutError):
            data = await self.recv(wait)
            raise AssertionError(f"unexpected datagram {data!r}")

    def close(self) -> None:
        self.sock.close()


async def discover(client: Client) -> None:
    client.discovery()
    response = await client.recv()
    assert len(response) == 74 and response[:8] == struct.pack("!HHI", 2, 70, client.ssrc)
    ip = response[8:72].split(b"\0", 1)[0].decode()
    assert (ip, struct.unpack("!H", response[72:])[0]) == client.address


class Observer:
    """A Discord member on the udp protocol that only listens: it records when each gateway
    message arrives (event-loop time, i.e. time.monotonic()), e.g. to time CLIENT_DISCONNECT."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, udp: Client, interval: float) -> None:
        self.ws = ws
        self.udp = udp
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.close_code: int | None = None  # the server's close frame's, once it closed the socket
        self.token = ""
        self._arrived = asyncio.Event()
        self._seq = -1
        self._reader = asyncio.ensure_future(self._read())
        self._beater = asyncio.ensure_future(self._beat(interval))

    @classmethod
    async def join(
        cls,
        http: aiohttp.ClientSession,
        url: str,
        *,
        server_id: str,
        user_id: int,
        token: str,
        ssl: ssl_module.SSLContext | None = None,
    ) -> Observer:
        """HELLO, IDENTIFY, READY, IP discovery, SELECT_PROTOCOL udp, op 4."""
        ws = await http.ws_connect(url, ssl=ssl if ssl is not None else True)
        hello = await ws.receive_json(timeout=5)
        assert hello["op"] == 8, hello
        identify = {
            "server_id": server_id,
            "user_id": str(user_id),
            "session_id": f"obs-{user_id}",
            "token": token,
        }
        await ws.send_json({"op": 0, "d": identify})
        ready = await ws.receive_json(timeout=5)
        assert ready["op"] == 2, ready
        udp = Client(ready["d"]["ssrc"], AES)
        udp.server = (ready["d"]["ip"], ready["d"]["port"])
        await discover(udp)
        ip, port = udp.address
        await ws.send_json(
            {"op": 1, "d": {"protocol": "udp", "data": {"address": ip, "port": port, "mode": AES}}}
        )
        observer = cls(ws, udp, hello["d"]["heartbeat_interval"] / 1000)
        observer.token = token  # RESUME needs IDENTIFY's
        return observer

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.CLOSE:  # the server's code (aiohttp may log 1006 after)
                    self.close_code = msg.data
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    return
                if msg.type == aiohttp.WSMsgType.TEXT:
                    message = json.loads(msg.data)
                    self._seq = message.get("seq", self._seq)
                    self.received.append((loop.time(), message))
                    self._arrived.set()
        finally:
            self._arrived.set()  # wait_received() learns of the end at once

    async def _beat(self, interval: float) -> None:
        """v8 heartbeats, so that a long observation is not closed with 4009."""
        while not self.ws.closed:
            await asyncio.sleep(interval)
            await self.ws.send_json({"op": 3, "d": {"t": 0, "seq_ack": self._seq}})

    async def wait_op(self, op: int, user_id: int, timeout: float) -> float:
        """When the first `op` about `user_id` arrived (TimeoutError if it does not in time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for at, message in self.received:
                d = message.get("d")
                about = (d.get("user_id"), *d.get("user_ids", ())) if isinstance(d, dict) else ()
                if message.get("op") == op and str(user_id) in about:
                    return at
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), max(deadline - loop.time(), 0))

    async def wait_received(self, count: int, timeout: float) -> None:
        """Until `count` messages have arrived in all: ConnectionError if the socket closes first,
        TimeoutError if they do not arrive in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.received) < count:
            if self._reader.done():
                raise ConnectionError(f"the gateway closed the socket ({self.close_code})")
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), max(deadline - loop.time(), 0))

    async def close(self) -> None:
        self._beater.cancel()
        await self.ws.close()
        self._reader.cancel()
        self.udp.close()
