"""Recording through `fastsfu serve` (docs/recording.md): the admin endpoint (its own token, 401
and 404), a call of an aiortc member over Harmony gRPC and a discord.py bot recorded to one Ogg
Opus file each, decoded by opusdec to the tones they sent for as long as they sent them, the
recording metrics, and SIGTERM ending every file with its EOS page."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from discord_clients import dpy_available, opus_tone_frames, start_dpy_bot, voice_ids
from helpers import ServeProcess, serve_process
from recording_helpers import (
    ToneTrack,
    check_structure,
    decode,
    decode_ffmpeg,
    dominant_hz,
    needs_opusdec,
    rms,
)

from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.config import ConfigError, load_config

pytestmark = [pytest.mark.loopback, pytest.mark.timeout(120), needs_opusdec]

SECRET = "recording-test-secret-0123456789abcdef"
ADMIN = "admin-token-for-the-recording-test"
AUTH = TokenAuth(SECRET)
GUILD, CHANNEL = 61, 62  # Discord server GUILD is mapped to the Harmony room (GUILD, CHANNEL)
HARMONY_USER, DPY_USER = 3001, 3002


@contextlib.asynccontextmanager
async def fastsfu_serve(tmp_path: Path, *extra: str) -> AsyncIterator[ServeProcess]:
    config = tmp_path / "fastsfu.toml"
    config.write_text(
        f'token_secret = "{SECRET}"\nhrpc_port = 0\ngrpc_port = 0\nadmin_token = "{ADMIN}"\n'
        f'[recording]\nenabled = true\ndirectory = "{tmp_path / "rec"}"\n'
        f'[discord]\nport = 0\n[discord.rooms]\n"{GUILD}" = [{GUILD}, {CHANNEL}]\n'
    )
    async with serve_process(config, "fastsfu: recordings admin", *extra) as server:
        yield server


def headers(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ids(user: int) -> dict[str, Any]:
    return {**voice_ids(GUILD, CHANNEL, user, AUTH.mint(user)), "scheme": "ws"}


def test_recording_needs_an_admin_token() -> None:
    with pytest.raises(ConfigError, match="admin_token"):
        load_config(None, {"FASTSFU_RECORDING_ENABLED": "true"}, {})
    config = load_config(None, {"FASTSFU_ADMIN_TOKEN": "x"}, {"recording.enabled": True})
    assert config.recording.enabled and config.redacted()["admin_token"] == "<set>"
    with pytest.raises(ConfigError, match="max_file_bytes"):
        load_config(None, {"FASTSFU_ADMIN_TOKEN": "x", "FASTSFU_RECORDING_MAX_FILE_BYTES": "100"}, {})


def test_admin_endpoint_refuses_bad_tokens_and_unknown_rooms(tmp_path: Path) -> None:
    async def main() -> None:
        async with fastsfu_serve(tmp_path) as server, aiohttp.ClientSession() as http:
            url = server.admin
            for h in ({}, headers("wrong"), headers(ADMIN + "x"), {"Authorization": ADMIN}):
                async with http.post(url, json={"room": [GUILD, CHANNEL]}, headers=h) as resp:
                    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
                async with http.get(url, headers=h) as resp:
                    assert resp.status == 401
                async with http.delete(url + "/x", headers=h) as resp:
                    assert resp.status == 401
            async with http.post(url, json={"room": [GUILD, CHANNEL]}, headers=headers()) as resp:
                assert resp.status == 404, await resp.text()  # nobody is in it: no such room
            for body in ({}, {"room": 5}, {"room": []}, {"room": [[1]]}):
                async with http.post(url, json=body, headers=headers()) as resp:
                    assert resp.status == 400, body
            async with http.post(url, data=b"{", headers=headers()) as resp:
                assert resp.status == 400
            async with http.delete(url + "/no-such-id", headers=headers()) as resp:
                assert resp.status == 404
            async with http.get(url, headers=headers()) as resp:
                assert resp.status == 200 and await resp.json() == []

    asyncio.run(asyncio.wait_for(main(), 60))


async def scrape(http: aiohttp.ClientSession, server: ServeProcess) -> dict[str, float]:
    async with http.get(server.address("fastsfu: metrics")) as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("fastsfu_recording"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_a_harmony_and_a_discord_member_are_recorded_to_the_tones_they_sent(tmp_path: Path) -> None:
    """The aiortc member sends 1 s of 440 Hz, nothing for 0.6 s (its timestamps run on), then 1 s
    of 660 Hz; the discord.py bot 1 s of 880 Hz, nothing for 2 s (discord.py's timestamp stands
    still meanwhile), then 1 s more. Each file decodes to its tones, silence in the gap, and
    lasts what was sent within 1 %."""
    if not dpy_available():
        pytest.fail("discord.py[voice]==2.7.1 is not installed (pip install -e '.[test]')")
    from harmony_client import HarmonyMember

    dpy_frames = opus_tone_frames(100, 880.0)

    async def main() -> None:
        async with fastsfu_serve(tmp_path) as server, aiohttp.ClientSession() as http:
            go = asyncio.Event()
            track = ToneTrack([(440.0, 1.0), (None, 0.6), (660.0, 1.0)], go)
            harmony = HarmonyMember(server.grpc_port, AUTH.mint(HARMONY_USER), GUILD, CHANNEL, track)
            await harmony.join()
            try:
                room = {"room": [GUILD, CHANNEL]}
                async with http.post(server.admin, json=room, headers=headers()) as resp:
                    assert resp.status == 201, await resp.text()
                    recording = await resp.json()
                async with http.post(server.admin, json=room, headers=headers()) as resp:
                    assert resp.status == 409  # one recording per room
                go.set()
                bot = await start_dpy_bot(
                    server.discord_endpoint,
                    **ids(DPY_USER),
                    frames=dpy_frames,
                    pause_at=50,
                    pause=2.0,
                    hold=0.5,
                )
                dpy = await bot.result()
                assert dpy.ok and dpy.frames_sent == 100, (dpy.error, dpy.stderr[-2000:])
                await asyncio.sleep(0.5)  # the bot left: its file is done
                metrics = await scrape(http, server)
                assert metrics["fastsfu_recordings"] == 1 and metrics["fastsfu_recording_files_total"] == 2
                assert metrics["fastsfu_recording_bytes_written_total"] > 10_000
                assert metrics['fastsfu_recording_dropped_packets_total{reason="ring_full"}'] == 0
                async with http.delete(f"{server.admin}/{recording['id']}", headers=headers()) as resp:
                    assert resp.status == 200
                    done = await resp.json()
            finally:
                await harmony.leave()
        files = {Path(f).name.split("-")[0]: Path(f) for f in done["files"]}
        assert set(files) == {f"user{HARMONY_USER}", f"user{DPY_USER}"}, done
        for path in files.values():
            check_structure(path)

        pcm = decode(files[f"user{HARMONY_USER}"], tmp_path)
        seconds = len(pcm) / 48000
        assert abs(seconds - track.sent_seconds) <= 0.01 * track.sent_seconds, (seconds, track.sent_seconds)
        assert dominant_hz(pcm, 0.4) == 440 and dominant_hz(pcm, 2.0) == 660
        assert rms(pcm, 1.15, 0.3) < 0.02 * rms(pcm, 0.4, 0.3)
        other = decode_ffmpeg(files[f"user{HARMONY_USER}"])
        assert abs(len(other) - len(pcm)) <= 480 and dominant_hz(other, 2.0) == 660
        ffmpeg, sent = len(other) / 48000, track.sent_seconds
        print(f"aiortc member: decoded {seconds:.3f} s (ffmpeg {ffmpeg:.3f} s), sent {sent:.3f} s")

        pcm = decode(files[f"user{DPY_USER}"], tmp_path)
        seconds, sent = len(pcm) / 48000, 100 * 0.02 + 2.0
        assert abs(seconds - sent) <= 0.01 * sent, (seconds, sent)
        assert dominant_hz(pcm, 0.4) == 880 and dominant_hz(pcm, 3.5) == 880
        assert rms(pcm, 1.5, 1.0) < 0.02 * rms(pcm, 0.4, 0.3)
        other = decode_ffmpeg(files[f"user{DPY_USER}"])
        assert abs(len(other) - len(pcm)) <= 480 and dominant_hz(other, 3.5) == 880
        ffmpeg = len(other) / 48000
        print(f"discord.py bot: decoded {seconds:.3f} s (ffmpeg {ffmpeg:.3f} s), sent {sent:.3f} s")

    asyncio.run(asyncio.wait_for(main(), 100))


def test_sigterm_ends_every_recording_with_an_eos_page(tmp_path: Path) -> None:
    if not dpy_available():
        pytest.fail("discord.py[voice]==2.7.1 is not installed (pip install -e '.[test]')")
    frames = opus_tone_frames(250, 440.0)

    async def main() -> list[str]:
        async with fastsfu_serve(tmp_path) as server, aiohttp.ClientSession() as http:
            endpoint = server.discord_endpoint
            bot = await start_dpy_bot(endpoint, **ids(DPY_USER), frames=frames, start_delay=0.5)
            await bot.wait_event("connected", 15)
            async with http.post(server.admin, json={"room": [GUILD, CHANNEL]}, headers=headers()) as resp:
                assert resp.status == 201, await resp.text()
                recording = await resp.json()
            await asyncio.sleep(2.0)
            await server.stop()  # mid-call: the bot still sends
            await bot.aclose()
        return list(recording["files"]) or sorted(str(p) for p in (tmp_path / "rec").iterdir())

    asyncio.run(asyncio.wait_for(main(), 100))
    (path,) = sorted((tmp_path / "rec").iterdir())
    pages = check_structure(path)  # the last page has the EOS flag
    pcm = decode(path, tmp_path)
    assert 1.0 < len(pcm) / 48000 < 3.0 and pages[-1].granule - 480 == len(pcm)
    assert dominant_hz(pcm, 0.5) == 440
