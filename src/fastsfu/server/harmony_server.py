"""The Harmony voice server: VoiceService over gRPC and hRPC WebSocket, one shared UDP media port.

Embedded defaults need no configuration (127.0.0.1, hRPC on Harmony's port 2289, gRPC on 2290, a
generated DTLS certificate and token secret); SIGTERM leaves every session cleanly (UserLeft).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from fastsfu.engine import Engine, Settings
from fastsfu.harmony.auth import TokenAuth, generate_secret
from fastsfu.harmony.grpc_server import start_grpc_server
from fastsfu.harmony.hrpc_server import STREAM_PATH, make_app
from fastsfu.harmony.session import VoiceRooms, VoiceSettings
from fastsfu.server.demo_page import mount_demo

log = logging.getLogger("fastsfu")


@dataclass
class ServerConfig:
    listen_ip: str = "127.0.0.1"
    announced_ip: str | None = None
    hrpc_port: int = 2289  # Harmony's default port
    grpc_port: int = 2290
    media_port: int = 0  # the shared WebRTC UDP port; 0: any free port
    token_secret: str | None = None  # None: generated at start (tokens then only work until restart)
    duration: float = 0.0  # stop after this many seconds; 0: until SIGINT/SIGTERM


async def serve_harmony(config: ServerConfig, voice: VoiceSettings | None = None) -> int:
    secret = config.token_secret or generate_secret()
    auth = TokenAuth(secret)
    settings = Settings(
        listen_ip=config.listen_ip, webrtc_port=config.media_port, webrtc_announced_ip=config.announced_ip
    )
    async with Engine(settings) as engine:
        rooms = VoiceRooms(engine, voice)
        grpc_server, grpc_port = await start_grpc_server(
            rooms, auth.authenticate, f"{config.listen_ip}:{config.grpc_port}"
        )
        mounts: list[Callable[[web.Application], None]] = [mount_demo]
        runner = web.AppRunner(make_app(rooms, auth.authenticate, mounts))
        await runner.setup()
        site = web.TCPSite(runner, config.listen_ip, config.hrpc_port)
        await site.start()
        hrpc_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        media = engine._webrtc_socket().local_address
        print(f"fastsfu: hRPC ws://{config.listen_ip}:{hrpc_port}{STREAM_PATH}", flush=True)
        print(f"fastsfu: gRPC {config.listen_ip}:{grpc_port}", flush=True)
        print(f"fastsfu: media udp {media[0]}:{media[1]}", flush=True)
        demo = f"http://{config.listen_ip}:{hrpc_port}/demo/"
        print(f"fastsfu: demo page {demo}", flush=True)
        if config.token_secret is None:
            # Tokens only this run can verify: open both links (two browsers or profiles) to talk.
            print(f"fastsfu: generated token secret; a token for user 1: {auth.mint(1)}", flush=True)
            for user in (1, 2):
                print(f"fastsfu: join as user {user}: {demo}?autojoin=1#token={auth.mint(user)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if config.duration:
            loop.call_later(config.duration, stop.set)
        try:
            await stop.wait()
        finally:
            print("fastsfu: shutting down", flush=True)
            # Every session leaves (members get UserLeft), then the listeners and sockets close.
            for session in list(rooms.sessions.values()):
                session.close()
            await runner.cleanup()
            await grpc_server.stop(grace=2.0)
    return 0
