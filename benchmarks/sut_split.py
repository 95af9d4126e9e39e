"""One worker of fastsfu split over several processes (the `fastsfu_split2` SUT): a spilled room.

Each worker is its own Engine and media sockets and serves the participants that
benchconfig.worker_of() gives it; every producer with a listener on another worker crosses one
plain-RTP PipeTransport per room and worker pair, once (docs/cluster.md). The workers exchange their
pipe ports and piped producers through the harness (run_loadgen.SutGroup), as cluster workers do
over the bus: each prints one `PIPE {json}` line, reads the others' as one JSON line on stdin,
wires the pipes and consumers, prints READY, forwards until SIGTERM or EOF on stdin, then prints
one JSON line of counters like sut_fastsfu.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchconfig  # noqa: E402
import sut_fastsfu as sut  # noqa: E402

from fastsfu import Engine, Settings  # noqa: E402
from fastsfu.pipe_transport import PipeTransport  # noqa: E402

PIPE_IP = "127.0.0.1"


def pipe_key(room: int, a: int, b: int) -> str:
    """One pipe per room and unordered pair of workers (mediasoup keeps one pair per two routers)."""
    return f"{room}:{min(a, b)}-{max(a, b)}"


async def read_line(timeout: float) -> str:
    """One line from stdin without Python's buffering (fd 0 is watched for EOF afterwards)."""
    loop = asyncio.get_running_loop()

    def read() -> str:
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = os.read(0, 1)
            if not chunk:
                break
            buf += chunk
        return buf.decode()

    line = await asyncio.wait_for(loop.run_in_executor(None, read), timeout)
    if not line:
        raise RuntimeError("stdin closed before the peers' PIPE line")
    return line


async def serve(
    cfg: dict[str, Any], me: int, workers: int, stop: asyncio.Event, settings: Settings
) -> dict[str, Any]:
    """Set up this worker's half, exchange pipes, forward until `stop`; returns the counters."""
    parts = cfg["participants"]
    mine = [p for p in parts if benchconfig.worker_of(p, workers) == me]
    senders = {c["sender"] for c in cfg["consumers"]}
    # Where each sender is heard: the workers that serve one of its receivers.
    heard_on: dict[int, set[int]] = {}
    for c in cfg["consumers"]:
        heard_on.setdefault(c["sender"], set()).add(benchconfig.worker_of(parts[c["receiver"]], workers))
    async with Engine(settings) as engine:
        routers: dict[int, Any] = {}
        transports: dict[int, Any] = {}
        producers: dict[int, Any] = {}
        for p in mine:
            router = routers.get(p["room"]) or routers.setdefault(p["room"], engine.create_router())
            t = transports[p["id"]] = sut.srtp_transport(router, cfg, p)
            if p["id"] in senders:  # a stage's listeners have nothing to produce
                producers[p["id"]] = t.produce(sut.producer_parameters(p))
        # Our end of each pipe, and the producers we send through it.
        pipes: dict[str, PipeTransport] = {}
        offer: dict[str, Any] = {"worker": me, "pipes": {}}
        for pid, producer in producers.items():
            room = parts[pid]["room"]
            for other in sorted(heard_on.get(pid, set()) - {me}):
                key = pipe_key(room, me, other)
                if key not in pipes:
                    pipes[key] = routers[room].create_pipe_transport(PIPE_IP, enable_srtp=False)
                    offer["pipes"][key] = {"port": pipes[key].tuple["localPort"], "producers": []}
                consumer = pipes[key].consume(producer.id)
                offer["pipes"][key]["producers"].append(
                    {"participant": pid, "id": producer.id, "rtp_parameters": consumer.rtp_parameters}
                )
        # Pipes on which we only receive (e.g. a stage's listener-only worker).
        for p in parts:
            if p["id"] in senders and me in heard_on.get(p["id"], set()):
                other = benchconfig.worker_of(p, workers)
                key = pipe_key(p["room"], me, other)
                if other != me and key not in pipes:
                    router = routers.get(p["room"]) or routers.setdefault(p["room"], engine.create_router())
                    pipes[key] = router.create_pipe_transport(PIPE_IP, enable_srtp=False)
                    offer["pipes"][key] = {"port": pipes[key].tuple["localPort"], "producers": []}
        print("PIPE " + json.dumps(offer), flush=True)
        peers = json.loads(await read_line(60.0))
        by_participant: dict[int, str] = {pid: pr.id for pid, pr in producers.items()}
        for peer in peers:
            for key, end in peer["pipes"].items():
                if key not in pipes:
                    continue  # a pipe between two other workers
                pipes[key].connect(PIPE_IP, end["port"])
                for prod in end["producers"]:
                    if me in heard_on[prod["participant"]]:
                        far = pipes[key].produce(prod["rtp_parameters"], id=prod["id"])
                        by_participant[prod["participant"]] = far.id
        caps = sut.receiver_capabilities(cfg)
        consumers = 0
        for c in cfg["consumers"]:
            if c["receiver"] in transports:
                transports[c["receiver"]].consume(by_participant[c["sender"]], caps, ssrc=c["ssrc"])
                consumers += 1
        print("READY", flush=True)
        # From now on stdin only signals EOF (the harness died): stop then.
        asyncio.get_running_loop().add_reader(0, lambda: os.read(0, 4096) or stop.set())
        await stop.wait()
        pipe_stats = [s for t in pipes.values() for s in t.get_stats()]
        return {
            "worker": me,
            "participants": len(mine),
            "consumers": consumers,
            "pipes": len(pipes),
            "pipe_rx_packets": sum(s["rtpPacketsReceived"] for s in pipe_stats),
            "pipe_tx_packets": sum(s["rtpPacketsSent"] for s in pipe_stats),
            **sut.engine_counters(engine, list(transports.values())),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("--worker", type=int, required=True, help="this worker's index, 0..workers-1")
    ap.add_argument("--workers", type=int, default=2, help="workers the members are split over [2]")
    ap.add_argument("--cpu", type=int, default=1, help="CPU to pin to (-1: leave affinity alone)")
    ap.add_argument("--max-queue-age-ms", type=float, help="drop RTP queued longer [Settings default]")
    args = ap.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        ap.error("--worker must be in 0..workers-1")
    sut.pin_cpu(args.cpu, "sut_split")
    cfg = benchconfig.load_config(args.config)
    if benchconfig.is_discord(cfg["suite"]):
        ap.error("the split SUT runs the SRTP suites only")

    async def run() -> dict[str, Any]:
        settings = sut.settings_for(cfg, args.max_queue_age_ms)
        return await serve(cfg, args.worker, args.workers, sut.stop_on_signals(), settings)

    counters = asyncio.run(run())
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
