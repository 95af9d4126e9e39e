"""The configuration of `fastsfu serve`: embedded defaults, overridden by a TOML file, then by
`FASTSFU_*` environment variables, then by command-line flags (each scalar knob has all three).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsfu.dtls import DtlsCertificate
from fastsfu.harmony.auth import GuildPolicy
from fastsfu.harmony.session import VoiceSettings
from fastsfu.recorder import MIN_FILE_BYTES
from fastsfu.server.logs import FORMATS, LEVELS, parse_levels

MAX_ID = 2**64  # Harmony IDs are unsigned 64-bit


class ConfigError(Exception):
    """A bad configuration value: reported as one line, exit code 2."""


@dataclass
class RateLimitConfig:
    """New streams per address (docs/harmony.md#rate-limit): `burst` at once, then one per `interval` s."""

    burst: int = 5  # 0: no limit
    interval: float = 10.0
    max_addresses: int = 65536  # addresses tracked at most (bounded memory)


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "text"  # or "json": one object per line
    levels: dict[str, str] = field(default_factory=dict)  # logger (fastsfu.dtls) -> its own level


@dataclass
class DiscordConfig:
    """The Discord-style voice gateway (docs/discord.md): WebSocket on `port`, wss with a
    certificate; media on the shared UDP port. `rooms` maps a server_id to a Harmony room."""

    port: int = 2291  # 0: any free port; -1: off
    tls_certificate: str | None = None  # PEM file: wss (discord.py and @discordjs/voice need it)
    tls_private_key: str | None = None
    only_mapped: bool = False  # refuse (4011) server_ids that `rooms` does not map
    legacy_modes: bool = False  # also offer the xsalsa20_poly1305* modes (after the AEAD ones; PyNaCl)
    resume_grace: float = 60.0  # seconds a dropped session waits for RESUME
    heartbeat_interval: float = 13.75  # seconds, sent in HELLO
    rooms: dict[str, tuple[int, int]] = field(default_factory=dict)  # server_id -> (guild, channel)


@dataclass
class RecordingConfig:
    """Recording to Ogg Opus (docs/recording.md), started and stopped through the admin endpoint."""

    enabled: bool = False  # serve /admin/recordings (needs admin_token)
    directory: str = "recordings"
    max_file_bytes: int = 100_000_000  # per file; 0: no cap
    max_file_seconds: float = 3600.0  # per file; 0: no cap
    on_cap: str = "rotate"  # or "stop": that speaker's recording ends at the cap


@dataclass
class ServerConfig:
    listen_ip: str = "127.0.0.1"
    announced_ip: str | None = None  # put in ICE candidates (NAT, containers); None: listen_ip
    hrpc_port: int = 2289  # Harmony's default port
    grpc_port: int = 2290
    media_port: int = 0  # the shared WebRTC UDP port; 0: any free port
    ice_tcp: bool = False  # also a passive ICE-TCP port for clients whose networks block UDP
    media_tcp_port: int = -1  # that TCP port; -1: the UDP media port's number; 0: any free port
    token_secret: str | None = None  # None: generated at start (tokens then only work until restart)
    # A file holding the secret instead (kept out of `ps` and the environment); read at start.
    token_secret_file: str | None = None
    dtls_certificate: str | None = None  # PEM file (ECDSA P-256); None: generated at start
    dtls_private_key: str | None = None  # PEM file, with dtls_certificate
    metrics: bool = True  # GET /metrics (Prometheus) on the hRPC listener
    # The aiohttp listeners (hRPC, Discord): seconds from accept to a complete request head (and of
    # keep-alive idleness), and open connections per address (IPv6: per /64; 0: no cap).
    header_timeout: float = 10.0
    max_connections_per_address: int = 64
    shutdown_grace: float = 3.0  # seconds SIGTERM waits for sessions to close before cutting them
    # A node of a cluster (workers or nats): seconds from SIGTERM's NOT_SERVING and draining in the
    # registry (new sessions go to other nodes) to closing its sessions (docs/cluster.md#workers).
    drain_grace: float = 1.0
    datapath_thread: bool = True  # forward on a dedicated thread, GIL released (docs/datapath.md)
    max_queue_age_ms: float = 200.0  # drop RTP queued longer than this; 0: never (docs/datapath.md)
    # Nice levels the datapath thread runs ahead of the event loop (docs/datapath.md, "Thread
    # priority"); without CAP_SYS_NICE the loop's priority is lowered instead; 0: off.
    datapath_priority: int = 19
    duration: float = 0.0  # stop after this many seconds; 0: until SIGINT/SIGTERM (flag only)
    # Scaling out (docs/cluster.md): worker processes ("auto": one per core), the NATS server(s)
    # they coordinate over (comma-separated URLs of one NATS cluster; None: an embedded one when
    # workers > 1, else no cluster), and the first port of the workers' own /metrics listeners
    # (worker i on this + i; 0: any free port each).
    workers: str = "1"
    nats: str | None = None
    worker_metrics_port: int = 0
    # Members (and joining sessions) of one room on one node before new ones go to another node
    # (docs/cluster.md#spill); 0: never spill.
    cluster_room_members_per_node: int = 200
    voice: VoiceSettings = field(default_factory=VoiceSettings)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    log: LogConfig = field(default_factory=LogConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    # Static authorization by guild ID ([auth.guilds.<id>]); None: every (guild, channel) is allowed.
    auth: dict[int, GuildPolicy] | None = None
    admin_token: str | None = None  # bearer token of the /admin endpoints; None: no admin endpoint
    recording: RecordingConfig = field(default_factory=RecordingConfig)

    @property
    def worker_count(self) -> int:
        """The worker processes to run: `workers`, with auto as one per core."""
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)

    def dtls_pem(self) -> tuple[bytes, bytes] | None:
        """The DTLS certificate and key PEM bytes, or None for a generated certificate."""
        if self.dtls_certificate is None or self.dtls_private_key is None:
            return None
        return _read(self.dtls_certificate), _read(self.dtls_private_key)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, the token secret hidden (for --print-config)."""
        out = dataclasses.asdict(self)
        if self.token_secret is not None:
            out["token_secret"] = "<set>"
        if self.admin_token is not None:
            out["admin_token"] = "<set>"
        if self.auth is not None:
            out["auth"] = {
                str(g): {k: "any" if v is None else sorted(v) for k, v in vars(p).items()}
                for g, p in self.auth.items()
            }
        return out


@dataclass(frozen=True)
class Option:
    """One scalar knob: `key` in the TOML file (dotted: section.name), a flag and an env variable."""

    key: str
    flag: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    ip: bool = False  # the value must be an IP address
    metavar: str = ""
    repeat: bool = False  # the flag may be given more than once

    @property
    def env(self) -> str:
        return "FASTSFU_" + self.flag[2:].upper().replace("-", "_")


OPTIONS = (
    Option(
        "listen_ip", "--listen-ip", str, "address for every listener and UDP socket", ip=True, metavar="IP"
    ),
    Option(
        "announced_ip",
        "--announced-ip",
        str,
        "address put in ICE candidates (NAT, containers)",
        ip=True,
        metavar="IP",
    ),
    Option(
        "hrpc_port",
        "--hrpc-port",
        int,
        "hRPC WebSocket (and /metrics) port; 0: any",
        minimum=0,
        maximum=65535,
    ),
    Option("grpc_port", "--grpc-port", int, "gRPC port; 0: any", minimum=0, maximum=65535),
    Option("media_port", "--media-port", int, "shared WebRTC UDP port; 0: any", minimum=0, maximum=65535),
    Option("ice_tcp", "--ice-tcp", bool, "offer a passive ICE-TCP candidate (clients that cannot use UDP)"),
    Option(
        "media_tcp_port",
        "--media-tcp-port",
        int,
        "ICE-TCP port; -1: the UDP media port's number; 0: any",
        minimum=-1,
        maximum=65535,
    ),
    Option(
        "token_secret",
        "--token-secret",
        str,
        "HS256 secret for session tokens (default: generated)",
        metavar="SECRET",
    ),
    Option(
        "token_secret_file",
        "--token-secret-file",
        str,
        "file holding the token secret (instead of --token-secret, which `ps` shows)",
        metavar="PATH",
    ),
    Option(
        "dtls_certificate",
        "--dtls-certificate",
        str,
        "DTLS certificate PEM file (ECDSA P-256)",
        metavar="PATH",
    ),
    Option("dtls_private_key", "--dtls-private-key", str, "DTLS private key PEM file", metavar="PATH"),
    Option("metrics", "--metrics", bool, "serve Prometheus metrics at /metrics on the hRPC port"),
    Option(
        "header_timeout",
        "--header-timeout",
        float,
        "seconds for a new hRPC/Discord connection's HTTP request head",
        minimum=0.1,
    ),
    Option(
        "max_connections_per_address",
        "--max-connections-per-address",
        int,
        "open hRPC/Discord connections per address; 0: no cap",
        minimum=0,
    ),
    Option(
        "shutdown_grace",
        "--shutdown-grace",
        float,
        "seconds SIGTERM waits for sessions to close",
        minimum=0.0,
    ),
    Option(
        "drain_grace",
        "--drain-grace",
        float,
        "with a cluster: seconds a SIGTERMed node drains (new sessions elsewhere) before closing its own",
        minimum=0.0,
    ),
    Option("workers", "--workers", str, "worker processes (N or auto: one per core)", metavar="N|auto"),
    Option(
        "nats",
        "--nats",
        str,
        "NATS server URL of the cluster this node joins; repeatable (one per server of a NATS "
        "cluster), or comma-separated; default with --workers: an embedded one",
        metavar="URL",
        repeat=True,
    ),
    Option(
        "worker_metrics_port",
        "--worker-metrics-port",
        int,
        "with --workers: worker i serves /metrics on this + i; 0: any",
        minimum=0,
        maximum=65535,
    ),
    Option(
        "cluster_room_members_per_node",
        "--cluster-room-members-per-node",
        int,
        "with --workers: a room's members on one node before it spills to another; 0: never",
        minimum=0,
    ),
    Option("datapath_thread", "--datapath-thread", bool, "forward media on its own thread, not the loop"),
    Option(
        "max_queue_age_ms", "--max-queue-age-ms", float, "drop RTP queued longer (ms); 0: never", minimum=0.0
    ),
    Option(
        "datapath_priority",
        "--datapath-priority",
        int,
        "nice levels the datapath thread runs ahead of the event loop; 0: off",
        minimum=0,
        maximum=39,
    ),
    Option("voice.id_quoting", "--id-quoting", str, "IDs as JSON string literals or bare", ("json", "bare")),
    Option(
        "voice.duplicate_session",
        "--duplicate-session",
        str,
        "a user's second session replaces or is rejected",
        ("replace", "reject"),
    ),
    Option("voice.max_users_per_room", "--max-users-per-room", int, "members per voice channel", minimum=1),
    Option("voice.init_timeout", "--init-timeout", float, "seconds to wait for Initialize", minimum=0.001),
    Option(
        "voice.prepare_timeout",
        "--prepare-timeout",
        float,
        "seconds for PrepareForJoinChannel",
        minimum=0.001,
    ),
    Option("voice.join_timeout", "--join-timeout", float, "seconds to wait for JoinChannel", minimum=0.001),
    Option(
        "voice.max_outbox", "--max-outbox", int, "queued responses before a non-reader is dropped", minimum=16
    ),
    Option("voice.speaking_detection", "--speaking-detection", bool, "measure who speaks from audio levels"),
    Option("voice.last_n", "--last-n", int, "forward only the N latest loud speakers; 0: all", minimum=0),
    Option("voice.opus_red", "--opus-red", bool, "route Opus RED (RFC 2198) beside Opus"),
    Option(
        "rate_limit.burst",
        "--rate-limit-burst",
        int,
        "new streams per address at once; 0: no limit",
        minimum=0,
    ),
    Option(
        "rate_limit.interval", "--rate-limit-interval", float, "seconds per further stream", minimum=0.001
    ),
    Option(
        "rate_limit.max_addresses", "--rate-limit-max-addresses", int, "addresses tracked at most", minimum=1
    ),
    Option(
        "discord.port",
        "--discord-port",
        int,
        "Discord voice gateway port; 0: any, -1: off",
        minimum=-1,
        maximum=65535,
    ),
    Option(
        "discord.tls_certificate",
        "--discord-tls-certificate",
        str,
        "certificate PEM file for wss on the Discord gateway",
        metavar="PATH",
    ),
    Option(
        "discord.tls_private_key",
        "--discord-tls-private-key",
        str,
        "its private key PEM file",
        metavar="PATH",
    ),
    Option(
        "discord.only_mapped",
        "--discord-only-mapped",
        bool,
        "serve only server_ids mapped in [discord.rooms]",
    ),
    Option(
        "discord.legacy_modes",
        "--discord-legacy-modes",
        bool,
        "also offer the discontinued xsalsa20_poly1305 modes (needs PyNaCl)",
    ),
    Option(
        "discord.resume_grace",
        "--discord-resume-grace",
        float,
        "seconds a dropped Discord session waits for RESUME",
        minimum=0.0,
    ),
    Option(
        "discord.heartbeat_interval",
        "--discord-heartbeat-interval",
        float,
        "seconds between Discord client heartbeats (HELLO)",
        minimum=1.0,
        maximum=60.0,
    ),
    Option(
        "log.level",
        "--log-level",
        str,
        f"log level ({', '.join(LEVELS)}), or LOGGER=LEVEL for one subsystem (fastsfu.dtls=debug); "
        "repeatable, or comma-separated",
        metavar="[LOGGER=]LEVEL",
        repeat=True,
    ),
    Option("log.format", "--log-format", str, "log format: text, or json (one object per line)", FORMATS),
    Option("admin_token", "--admin-token", str, "bearer token of the /admin endpoints", metavar="TOKEN"),
    Option("recording.enabled", "--recording-enabled", bool, "serve /admin/recordings (needs admin_token)"),
    Option("recording.directory", "--recording-directory", str, "directory for recordings", metavar="PATH"),
    Option(
        "recording.max_file_bytes", "--recording-max-file-bytes", int, "bytes per file; 0: no cap", minimum=0
    ),
    Option(
        "recording.max_file_seconds",
        "--recording-max-file-seconds",
        float,
        "seconds per file; 0: no cap",
        minimum=0.0,
    ),
    Option(
        "recording.on_cap", "--recording-on-cap", str, "at a cap: a new file, or stop", ("rotate", "stop")
    ),
)
_BY_KEY = {o.key: o for o in OPTIONS}
SECTIONS = ("voice", "rate_limit", "log", "discord", "recording")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and one flag per option; a flag left out leaves the lower layers' value."""
    parser.add_argument("--config", default=None, help="TOML configuration file (env FASTSFU_CONFIG)")
    for o in OPTIONS:
        dest = "opt_" + o.key.replace(".", "__")
        text = f"{o.help} (env {o.env})"
        if o.kind is bool:
            parser.add_argument(
                o.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif o.repeat:
            parser.add_argument(o.flag, dest=dest, action="append", metavar=o.metavar, help=text)
        else:
            metavar = o.metavar or ("|".join(o.choices) if o.choices else o.kind.__name__.upper())
            parser.add_argument(o.flag, dest=dest, default=None, metavar=metavar, help=text)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by key."""
    out = {}
    for o in OPTIONS:
        value = getattr(args, "opt_" + o.key.replace(".", "__"), None)
        if value is not None:
            out[o.key] = ",".join(value) if o.repeat else value
    return out


def load_config(
    path: str | None, env: Mapping[str, str], flags: Mapping[str, Any], duration: float = 0.0
) -> ServerConfig:
    """Defaults < the TOML file at `path` (else env FASTSFU_CONFIG) < env < flags; ConfigError if bad."""
    values: dict[str, Any] = {}
    auth = None
    path = path or env.get("FASTSFU_CONFIG") or None
    if path is not None:
        file_values, auth = _parse_file(path)
        values.update(file_values)
    for o in OPTIONS:
        raw = env.get(o.env)
        if raw:  # an empty variable counts as unset
            _put(values, o.key, _coerce(o, raw, o.env, from_text=True), o.env)
    for key, raw in flags.items():
        o = _BY_KEY[key]
        _put(values, key, _coerce(o, raw, o.flag, from_text=not isinstance(raw, bool)), o.flag)
    config = _build(values, auth, duration)
    _load_token_secret(config)
    _check_dtls(config)
    _check_discord_tls(config)
    _check_workers(config)
    _check_recording(config)
    return config


def _check_recording(config: ServerConfig) -> None:
    r = config.recording
    if r.enabled and config.admin_token is None:
        raise ConfigError("recording.enabled needs admin_token (FASTSFU_ADMIN_TOKEN) to protect its endpoint")
    if r.max_file_bytes and r.max_file_bytes < MIN_FILE_BYTES:
        raise ConfigError(f"recording.max_file_bytes: must be 0 or at least {MIN_FILE_BYTES}")


def _check_workers(config: ServerConfig) -> None:
    value = config.workers.strip().lower()
    if value != "auto" and not (value.isdigit() and 1 <= int(value) <= 1024):
        raise ConfigError(f"workers: expected a number 1..1024 or auto, got {config.workers!r}")
    config.workers = value


# ---------------------------------------------------------------------- parsing and checks


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_file(path: str) -> tuple[dict[str, Any], dict[int, GuildPolicy] | None]:
    try:
        data = tomllib.loads(_read(path).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    auth = None
    for name, value in data.items():
        if name == "auth":
            auth = _parse_auth(path, value)
        elif name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            for sub, item in value.items():
                if name == "discord" and sub == "rooms":
                    values["discord.rooms"] = _parse_discord_rooms(path, item)
                elif name == "log" and sub == "levels":
                    _put(values, "log.level", _log_levels(path, item), f"{path}: log.levels")
                else:
                    _put(values, f"{name}.{sub}", _file_value(path, f"{name}.{sub}", item), path)
        else:
            _put(values, name, _file_value(path, name, value), path)
    return values, auth


def _file_value(path: str, key: str, value: Any) -> Any:
    o = _BY_KEY.get(key)
    if o is None:
        raise ConfigError(f"{path}: unknown key {key!r}")
    if o.repeat and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # a list in the file is the flag given once per item
    return _coerce(o, value, f"{path}: {key}", from_text=False)


def _put(values: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set one checked value; log.level may also carry `logger=level` items, which are merged
    into log.levels (a later layer overrides one logger's level, not the whole table)."""
    if key != "log.level":
        values[key] = value
        return
    try:
        root, levels = parse_levels(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: log level {exc}") from None
    if root is not None:
        values[key] = root
    values["log.levels"] = {**values.get("log.levels", {}), **levels}


def _log_levels(path: str, value: Any) -> str:
    """[log] levels = {"fastsfu.dtls" = "debug"}, as the `logger=level,...` form of log.level."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        example = '{"fastsfu.dtls" = "debug"}'
        raise ConfigError(f"{path}: log.levels must be a table of logger = level, e.g. {example}")
    return ",".join(f"{name}={level}" for name, level in value.items())


def _coerce(o: Option, value: Any, where: str, from_text: bool) -> Any:
    """`value` (text from env or a flag, or a typed TOML value) as the option's type, checked."""
    kind = o.kind.__name__
    if from_text and o.kind is not str:
        text = str(value).strip()
        if o.kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ConfigError(f"{where}: expected true or false, got {text!r}")
            value = lowered in ("1", "true", "yes", "on")
        else:
            try:
                value = o.kind(text)
            except ValueError:
                raise ConfigError(
                    f"{where}: expected {'an' if kind == 'int' else 'a'} {kind}, got {text!r}"
                ) from None
    if o.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, o.kind) or (o.kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")
    return _check(o, value, where)


def _check(o: Option, value: Any, where: str) -> Any:
    """Range, choice and form checks of a value of the right type."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number")
    if o.choices and value not in o.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(o.choices)}, got {value!r}")
    if o.minimum is not None and value < o.minimum:
        raise ConfigError(f"{where}: must be at least {o.minimum:g}, got {value!r}")
    if o.maximum is not None and value > o.maximum:
        raise ConfigError(f"{where}: must be at most {o.maximum:g}, got {value!r}")
    if o.ip:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(f"{where}: not an IP address: {value!r}") from None
    if isinstance(value, str) and not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


def _parse_auth(path: str, value: Any) -> dict[int, GuildPolicy]:
    if not isinstance(value, dict) or set(value) - {"guilds"}:
        raise ConfigError(f"{path}: [auth] takes one table, [auth.guilds.<guild id>]")
    guilds = value.get("guilds", {})
    if not isinstance(guilds, dict):
        raise ConfigError(f"{path}: auth.guilds must be a table of guild IDs")
    out = {}
    for gid, policy in guilds.items():
        where = f"{path}: auth.guilds.{gid}"
        guild_id = _id(gid, where)
        if not isinstance(policy, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(policy) - {"voice_channels", "other_channels", "members"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        voice = _id_set(policy.get("voice_channels", "any"), f"{where}.voice_channels", allow_any=True)
        other = _id_set(policy.get("other_channels", []), f"{where}.other_channels", allow_any=False)
        members = _id_set(policy.get("members", "any"), f"{where}.members", allow_any=True)
        assert other is not None
        if voice is not None and voice & other:
            raise ConfigError(f"{where}: a channel cannot be in both voice_channels and other_channels")
        out[guild_id] = GuildPolicy(voice, other, members)
    return out


def _parse_discord_rooms(path: str, value: Any) -> dict[str, tuple[int, int]]:
    """[discord.rooms]: "<server_id>" = [guild_id, channel_id], a Harmony room shared with Discord."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [discord.rooms] must be a table of server_id = [guild_id, channel_id]")
    out = {}
    for server_id, room in value.items():
        where = f"{path}: discord.rooms.{server_id}"
        if not isinstance(room, list) or len(room) != 2:
            raise ConfigError(f"{where}: expected [guild_id, channel_id]")
        out[str(server_id)] = (_id(room[0], where), _id(room[1], where))
    return out


def _id(value: Any, where: str) -> int:
    number = value
    if isinstance(value, str):  # a TOML table key: [auth.guilds.1] gives "1"
        number = int(value) if value.isascii() and value.isdigit() else None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < MAX_ID:
        raise ConfigError(f"{where}: not a Harmony ID (unsigned 64-bit integer): {value!r}")
    return number


def _id_set(value: Any, where: str, allow_any: bool) -> frozenset[int] | None:
    if allow_any and value == "any":
        return None
    if not isinstance(value, list):
        alternative = ' or "any"' if allow_any else ""
        raise ConfigError(f"{where}: expected a list of IDs{alternative}")
    return frozenset(_id(v, where) for v in value)


def _build(values: dict[str, Any], auth: dict[int, GuildPolicy] | None, duration: float) -> ServerConfig:
    top = {k: v for k, v in values.items() if "." not in k}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    try:
        voice = VoiceSettings(**sections["voice"])
    except ValueError as exc:
        raise ConfigError(f"voice: {exc}") from None
    return ServerConfig(
        **top,
        duration=duration,
        voice=voice,
        rate_limit=RateLimitConfig(**sections["rate_limit"]),
        log=LogConfig(**sections["log"]),
        discord=DiscordConfig(**sections["discord"]),
        auth=auth,
        recording=RecordingConfig(**sections["recording"]),
    )


def _check_discord_tls(config: ServerConfig) -> None:
    d = config.discord
    if (d.tls_certificate is None) != (d.tls_private_key is None):
        raise ConfigError("discord tls_certificate and tls_private_key must be given together")
    if d.tls_certificate is not None and d.tls_private_key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                d.tls_certificate, d.tls_private_key
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"discord TLS certificate {d.tls_certificate}: {exc}") from None


def _load_token_secret(config: ServerConfig) -> None:
    """token_secret_file: its content (surrounding whitespace stripped) becomes token_secret."""
    if config.token_secret_file is None:
        return
    if config.token_secret is not None:
        raise ConfigError("token_secret and token_secret_file are both set: give one")
    try:
        secret = _read(config.token_secret_file).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{config.token_secret_file}: the token secret must be UTF-8 text") from None
    if not secret:
        raise ConfigError(f"{config.token_secret_file}: the token secret file is empty")
    config.token_secret = secret


def _check_dtls(config: ServerConfig) -> None:
    if (config.dtls_certificate is None) != (config.dtls_private_key is None):
        raise ConfigError("dtls_certificate and dtls_private_key must be given together")
    pem = config.dtls_pem()
    if pem is None:
        return
    try:
        DtlsCertificate.load_pem(*pem)
    except Exception as exc:  # cryptography raises ValueError or its own types on bad PEM
        raise ConfigError(f"DTLS certificate {config.dtls_certificate}: {exc}") from None
