"""The voice server: Harmony's VoiceService over gRPC and hRPC WebSocket and the Discord-style voice
gateway, with rooms shared across protocols and one UDP media port.

Embedded defaults need no configuration (127.0.0.1, hRPC on Harmony's port 2289, gRPC on 2290, a
generated DTLS certificate and token secret; see config.py); /metrics and gRPC health for operators.
SIGTERM flips health to NOT_SERVING, then leaves every session cleanly (UserLeft), within
`shutdown_grace` seconds (edge.py cuts what is still open then).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

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
from fastsfu.server.demo_page import NOT_BUILT, bundle_built, mount_demo, speaking_mount
from fastsfu.server.edge import ConnectionGuard, EdgeLimits, GuardedSite
from fastsfu.server.gc_health import GcMonitor, freeze_startup_heap
from fastsfu.server.lifecycle import drain, stop_event
from fastsfu.server.logs import announce
from fastsfu.server.metrics import METRICS_PATH, metrics_mount
from fastsfu.server.recordings import ADMIN_PATH, recordings_for
from fastsfu.server.worker import worker_role

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "serve_harmony"]


async def serve_harmony(config: ServerConfig, voice: VoiceSettings | None = None) -> int:
    secret = config.token_secret or generate_secret()
    auth = TokenAuth(secret)
    pem = config.dtls_pem()
    settings = Settings(
        listen_ip=config.listen_ip,
        media_port=config.media_port,
        ice_tcp=config.ice_tcp,
        media_tcp_port=None if config.media_tcp_port < 0 else config.media_tcp_port,
        media_announced_ip=config.announced_ip,
        dtls_certificate_pem=pem[0] if pem else None,
        dtls_private_key_pem=pem[1] if pem else None,
        datapath_thread=config.datapath_thread,
        max_queue_age_ms=config.max_queue_age_ms,
        datapath_priority=config.datapath_priority,
        lower_loop_priority=True,  # this process owns its loop
    )
    policy = StaticAuthorization(config.auth).authorize if config.auth is not None else None
    limit = config.rate_limit
    # One limiter for both front-ends: the limit is per address, whichever protocol it speaks.
    rate_limit = RateLimiter(limit.burst, limit.interval, limit.max_addresses) if limit.burst else None
    health = Health()
    worker = worker_role(config, os.environ)  # started by `--workers N`: shares the signaling ports
    reuse_port = worker is not None and worker.supervised
    async with Engine(settings) as engine:
        rooms = VoiceRooms(engine, voice or config.voice, policy)
        rooms.schedule = asyncio.get_running_loop().call_soon  # big rooms join in slices
        grpc_server, grpc_port = await start_grpc_server(
            rooms, auth.authenticate, f"{config.listen_ip}:{config.grpc_port}", rate_limit, health
        )
        discord = _discord_endpoint(config, rooms, auth.authenticate)
        limits = EdgeLimits(config.header_timeout, config.max_connections_per_address)
        guards = [ConnectionGuard("hrpc", limits)]
        if discord is not None:
            guards.append(ConnectionGuard("discord", limits))
        mounts: list[Callable[[web.Application], None]] = [
            mount_demo,
            speaking_mount(rooms, auth.authenticate),
        ]
        gc_monitor = GcMonitor().install()
        cluster = worker.bind(rooms, engine, discord) if worker is not None else ()
        relay = worker.node.admin if worker is not None and worker.node is not None else None
        recordings, admin = recordings_for(config, rooms, relay)  # docs/recording.md
        if admin is not None:
            mounts.append(admin)
        scrape = None
        if config.metrics:
            collectors = (*cluster, *recordings.collectors()) if recordings is not None else cluster
            scrape = metrics_mount(rooms, rate_limit, discord, guards, gc_monitor, collectors)
            mounts.append(scrape)
        app = make_app(rooms, auth.authenticate, mounts, rate_limit)
        guards[0].install(app)
        runner = web.AppRunner(app, **_runner_options(config))
        await runner.setup()
        site = GuardedSite(runner, config.listen_ip, config.hrpc_port, guards[0], reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:  # e.g. the port is taken: stop what already runs, then report it
            await runner.cleanup()
            await grpc_server.stop(grace=None)
            raise
        hrpc_port = site.port
        gateway = discord.gateway if discord is not None else None
        try:
            discord_runner, discord_url = await _start_discord(config, discord, guards[-1], reuse_port)
        except OSError:  # the Discord port is taken: stop what already runs, then report it
            await runner.cleanup()
            await grpc_server.stop(grace=None)
            raise
        media = engine.media_socket().local_address
        fmt = config.log.format
        hrpc_url = f"ws://{config.listen_ip}:{hrpc_port}{STREAM_PATH}"
        announce(log, fmt, f"hRPC {hrpc_url}", hrpc_url=hrpc_url)
        announce(log, fmt, f"gRPC {config.listen_ip}:{grpc_port}", grpc=f"{config.listen_ip}:{grpc_port}")
        announce(log, fmt, f"media udp {media[0]}:{media[1]}", media=f"{media[0]}:{media[1]}")
        demo = f"http://{config.listen_ip}:{hrpc_port}/demo/" if bundle_built() else None
        announce(log, fmt, f"demo page {demo}" if demo else NOT_BUILT, demo=demo)
        if config.metrics:
            metrics = f"http://{config.listen_ip}:{hrpc_port}{METRICS_PATH}"
            announce(log, fmt, f"metrics {metrics}", metrics=metrics)
        if discord_url:
            announce(log, fmt, f"Discord voice gateway {discord_url}", discord=discord_url)
        if recordings is not None:
            admin_url = f"http://{config.listen_ip}:{hrpc_port}{ADMIN_PATH}"
            announce(log, fmt, f"recordings admin {admin_url}", recordings=admin_url)
        if worker is not None:
            await worker.start(scrape)
        if config.token_secret is None:
            # Tokens only this run can verify: open both links (two browsers or profiles) to talk.
            token = auth.mint(1)
            announce(log, fmt, f"generated token secret; a token for user 1: {token}", token=token)
            for user in (1, 2) if demo else ():  # links only to a page that works
                link = f"{demo}?autojoin=1#token={auth.mint(user)}"
                announce(log, fmt, f"join as user {user}: {link}", join_url=link, user_id=user)
        stop = stop_event(config.duration)
        # Everything built so far lives as long as the process: keep it out of every collection.
        gc_monitor.frozen = freeze_startup_heap()
        log.debug("gc: %d start-up objects frozen", gc_monitor.frozen)
        try:
            await stop.wait()
        finally:
            gc_monitor.uninstall()
            # Health first, so load balancers stop sending new streams while sessions end.
            health.shutdown()
            if worker is not None:
                await worker.drain()
            announce(log, config.log.format, "shutting down")
            if gateway is not None:
                gateway.shutdown()  # 4015: Discord clients resume against the next instance
            # Every session leaves (members get UserLeft) and its stream ends (hRPC: close 1001),
            # then the listeners and sockets close; whatever is still open after the grace is cut.
            for session in list(rooms.open_sessions):
                session.close("server shutting down")
            cleanups: list[Awaitable[object]] = [
                runner.cleanup(),
                grpc_server.stop(grace=config.shutdown_grace),
            ]
            if discord_runner is not None:
                cleanups.append(discord_runner.cleanup())
            await drain(cleanups, guards, config.shutdown_grace)
            if recordings is not None:
                await recordings.close()  # every file ends with its EOS page before the exit
            if worker is not None:
                await worker.close()
    return 0


def _runner_options(config: ServerConfig) -> dict[str, Any]:
    """aiohttp's own bounds: idle keep-alive connections close after the header timeout (a later
    request head must come as quickly as the first), and its shutdown waits at most the grace."""
    return {"keepalive_timeout": config.header_timeout, "shutdown_timeout": config.shutdown_grace}


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
    voice.schedule = rooms.schedule  # big rooms join in slices, as Harmony's
    gateway = Gateway(
        voice,
        GatewayConfig(heartbeat_interval_ms=round(d.heartbeat_interval * 1000), resume_grace=d.resume_grace),
    )
    return GatewayEndpoint(gateway)


async def _start_discord(
    config: ServerConfig, endpoint: GatewayEndpoint | None, guard: ConnectionGuard, reuse_port: bool = False
) -> tuple[web.AppRunner | None, str]:
    """Listen on the Discord gateway's port: ws, or wss with the configured certificate."""
    if endpoint is None:
        return None, ""
    d = config.discord
    tls = None
    if d.tls_certificate is not None and d.tls_private_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(d.tls_certificate, d.tls_private_key)
    app = make_gateway_app(endpoint.gateway, endpoint)
    guard.install(app)
    runner = web.AppRunner(app, access_log=None, **_runner_options(config))
    await runner.setup()
    site = GuardedSite(runner, config.listen_ip, d.port, guard, ssl_context=tls, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, f"{'wss' if tls else 'ws'}://{config.listen_ip}:{site.port}/?v=8"
