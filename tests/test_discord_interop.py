"""Real Discord clients against `fastsfu serve` over wss (docs/testing.md#other-real-peers): discord.py 2.7.1
and @discordjs/voice 0.19.2 each send pre-encoded Opus and receive the other's (djs attributes
every frame to the right user), djs resumes after a server-sent 4015 and audio continues, and a
discord.py bot shares a room with a Harmony user (aiortc over gRPC) through the room map."""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from discord_clients import (
    djs_available,
    dpy_available,
    make_test_certificate,
    opus_tone_frames,
    run_dpy_bot,
    start_djs_client,
    start_dpy_bot,
    voice_ids,
)
from helpers import ServeProcess, serve_app, serve_process

from fastsfu.harmony.auth import TokenAuth

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(120)]

SECRET = "discord-interop-secret-0123456789abcdef"
AUTH = TokenAuth(SECRET)
GUILD, CHANNEL = 41, 42  # the Discord server_id is GUILD; the Harmony room is (GUILD, CHANNEL)
DPY_USER, DJS_USER, HARMONY_USER = 1001, 1002, 1003


def require_clients() -> None:
    if not dpy_available():
        pytest.fail("discord.py[voice]==2.7.1 is not installed (pip install -e '.[test]')")
    if not djs_available():
        pytest.fail("tests/discord/node_modules is missing: run scripts/discord_clients_setup.sh")


@contextlib.asynccontextmanager
async def fastsfu_serve(tmp_path: Path) -> AsyncIterator[tuple[ServeProcess, Path]]:
    """`fastsfu serve` with a wss Discord gateway and a room map, and the certificate to trust."""
    cert, key = make_test_certificate(tmp_path)
    config = tmp_path / "fastsfu.toml"
    config.write_text(
        f'token_secret = "{SECRET}"\nhrpc_port = 0\ngrpc_port = 0\n'
        f'[discord]\nport = 0\ntls_certificate = "{cert}"\ntls_private_key = "{key}"\nresume_grace = 10\n'
        f'[discord.rooms]\n"{GUILD}" = [{GUILD}, {CHANNEL}]\n'
    )
    async with serve_process(config, "fastsfu: Discord voice gateway") as server:
        yield server, cert


def ids(user: int) -> dict[str, Any]:
    return voice_ids(GUILD, CHANNEL, user, AUTH.mint(user))


def test_discord_py_and_discordjs_hear_each_other(tmp_path: Path) -> None:
    require_clients()
    dpy_frames = opus_tone_frames(100, 440.0)
    djs_frames = opus_tone_frames(100, 880.0)

    async def main() -> None:
        async with fastsfu_serve(tmp_path) as (server, cert):
            endpoint = server.discord_endpoint
            djs = await start_djs_client(
                endpoint,
                **ids(DJS_USER),
                frames=djs_frames,
                receive_from=[DPY_USER],
                expect_frames={DPY_USER: len(dpy_frames)},
                play_delay=1.5,  # discord.py is connected by then
                duration=20,
                cafile=cert,
            )
            await djs.wait_event("ready", 15)
            dpy = await run_dpy_bot(endpoint, **ids(DPY_USER), frames=dpy_frames, cafile=cert, hold=3.0)
            result = await djs.result()
            print(
                "dpy:",
                json.dumps({k: v for k, v in vars(dpy).items() if k not in ("raw", "events")}, default=str)[
                    :3000
                ],
            )
            print(
                "djs:",
                json.dumps(
                    {
                        "ok": result.ok,
                        "mode": result.mode,
                        "errors": result.errors,
                        "received": {k: len(v) for k, v in result.received.items()},
                        "close": result.ws_close_codes,
                        "sent": result.frames_sent,
                    }
                ),
            )
            # discord.py: connected (XChaCha: it has no AES), sent everything.
            assert dpy.ok and dpy.connected, (dpy.error, dpy.stderr[-2000:])
            assert dpy.mode == "aead_xchacha20_poly1305_rtpsize" and dpy.secret_key_len == 32
            assert dpy.frames_sent == len(dpy_frames)
            # djs: AES-GCM; received every dpy frame, byte for byte, attributed to the dpy user.
            assert result.ready and result.mode == "aead_aes256_gcm_rtpsize", result.errors
            assert result.received.get(DPY_USER) == dpy_frames, {
                k: len(v) for k, v in result.received.items()
            }
            # discord.py received djs's frames: it has no receive API, so the bot decrypts what
            # its socket got (with PyNaCl); the SSRC is the one SPEAKING announced for djs's user.
            speaking = [
                m["d"] for m in dpy.ws_received if m["op"] == 5 and m["d"]["user_id"] == str(DJS_USER)
            ]
            assert speaking, dpy.ws_received
            heard = [base64.b64decode(f) for f in dpy.raw["received"].get(str(speaking[0]["ssrc"]), [])]
            assert result.frames_sent == len(djs_frames)
            assert heard[: len(djs_frames)] == djs_frames, (len(heard), dpy.raw["receive_failures"])
            assert dpy.raw["receive_failures"] == 0
            # /metrics: both sessions ended (their clients left, closing with 1000), none waits
            # for a RESUME.
            import aiohttp

            async with aiohttp.ClientSession() as http, http.get(server.address("fastsfu: metrics")) as r:
                text = await r.text()
            assert 'fastsfu_discord_sessions{state="suspended"} 0.0' in text, text
            assert "fastsfu_discord_connections 0.0" in text

    asyncio.run(asyncio.wait_for(main(), 100))


@pytest.mark.usefixtures("aiortc_loopback")
def test_a_discord_bot_and_a_harmony_user_share_a_mapped_room(tmp_path: Path) -> None:
    """[discord.rooms] puts Discord server 41 into Harmony room (41, 42): a discord.py bot and an
    aiortc client over gRPC hear each other (PT, SSRC and header-extension translation both ways).
    The Harmony user is silent, then talks once the bot is in: discord.py gets SPEAKING 0 for it
    at the join and SPEAKING 1 when its measured level rises (docs/observers.md#speaking)."""
    require_clients()
    from aiortc_helpers import VoiceTrack
    from harmony_client import HarmonyMember

    dpy_frames = opus_tone_frames(150, 440.0)

    async def main() -> None:
        async with fastsfu_serve(tmp_path) as (server, cert):
            voice = VoiceTrack()
            harmony = HarmonyMember(server.grpc_port, AUTH.mint(HARMONY_USER), GUILD, CHANNEL, track=voice)
            await harmony.join()
            try:
                bot = await start_dpy_bot(
                    server.discord_endpoint, **ids(DPY_USER), frames=dpy_frames, cafile=cert, hold=2.0
                )
                await bot.wait_event("connected", 15)
                voice.talking = True  # the bot is in: its SPEAKING for the Harmony user goes 0 -> 1
                for _ in range(100):  # UserJoined for the bot, consumed by the Harmony client
                    if DPY_USER in harmony.receivers:
                        break
                    await asyncio.sleep(0.05)
                assert DPY_USER in harmony.receivers, harmony.received
                loud = 0
                for _ in range(25):  # decoded by aiortc: the 440 Hz tone, not silence
                    frame = await asyncio.wait_for(harmony.receivers[DPY_USER].track.recv(), 5)
                    samples = array.array("h", bytes(frame.planes[0]))
                    loud += frame.samples == 960 and max(abs(x) for x in samples) > 1000
                assert loud >= 10, loud
                dpy = await bot.result()
                assert dpy.ok and dpy.frames_sent == len(dpy_frames), (dpy.error, dpy.stderr[-2000:])
                joined = [
                    r.user_joined.data for r in harmony.received if r.WhichOneof("message") == "user_joined"
                ]
                assert [u.user_id for u in joined] == [DPY_USER]
                # The bot heard the Harmony user: CLIENTS_CONNECT and SPEAKING name it, and its
                # RTP (aiortc's Opus, PT 111 in, PT 120 out) decrypts under the announced SSRC.
                ops = [(m["op"], m["d"]) for m in dpy.ws_received]
                assert (11, {"user_ids": [str(HARMONY_USER)]}) in ops, ops
                ssrcs = [d["ssrc"] for op, d in ops if op == 5 and d["user_id"] == str(HARMONY_USER)]
                assert ssrcs, ops
                speaking = [d["speaking"] for op, d in ops if op == 5 and d["user_id"] == str(HARMONY_USER)]
                assert speaking == [0, 1], ops  # silent at the join, then measured talking: no flapping
                heard = dpy.raw["received"].get(str(ssrcs[0]), [])
                assert len(heard) > 50 and dpy.raw["receive_failures"] == 0, (
                    len(heard),
                    dpy.raw["receive_failures"],
                )
                # The bot left (disconnect() closes its socket with 1000): the Harmony user
                # gets UserLeft at once, not after the resume grace (10 s here).
                for _ in range(20):
                    if any(r.WhichOneof("message") == "user_left" for r in harmony.received):
                        break
                    await asyncio.sleep(0.05)
                left = [
                    r.user_left.user_id for r in harmony.received if r.WhichOneof("message") == "user_left"
                ]
                assert left == [DPY_USER], harmony.received
            finally:
                await harmony.leave()

    asyncio.run(asyncio.wait_for(main(), 100))


def test_discordjs_resumes_after_4015_and_audio_continues(tmp_path: Path) -> None:
    """The server asks for a RESUME (4015, a graceful restart or migration): djs reconnects with
    op 7, gets op 9, keeps its UDP socket and key, and the frames keep coming."""
    require_clients()
    frames = opus_tone_frames(200, 440.0)

    async def main() -> None:
        import ssl

        from fastsfu import Engine, Settings
        from fastsfu.discord.gateway import Gateway
        from fastsfu.discord.voice import DiscordVoice
        from fastsfu.discord.ws_server import make_gateway_app
        from fastsfu.harmony import VoiceRooms

        cert, key = make_test_certificate(tmp_path)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        async with Engine(Settings(listen_ip="127.0.0.1")) as engine:
            gateway = Gateway(DiscordVoice(VoiceRooms(engine), AUTH.authenticate))
            async with serve_app(make_gateway_app(gateway), tls) as port:
                endpoint = f"127.0.0.1:{port}"
                try:
                    djs = await start_djs_client(
                        endpoint,
                        **ids(DJS_USER),
                        receive_from=[DPY_USER],
                        expect_frames={DPY_USER: len(frames)},
                        expect_resume=True,
                        duration=25,
                        cafile=cert,
                    )
                    await djs.wait_event("ready", 15)
                    bot = await start_dpy_bot(endpoint, **ids(DPY_USER), frames=frames, cafile=cert, hold=1.0)
                    await bot.wait_event("connected", 15)
                    await asyncio.sleep(1.5)  # about 60 frames in
                    session = gateway.session(f"session-{DJS_USER}")
                    assert session is not None
                    session.close(4015, "voice server restarting")
                    await djs.wait_event("resumed", 10)
                    for _ in range(50):
                        if session.state == "active":
                            break
                        await asyncio.sleep(0.02)
                    assert session.state == "active" and gateway.session(f"session-{DJS_USER}") is session
                    result = await djs.result()
                    dpy = await bot.result()
                    print(
                        "djs:",
                        json.dumps(
                            {
                                "resumes": result.resumes,
                                "close": result.ws_close_codes,
                                "received": {k: len(v) for k, v in result.received.items()},
                                "states": result.networking_states[-8:],
                                "errors": result.errors,
                            }
                        ),
                    )
                    assert dpy.ok, (dpy.error, dpy.stderr[-2000:])
                    assert 4015 in result.ws_close_codes and result.resumes == 1, result.ws_close_codes
                    assert result.received.get(DPY_USER) == frames  # every frame: UDP never stopped
                finally:
                    gateway.shutdown()

    asyncio.run(asyncio.wait_for(main(), 100))
