"""The soak benchmark's churn: one join/leave cycle per protocol (hRPC, gRPC, Discord), at the
signaling level or, every Nth Harmony cycle, with aiortc ICE + DTLS; a cycle may vanish instead of leaving."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from aiortc_helpers import AiortcLeg  # noqa: E402
from discord_helpers import AES, Client, rtp_packet  # noqa: E402
from helpers import OPUS_CAPS  # noqa: E402

from fastsfu._proto.hrpc.v1 import hrpc_pb2  # noqa: E402
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc  # noqa: E402
from fastsfu.dtls import DtlsCertificate  # noqa: E402
from fastsfu.harmony.auth import TokenAuth  # noqa: E402

Req = voice_pb2.StreamMessageRequest
Resp = voice_pb2.StreamMessageResponse
PROTOCOLS = ("hrpc", "grpc", "discord")
STEP_TIMEOUT = 10.0  # s per message awaited; a cycle that waits longer fails (and is counted)
DISCOVERY_TIMEOUT = 5.0  # s without an IP discovery answer: the cycle fails
DISCORD_PACKETS = 5  # RTP packets a Discord cycle sends (the reference members receive them)


@dataclass
class Target:
    """Where the server under test listens, and how to get in."""

    hrpc_url: str
    grpc_addr: str
    discord_url: str
    auth: TokenAuth
    guild_id: int
    channel_id: int
    server_id: str  # the Discord server_id mapped to (guild_id, channel_id)


class CycleError(Exception):
    """A cycle that did not go as the protocol says (the message names the step)."""


def _dtls_parameters(fingerprints: list[dict[str, str]]) -> str:
    return json.dumps({"role": "client", "fingerprints": fingerprints})


def _rtp_parameters(user: int) -> str:
    return json.dumps(
        {
            "codecs": [{"mimeType": "audio/opus", "payloadType": 111, "clockRate": 48000, "channels": 2}],
            "encodings": [{"ssrc": 0x10000000 + user}],
            "rtcp": {"cname": f"soak{user}"},
        }
    )


def _expect(resp: Resp, what: str) -> voice_pb2.StreamMessageResponse:
    if resp.WhichOneof("message") != what:
        raise CycleError(f"expected {what}, got {resp}")
    return resp


class Harmony:
    """One Harmony VoiceService stream's send/receive, whatever carries it. The signaling-level
    join gives fingerprints of a certificate no one uses, so the transports never connect."""

    async def send(self, req: voice_pb2.StreamMessageRequest) -> None:
        raise NotImplementedError

    async def recv(self) -> voice_pb2.StreamMessageResponse:
        raise NotImplementedError

    async def flow(self, target: Target, user: int, cert: DtlsCertificate, full: bool) -> None:
        """Initialize, PrepareForJoinChannel, JoinChannel (and with `full`, ICE + DTLS on both legs)."""
        init = Req.Initialize(guild_id=target.guild_id, channel_id=target.channel_id)
        await self.send(Req(initialize=init))
        _expect(await self.recv(), "initialized")
        caps = json.dumps(OPUS_CAPS)
        await self.send(Req(prepare_for_join_channel=Req.PrepareForJoinChannel(rtp_capabilities=caps)))
        prep = _expect(await self.recv(), "prepared_for_join_channel").prepared_for_join_channel
        legs = [AiortcLeg(), AiortcLeg()] if full else []
        if legs:
            await asyncio.gather(*(leg.gatherer.gather() for leg in legs))
            dtls = [json.dumps(leg.dtls_parameters()) for leg in legs]
        else:
            dtls = [_dtls_parameters(cert.fingerprints()[:1])] * 2
        join = Req.JoinChannel(
            rtp_paramaters=_rtp_parameters(user),
            producer_dtls_paramaters=dtls[0],
            consumer_dtls_paramaters=dtls[1],
        )
        await self.send(Req(join_channel=join))
        _expect(await self.recv(), "joined_channel")
        if not legs:
            return
        try:
            options = (prep.producer_transport_options, prep.consumer_transport_options)
            await asyncio.wait_for(
                asyncio.gather(
                    *(
                        leg.start(
                            [json.loads(c) for c in o.ice_candidates],
                            json.loads(o.ice_parameters),
                            json.loads(o.dtls_parameters),
                        )
                        for leg, o in zip(legs, options, strict=True)
                    )
                ),
                STEP_TIMEOUT,
            )
            if any(leg.dtls.state != "connected" for leg in legs):
                raise CycleError(f"DTLS legs: {[leg.dtls.state for leg in legs]}")
        finally:
            for leg in legs:
                await leg.stop()


class HrpcStream(Harmony):
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, req: voice_pb2.StreamMessageRequest) -> None:
        await self.ws.send_bytes(req.SerializeToString())

    async def recv(self) -> voice_pb2.StreamMessageResponse:
        msg = await asyncio.wait_for(self.ws.receive(), STEP_TIMEOUT)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise CycleError(f"hRPC: {msg.type} {msg.data!r}")
        if msg.data[0] != 0:
            raise CycleError(f"hRPC error {hrpc_pb2.Error.FromString(msg.data[1:])}")
        resp: voice_pb2.StreamMessageResponse = Resp.FromString(msg.data[1:])
        return resp


class GrpcStream(Harmony):
    def __init__(self, call: Any) -> None:
        self.call = call

    async def send(self, req: voice_pb2.StreamMessageRequest) -> None:
        await self.call.write(req)

    async def recv(self) -> voice_pb2.StreamMessageResponse:
        msg = await asyncio.wait_for(self.call.read(), STEP_TIMEOUT)
        if msg is grpc.aio.EOF:
            raise CycleError(f"gRPC stream ended: {await self.call.code()}")
        resp: voice_pb2.StreamMessageResponse = msg
        return resp


def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Vanish: the TCP connection reset, no close frame (a client that crashed or lost power)."""
    connection = ws._response.connection if ws._response is not None else None
    if connection is not None and connection.transport is not None:
        connection.transport.abort()


async def cycle_hrpc(
    target: Target, http: aiohttp.ClientSession, user: int, cert: DtlsCertificate, full: bool, abort: bool
) -> None:
    token = target.auth.mint(user)
    ws = await http.ws_connect(target.hrpc_url, protocols=("hrpc1", token), heartbeat=None)
    try:
        await HrpcStream(ws).flow(target, user, cert, full)
        if abort:
            _abort(ws)
    finally:
        await ws.close()  # the leave: the session ends with its socket


async def cycle_grpc(target: Target, user: int, cert: DtlsCertificate, full: bool, abort: bool) -> None:
    token = target.auth.mint(user)
    async with grpc.aio.insecure_channel(target.grpc_addr) as channel:
        call = voice_pb2_grpc.VoiceServiceStub(channel).StreamMessage(metadata=(("authorization", token),))
        try:
            await GrpcStream(call).flow(target, user, cert, full)
            if abort:
                return  # cancelled below (RST_STREAM CANCEL), then the channel closes
            await call.done_writing()  # the leave: a half-close, then the server ends the stream
            while (msg := await asyncio.wait_for(call.read(), STEP_TIMEOUT)) is not grpc.aio.EOF:
                pass  # UserJoined/UserLeft of other cycles in flight
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise CycleError(f"gRPC stream ended with {code}: {msg}")
        finally:
            call.cancel()


async def cycle_discord(target: Target, http: aiohttp.ClientSession, user: int, abort: bool) -> None:
    ws = await http.ws_connect(target.discord_url, heartbeat=None)
    udp: Client | None = None
    try:

        async def expect(op: int) -> dict[str, Any]:
            while True:
                msg = await asyncio.wait_for(ws.receive(), STEP_TIMEOUT)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise CycleError(f"Discord: {msg.type} {msg.data!r} waiting for op {op}")
                data: dict[str, Any] = json.loads(msg.data)
                if data["op"] == op:
                    return data

        async def send(op: int, d: Any) -> None:
            await ws.send_str(json.dumps({"op": op, "d": d}))

        await expect(8)
        token = target.auth.mint(user)
        ident = {"server_id": target.server_id, "user_id": str(user), "session_id": f"soak{user}"}
        await send(0, ident | {"token": token})
        ready = (await expect(2))["d"]
        udp = Client(ready["ssrc"], AES)
        udp.server = (ready["ip"], ready["port"])
        await discover_address(udp)
        ip, port = udp.address
        await send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": AES}})
        udp.key = bytes((await expect(4))["d"]["secret_key"])
        await send(5, {"speaking": 1, "delay": 0, "ssrc": udp.ssrc})
        for seq in range(DISCORD_PACKETS):
            udp.send_rtp(rtp_packet(udp.ssrc, seq, b"\xfc\xff" + bytes(60)))
        if abort:
            _abort(ws)
    finally:
        await ws.close()  # a suspension: the session ends after the resume grace
        if udp is not None:
            udp.close()


async def discover_address(udp: Client) -> None:
    """IP discovery (one request, as discord.py and @discordjs/voice send). The reference members'
    RTP may already reach us once the server learned our address from the request; skip it."""
    udp.discovery()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DISCOVERY_TIMEOUT
    while True:
        data = await asyncio.wait_for(loop.sock_recv(udp.sock, 2048), max(deadline - loop.time(), 0))
        if len(data) == 74 and data[:8] == struct.pack("!HHI", 2, 70, udp.ssrc):
            return


def loopback_only_aiortc() -> None:
    """Keep aiortc's ICE on 127.0.0.1 (the tests' aiortc_loopback fixture does the same)."""
    from aioice import ice as aioice_ice

    aioice_ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
