"""The voice server: Harmony's VoiceService over gRPC and hRPC WebSocket and the Discord-style voice
gateway, with rooms shared across protocols and one UDP media port.

Embedded defaults need no configuration (127.0.0.1, hRPC on Harmony's port 2289, gRPC on 2290, a
generated DTLS certificate and token secret; see config.py); /metrics and gRPC health for operators.
SIGTERM flips health to NOT_SERVING, then leaves every session cleanly (UserLeft).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from aiohttp import web

from fastsfu.discord.gateway import Gateway, GatewayConfig
from fastsfu.discord.voice import DiscordVoice
from fastsfu.discord.ws_server import GatewayEndpoint, make_gateway_app
from fastsfu.engine import Engine, Settings
from fastsfu.harmony.auth import StaticAuthorization, TokenAuth, generate_secret
from fastsfu.harmony.grpc_server import start_grpc_server
from fastsfu.harmony.health import Health
from fastsfu.harmony.hrpc_server import STREAM_PATH, make_app
from fastsfu.harmony.rate_limit import RateLimiter
from fastsfu.harmony.session import VoiceRooms, VoiceSettings
from fastsfu.server.config import ServerConfig
from fastsfu.server.demo_page import mount_demo
from fastsfu.server.lifecycle import stop_event
from fastsfu.server.metrics import METRICS_PATH, metrics_mount

log = logging.getLogger("fastsfu")

__all__ = ["ServerConfig", "serve_harmony"]


async def serve_harmony(config: ServerConfig, voice: VoiceSettings | None = None) -> int:
    secret = config.token_secret or generate_secret()
    auth = TokenAuth(secret)
    pem = config.dtls_pem()
    settings = Settings(
        listen_ip=config.listen_ip,
        webrtc_port=config.media_port,
        webrtc_announced_ip=config.announced_ip,
        dtls_certificate_pem=pem[0] if pem else None,
        dtls_private_key_pem=pem[1] if pem else None,
        datapath_thread=config.datapath_thread,
        max_queue_age_ms=config.max_queue_age_ms,
    )
    policy = StaticAuthorization(config.auth).authorize if config.auth is not None else None
    limit = config.rate_limit
    # One limiter for both front-ends: the limit is per address, whichever protocol it speaks.
    rate_limit = RateLimiter(limit.burst, limit.interval, limit.max_addresses) if limit.burst else None
    health = Health()
    async with Engine(settings) as engine:
        rooms = VoiceRooms(engine, voice or config.voice, policy)
        grpc_server, grpc_port = await start_grpc_server(
            rooms, auth.authenticate, f"{config.listen_ip}:{config.grpc_port}", rate_limit, health
        )
        discord = _discord_endpoint(config, rooms, auth.authenticate)
        mounts: list[Callable[[web.Application], None]] = [mount_demo]
        if config.metrics:
            mounts.append(metrics_mount(rooms, rate_limit, discord))
        runner = web.AppRunner(make_app(rooms, auth.authenticate, mounts, rate_limit))
        await runner.setup()
        site = web.TCPSite(runner, config.listen_ip, config.hrpc_port)
        try:
            await site.start()
        except OSError:  # e.g. the port is taken: stop what already runs, then report it
            await runner.cleanup()
            await grpc_server.stop(grace=None)
            raise
        hrpc_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        gateway = discord.gateway if discord is not None else None
        try:
            discord_runner, discord_url = await _start_discord(config, discord)
        except OSError:  # the Discord port is taken: stop what already runs, then report it
            await runner.cleanup()
            await grpc_server.stop(grace=None)
            raise
        media = engine._webrtc_socket().local_address
        print(f"fastsfu: hRPC ws://{config.listen_ip}:{hrpc_port}{STREAM_PATH}", flush=True)
        print(f"fastsfu: gRPC {config.listen_ip}:{grpc_port}", flush=True)
        print(f"fastsfu: media udp {media[0]}:{media[1]}", flush=True)
        demo = f"http://{config.listen_ip}:{hrpc_port}/demo/"
        print(f"fastsfu: demo page {demo}", flush=True)
        if config.metrics:
            print(f"fastsfu: metrics http://{config.listen_ip}:{hrpc_port}{METRICS_PATH}", flush=True)
        if discord_url:
            print(f"fastsfu: Discord voice gateway {discord_url}", flush=True)
        if config.token_secret is None:
            # Tokens only this run can verify: open both links (two browsers or profiles) to talk.
            print(f"fastsfu: generated token secret; a token for user 1: {auth.mint(1)}", flush=True)
            for user in (1, 2):
                print(f"fastsfu: join as user {user}: {demo}?autojoin=1#token={auth.mint(user)}", flush=True)
        stop = stop_event(config.duration)
        try:
            await stop.wait()
        finally:
            # Health first, so load balancers stop sending new streams while sessions end.
            health.shutdown()
            print("fastsfu: shutting down", flush=True)
            if gateway is not None:
                gateway.shutdown()  # 4015: Discord clients resume against the next instance
            # Every session leaves (members get UserLeft) and its stream ends, then the listeners
            # and sockets close.
            for session in list(rooms.open_sessions):
                session.close()
            await runner.cleanup()
            if discord_runner is not None:
                await discord_runner.cleanup()
            await grpc_server.stop(grace=2.0)
    return 0


def _discord_endpoint(
    config: ServerConfig, rooms: VoiceRooms, authenticate: Callable[[str], int]
) -> GatewayEndpoint | None:
    """The Discord voice gateway (sharing rooms, auth and the media port with the Harmony
    service), or None when its port is -1."""
    d = config.discord
    if d.port < 0:
        return None
    voice = DiscordVoice(
        rooms, authenticate, d.rooms, d.only_mapped, config.announced_ip, legacy_modes=d.legacy_modes
    )
    gateway = Gateway(
        voice,
        GatewayConfig(heartbeat_interval_ms=round(d.heartbeat_interval * 1000), resume_grace=d.resume_grace),
    )
    return GatewayEndpoint(gateway)


async def _start_discord(
    config: ServerConfig, endpoint: GatewayEndpoint | None
) -> tuple[web.AppRunner | None, str]:
    """Listen on the Discord gateway's port: ws, or wss with the configured certificate."""
    if endpoint is None:
        return None, ""
    d = config.discord
    tls = None
    if d.tls_certificate is not None and d.tls_private_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(d.tls_certificate, d.tls_private_key)
    runner = web.AppRunner(make_gateway_app(endpoint.gateway, endpoint), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_ip, d.port, ssl_context=tls)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'wss' if tls else 'ws'}://{config.listen_ip}:{port}/?v=8"
