"""Quick checks of the Discord real-client harness (tests/discord_clients.py) without a voice server:
the Opus frame helpers, the test certificate, the subprocess deadline, and that both client
scripts start and report failure (never hang) when nothing listens."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from discord_clients import (
    DJS_DIR,
    DPY_BOT,
    DpyBot,
    HarnessError,
    _spawn,
    decode_opus,
    djs_available,
    dpy_available,
    estimate_tone_hz,
    make_test_certificate,
    marker_index,
    opus_frame_duration_ms,
    opus_marker_frames,
    opus_pad,
    opus_toc,
    opus_tone_frames,
    run_djs_client,
    run_dpy_bot,
)

pytest.importorskip("av")
REPO = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Opus frames --------------------------------------------------------------------------------


def test_opus_tone_frames_are_valid_distinct_and_decode_to_the_tone() -> None:
    frames = opus_tone_frames(60, 440)
    assert len(frames) == 60
    assert len(set(frames)) == 60
    for frame in frames:
        config, stereo, _code = opus_toc(frame)
        assert config >= 16 and opus_frame_duration_ms(config) == 20.0  # CELT-only, 20 ms
        assert stereo
    pcm = decode_opus(frames)
    assert len(pcm) == 60 * 960 * 2
    assert estimate_tone_hz(pcm) == pytest.approx(440, rel=0.02)
    assert opus_tone_frames(60, 440) == frames  # deterministic


def test_opus_tone_frames_stay_distinct_over_long_runs() -> None:
    frames = opus_tone_frames(400, 1000)  # 1 kHz repeats byte-identical packets without the padding
    assert len(set(frames)) == 400
    assert estimate_tone_hz(decode_opus(frames)) == pytest.approx(1000, rel=0.02)


def test_opus_tone_frames_mono() -> None:
    frames = opus_tone_frames(20, 660, channels=1)
    assert not any(opus_toc(f)[1] for f in frames)
    assert estimate_tone_hz(decode_opus(frames, channels=1), channels=1) == pytest.approx(660, rel=0.03)


@pytest.mark.parametrize("padding", [1, 7, 254, 255, 600])
def test_opus_pad_is_rfc6716_code3_with_the_same_audio(padding: int) -> None:
    frame = opus_tone_frames(3, 440)[1]
    padded = opus_pad(frame, padding)
    config, stereo, code = opus_toc(padded)
    assert (config, stereo, code) == opus_toc(frame)[:2] + (3,)
    assert padded[1] == 0x41  # CBR, padding flag, one frame
    i, total = 2, 0
    while padded[i] == 255:
        total += 254
        i += 1
    total += padded[i]
    assert total == padding
    assert padded[i + 1 : len(padded) - padding] == frame[1:]
    assert padded[len(padded) - padding :] == bytes(padding)
    assert decode_opus([padded]) == decode_opus([frame])


def test_opus_marker_frames() -> None:
    frames = opus_marker_frames(5, size=30, start=7)
    assert [marker_index(f) for f in frames] == [7, 8, 9, 10, 11]
    assert all(len(f) == 30 and opus_toc(f) == (31, True, 0) for f in frames)
    assert len(decode_opus(frames)) == 5 * 960 * 2  # libopus accepts them
    assert marker_index(b"\xf8\xff\xfe") is None


# --- certificate --------------------------------------------------------------------------------


def test_make_test_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_pem, key_pem = make_test_certificate(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=2, hours=1)
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.UTC) < cert.not_valid_after_utc


@pytest.mark.loopback
@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_test_certificate_verifies_over_tls(tmp_path: Path, hostname: str) -> None:
    cert_pem, key_pem = make_test_certificate(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_pem, key_pem)
    client_ctx = ssl.create_default_context(cafile=str(cert_pem))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=hostname) as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(5)


# --- subprocess handling ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_client_process_is_killed_at_its_deadline() -> None:
    code = "import json, time; print(json.dumps({'event': 'up'}), flush=True); time.sleep(60)"

    async def main() -> None:
        handle = await _spawn(DpyBot, "sleeper", [sys.executable, "-c", code], {}, {}, 2.0)
        assert (await handle.wait_event("up", timeout=5))["event"] == "up"
        with pytest.raises(HarnessError, match="event 'never'|no 'never' event"):
            await handle.wait_event("never", timeout=0.3)
        start = time.monotonic()
        with pytest.raises(HarnessError, match="timed out and was killed"):
            await handle.result()
        assert time.monotonic() - start < 5
        assert handle.proc.returncode == -9
        await handle.aclose()

    asyncio.run(main())


def test_dpy_bot_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, str(DPY_BOT), "--json-args", "{}"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    result = json.loads(proc.stdout.strip().splitlines()[-1])["result"]
    assert result["ok"] is False and "bad arguments" in result["error"]


@pytest.mark.loopback
@pytest.mark.timeout(60)
@pytest.mark.skipif(not dpy_available(), reason="discord.py[voice]==2.7.1 is not installed")
def test_dpy_bot_reports_an_unreachable_server(tmp_path: Path) -> None:
    cert_pem, _ = make_test_certificate(tmp_path)
    res = asyncio.run(
        run_dpy_bot(
            f"127.0.0.1:{_closed_port()}",
            guild_id=41,
            channel_id=42,
            user_id=43,
            session_id="s",
            token="t",
            frames=opus_marker_frames(3),
            cafile=cert_pem,
            connect_timeout=3,
            timeout=30,
        )
    )
    assert not res.ok and not res.connected
    assert res.error is not None and res.error_type is not None
    assert res.raw["versions"]["discord.py"] == "2.7.1"


@pytest.mark.loopback
@pytest.mark.timeout(60)
@pytest.mark.skipif(not djs_available(), reason="run scripts/discord_clients_setup.sh")
def test_djs_client_reports_an_unreachable_server(tmp_path: Path) -> None:
    cert_pem, _ = make_test_certificate(tmp_path)
    res = asyncio.run(
        run_djs_client(
            f"127.0.0.1:{_closed_port()}",
            guild_id=41,
            channel_id=42,
            user_id=44,
            session_id="s",
            token="t",
            cafile=cert_pem,
            ready_timeout=3,
            duration=3,
            timeout=30,
        )
    )
    assert not res.ok and not res.ready and res.errors
    assert res.states[0]["status"] == "signalling"
    assert res.final_status == "disconnected" and res.disconnect_reason == 1  # no rejoin allowed
    assert "@discordjs/voice: 0.19.2" in res.dependency_report
    assert "@noble/ciphers: 2.4.0" in res.dependency_report


# --- pins ---------------------------------------------------------------------------------------


def test_client_versions_are_pinned_exactly() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "discord.py[voice]==2.7.1" in pyproject["project"]["optional-dependencies"]["test"]
    package = json.loads((DJS_DIR / "package.json").read_text())
    lock = json.loads((DJS_DIR / "package-lock.json").read_text())
    deps = package["dependencies"]
    assert deps["@discordjs/voice"] == "0.19.2" and deps["@noble/ciphers"] == "2.4.0"
    for name, version in deps.items():
        assert version[0].isdigit(), f"{name} is not pinned exactly: {version}"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
