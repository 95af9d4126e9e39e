"""An embedded default configuration: a demo room of SRTP PlainTransports with synthetic speakers.

Each speaker is a loopback UDP client sending Opus-sized SRTP at 50 packets/s, so a fresh
`fastsfu serve` shows the datapath forwarding and its counters moving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
from dataclasses import dataclass

from fastsfu import ortc
from fastsfu.engine import Engine
from fastsfu.plain_transport import PlainTransport
from fastsfu.router import Router
from fastsfu.rtp import RtpPacket
from fastsfu.srtp import SrtpContext, generate_key
from fastsfu.types import RtpParameters

DEMO_SUITE = "AEAD_AES_128_GCM"
OPUS_PT = 111
LEVEL_ID = 1


def demo_producer_parameters(ssrc: int) -> RtpParameters:
    return {
        "codecs": [{"mimeType": "audio/opus", "payloadType": OPUS_PT, "clockRate": 48000, "channels": 2}],
        "headerExtensions": [{"uri": ortc.URI_AUDIO_LEVEL, "id": LEVEL_ID}],
        "encodings": [{"ssrc": ssrc}],
        "rtcp": {"cname": f"demo-{ssrc}"},
    }


@dataclass
class DemoSpeaker:
    """A synthetic client: its socket, its SRTP sender, its transport on the server."""

    sock: socket.socket
    srtp: SrtpContext
    transport: PlainTransport
    ssrc: int
    received: int = 0
    seq: int = 0

    def send_one(self) -> None:
        pkt = RtpPacket(
            OPUS_PT,
            self.seq & 0xFFFF,
            (self.seq * 960) & 0xFFFFFFFF,
            self.ssrc,
            extensions=[(LEVEL_ID, b"\x9e")],
            payload=os.urandom(80 + self.seq % 40),
        )
        self.seq += 1
        dest = (self.transport.tuple["localIp"], self.transport.tuple["localPort"])
        with contextlib.suppress(OSError):  # a full socket buffer on a busy machine: skip a frame
            self.sock.sendto(self.srtp.protect(bytes(pkt)), dest)

    def drain(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except OSError:
                return
            self.received += 1


class DemoRoom:
    """A router with `speakers` participants, each producing and consuming everyone else."""

    def __init__(self, engine: Engine, speakers: int, listen_ip: str) -> None:
        self.engine = engine
        self.router: Router = engine.create_router(app_data={"demo": True})
        self.speakers: list[DemoSpeaker] = []
        caps = self.router.rtp_capabilities
        for i in range(speakers):
            sock = socket.socket(socket.AF_INET6 if ":" in listen_ip else socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((listen_ip, 0))
            sock.setblocking(False)
            key = generate_key(DEMO_SUITE)
            transport = self.router.create_plain_transport(
                listen_ip=listen_ip, enable_srtp=True, srtp_crypto_suite=DEMO_SUITE, app_data={"speaker": i}
            )
            transport.connect(
                sock.getsockname()[0],
                sock.getsockname()[1],
                {"cryptoSuite": DEMO_SUITE, "keyBase64": _b64(key)},
            )
            ssrc = 0x0D000000 + i
            transport.produce(demo_producer_parameters(ssrc))
            self.speakers.append(
                DemoSpeaker(sock, SrtpContext(DEMO_SUITE, key, inbound=False), transport, ssrc)
            )
            engine.loop.add_reader(sock.fileno(), self.speakers[-1].drain)
        for speaker in self.speakers:
            for producer in self.router.producers.values():
                if producer.transport is not speaker.transport:
                    speaker.transport.consume(producer.id, caps)

    async def talk(self, stop: asyncio.Event) -> None:
        """Every speaker sends one packet per 20 ms, spread over the period."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while not stop.is_set():
            for speaker in self.speakers:
                speaker.send_one()
            tick += 1
            delay = start + tick * 0.020 - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    def close(self) -> None:
        for speaker in self.speakers:
            self.engine.loop.remove_reader(speaker.sock.fileno())
            speaker.sock.close()
        self.router.close()


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()
