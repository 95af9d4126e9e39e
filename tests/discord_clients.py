"""Real-client harness for the Discord-style voice gateway (docs/testing.md#other-real-peers).

Drives the two reference bot libraries against a voice server on 127.0.0.1, each in its own
subprocess with a hard timeout:

* discord.py 2.7.1 through ``tests/dpy_bot.py`` (a subprocess because ``SSL_CERT_FILE`` must be set
  before aiohttp is imported). It only sends: discord.py has no audio receive.
* @discordjs/voice 0.19.2 through ``tests/discord/djs_client.mjs`` (``NODE_EXTRA_CA_CERTS`` for wss);
  it receives (attributed per user ID), sends, and records state transitions, close codes, resumes.
  Its pinned npm packages are installed by ``scripts/discord_clients_setup.sh``.

Both scripts read their arguments as one JSON object on stdin (``--json-args -``), print progress
events as JSON lines (``{"event": "ready", ...}``) and finally one ``{"result": {...}}`` line on
stdout; logs go to stderr. ``run_dpy_bot``/``run_djs_client`` run a client to completion;
``start_dpy_bot``/``start_djs_client`` return a handle whose events can be awaited first, e.g. to
start sending only once the receiver is ready::

    cert, key = make_test_certificate(tmp_path)  # the server: ssl ctx.load_cert_chain(cert, key)
    frames = opus_tone_frames(50)
    djs = await start_djs_client(endpoint, guild_id=1, channel_id=2, user_id=20, session_id="s2",
                                 token="t2", receive_from=[10], expect_frames={10: 50}, cafile=cert)
    try:
        await djs.wait_event("ready", timeout=10)
        dpy = await run_dpy_bot(endpoint, guild_id=1, channel_id=2, user_id=10, session_id="s1",
                                token="t1", frames=frames, cafile=cert)
        res = await djs.result()
    finally:
        await djs.aclose()
    assert dpy.ok and dpy.mode == "aead_xchacha20_poly1305_rtpsize"
    assert res.ok and res.mode == "aead_aes256_gcm_rtpsize" and res.received_from(10) == frames

Helpers without any server: ``make_test_certificate`` (self-signed P-256 for 127.0.0.1/localhost),
``opus_tone_frames`` (real Opus from PyAV's libopus, each frame distinct), ``opus_marker_frames``
(syntactically valid CELT-only packets with the index in the payload, no codec needed),
``decode_opus`` and ``estimate_tone_hz`` to check what a receiver got.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import math
import os
import shutil
import signal
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

TESTS_DIR = Path(__file__).resolve().parent
DPY_BOT = TESTS_DIR / "dpy_bot.py"
DJS_DIR = TESTS_DIR / "discord"
DJS_CLIENT = DJS_DIR / "djs_client.mjs"

OPUS_SILENCE_FRAME = b"\xf8\xff\xfe"
"""The Opus silence frame both bots send five of before a pause (docs/transports.md#encryption-modes)."""

FRAME_SAMPLES = 960  # 20 ms at 48 kHz
_STDERR_KEEP = 64 * 1024


class HarnessError(RuntimeError):
    """The client process could not be started, produced no result, or timed out."""


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def make_test_certificate(tmp_path: Path | str) -> tuple[Path, Path]:
    """Write a throwaway self-signed P-256 certificate for wss on loopback (docs/testing.md#other-real-peers).

    SANs IP:127.0.0.1 and DNS:localhost, CN=localhost, valid from an hour ago for 2 days. Returns
    ``(cert_pem, key_pem)`` paths in ``tmp_path``; the certificate is also its own CA, so pass
    ``cert_pem`` as ``cafile`` to the clients and load both into an ``ssl.SSLContext``::

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert_pem, key_pem)
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = directory / "cert.pem"
    key_pem = directory / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_pem, key_pem


# ---------------------------------------------------------------------------------------------
# Opus frames
# ---------------------------------------------------------------------------------------------


def opus_toc(frame: bytes) -> tuple[int, bool, int]:
    """Decode an Opus TOC byte (RFC 6716 §3.1): ``(config 0-31, stereo, frame count code 0-3)``."""
    if not frame:
        raise ValueError("empty Opus packet")
    toc = frame[0]
    return toc >> 3, bool(toc & 0x04), toc & 0x03


def opus_frame_duration_ms(config: int) -> float:
    """Frame duration of an Opus TOC configuration (RFC 6716 Table 2)."""
    if config < 12:  # SILK NB/MB/WB: 10, 20, 40, 60 ms
        return (10.0, 20.0, 40.0, 60.0)[config % 4]
    if config < 16:  # Hybrid SWB/FB: 10, 20 ms
        return (10.0, 20.0)[config % 2]
    return (2.5, 5.0, 10.0, 20.0)[config % 4]  # CELT NB/WB/SWB/FB


def opus_marker_frames(n: int, *, size: int = 40, stereo: bool = True, start: int = 0) -> list[bytes]:
    """``n`` syntactically valid 20 ms CELT-only fullband Opus packets, no codec needed.

    TOC config 31 (CELT FB 20 ms), code 0 (one frame), then ``b"FSFU"``, the frame index as u32
    BE and deterministic filler up to ``size`` bytes. Any code-0 body is a decodable CELT frame
    (it decodes to noise-like audio), so the SFU and the clients treat these as ordinary Opus,
    and every frame is distinct and identifiable with :func:`marker_index`.
    """
    if size < 9:
        raise ValueError("size must be at least 9 bytes (TOC, tag, index)")
    toc = bytes([(31 << 3) | (0x04 if stereo else 0x00)])
    frames = []
    for i in range(start, start + n):
        head = toc + b"FSFU" + struct.pack(">I", i & 0xFFFFFFFF)
        filler = bytes(((i * 31 + k * 7) & 0xFF) for k in range(size - len(head)))
        frames.append(head + filler)
    return frames


def marker_index(frame: bytes) -> int | None:
    """The index stamped by :func:`opus_marker_frames`, or None for any other packet."""
    if len(frame) >= 9 and frame[1:5] == b"FSFU":
        return int(struct.unpack_from(">I", frame, 5)[0])
    return None


def opus_tone_frames(
    n: int,
    hz: float = 440.0,
    *,
    channels: int = 2,
    bitrate: int = 64000,
    amplitude: float = 0.25,
) -> list[bytes]:
    """Encode ``n`` 20 ms Opus frames of a sine tone with PyAV's libopus (no system libopus needed).

    PyAV (``av``, installed with aiortc) bundles FFmpeg built with libopus. The encoder emits
    CELT-only 20 ms frames (TOC 0xFC for fullband stereo) at 48 kHz; the first ~6.5 ms are the
    encoder's pre-skip. A per-frame gain between 0.8 and 1 that never repeats keeps frames apart
    (a steady 440 Hz tone repeats its phase every 5 frames), and the rare remaining byte-identical
    repeat is made unique with zero padding (:func:`opus_pad`, same audio), so every frame in the
    list is distinct: receivers can compare payloads exactly with the sent list (the SFU forwards
    Opus payloads untouched). Deterministic for a given libopus build. About 1 ms per frame.
    """
    import av

    if n <= 0:
        return []
    if channels not in (1, 2):
        raise ValueError("channels must be 1 or 2")
    ctx: Any = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = 48000
    ctx.layout = "stereo" if channels == 2 else "mono"
    ctx.format = "s16"
    ctx.bit_rate = bitrate
    ctx.time_base = Fraction(1, 48000)
    ctx.options = {"application": "audio", "frame_duration": "20"}
    ctx.open()
    packets: list[bytes] = []
    t = 0
    index = 0
    while len(packets) < n:
        # a non-repeating gain in [0.8, 1] (golden-ratio sequence): a steady tone repeats its
        # phase every few frames and would otherwise produce byte-identical packets
        scale = amplitude * (1.0 - 0.2 * ((index * 0.6180339887498949) % 1.0)) * 32767
        samples = array.array("h")
        for k in range(t, t + FRAME_SAMPLES):
            v = int(scale * math.sin(2 * math.pi * hz * k / 48000))
            samples.extend((v,) * channels)
        frame = av.AudioFrame(format="s16", layout=ctx.layout.name, samples=FRAME_SAMPLES)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = 48000
        frame.pts = t
        frame.time_base = Fraction(1, 48000)
        packets.extend(bytes(p) for p in ctx.encode(frame))
        t += FRAME_SAMPLES
        index += 1
        if index > n + 50:  # the encoder's lookahead is one frame; never loop unbounded
            break
    if len(packets) < n:
        packets.extend(bytes(p) for p in ctx.encode(None))
    packets = packets[:n]
    if len(packets) < n:
        raise RuntimeError(f"libopus produced {len(packets)} packets for {n} frames")
    return _make_distinct(packets)


def opus_pad(packet: bytes, padding: int) -> bytes:
    """Re-frame a one-frame (code 0) Opus packet as code 3 with ``padding`` zero padding bytes.

    RFC 6716 §3.2.5: same audio, different bytes (decoders skip the padding).
    """
    config, stereo, code = opus_toc(packet)
    if code != 0:
        raise ValueError("only code-0 (single frame) packets can be padded here")
    if padding <= 0:
        return packet
    toc = bytes([(config << 3) | (0x04 if stereo else 0) | 0x03])
    count = bytes([0x40 | 1])  # CBR, padding flag, one frame
    # padding-length bytes: each 255 adds 254 bytes, the last (0-254) adds its value (RFC 6716 §3.2.5)
    length = b""
    left = padding
    while left > 254:
        length += b"\xff"
        left -= 254
    length += bytes([left])
    return toc + count + length + packet[1:] + b"\x00" * padding


def _make_distinct(packets: list[bytes]) -> list[bytes]:
    """Pad the rare byte-identical repeats (a steady tone's encoder state can converge) until unique."""
    seen: set[bytes] = set()
    out = []
    for packet in packets:
        candidate, pad = packet, 0
        while candidate in seen:
            pad += 1
            candidate = opus_pad(packet, pad)
        seen.add(candidate)
        out.append(candidate)
    return out


def decode_opus(frames: Iterable[bytes], *, channels: int = 2) -> array.array[int]:
    """Decode Opus packets with PyAV's libopus to interleaved s16 PCM at 48 kHz."""
    import av

    ctx: Any = av.CodecContext.create("libopus", "r")
    ctx.sample_rate = 48000
    ctx.layout = "stereo" if channels == 2 else "mono"
    ctx.open()
    resampler = av.AudioResampler(format="s16", layout=ctx.layout.name, rate=48000)
    out: array.array[int] = array.array("h")
    for payload in frames:
        for frame in ctx.decode(av.Packet(payload)):
            for pcm in resampler.resample(frame):
                out.frombytes(bytes(pcm.planes[0])[: pcm.samples * channels * 2])
    return out


def estimate_tone_hz(pcm: Sequence[int], *, channels: int = 2, rate: int = 48000, skip: int = 960) -> float:
    """Dominant frequency of a (mono-ized) tone from its zero crossings; skips ``skip`` samples."""
    mono = [pcm[i] for i in range(skip * channels, len(pcm), channels)]
    if len(mono) < 2:
        return 0.0
    crossings = sum(1 for a, b in zip(mono, mono[1:], strict=False) if (a < 0) != (b < 0))
    return crossings / 2 / (len(mono) / rate)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _b64(frames: Iterable[bytes]) -> list[str]:
    return [base64.b64encode(bytes(f)).decode("ascii") for f in frames]


@dataclass
class DpyResult:
    """What tests/dpy_bot.py reported (discord.py 2.7.1, send only)."""

    ok: bool
    """Connected, sent every frame, disconnected, and no error."""
    connected: bool
    mode: str | None
    ssrc: int | None
    secret_key_len: int | None
    dave_protocol_version: int | None
    frames_sent: int
    """``send_audio_packet`` calls with a non-silence frame whose datagram left the socket."""
    silence_sent: int
    """Silence frames (``F8 FF FE``) sent, e.g. the AudioPlayer's five at the end (player mode)."""
    packets_sent: int
    """All RTP datagrams sent (frames plus silence)."""
    packets_dropped: int
    """Datagrams discord.py dropped on OSError (it swallows them)."""
    error: str | None
    error_type: str | None
    ws_received: list[dict[str, Any]]
    """Every voice-gateway message discord.py received: ``{"op", "seq", "d", "t"}``."""
    ws_sent: list[dict[str, Any]]
    """Every JSON message it sent (IDENTIFY, SELECT_PROTOCOL, SPEAKING, HEARTBEAT...)."""
    close_codes: list[int]
    connect_seconds: float | None
    latency: float | None
    """discord.py's heartbeat latency (None before any ACK; unreliable: it can read as the full
    5 s interval, as its heartbeat thread stamps the send after the ACK may have arrived)."""
    disconnected: bool
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stderr: str = ""

    def ops_received(self) -> list[int]:
        return [int(m["op"]) for m in self.ws_received]

    def ops_sent(self) -> list[int]:
        return [int(m["op"]) for m in self.ws_sent]


@dataclass
class DjsResult:
    """What tests/discord/djs_client.mjs reported (@discordjs/voice 0.19.2)."""

    ok: bool
    """Reached Ready, met every expectation given (frames, resume), and no error."""
    ready: bool
    mode: str | None
    ssrc: int | None
    ready_payload: dict[str, Any] | None
    """The op 2 READY ``d`` it received (ssrc, ip, port, modes, ...)."""
    session_description: dict[str, Any] | None
    """The op 4 ``d`` minus ``secret_key``, plus ``secret_key_len``."""
    received: dict[int, list[bytes]]
    """Decrypted Opus payloads per user ID, as the receiver attributed them (subscribed users only)."""
    received_rtp: list[dict[str, Any]]
    """Every RTP datagram on the UDP socket: ``{ssrc, seq, ts, pt, marker, cc, x, len, t}`` (capped)."""
    speaking: list[dict[str, Any]]
    """Every S->C op 5 ``d`` (user_id, ssrc, speaking)."""
    ws_ops_received: list[int]
    states: list[dict[str, Any]]
    """VoiceConnection transitions ``{t, status}``: signalling/connecting/ready/disconnected/destroyed."""
    networking_states: list[dict[str, Any]]
    """Networking transitions ``{t, code, name}`` (OpeningWs ... Ready, Resuming, Closed)."""
    ws_close_codes: list[int]
    """Close codes of every voice WebSocket it saw close (4015 before a resume, 4014 ...)."""
    networking_close_codes: list[int]
    """Codes of non-resumable closes (the Networking 'close' event)."""
    resumes: int
    """Resuming -> Ready transitions (after op 9 RESUMED)."""
    rejoin_requests: int
    """Adapter sendPayload calls after the first join (djs rejoins after non-resumable closes)."""
    packets_sent: int
    """Audio packets dispatched (frames plus silence padding)."""
    silence_sent: int
    frames_sent: int
    frames_skipped: int
    """Frames not sent because the connection was not Ready (networking mode)."""
    final_status: str | None
    disconnect_reason: int | None
    close_code: int | None
    errors: list[str]
    dependency_report: str
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stderr: str = ""

    def received_from(self, user_id: int) -> list[bytes]:
        return self.received.get(int(user_id), [])


def _dpy_result(raw: dict[str, Any], events: list[dict[str, Any]], rc: int | None, stderr: str) -> DpyResult:
    return DpyResult(
        ok=bool(raw.get("ok")),
        connected=bool(raw.get("connected")),
        mode=raw.get("mode"),
        ssrc=raw.get("ssrc"),
        secret_key_len=raw.get("secret_key_len"),
        dave_protocol_version=raw.get("dave_protocol_version"),
        frames_sent=int(raw.get("frames_sent", 0)),
        silence_sent=int(raw.get("silence_sent", 0)),
        packets_sent=int(raw.get("packets_sent", 0)),
        packets_dropped=int(raw.get("packets_dropped", 0)),
        error=raw.get("error"),
        error_type=raw.get("error_type"),
        ws_received=list(raw.get("ws_received", [])),
        ws_sent=list(raw.get("ws_sent", [])),
        close_codes=[int(c) for c in raw.get("close_codes", [])],
        connect_seconds=raw.get("connect_seconds"),
        latency=raw.get("latency"),
        disconnected=bool(raw.get("disconnected")),
        events=events,
        raw=raw,
        returncode=rc,
        stderr=stderr,
    )


def _djs_result(raw: dict[str, Any], events: list[dict[str, Any]], rc: int | None, stderr: str) -> DjsResult:
    received = {
        int(uid): [base64.b64decode(p) for p in payloads] for uid, payloads in raw.get("received", {}).items()
    }
    return DjsResult(
        ok=bool(raw.get("ok")),
        ready=bool(raw.get("ready")),
        mode=raw.get("mode"),
        ssrc=raw.get("ssrc"),
        ready_payload=raw.get("ready_payload"),
        session_description=raw.get("session_description"),
        received=received,
        received_rtp=list(raw.get("received_rtp", [])),
        speaking=list(raw.get("speaking", [])),
        ws_ops_received=[int(o) for o in raw.get("ws_ops_received", [])],
        states=list(raw.get("states", [])),
        networking_states=list(raw.get("networking_states", [])),
        ws_close_codes=[int(c) for c in raw.get("ws_close_codes", [])],
        networking_close_codes=[int(c) for c in raw.get("networking_close_codes", [])],
        resumes=int(raw.get("resumes", 0)),
        rejoin_requests=int(raw.get("rejoin_requests", 0)),
        packets_sent=int(raw.get("packets_sent", 0)),
        silence_sent=int(raw.get("silence_sent", 0)),
        frames_sent=int(raw.get("frames_sent", 0)),
        frames_skipped=int(raw.get("frames_skipped", 0)),
        final_status=raw.get("final_status"),
        disconnect_reason=raw.get("disconnect_reason"),
        close_code=raw.get("close_code"),
        errors=[str(e) for e in raw.get("errors", [])],
        dependency_report=str(raw.get("dependency_report", "")),
        events=events,
        raw=raw,
        returncode=rc,
        stderr=stderr,
    )


# ---------------------------------------------------------------------------------------------
# Subprocess handling
# ---------------------------------------------------------------------------------------------


class ClientProcess:
    """A running client script: its progress events, then one result; killed after its deadline.

    ``wait_event(name, timeout)`` waits for a progress event; ``result()`` waits for the process to
    exit (at most until the deadline given at start) and returns the parsed result. On the
    deadline the whole process group (started with ``start_new_session``) is sent SIGKILL.
    """

    def __init__(self, name: str, proc: asyncio.subprocess.Process, deadline: float) -> None:
        self.name = name
        self.proc = proc
        self.deadline = deadline
        self.events: list[dict[str, Any]] = []
        self.raw_result: dict[str, Any] | None = None
        self._stderr = bytearray()
        self._event_added = asyncio.Event()
        self._readers = [
            asyncio.ensure_future(self._read_stdout()),
            asyncio.ensure_future(self._read_stderr()),
        ]
        self.timed_out = False

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                self._append_stderr(b"[stdout] " + line)
                continue
            if isinstance(msg, dict) and "result" in msg:
                self.raw_result = msg["result"]
            elif isinstance(msg, dict) and "event" in msg:
                self.events.append(msg)
            else:
                self._append_stderr(b"[stdout] " + line)
            self._event_added.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            chunk = await self.proc.stderr.read(65536)
            if not chunk:
                return
            self._append_stderr(chunk)

    def _append_stderr(self, chunk: bytes) -> None:
        self._stderr += chunk
        if len(self._stderr) > _STDERR_KEEP:
            del self._stderr[: len(self._stderr) - _STDERR_KEEP]

    def _remaining(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def find_event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == name), None)

    async def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait (bounded) for the first progress event called ``name``; HarnessError if it never comes."""
        loop = asyncio.get_running_loop()
        end = min(loop.time() + timeout, self.deadline)
        while True:
            found = self.find_event(name)
            if found is not None:
                return found
            if self.proc.returncode is not None and all(r.done() for r in self._readers):
                raise HarnessError(
                    f"{self.name} exited ({self.proc.returncode}) before event {name!r}; "
                    f"events={[e.get('event') for e in self.events]} result={self.raw_result}\n"
                    f"{self.stderr[-4000:]}"
                )
            left = end - loop.time()
            if left <= 0:
                raise HarnessError(
                    f"{self.name}: no {name!r} event within {timeout} s\n{self.stderr[-4000:]}"
                )
            self._event_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), timeout=min(left, 0.2))

    async def wait_raw(self) -> tuple[dict[str, Any], int | None]:
        """Wait for exit (bounded by the deadline; killed past it); the raw result dict and exit code."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=self._remaining())
        except TimeoutError:
            self.timed_out = True
            self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout=5.0)
        for reader in self._readers:
            try:
                await asyncio.wait_for(reader, timeout=2.0)
            except TimeoutError:
                reader.cancel()
        if self.raw_result is None:
            why = "timed out and was killed" if self.timed_out else f"exited with {self.proc.returncode}"
            raise HarnessError(f"{self.name} {why} without a result line\n{self.stderr[-6000:]}")
        raw = dict(self.raw_result)
        if self.timed_out:
            raw["ok"] = False
            raw.setdefault("error", "harness deadline: killed")
        return raw, self.proc.returncode

    def kill(self) -> None:
        """SIGKILL this client's own process group (no-op once it has exited)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def aclose(self) -> None:
        """Kill if still running and reap; safe to call more than once."""
        self.kill()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await asyncio.wait_for(self.proc.wait(), timeout=5.0)
        for reader in self._readers:
            reader.cancel()


_P = TypeVar("_P", bound=ClientProcess)


async def _spawn(
    cls: type[_P], name: str, argv: list[str], args: dict[str, Any], env: dict[str, str], timeout: float
) -> _P:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(TESTS_DIR.parent),
        start_new_session=True,
        limit=16 * 1024 * 1024,  # one result line can hold every received payload
    )
    handle = cls(name, proc, asyncio.get_running_loop().time() + timeout)
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(args).encode())
        await asyncio.wait_for(proc.stdin.drain(), timeout=10.0)
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # it died at start; result() reports stderr
    return handle


# ---------------------------------------------------------------------------------------------
# discord.py
# ---------------------------------------------------------------------------------------------


class DpyBot(ClientProcess):
    """Handle on a running tests/dpy_bot.py. Events: ``connected`` {ssrc, mode}, ``sent`` {frames_sent}."""

    async def result(self) -> DpyResult:
        raw, rc = await self.wait_raw()
        return _dpy_result(raw, self.events, rc, self.stderr)

    def end_hold(self) -> None:
        """Disconnect now rather than at the end of ``hold`` (SIGUSR1; after ``connected``)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGUSR1)


def voice_ids(guild: int, channel: int, user: int, token: str) -> dict[str, Any]:
    """The identity keywords of start_dpy_bot / start_djs_client for `user` in (guild, channel),
    with session ID session-<user> and its `token`."""
    return {
        "guild_id": guild,
        "channel_id": channel,
        "user_id": user,
        "session_id": f"session-{user}",
        "token": token,
    }


def dpy_available() -> bool:
    """True if discord.py 2.7.1 with voice support (PyNaCl, davey) is importable here."""
    try:
        import importlib.metadata as md

        if md.version("discord.py") != "2.7.1":
            return False
        import davey  # noqa: F401
        import nacl  # noqa: F401
    except Exception:
        return False
    return True


async def start_dpy_bot(
    endpoint: str,
    *,
    guild_id: int,
    channel_id: int,
    user_id: int,
    session_id: str,
    token: str,
    frames: Sequence[bytes] = (),
    cafile: str | os.PathLike[str] | None = None,
    frame_interval: float = 0.02,
    connect_timeout: float = 10.0,
    send_via: str = "direct",
    speaking: bool = False,
    start_delay: float = 0.2,
    hold: float = 0.2,
    scheme: str = "wss",
    timeout: float | None = None,
    log_level: str = "WARNING",
    python: str | None = None,
    pause_at: int = -1,
    pause: float = 0.0,
) -> DpyBot:
    """Start tests/dpy_bot.py (see :func:`run_dpy_bot`); the keywords below are its options."""
    if send_via not in ("direct", "player"):
        raise ValueError("send_via must be 'direct' or 'player'")
    budget = connect_timeout + start_delay + len(frames) * frame_interval + pause + hold + 15.0
    deadline = budget if timeout is None else timeout
    args = {
        "endpoint": endpoint,
        "guild_id": int(guild_id),
        "channel_id": int(channel_id),
        "user_id": int(user_id),
        "session_id": session_id,
        "token": token,
        "frames": _b64(frames),
        "cafile": os.fspath(cafile) if cafile is not None else None,
        "frame_interval": frame_interval,
        "connect_timeout": connect_timeout,
        "send_via": send_via,
        "speaking": speaking,
        "start_delay": start_delay,
        "hold": hold,
        "scheme": scheme,
        "deadline": max(1.0, deadline - 3.0),  # the bot reports partial results before we kill it
        "log_level": log_level,
        "pause_at": pause_at,
        "pause": pause,
    }
    env = dict(os.environ)
    if cafile is not None:
        env["SSL_CERT_FILE"] = os.fspath(cafile)
    argv = [python or sys.executable, str(DPY_BOT), "--json-args", "-"]
    return await _spawn(DpyBot, "dpy_bot", argv, args, env, deadline)


async def run_dpy_bot(endpoint: str, **options: Any) -> DpyResult:
    """Run a discord.py 2.7.1 voice bot against ``endpoint`` (``"127.0.0.1:PORT"``).

    The bot joins through a FakeGuild that delivers VOICE_STATE_UPDATE (``session_id``) and
    VOICE_SERVER_UPDATE (``token``, ``endpoint``) 50 ms after ``change_voice_state`` returns, calls
    ``VoiceClient.connect(reconnect=False, timeout=connect_timeout)``, waits ``start_delay``, then
    sends each of ``frames`` (pre-encoded Opus) and disconnects after ``hold`` seconds.

    * ``send_via="direct"``: ``send_audio_packet(frame, encode=False)`` every ``frame_interval``
      (no op 5 besides discord.py's own ``speaking: 0`` after op 4, unless ``speaking``).
    * ``send_via="player"``: ``vc.play()`` of an ``AudioSource`` with ``is_opus()`` True; the
      AudioPlayer adds op 5 speaking 1/0 and five silence frames.
    * ``speaking``: send op 5 ``speaking: 1`` before and ``0`` after the frames (direct mode).
    * ``pause_at``/``pause``: send nothing for ``pause`` seconds before frame ``pause_at`` (direct mode).
    * ``start_delay`` (default 0.2 s) between connect and the first frame: discord.py sends its
      op 5 right after op 4 and its first RTP at once; the server relays op 5 over TLS while it
      forwards RTP at once, so without a pause the first datagram can reach djs before the SSRC
      mapping and be dropped there (measured against a minimal server: 99/100 with 0 s).
    * ``cafile``: CA for wss (``SSL_CERT_FILE`` in the subprocess); ``scheme="ws"`` rewrites the
      bot's ``wss://`` URL to ``ws://`` for a plain-WebSocket server.
    * ``timeout``: hard limit for the subprocess (default: derived from the frame count); the bot
      reports by itself 3 s before it, and is killed at it.

    A failed connect is reported, not raised (``connected=False``, ``error``/``error_type``), so a
    test can assert e.g. the ``KeyError`` a missing ``dave_protocol_version`` causes.
    HarnessError only when the process produced no result at all.
    """
    bot = await start_dpy_bot(endpoint, **options)
    try:
        return await bot.result()
    finally:
        await bot.aclose()


# ---------------------------------------------------------------------------------------------
# @discordjs/voice
# ---------------------------------------------------------------------------------------------


class DjsClient(ClientProcess):
    """Handle on a running djs_client.mjs.

    Events: ``ready`` {ssrc, mode}, ``played`` {frames_sent}, ``resumed`` {resumes},
    ``ws_close`` {code}, ``status`` {status} (every VoiceConnection transition), ``received``
    {user_id, count} (once a user's ``expect_frames`` count is reached).
    """

    async def result(self) -> DjsResult:
        raw, rc = await self.wait_raw()
        return _djs_result(raw, self.events, rc, self.stderr)


def djs_available() -> bool:
    """True if node and the npm packages of tests/discord (scripts/discord_clients_setup.sh) are there."""
    return (
        shutil.which("node") is not None
        and (DJS_DIR / "node_modules" / "@discordjs" / "voice" / "package.json").is_file()
        and (DJS_DIR / "node_modules" / "@noble" / "ciphers" / "package.json").is_file()
    )


async def start_djs_client(
    endpoint: str,
    *,
    guild_id: int,
    channel_id: int,
    user_id: int,
    session_id: str,
    token: str,
    frames: Sequence[bytes] = (),
    receive_from: Iterable[int] = (),
    expect_frames: Mapping[int, int] | None = None,
    expect_resume: bool = False,
    exit_on_disconnect: bool = True,
    send_via: str = "player",
    play_delay: float = 0.0,
    announce_speaking: float = 0.2,
    frame_interval: float = 0.02,
    silence_padding_frames: int = 5,
    duration: float = 10.0,
    linger: float = 0.2,
    ready_timeout: float = 10.0,
    max_rejoins: int = 0,
    max_rtp_records: int = 5000,
    cafile: str | os.PathLike[str] | None = None,
    debug: bool = False,
    timeout: float | None = None,
    node: str | None = None,
) -> DjsClient:
    """Start djs_client.mjs; see :func:`run_djs_client` for the arguments."""
    if send_via not in ("player", "networking"):
        raise ValueError("send_via must be 'player' or 'networking'")
    node_bin = node or shutil.which("node")
    if node_bin is None or not DJS_CLIENT.is_file():
        raise HarnessError("node or tests/discord/djs_client.mjs is missing")
    if not djs_available():
        raise HarnessError("tests/discord/node_modules is missing: run scripts/discord_clients_setup.sh")
    deadline = duration + ready_timeout + 10.0 if timeout is None else timeout
    args = {
        "endpoint": endpoint,
        "guild_id": str(guild_id),
        "channel_id": str(channel_id),
        "user_id": str(user_id),
        "session_id": session_id,
        "token": token,
        "frames": _b64(frames),
        "receive_from": [str(u) for u in receive_from],
        "expect_frames": {str(k): int(v) for k, v in (expect_frames or {}).items()},
        "expect_resume": expect_resume,
        "exit_on_disconnect": exit_on_disconnect,
        "send_via": send_via,
        "play_delay_ms": int(play_delay * 1000),
        "announce_speaking_ms": int(announce_speaking * 1000),
        "frame_interval_ms": frame_interval * 1000,
        "silence_padding_frames": silence_padding_frames,
        "duration_ms": int(duration * 1000),
        "linger_ms": int(linger * 1000),
        "ready_timeout_ms": int(ready_timeout * 1000),
        "max_rejoins": max_rejoins,
        "max_rtp_records": max_rtp_records,
        "hard_deadline_ms": int(max(1.0, deadline - 2.0) * 1000),
        "debug": debug,
    }
    env = dict(os.environ)
    if cafile is not None:
        env["NODE_EXTRA_CA_CERTS"] = os.fspath(cafile)
    argv = [node_bin, str(DJS_CLIENT), "--json-args", "-"]
    return await _spawn(DjsClient, "djs_client", argv, args, env, deadline)


async def run_djs_client(endpoint: str, **options: Any) -> DjsResult:
    """Run an @discordjs/voice 0.19.2 client against ``endpoint`` (``"127.0.0.1:PORT"``).

    Joins with the fake adapter (state update, then server update; ``daveEncryption: false``),
    waits for Ready (``ready_timeout``), subscribes the receiver to every ``receive_from`` user ID
    (EndBehaviorType.Manual) and records each decrypted Opus payload, then after ``play_delay``
    plays ``frames``:

    * ``send_via="player"``: createAudioPlayer + createAudioResource(StreamType.Opus), with
      ``silence_padding_frames`` silence frames at the end (djs default 5) and op 5 1/0;
    * ``send_via="networking"``: ``prepareAudioPacket`` + ``dispatchAudio`` every
      ``frame_interval`` (no silence padding; op 5 speaking 1 before the first packet).

    ``announce_speaking`` (default 0.2 s): send op 5 ``speaking: 1`` that long before the first
    frame. djs itself sends it immediately before its first packet, and a receiver drops RTP from
    an SSRC it has no op 5 for, so the first frame races the relayed op 5 (measured against a
    minimal server: 99/100 delivered with 0). Set 0 to test djs's own timing. The player
    dispatches ``silence_padding_frames - 1`` silence frames: the last prepared one is dropped
    when it goes Idle (djs 0.19.2 behaviour).

    It stops when every expectation is met (each ``expect_frames[user]`` payload count, playback
    done, a Resuming -> Ready when ``expect_resume``), when it ends Disconnected/Destroyed
    (``exit_on_disconnect``), or after ``duration`` seconds from start, whichever is first, then
    lingers ``linger`` s, destroys the connection and reports. Without expectations it runs the
    whole ``duration``. ``max_rejoins``: how many adapter rejoins (after a non-resumable close) the
    fake adapter answers; beyond that sendPayload returns false (Disconnected, reason 1).
    ``cafile`` becomes ``NODE_EXTRA_CA_CERTS``. ``timeout`` is the hard subprocess limit.
    """
    client = await start_djs_client(endpoint, **options)
    try:
        return await client.result()
    finally:
        await client.aclose()
