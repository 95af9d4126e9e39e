"""A discord.py 2.7.1 voice bot for interop tests, run as a subprocess (docs/testing.md#other-real-peers).

    python tests/dpy_bot.py --json-args -            # arguments as one JSON object on stdin
    python tests/dpy_bot.py --json-args '{"endpoint": "127.0.0.1:PORT", ...}'
    python tests/dpy_bot.py --json-args @args.json

A subprocess because discord.py's aiohttp builds its default SSL context at import: ``SSL_CERT_FILE``
(the test CA, argument ``cafile``) must be in the environment before aiohttp is imported.
No Discord login and no libopus: a ``discord.Client(intents=Intents.none())`` with the HTTP session
``login()`` would create, a FakeGuild that delivers the two voice events 50 ms after
``change_voice_state`` returns, ``VoiceClient.connect(reconnect=False, timeout=...)``, then
pre-encoded Opus frames through ``send_audio_packet(frame, encode=False)`` every 20 ms (or an
Opus ``AudioSource`` through ``vc.play``), then ``disconnect()`` after ``hold`` seconds (or at SIGUSR1).

stdout: progress events ``{"event": "connected", ...}`` / ``{"event": "sent", ...}`` and finally one
``{"result": {...}}`` line (fields: tests/discord_clients.py ``DpyResult``); logs go to stderr.
Exit code 0 when the result is ok, 1 otherwise, 2 for bad arguments. The argument ``deadline``
(seconds) bounds the whole run; past it the bot reports what it has and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from types import SimpleNamespace
from typing import Any

_T0 = time.monotonic()
OPUS_SILENCE = b"\xf8\xff\xfe"


def _now() -> float:
    return round(time.monotonic() - _T0, 4)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _load_args(spec: str) -> dict[str, Any]:
    if spec == "-":
        text = sys.stdin.read()
    elif spec.startswith("@"):
        with open(spec[1:], encoding="utf-8") as f:
            text = f.read()
    else:
        text = spec
    args = json.loads(text)
    if not isinstance(args, dict):
        raise ValueError("--json-args must be a JSON object")
    if args.get("frames_file"):
        with open(args["frames_file"], encoding="utf-8") as f:
            args["frames"] = json.load(f)
    return args


class Recorder:
    """Everything the bot reports; filled by the hooks and the run."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {
            "ok": False,
            "connected": False,
            "mode": None,
            "ssrc": None,
            "secret_key_len": None,
            "dave_protocol_version": None,
            "frames_sent": 0,
            "silence_sent": 0,
            "packets_sent": 0,
            "packets_dropped": 0,
            "error": None,
            "error_type": None,
            "ws_received": [],
            "ws_sent": [],
            "close_codes": [],
            "connect_seconds": None,
            "latency": None,
            "disconnected": False,
            "versions": {},
            # RTP the bot's socket received, decrypted here (discord.py has no receive API):
            # {ssrc: [base64 Opus payload, ...]}, plus datagrams that failed to decrypt.
            "received": {},
            "receive_failures": 0,
        }
        self.lock = threading.Lock()

    def fail(self, exc: BaseException, where: str) -> None:
        if self.result["error"] is None:
            self.result["error"] = f"{where}: {exc!r}"
            self.result["error_type"] = type(exc).__name__
        logging.getLogger("dpy_bot").debug("%s failed", where, exc_info=exc)


def _install_hooks(rec: Recorder) -> None:
    """Record every voice-gateway message, close code and UDP send (class-level: own process)."""
    from discord.gateway import DiscordVoiceWebSocket
    from discord.voice_client import VoiceClient
    from discord.voice_state import VoiceConnectionState

    orig_received = DiscordVoiceWebSocket.received_message
    orig_send = DiscordVoiceWebSocket.send_as_json
    orig_poll = DiscordVoiceWebSocket.poll_event
    orig_send_packet = VoiceConnectionState.send_packet
    orig_send_audio = VoiceClient.send_audio_packet

    async def received_message(self: Any, msg: dict[str, Any]) -> None:
        rec.result["ws_received"].append(
            # mono: time.monotonic(), comparable with the test's event-loop time (same clock)
            {
                "op": msg.get("op"),
                "seq": msg.get("seq"),
                "d": msg.get("d"),
                "t": _now(),
                "mono": time.monotonic(),
            }
        )
        await orig_received(self, msg)

    async def send_as_json(self: Any, data: Any) -> None:
        if isinstance(data, dict):
            rec.result["ws_sent"].append({"op": data.get("op"), "d": data.get("d"), "t": _now()})
        await orig_send(self, data)

    async def poll_event(self: Any) -> None:
        try:
            await orig_poll(self)
        except Exception as exc:
            code = getattr(exc, "code", None)
            if isinstance(code, int):
                rec.result["close_codes"].append(code)
            raise

    def send_packet(self: Any, packet: bytes) -> None:
        try:
            orig_send_packet(self, packet)
        except OSError:
            with rec.lock:
                rec.result["packets_dropped"] += 1
            raise
        with rec.lock:
            rec.result["packets_sent"] += 1

    def send_audio_packet(self: Any, data: bytes, *, encode: bool = True) -> None:
        # called from the event loop (direct) or the AudioPlayer thread (player)
        before = rec.result["packets_sent"]
        orig_send_audio(self, data, encode=encode)
        if rec.result["packets_sent"] != before:
            with rec.lock:
                rec.result["silence_sent" if bytes(data) == OPUS_SILENCE else "frames_sent"] += 1

    DiscordVoiceWebSocket.received_message = received_message  # type: ignore[method-assign]
    DiscordVoiceWebSocket.send_as_json = send_as_json  # type: ignore[method-assign]
    DiscordVoiceWebSocket.send_heartbeat = send_as_json  # type: ignore[assignment]
    DiscordVoiceWebSocket.poll_event = poll_event  # type: ignore[method-assign]
    VoiceConnectionState.send_packet = send_packet  # type: ignore[method-assign]
    VoiceClient.send_audio_packet = send_audio_packet  # type: ignore[method-assign]


class FakeGuild:
    """The guild stub: delivers the voice events after discord.py starts waiting for them."""

    def __init__(self, guild_id: int, user_id: int, session_id: str, token: str, endpoint: str) -> None:
        self.id = guild_id
        self.user_id = user_id
        self.session_id = session_id
        self.token = token
        self.endpoint = endpoint
        self.me = SimpleNamespace(voice=None)
        self.channel: Any = None
        self.vc: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get_channel(self, channel_id: int) -> Any:
        return self.channel

    async def change_voice_state(
        self, *, channel: Any, self_mute: bool = False, self_deaf: bool = False, **_: Any
    ) -> None:
        async def deliver() -> None:
            await asyncio.sleep(0.05)  # inline or immediate delivery is ignored or races
            await self.vc.on_voice_state_update(
                {
                    "guild_id": str(self.id),
                    "user_id": str(self.user_id),
                    "session_id": self.session_id,
                    "channel_id": str(channel.id) if channel else None,
                    "self_mute": self_mute,
                    "self_deaf": self_deaf,
                }
            )
            if channel:
                await self.vc.on_voice_server_update(
                    {"guild_id": str(self.id), "token": self.token, "endpoint": self.endpoint}
                )

        task = asyncio.get_running_loop().create_task(deliver())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _run(args: dict[str, Any], rec: Recorder) -> None:
    import aiohttp
    import discord

    rec.result["versions"] = {"discord.py": discord.__version__, "aiohttp": aiohttp.__version__}
    # SIGUSR1 ends the hold early: a test that needs the bot until some event tells it so.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    _install_hooks(rec)
    log = logging.getLogger("dpy_bot")

    guild_id = int(args["guild_id"])
    channel_id = int(args["channel_id"])
    user_id = int(args["user_id"])
    frames = [base64.b64decode(f) for f in args.get("frames", [])]
    interval = float(args.get("frame_interval", 0.02))

    client = discord.Client(intents=discord.Intents.none())
    await client._async_setup_hook()  # binds the loop; normally done by start()/login()
    session = aiohttp.ClientSession()
    client.http._HTTPClient__session = session  # type: ignore[attr-defined]  # made by login()
    client._connection.user = SimpleNamespace(id=user_id)  # type: ignore[assignment]
    if args.get("scheme", "wss") == "ws":
        orig_ws_connect = client.http.ws_connect

        async def ws_connect(url: str, *, compress: int = 0) -> Any:
            return await orig_ws_connect(url.replace("wss://", "ws://", 1), compress=compress)

        client.http.ws_connect = ws_connect  # type: ignore[method-assign]

    guild = FakeGuild(guild_id, user_id, str(args["session_id"]), str(args["token"]), str(args["endpoint"]))
    guild.channel = SimpleNamespace(
        id=channel_id, guild=guild, _get_voice_client_key=lambda: (guild_id, "guild_id")
    )
    vc = guild.vc = discord.VoiceClient(client, guild.channel)
    try:
        t0 = time.monotonic()
        try:
            await vc.connect(reconnect=False, timeout=float(args.get("connect_timeout", 10.0)))
        except BaseException as exc:  # includes the KeyError of a missing dave_protocol_version
            rec.fail(exc, "connect")
            return
        rec.result["connect_seconds"] = round(time.monotonic() - t0, 4)
        rec.result["connected"] = vc.is_connected()
        rec.result["mode"] = vc.mode
        rec.result["ssrc"] = vc.ssrc
        rec.result["secret_key_len"] = len(vc.secret_key) if vc.secret_key else None
        rec.result["dave_protocol_version"] = vc._connection.dave_protocol_version
        _emit({"event": "connected", "t": _now(), "ssrc": vc.ssrc, "mode": vc.mode})
        vc._connection.add_socket_listener(_receiver(vc.mode, bytes(vc.secret_key), rec))

        if args.get("start_delay"):
            await asyncio.sleep(float(args["start_delay"]))
        if args.get("send_via", "direct") == "player":
            await _play(vc, frames, rec, args)
        else:
            pause_at, pause = int(args.get("pause_at", -1)), float(args.get("pause", 0.0))
            await _send_direct(vc, frames, interval, bool(args.get("speaking")), rec, pause_at, pause)
        _emit({"event": "sent", "t": _now(), "frames_sent": rec.result["frames_sent"]})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), float(args.get("hold", 0.2)))
        latency = vc.latency
        rec.result["latency"] = latency if latency != float("inf") else None
    finally:
        try:
            _emit({"event": "leaving", "t": _now(), "mono": time.monotonic()})
            await asyncio.wait_for(vc.disconnect(force=True), timeout=5.0)
            rec.result["disconnected"] = True
        except BaseException as exc:
            log.debug("disconnect failed", exc_info=exc)
            if rec.result["error"] is None and rec.result["connected"]:
                rec.fail(exc, "disconnect")
        await session.close()
        try:
            await asyncio.wait_for(client.close(), timeout=5.0)
        except BaseException as exc:
            log.debug("client.close failed", exc_info=exc)


def _receiver(mode: str, key: bytes, rec: Recorder) -> Any:
    """A socket listener (called on discord.py's reader thread) that opens rtpsize AEAD RTP with
    other libraries than the server's (docs/transports.md#encryption-modes) and records the Opus payloads."""
    import nacl.bindings
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def listener(data: bytes) -> None:
        if len(data) < 12 + 20 or data[0] >> 6 != 2 or data[1] & 0x7F != 120:
            return  # RTCP, keep-alives, discovery
        clear = 12 + 4 * (data[0] & 0x0F) + (4 if data[0] & 0x10 else 0)
        counter, body, aad = data[-4:], data[clear:-4], data[:clear]
        try:
            if mode == "aead_aes256_gcm_rtpsize":
                plain = AESGCM(key).decrypt(counter + bytes(8), body, aad)
            else:
                plain = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    body, aad, counter + bytes(20), key
                )
        except Exception:
            with rec.lock:
                rec.result["receive_failures"] += 1
            return
        if data[0] & 0x10:  # extension elements were encrypted with the payload
            plain = plain[4 * int.from_bytes(data[clear - 2 : clear], "big") :]
        ssrc = str(int.from_bytes(data[8:12], "big"))
        with rec.lock:
            rec.result["received"].setdefault(ssrc, []).append(base64.b64encode(plain).decode())

    return listener


async def _send_direct(
    vc: Any,
    frames: list[bytes],
    interval: float,
    speaking: bool,
    rec: Recorder,
    pause_at: int = -1,
    pause: float = 0.0,
) -> None:
    import discord

    if speaking:
        await vc.ws.speak(discord.SpeakingState.voice)
    start = time.monotonic()
    for i, frame in enumerate(frames):
        if i == pause_at:
            # Nothing sent for `pause` seconds (a speaker falling silent); discord.py's timestamp
            # does not advance meanwhile, as it counts frames sent.
            await asyncio.sleep(pause)
            start += pause
        if not vc.is_connected():
            raise ConnectionError(f"voice connection lost after {i} frames")
        vc.send_audio_packet(frame, encode=False)
        # a fixed schedule, not sleep(interval) after each send: no drift over long runs
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    if speaking:
        await vc.ws.speak(discord.SpeakingState.none)


async def _play(vc: Any, frames: list[bytes], rec: Recorder, args: dict[str, Any]) -> None:
    import discord

    class OpusFrames(discord.AudioSource):
        def __init__(self, data: list[bytes]) -> None:
            self._it = iter(data)

        def read(self) -> bytes:
            return next(self._it, b"")

        def is_opus(self) -> bool:
            return True

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def after(err: Exception | None) -> None:
        if err is not None:
            errors.append(err)
        loop.call_soon_threadsafe(done.set)

    vc.play(OpusFrames(frames), after=after)
    budget = len(frames) * 0.02 + 5.0
    await asyncio.wait_for(done.wait(), timeout=budget)
    if errors:
        raise errors[0]


async def _main(args: dict[str, Any], rec: Recorder) -> None:
    deadline = float(args.get("deadline", 60.0))
    try:
        await asyncio.wait_for(_run(args, rec), timeout=deadline)
    except TimeoutError as exc:
        rec.fail(exc, f"deadline {deadline} s")
    except BaseException as exc:
        rec.fail(exc, "run")
        traceback.print_exc(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-args", required=True, help="JSON object, @file, or - for stdin")
    ns = parser.parse_args(argv)
    try:
        args = _load_args(ns.json_args)
        for key in ("endpoint", "guild_id", "channel_id", "user_id", "session_id", "token"):
            if key not in args:
                raise KeyError(key)
    except (ValueError, KeyError, OSError) as exc:
        _emit({"result": {"ok": False, "error": f"bad arguments: {exc!r}", "error_type": type(exc).__name__}})
        return 2

    # Before aiohttp (imported by discord) builds its default SSL context.
    if args.get("cafile"):
        os.environ["SSL_CERT_FILE"] = str(args["cafile"])
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.get("log_level", "WARNING")).upper(), logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    rec = Recorder()
    try:
        import discord

        if not hasattr(discord, "VoiceClient"):  # tests/discord/ (npm) must not shadow discord.py
            raise ImportError(f"discord.py is not installed (found {discord!r})")
    except ImportError as exc:
        rec.fail(exc, "import")
        _emit({"result": rec.result})
        return 1

    asyncio.run(_main(args, rec))
    res = rec.result
    res["ok"] = bool(
        res["error"] is None
        and res["connected"]
        and res["frames_sent"] >= len(args.get("frames", []))
        and res["disconnected"]
    )
    _emit({"result": res})
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
