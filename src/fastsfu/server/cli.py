"""The command line: `fastsfu serve` (the Harmony voice server, or `--demo`), `fastsfu token` and
`fastsfu cluster status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from fastsfu import __version__
from fastsfu.engine import Engine, Settings
from fastsfu.harmony.auth import TokenAuth
from fastsfu.server.config import ConfigError, add_arguments, flag_values, load_config
from fastsfu.server.demo import DemoRoom
from fastsfu.server.harmony_server import serve_harmony
from fastsfu.server.lifecycle import raise_open_file_limit, stop_event
from fastsfu.server.logs import setup_logging

log = logging.getLogger("fastsfu.server.cli")  # by name: `python -m` runs this module as __main__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastsfu", description="fastsfu voice SFU")
    ap.add_argument("--version", action="version", version=f"fastsfu {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the Harmony voice server (or --demo: a demo room)",
        description="Embedded defaults < --config TOML file < FASTSFU_* environment < flags.",
    )
    add_arguments(serve)
    serve.add_argument(
        "--print-config", action="store_true", help="print the effective configuration (JSON) and exit"
    )
    serve.add_argument(
        "--demo", action="store_true", help="instead: a demo room of PlainTransports with speakers"
    )
    serve.add_argument("--speakers", type=int, default=3, help="--demo: synthetic SRTP speakers (0-64)")
    serve.add_argument(
        "--stats-interval", type=float, default=2.0, help="--demo: seconds between stats lines"
    )
    serve.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)"
    )
    serve.add_argument("--json", action="store_true", help="--demo: print stats as JSON lines")
    serve.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    token = sub.add_parser("token", help="mint a session token for a user")
    token.add_argument("--user", type=int, required=True, help="Harmony user ID")
    token.add_argument(
        "--secret", default=os.environ.get("FASTSFU_TOKEN_SECRET"), help="the server's token secret"
    )
    token.add_argument("--ttl", type=float, default=86400.0, help="seconds of validity")
    cluster = sub.add_parser("cluster", help="a cluster of nodes over NATS (docs/cluster.md)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    status = cluster_sub.add_parser("status", help="print the nodes (load, last heard) and the room homes")
    status.add_argument(
        "--nats",
        action="append",
        default=None,
        metavar="URL",
        help="NATS server URL; repeatable (env FASTSFU_NATS, comma-separated; default nats://127.0.0.1:4222)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    if args.command == "serve":
        if not 0 <= args.speakers <= 64:
            ap.error("--speakers must be 0..64")
        if args.stats_interval <= 0 or args.duration < 0:
            ap.error("--stats-interval must be > 0 and --duration >= 0")
    elif args.command == "token" and not args.secret:
        ap.error("--secret (or FASTSFU_TOKEN_SECRET) is required")
    return args


def stats_line(
    engine: Engine, room: DemoRoom, last: dict[str, Any], elapsed: float
) -> tuple[str, dict[str, Any]]:
    s = engine.stats()
    fwd = s["forwarded_packets"]
    rate = (fwd - last.get("forwarded_packets", 0)) / elapsed if elapsed > 0 else 0.0
    drops = {k: v for k, v in s["drops"].items() if v}
    heard = sum(sp.received for sp in room.speakers)
    summary = {
        "rx_packets": s["rx_packets"],
        "forwarded_packets": fwd,
        "forward_pps": round(rate, 1),
        "delivered_to_speakers": heard,
        "batches": s["batches"],
        "transports": s["transports"],
        "drops": drops,
    }
    text = (
        f"rx {s['rx_packets']:>9}  forwarded {fwd:>9} ({rate:8.1f}/s)  delivered {heard:>9}  "
        f"batches {s['batches']:>7}  drops {drops or 'none'}"
    )
    return text, summary


async def serve_demo(args: argparse.Namespace, listen_ip: str) -> int:
    engine = Engine(Settings(listen_ip=listen_ip))
    room = DemoRoom(engine, args.speakers, listen_ip)
    print(
        f"fastsfu {__version__}: demo room {room.router.id} with {len(room.speakers)} SRTP speakers "
        f"(AEAD_AES_128_GCM) on {listen_ip}",
        flush=True,
    )
    for sp in room.speakers:
        t = sp.transport.tuple
        print(
            f"  transport {sp.transport.id}  udp {t['localIp']}:{t['localPort']} <-> "
            f"{t['remoteIp']}:{t['remotePort']}  producer ssrc {sp.ssrc}",
            flush=True,
        )
    stop = stop_event(args.duration)
    talker = asyncio.create_task(room.talk(stop))
    last: dict[str, Any] = {}
    t_last = time.monotonic()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_interval)
            now = time.monotonic()
            text, last = stats_line(engine, room, last, now - t_last)
            t_last = now
            print(json.dumps(last) if args.json else text, flush=True)
    finally:
        await talker
        room.close()
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "token":
        print(TokenAuth(args.secret).mint(args.user, args.ttl))
        return 0
    if args.command == "cluster":
        from fastsfu.cluster.status import run  # needs the cluster extra

        urls = args.nats or [os.environ.get("FASTSFU_NATS") or "nats://127.0.0.1:4222"]
        return run(urls, args.json)
    try:
        config = load_config(args.config, os.environ, flag_values(args), args.duration)
    except ConfigError as exc:
        # A bad value is the operator's to fix: one line and exit code 2 (as argparse), no traceback.
        print(f"fastsfu serve: error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        config.log.level = "debug"
    if args.print_config:
        print(json.dumps(config.redacted(), indent=2, sort_keys=True))
        return 0
    setup_logging(config.log.level, config.log.format, levels=config.log.levels)
    raise_open_file_limit()
    if args.demo:
        return asyncio.run(serve_demo(args, config.listen_ip))
    if config.worker_count > 1:
        from fastsfu.server.supervisor import Supervisor  # only --workers needs it

        serve_argv = (sys.argv[1:] if argv is None else argv)[1:]  # after "serve"
        try:
            return asyncio.run(Supervisor(serve_argv, config, config.worker_count).run())
        except (OSError, RuntimeError) as exc:  # no nats-server binary, or it did not start
            log.error("cannot serve: %s", exc)
            return 1
    try:
        return asyncio.run(serve_harmony(config))
    except OSError as exc:  # e.g. a port already in use
        log.error("cannot serve: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
