"""The connection rate limit per remote address (docs/harmony.md#rate-limit): the token bucket itself (burst,
refill, bounded memory, IPv6 by /64), and both front-ends refusing the stream after the burst with
hrpc.resource-exhausted + RetryInfo, before authentication, while another address is unaffected."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from helpers import serve_app

from fastsfu import Engine
from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import StaticTokens
from fastsfu.harmony.grpc_server import peer_address, start_grpc_server
from fastsfu.harmony.hrpc_server import STREAM_PATH, make_app
from fastsfu.harmony.rate_limit import RateLimiter, address_key

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
TOKENS = StaticTokens({"tok-1": 1, "tok-2": 2, "tok-3": 3, "tok-4": 4})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_one_per_interval() -> None:
    clock = Clock()
    limit = RateLimiter(burst=3, interval=10.0, clock=clock)
    assert [limit.check("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.check("10.0.0.1") == pytest.approx(10.0)
    clock.now += 4.0
    assert limit.check("10.0.0.1") == pytest.approx(6.0)  # refused attempts do not push it back
    assert limit.check("10.0.0.2") == 0.0  # another address has its own bucket
    clock.now += 6.0
    assert limit.check("10.0.0.1") == 0.0
    assert limit.check("10.0.0.1") > 0
    assert limit.rejected == 3


def test_memory_is_bounded_and_full_buckets_are_forgotten() -> None:
    clock = Clock()
    limit = RateLimiter(burst=2, interval=5.0, max_addresses=100, clock=clock)
    for i in range(1000):
        limit.check(f"10.0.{i // 256}.{i % 256}")
    assert len(limit) == 100  # the hard cap
    clock.now += 10.0  # burst * interval: every bucket is full again
    limit.check("10.9.9.9")
    assert len(limit) == 1


def test_ipv6_shares_a_bucket_per_64() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    limit = RateLimiter(burst=1, interval=60.0, clock=Clock())
    assert limit.check("2001:db8::1") == 0.0
    assert limit.check("2001:db8::2") > 0  # same /64


def test_grpc_peer_strings() -> None:
    assert peer_address("ipv4:127.0.0.2:5000") == "127.0.0.2"
    assert peer_address("ipv6:[::1]:5000") == "::1"
    assert peer_address("unix:/tmp/x") == "unix:/tmp/x"


def test_zero_or_negative_settings_are_refused() -> None:
    for burst, interval in ((0, 10.0), (1, 0.0)):
        with pytest.raises(ValueError):
            RateLimiter(burst, interval)


async def hrpc_open(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, object]:
    """Open a stream and send Initialize: (0, Resp) or (1, hrpc.v1.Error) for the first frame."""
    ws = await http.ws_connect(url, protocols=("hrpc1", token))
    try:
        await ws.send_bytes(Req(initialize=Req.Initialize(guild_id=1, channel_id=1)).SerializeToString())
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        if msg.data[0] == 1:
            closing = await asyncio.wait_for(ws.receive(), 10)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1000
            return 1, hrpc_pb2.Error.FromString(msg.data[1:])
        return 0, Resp.FromString(msg.data[1:])
    finally:
        await ws.close()


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_both_front_ends_share_the_limit_per_address() -> None:
    async def main() -> None:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            limit = RateLimiter(burst=2, interval=30.0)
            grpc_server, grpc_port = await start_grpc_server(rooms, TOKENS.authenticate, rate_limit=limit)
            async with serve_app(make_app(rooms, TOKENS.authenticate, rate_limit=limit)) as port:
                url = f"http://127.0.0.1:{port}{STREAM_PATH}"
                try:
                    async with aiohttp.ClientSession() as http:
                        # Two from 127.0.0.1 (the burst), one over each protocol.
                        op, first = await hrpc_open(http, url, "tok-1")
                        assert op == 0 and first.WhichOneof("message") == "initialized"  # type: ignore[attr-defined]
                        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                            stub = voice_pb2_grpc.VoiceServiceStub(channel)
                            call = stub.StreamMessage(metadata=(("authorization", "tok-2"),))
                            await call.write(Req(initialize=Req.Initialize(guild_id=1, channel_id=1)))
                            assert (await asyncio.wait_for(call.read(), 10)).WhichOneof(
                                "message"
                            ) == "initialized"
                            call.cancel()
                            # The third, over gRPC: RESOURCE_EXHAUSTED, before authentication (bad token).
                            call = stub.StreamMessage(metadata=(("authorization", "not-a-token"),))
                            with pytest.raises(grpc.aio.AioRpcError) as exc:
                                await asyncio.wait_for(call.read(), 10)
                            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                            error = hrpc_pb2.Error.FromString(
                                dict(exc.value.trailing_metadata())["hrpc-error-bin"]
                            )
                            assert error.identifier == "hrpc.resource-exhausted"
                            assert 29 <= hrpc_pb2.RetryInfo.FromString(error.details).retry_after <= 30
                        # The fourth, over hRPC: an in-band error frame with RetryInfo, then close 1000.
                        op, refused = await hrpc_open(http, url, "tok-3")
                        assert op == 1 and refused.identifier == "hrpc.resource-exhausted"  # type: ignore[attr-defined]
                        assert hrpc_pb2.RetryInfo.FromString(refused.details).retry_after >= 29  # type: ignore[attr-defined]
                    # Another source address has its own budget.
                    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
                    async with aiohttp.ClientSession(connector=connector) as other:
                        op, resp = await hrpc_open(other, url, "tok-4")
                        assert op == 0 and resp.WhichOneof("message") == "initialized"  # type: ignore[attr-defined]
                    assert limit.rejected == 2
                    assert rooms.stream_errors["hrpc.resource-exhausted"] == 2
                finally:
                    await grpc_server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 45))


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_without_a_limiter_many_quick_streams_are_fine() -> None:
    async def main() -> None:
        async with Engine() as engine, serve_app(make_app(VoiceRooms(engine), TOKENS.authenticate)) as port:
            url = f"http://127.0.0.1:{port}{STREAM_PATH}"
            async with aiohttp.ClientSession() as http:
                for _ in range(10):
                    op, _resp = await hrpc_open(http, url, "tok-1")
                    assert op == 0

    asyncio.run(asyncio.wait_for(main(), 45))
