"""`fastsfu serve` configuration: defaults < TOML file < FASTSFU_* environment < flags; bad values
exit 2 with one line; the static authorization policy gives each docs/harmony.md#errors identifier through the
real hRPC and gRPC front-ends."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from helpers import serve_app

from fastsfu import Engine
from fastsfu._proto.hrpc.v1 import hrpc_pb2
from fastsfu._proto.protocol.voice.v1 import voice_pb2, voice_pb2_grpc
from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony import VoiceRooms
from fastsfu.harmony.auth import StaticAuthorization, StaticTokens
from fastsfu.harmony.grpc_server import start_grpc_server
from fastsfu.harmony.hrpc_server import STREAM_PATH, make_app
from fastsfu.server.config import ConfigError, ServerConfig, load_config

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FASTSFU_")}
    return subprocess.run(
        [sys.executable, "-m", "fastsfu.server.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_defaults_need_no_configuration() -> None:
    config = load_config(None, {}, {})
    assert config == ServerConfig()
    assert (config.listen_ip, config.hrpc_port, config.grpc_port, config.media_port) == (
        "127.0.0.1",
        2289,
        2290,
        0,
    )
    assert config.token_secret is None and config.dtls_pem() is None and config.auth is None
    assert (config.rate_limit.burst, config.rate_limit.interval) == (5, 10.0)
    assert (config.log.level, config.log.format) == ("info", "text")


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "fastsfu.toml"
    toml.write_text(
        'listen_ip = "127.0.0.2"\nhrpc_port = 1111\ngrpc_port = 2222\nmedia_port = 3333\n'
        "[voice]\nmax_users_per_room = 7\njoin_timeout = 12\n"
        '[log]\nformat = "json"\nlevel = "warning"\n'
    )
    env = {"FASTSFU_GRPC_PORT": "4444", "FASTSFU_MEDIA_PORT": "5555", "FASTSFU_JOIN_TIMEOUT": "13.5"}
    config = load_config(str(toml), env, {"media_port": "6666", "log.level": "debug"})
    assert config.listen_ip == "127.0.0.2"  # file over default
    assert config.hrpc_port == 1111  # file
    assert config.grpc_port == 4444  # env over file
    assert config.media_port == 6666  # flag over env over file
    assert config.voice.max_users_per_room == 7 and config.voice.join_timeout == 13.5
    assert config.voice.init_timeout == 10.0  # untouched default
    assert (config.log.format, config.log.level) == ("json", "debug")
    datapath = load_config(None, {"FASTSFU_MAX_QUEUE_AGE_MS": "80"}, {"datapath_thread": False})
    assert (datapath.datapath_thread, datapath.max_queue_age_ms) == (False, 80.0)
    # FASTSFU_CONFIG names the file when no --config is given.
    assert load_config(None, {"FASTSFU_CONFIG": str(toml)}, {}).hrpc_port == 1111


def test_precedence_through_the_command_line(tmp_path: Path) -> None:
    toml = tmp_path / "fastsfu.toml"
    toml.write_text("hrpc_port = 1111\ngrpc_port = 2222\nmedia_port = 3333\n[rate_limit]\nburst = 9\n")
    out = cli(
        "--config",
        str(toml),
        "--media-port",
        "6666",
        "--no-metrics",
        "--print-config",
        env={"FASTSFU_GRPC_PORT": "4444", "FASTSFU_MEDIA_PORT": "5555", "FASTSFU_TOKEN_SECRET": "s3cret-x"},
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert (printed["hrpc_port"], printed["grpc_port"], printed["media_port"]) == (1111, 4444, 6666)
    assert printed["datapath_thread"] is True and printed["max_queue_age_ms"] == 200.0
    assert printed["rate_limit"]["burst"] == 9 and printed["metrics"] is False
    assert printed["token_secret"] == "<set>" and "s3cret-x" not in out.stdout


@pytest.mark.parametrize(
    ("toml", "args", "env", "message"),
    [
        ("hrpc_port = 'x'\n", (), {}, "hrpc_port: expected int"),
        ("hrpc_prot = 1\n", (), {}, "unknown key 'hrpc_prot'"),
        ("[voice]\ntimeout = 1\n", (), {}, "unknown key 'voice.timeout'"),
        ("[voice]\nid_quoting = 'yes'\n", (), {}, "must be one of json, bare"),
        ("hrpc_port = \n", (), {}, "not valid TOML"),
        ("[auth.guilds.abc]\n", (), {}, "not a Harmony ID"),
        ("[auth.guilds.1]\nvoice_channels = 'some'\n", (), {}, 'list of IDs or "any"'),
        ("[auth.guilds.1]\nvoice_channels = [1]\nother_channels = [1]\n", (), {}, "both"),
        ("", ("--hrpc-port", "70000"), {}, "--hrpc-port: must be at most 65535"),
        ("", ("--listen-ip", "example.org"), {}, "--listen-ip: not an IP address"),
        ("", (), {"FASTSFU_JOIN_TIMEOUT": "soon"}, "FASTSFU_JOIN_TIMEOUT: expected a float"),
        ("", ("--max-queue-age-ms", "-1"), {}, "--max-queue-age-ms: must be at least 0"),
        ("", (), {"FASTSFU_LOG_FORMAT": "xml"}, "FASTSFU_LOG_FORMAT: must be one of text, json"),
        ("", ("--log-level", "loud"), {}, "--log-level: log level must be one of debug, info"),
        ("", ("--log-level", "fastsfu..dtls=debug"), {}, "not a logger name: 'fastsfu..dtls'"),
        ("", (), {"FASTSFU_LOG_LEVEL": "info,fastsfu.dtls=loud"}, "FASTSFU_LOG_LEVEL: log level must be"),
        ('[log]\nlevels = {"fastsfu.dtls" = "loud"}\n', (), {}, "log.levels: log level must be one of"),
        ("[log]\nlevels = 3\n", (), {}, "log.levels must be a table of logger = level"),
        ("", ("--dtls-certificate", "/nonexistent.pem"), {}, "must be given together"),
        ("", ("--dtls-certificate", "/no/c.pem", "--dtls-private-key", "/no/k.pem"), {}, "cannot read"),
        ("[discord.rooms]\n41 = [1]\n", (), {}, "expected [guild_id, channel_id]"),
        ("[discord.rooms]\n41 = [1, -2]\n", (), {}, "not a Harmony ID"),
        ("[discord]\nport = 70000\n", (), {}, "discord.port: must be at most 65535"),
        ("", ("--discord-tls-certificate", "/no/c.pem"), {}, "must be given together"),
        (
            "",
            ("--discord-tls-certificate", "/no/c.pem", "--discord-tls-private-key", "/no/k.pem"),
            {},
            "discord TLS",
        ),
    ],
)
def test_bad_configuration_exits_2_with_a_message(
    tmp_path: Path, toml: str, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    out = cli("--config", str(path), *args, "--duration", "0.1", env=env)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.startswith("fastsfu serve: error: ") and out.stderr.count("\n") == 1


def test_log_levels_per_subsystem_merge_across_layers(tmp_path: Path) -> None:
    toml = tmp_path / "fastsfu.toml"
    toml.write_text(
        '[log]\nlevel = "warning"\nlevels = {"fastsfu.dtls" = "debug", "fastsfu.engine" = "error"}\n'
    )
    env = {"FASTSFU_LOG_LEVEL": "fastsfu.engine=info, fastsfu.harmony=warning"}
    config = load_config(str(toml), env, {"log.level": "fastsfu.harmony=debug,error"})
    assert config.log.level == "error"  # the bare level of the flag, over the file's
    # One logger's level from a higher layer; the others stay.
    assert config.log.levels == {
        "fastsfu.dtls": "debug",
        "fastsfu.engine": "info",
        "fastsfu.harmony": "debug",
    }
    assert load_config(None, {}, {"log.level": "fastsfu.dtls=debug"}).log.level == "info"  # root untouched


def test_one_subsystem_at_debug_through_the_command_line() -> None:
    """--log-level given twice: the root at warning, one module at debug (its start-up debug line
    shows, nothing else below warning does)."""
    flags = ("--hrpc-port", "0", "--grpc-port", "0", "--discord-port", "-1", "--duration", "0.3")
    one = cli(*flags, "--log-level", "warning", "--log-level", "fastsfu.server.harmony_server=debug")
    assert one.returncode == 0, one.stderr
    lines = one.stderr.splitlines()
    assert [line for line in lines if "DEBUG" in line] and all(
        " DEBUG fastsfu.server.harmony_server: " in line
        for line in lines
        if "DEBUG" in line or "INFO" in line
    ), lines
    plain = cli(*flags, "--log-level", "warning")
    assert plain.returncode == 0 and "DEBUG" not in plain.stderr, plain.stderr


def test_missing_config_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("/nonexistent/fastsfu.toml", {}, {})


def test_dtls_certificate_files_are_loaded(tmp_path: Path) -> None:
    cert = DtlsCertificate.generate()
    (tmp_path / "c.pem").write_bytes(cert.certificate_pem())
    (tmp_path / "k.pem").write_bytes(cert.private_key_pem())
    config = load_config(
        None,
        {"FASTSFU_DTLS_CERTIFICATE": str(tmp_path / "c.pem")},
        {"dtls_private_key": str(tmp_path / "k.pem")},
    )
    pem = config.dtls_pem()
    assert pem is not None
    assert DtlsCertificate.load_pem(*pem).fingerprint() == cert.fingerprint()
    (tmp_path / "k.pem").write_bytes(DtlsCertificate.generate().private_key_pem())  # not this cert's key
    with pytest.raises(ConfigError, match="does not belong"):
        load_config(
            None,
            {},
            {"dtls_certificate": str(tmp_path / "c.pem"), "dtls_private_key": str(tmp_path / "k.pem")},
        )


def test_example_config_file_is_valid() -> None:
    config = load_config(str(ROOT / "fastsfu.example.toml"), {}, {})
    assert config.auth is not None and config.rate_limit.burst >= 1


POLICY = """
[auth.guilds.1]
voice_channels = [10]
other_channels = [11]
members = [1, 2]

[auth.guilds.2]
"""
TOKENS = StaticTokens({"tok-1": 1, "tok-3": 3})


def policy_rooms(engine: Engine, tmp_path: Path) -> VoiceRooms:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    config = load_config(str(path), {}, {})
    assert config.auth is not None
    return VoiceRooms(engine, config.voice, StaticAuthorization(config.auth).authorize)


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_static_policy_gives_each_identifier_over_hrpc(tmp_path: Path) -> None:
    cases = [
        ("tok-1", 9, 10, "h.bad-guild-id"),
        ("tok-1", 1, 12, "h.bad-channel-id"),
        ("tok-1", 1, 11, "fastsfu.voice-not-voice-channel"),
        ("tok-3", 1, 10, "h.not-joined"),
        ("tok-1", 1, 10, "initialized"),
        ("tok-3", 2, 12345, "initialized"),  # a guild with no lists: any channel, any member
    ]

    async def main() -> None:
        async with (
            Engine() as engine,
            serve_app(make_app(policy_rooms(engine, tmp_path), TOKENS.authenticate)) as port,
            aiohttp.ClientSession() as http,
        ):
            for token, guild, channel, expected in cases:
                ws = await http.ws_connect(
                    f"http://127.0.0.1:{port}{STREAM_PATH}", protocols=("hrpc1", token)
                )
                await ws.send_bytes(
                    Req(initialize=Req.Initialize(guild_id=guild, channel_id=channel)).SerializeToString()
                )
                msg = await asyncio.wait_for(ws.receive(), 10)
                if expected == "initialized":
                    assert msg.data[0] == 0
                    assert Resp.FromString(msg.data[1:]).WhichOneof("message") == "initialized"
                else:
                    assert msg.data[0] == 1, (guild, channel)
                    assert hrpc_pb2.Error.FromString(msg.data[1:]).identifier == expected
                await ws.close()

    asyncio.run(asyncio.wait_for(main(), 45))


@pytest.mark.loopback
@pytest.mark.timeout(60)
def test_static_policy_maps_to_grpc_status_codes(tmp_path: Path) -> None:
    cases = [
        (9, 10, grpc.StatusCode.NOT_FOUND, "h.bad-guild-id"),
        (1, 12, grpc.StatusCode.NOT_FOUND, "h.bad-channel-id"),
        (1, 11, grpc.StatusCode.FAILED_PRECONDITION, "fastsfu.voice-not-voice-channel"),
    ]

    async def main() -> None:
        async with Engine() as engine:
            server, port = await start_grpc_server(policy_rooms(engine, tmp_path), TOKENS.authenticate)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = voice_pb2_grpc.VoiceServiceStub(channel)
                    for guild, channel_id, code, identifier in cases:
                        call = stub.StreamMessage(metadata=(("authorization", "tok-1"),))
                        await call.write(
                            Req(initialize=Req.Initialize(guild_id=guild, channel_id=channel_id))
                        )
                        with pytest.raises(grpc.aio.AioRpcError) as exc:
                            await asyncio.wait_for(call.read(), 10)
                        assert exc.value.code() == code
                        trailer = dict(exc.value.trailing_metadata())["hrpc-error-bin"]
                        assert hrpc_pb2.Error.FromString(trailer).identifier == identifier
            finally:
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 45))


@pytest.mark.loopback
@pytest.mark.parametrize("flag", ["--hrpc-port", "--grpc-port"])
def test_a_taken_port_is_one_log_line_and_exit_1(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        other = "--grpc-port" if flag == "--hrpc-port" else "--hrpc-port"
        out = cli(flag, port, other, "0", "--duration", "5")
    assert out.returncode == 1
    assert "cannot serve" in out.stderr and port in out.stderr and "Traceback" not in out.stderr


def test_edge_knobs_defaults_precedence_and_bounds(tmp_path: Path) -> None:
    defaults = load_config(None, {}, {})
    assert (defaults.header_timeout, defaults.max_connections_per_address, defaults.shutdown_grace) == (
        10.0,
        64,
        3.0,
    )
    toml = tmp_path / "fastsfu.toml"
    toml.write_text("header_timeout = 4\nmax_connections_per_address = 10\nshutdown_grace = 1.5\n")
    config = load_config(str(toml), {"FASTSFU_SHUTDOWN_GRACE": "2.5"}, {"max_connections_per_address": "0"})
    assert (config.header_timeout, config.max_connections_per_address, config.shutdown_grace) == (
        4.0,
        0,
        2.5,
    )
    for env in ({"FASTSFU_HEADER_TIMEOUT": "0"}, {"FASTSFU_SHUTDOWN_GRACE": "-1"}):
        with pytest.raises(ConfigError, match="must be at least"):
            load_config(None, env, {})
    with pytest.raises(ConfigError, match="expected an int"):
        load_config(None, {"FASTSFU_MAX_CONNECTIONS_PER_ADDRESS": "many"}, {})


def test_token_secret_from_a_file(tmp_path: Path) -> None:
    """The secret can come from a file (systemd credentials, Docker secrets), so it is not on a
    command line that `ps` shows; tokens minted with it are accepted by the running server."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-of-at-least-thirty-two-bytes\n")
    config = load_config(None, {"FASTSFU_TOKEN_SECRET_FILE": str(secret_file)}, {})
    assert config.token_secret == "file-secret-of-at-least-thirty-two-bytes"
    assert config.redacted()["token_secret"] == "<set>"
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, {"FASTSFU_TOKEN_SECRET": "x" * 32}, {"token_secret_file": str(secret_file)})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(None, {}, {"token_secret_file": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, {}, {"token_secret_file": str(tmp_path / "missing")})
    out = cli(
        "--token-secret-file",
        str(secret_file),
        "--hrpc-port",
        "0",
        "--grpc-port",
        "0",
        "--discord-port",
        "-1",
        "--print-config",
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["token_secret"] == "<set>" and "file-secret" not in out.stdout
