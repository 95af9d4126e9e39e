"""fastsfu as the system under test of the loopback benchmark: one PlainTransport per participant,
or for the Discord suites one Discord UDP transport per participant on the engine's shared port.

Reads the shared JSON config (benchconfig.py), prints READY once every transport is set up,
forwards until SIGTERM/SIGINT or EOF on a stdin pipe, then prints one JSON line of counters.
Discord transports learn the generator's address from its IP discovery requests, after READY.
With --storm-control PATH (SRTP suites), the first room is a room of fastsfu's Discord gateway too,
and the storm client (storm_client.py, another process) joins it over that gateway and, for WebRTC
joins, through the control socket at PATH (join_storm.py); the final line then carries each storm's
per-join loop times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchconfig  # noqa: E402
from join_storm import StormServer  # noqa: E402

from fastsfu import Engine, Settings, ortc  # noqa: E402
from fastsfu.server.config import ServerConfig  # noqa: E402
from fastsfu.server.gc_health import freeze_startup_heap  # noqa: E402


def producer_parameters(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "codecs": [{"mimeType": "audio/opus", "payloadType": p["pt"], "clockRate": 48000, "channels": 2}],
        "headerExtensions": [
            {"uri": ortc.URI_ABS_CAPTURE_TIME, "id": p["ext_id"]},
            # The generator sends ssrc-audio-level on every packet, as browsers do.
            {"uri": ortc.URI_AUDIO_LEVEL, "id": benchconfig.LEVEL_EXT_ID},
        ],
        "encodings": [{"ssrc": p["ssrc"]}],
        "rtcp": {"cname": f"p{p['id']}"},
    }


def discord_producer_parameters(p: dict[str, Any]) -> dict[str, Any]:
    """A Discord sender's parameters (udp_transport.rtp_parameters: PT 120, its SSRC), plus the
    generator's send-stamp extension so that it reaches the sink rewritten like the SRTP case."""
    from fastsfu.discord.udp_transport import rtp_parameters

    params = rtp_parameters(p["ssrc"])
    params["headerExtensions"] = [{"uri": ortc.URI_ABS_CAPTURE_TIME, "id": p["ext_id"]}]
    return params


def receiver_capabilities(cfg: dict[str, Any]) -> dict[str, Any]:
    # The sink reads the send stamp at consumer_ext_id; the receiver has no MID extension, so
    # fastsfu does the same rewrite work as the C baseline (SSRC, PT, one extension ID).
    return {
        "codecs": [
            {
                "kind": "audio",
                "mimeType": "audio/opus",
                "preferredPayloadType": cfg["consumer_pt"],
                "clockRate": 48000,
                "channels": 2,
            }
        ],
        "headerExtensions": [
            {
                "kind": "audio",
                "uri": ortc.URI_ABS_CAPTURE_TIME,
                "preferredId": cfg["consumer_ext_id"],
                "direction": "sendrecv",
            },
            {
                "kind": "audio",
                "uri": ortc.URI_AUDIO_LEVEL,
                "preferredId": benchconfig.LEVEL_EXT_ID,
                "direction": "sendrecv",
            },
        ],
    }


def settings_for(
    cfg: dict[str, Any],
    max_queue_age_ms: float | None = None,
    out_slots: int | None = None,
    sized: bool = False,
    inline: bool = False,
    unconnected: bool = False,
    priority: int | None = None,
) -> Settings:
    """`Settings()` defaults and `fastsfu serve`'s datapath priority, as a user runs fastsfu,
    except what the command line overrides.

    sized: tables sized to this load instead of the defaults (65,536 consumers, 4,096 producers...),
    as the benchmark did before: smaller tables stay in cache, which flatters fastsfu.
    inline: the datapath on the event loop instead of its own thread (datapath_thread=False).
    unconnected: PlainTransport sockets left unconnected (connect_sockets=False), every send addressed.
    priority: the datapath thread's lead over the loop in nice levels (None: the server's default).
    """
    n = len(cfg["participants"])
    discord = benchconfig.is_discord(cfg["suite"])
    kw: dict[str, Any] = {
        "media_listen_ip": "127.0.0.1",
        # Discord transports share the engine's media port; SRTP ones do not use it.
        "media_port": cfg["participants"][0]["sut_port"] if discord else 0,
        # As `fastsfu serve` sets them: the SUT owns its loop, as the server does.
        "datapath_priority": ServerConfig().datapath_priority if priority is None else priority,
        "lower_loop_priority": True,
    }
    if max_queue_age_ms is not None:
        kw["max_queue_age_ms"] = max_queue_age_ms
    if out_slots is not None:
        kw["out_slots"] = out_slots
    if inline:
        kw["datapath_thread"] = False
    if unconnected:
        kw["connect_sockets"] = False
    if sized:
        kw.update(
            max_sockets=n + 8,
            max_transports=n + 8,
            max_producers=n + 8,
            max_consumers=len(cfg["consumers"]) + 8,
            max_consumers_per_router=10**6,
        )
    return Settings(**kw)


def srtp_transport(router: Any, cfg: dict[str, Any], p: dict[str, Any]) -> Any:
    """Participant p's PlainTransport on its SUT port: SRTP with the generator's keys (one per
    direction), connected to the generator's port."""
    t = router.create_plain_transport(
        listen_ip="127.0.0.1",
        port=p["sut_port"],
        enable_srtp=True,
        srtp_crypto_suite=cfg["suite"],
        srtp_key=bytes.fromhex(p["key_down"]),
    )
    t.connect(
        "127.0.0.1",
        p["gen_port"],
        {"cryptoSuite": cfg["suite"], "keyBase64": _b64(bytes.fromhex(p["key_up"]))},
    )
    return t


def engine_counters(engine: Engine, transports: list[Any]) -> dict[str, Any]:
    """The final JSON line's forwarding counters, from the engine's stats and these transports."""
    stats = engine.stats()
    return {
        "received": stats["rx_packets"],
        "forwarded": stats["forwarded_packets"],
        "decrypt_failures": stats["drops"]["decrypt_failed"]
        + stats["drops"]["srtp_replay"]
        + stats["drops"].get("aead_replay", 0),
        "send_failures": stats["drops"]["send_failed"],
        "batches": stats["batches"],
        "drops": {k: v for k, v in stats["drops"].items() if v},
        # RTCP packets (not compounds) the transports took in: the generator's receiver reports.
        "rtcp_received": sum(sum(t.rtcp_received.values()) for t in transports),
        "ok": True,
    }


def pin_cpu(cpu: int, who: str) -> None:
    """Pin this process to one CPU (-1: leave the affinity alone); a refusal is only reported."""
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            print(f"{who}: cannot pin to CPU {cpu}: {exc}", file=sys.stderr)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets: the harness stops a SUT with SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(
    cfg: dict[str, Any],
    stop: asyncio.Event,
    settings: Settings,
    storm_control: str | None = None,
    observe: bool = False,
) -> dict[str, Any]:
    discord = benchconfig.is_discord(cfg["suite"])
    async with Engine(settings) as engine:
        routers: dict[int, Any] = {}
        storm = None
        if storm_control is not None:
            # The first room's router is a room of the Discord gateway's registry: Discord joiners
            # land in it and consume its producers.
            room0 = sum(1 for p in cfg["participants"] if p["room"] == 0)
            storm = StormServer(engine, storm_control, room0)
            routers[0] = storm.router
        transports = []
        for p in cfg["participants"]:
            router = routers.get(p["room"]) or routers.setdefault(p["room"], engine.create_router())
            if discord:
                dt = router.create_discord_udp_transport(p["ssrc"])
                # The generator holds the same key (one per transport, both directions).
                dt.select_mode(benchconfig.DISCORD_MODES[cfg["suite"]], key=bytes.fromhex(p["key_up"]))
                transports.append(dt)
                continue
            transports.append(srtp_transport(router, cfg, p))
        params = discord_producer_parameters if discord else producer_parameters
        producers = [t.produce(params(p)) for t, p in zip(transports, cfg["participants"], strict=True)]
        caps = receiver_capabilities(cfg)
        for c in cfg["consumers"]:
            # The sink tells subscriptions apart by the config's consumer SSRCs.
            transports[c["receiver"]].consume(producers[c["sender"]].id, caps, ssrc=c["ssrc"])
        if observe:
            # An active-speaker observer per room over all its producers: levels read per packet in C.
            for room, router in routers.items():
                observer = router.create_active_speaker_observer()
                for pr, p in zip(producers, cfg["participants"], strict=True):
                    if p["room"] == room:
                        observer.add_producer(pr.id)
        if storm is not None:
            # The participants are the room's users 1..n.
            parts = zip(producers, cfg["participants"], strict=True)
            await storm.start([(i + 1, pr) for i, (pr, p) in enumerate(parts) if p["room"] == 0])
        # As `fastsfu serve` does once started (docs/operations.md): the start-up heap out of the
        # collector's reach, so a full collection during a storm walks only the live joins.
        freeze_startup_heap()
        print("READY", flush=True)
        try:
            await stop.wait()
        finally:
            if storm is not None:
                await storm.close()
        return {**engine_counters(engine, transports), "join_storms": storm.summaries if storm else []}


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--cpu", type=int, default=1, help="CPU to pin to (-1: leave affinity alone)")
    ap.add_argument(
        "--max-queue-age-ms",
        type=float,
        help="drop RTP queued longer (0: never, as baseline) [Settings default]",
    )
    ap.add_argument("--out-slots", type=int, help="datapath output slots [Settings default]")
    ap.add_argument(
        "--sized-tables",
        action="store_true",
        help="size the engine's tables to this load instead of Settings() defaults",
    )
    ap.add_argument("--inline", action="store_true", help="datapath on the loop (datapath_thread=False)")
    ap.add_argument(
        "--storm-control",
        metavar="PATH",
        help="serve join storms: fastsfu's Discord gateway on the first room and a control socket at "
        "PATH for the storm client (storm_client.py); SRTP suites",
    )
    ap.add_argument(
        "--datapath-priority", type=int, help="the datapath thread's lead in nice levels [the server's]"
    )
    ap.add_argument(
        "--unconnected", action="store_true", help="sockets left unconnected (connect_sockets=False)"
    )
    ap.add_argument(
        "--observer", action="store_true", help="an active-speaker observer per room over all its producers"
    )
    args = ap.parse_args(argv)
    pin_cpu(args.cpu, "sut_fastsfu")
    cfg = benchconfig.load_config(args.config)
    if args.storm_control and benchconfig.is_discord(cfg["suite"]):
        ap.error("--storm-control: SRTP suites only (a Discord suite's participants share the media port)")

    async def run() -> dict[str, Any]:
        stop = stop_on_signals()
        try:
            if stat.S_ISFIFO(os.fstat(0).st_mode):
                asyncio.get_running_loop().add_reader(0, lambda: os.read(0, 4096) or stop.set())
        except OSError:
            pass
        settings = settings_for(
            cfg,
            args.max_queue_age_ms,
            args.out_slots,
            args.sized_tables,
            args.inline,
            args.unconnected,
            args.datapath_priority,
        )
        return await serve(cfg, stop, settings, args.storm_control, args.observer)

    counters = asyncio.run(run())
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
