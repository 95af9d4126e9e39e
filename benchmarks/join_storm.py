"""The SUT side of the join storm (sut_fastsfu.py --storm-control PATH): a control socket through which
the storm client (storm_client.py, its own process) drives each WebRTC join's server steps, and
fastsfu's Discord voice gateway, whose members join the first room; per join, the server's loop time.

A join's loop time is the sum of perf_counter spans around the server's own synchronous work for it,
with the loop thread's CPU time over the same spans beside it. WebRTC: create, connect, produce,
consume the room, close, and the transport's STUN/DTLS datagram callbacks. Discord: its gateway
connection's frames and timers (IDENTIFY, SELECT_PROTOCOL, SPEAKING, the close that ends it), the
slices its room join is cut into, writing its messages to its WebSocket, and its transport's IP
discovery datagrams. The control channel's own JSON (a stand-in for signaling) is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import client_caps, producer_params  # noqa: E402

from fastsfu import Engine  # noqa: E402
from fastsfu.discord.gateway import Connection, Gateway, Output, Session  # noqa: E402
from fastsfu.discord.voice import DiscordMember, DiscordVoice  # noqa: E402
from fastsfu.discord.ws_server import GatewayEndpoint, GatewayLink, make_gateway_app  # noqa: E402
from fastsfu.harmony.auth import TokenAuth, generate_secret  # noqa: E402
from fastsfu.producer import Producer  # noqa: E402
from fastsfu.rooms import Rooms  # noqa: E402
from fastsfu.router import Router  # noqa: E402
from fastsfu.server.edge import ConnectionGuard, EdgeLimits, GuardedSite  # noqa: E402

ROOM_KEY = ("bench", 0)
SERVER_ID = "storm"  # the Discord server_id mapped to the room
KINDS = ("webrtc", "discord")
MAX_LINE = 1 << 20  # bytes per control line (a storm_end of 300 joins is about 30 KB)
MAX_CONNECTIONS = 4  # control connections at once
MAX_INFLIGHT = 256  # requests of one connection still waiting (DTLS) at once
MAX_JOINS = 1024  # WebRTC joins alive at once; also the room's headroom over its members
DTLS_WAIT_S = 5.0  # produce waits this long at most for the server's DTLS state
LEAVE_WAIT_S = 2.0  # storm_end waits this long at most for the server's end of the last leaves


class StormError(Exception):
    """A control request that cannot be served (the reply says why)."""


@dataclass
class JoinRecord:
    """One join's server loop time so far; done once the server has finished its leave."""

    kind: str
    loop_s: float = 0.0
    cpu_s: float = 0.0
    done: bool = False


class LoopMeter:
    """Times synchronous calls for a join. A call made inside another timed call is counted by the
    outer one only, so nothing is counted twice; `current` is the join being timed, if any."""

    def __init__(self) -> None:
        self.current: JoinRecord | None = None

    def call(self, record: JoinRecord, fn: Callable[..., Any], *args: Any) -> Any:
        if self.current is not None:
            return fn(*args)
        self.current = record
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            record.loop_s += time.perf_counter() - t
            record.cpu_s += time.thread_time() - c
            self.current = None

    def wrap(self, record: JoinRecord, method: Callable[..., Any]) -> Callable[..., Any]:
        """`method`, a bound method, timed for `record`. Held weakly: the wrapper is stored on the
        method's own object, and a strong reference would make each transport a reference cycle
        left to the garbage collector, which fastsfu's own code avoids."""
        weak = weakref.WeakMethod(method)

        def timed(*args: Any) -> Any:
            fn = weak()
            return None if fn is None else self.call(record, fn, *args)

        return timed

    def scheduler(
        self, schedule: Callable[[Callable[[], None]], object]
    ) -> Callable[[Callable[[], None]], object]:
        """`schedule` (the loop's call_soon), with a callback scheduled during a join's timed call
        (a slice of a sliced room join) timed for that join when it runs."""

        def run_later(callback: Callable[[], None]) -> object:
            record = self.current
            if record is None:
                return schedule(callback)
            return schedule(lambda: self.call(record, callback))

        return run_later


class BenchMember:
    """A load generator participant as a member of the room: joiners consume its producer and hear
    of it; it consumes no joiner (the sink expects only the config's subscriptions). It never says
    whether it speaks, and is not measured either: no speaking observer in the datapath."""

    def __init__(self, user_id: int, producer: Producer) -> None:
        self._user_id = user_id
        self._producer = producer

    @property
    def user_id(self) -> int:
        return self._user_id

    @property
    def producer(self) -> Producer | None:
        return self._producer

    @property
    def reports_speaking(self) -> bool:
        return True

    def member_joined(self, user_id: int, producer: Producer) -> None:
        pass

    def member_left(self, user_id: int) -> None:
        pass

    def member_speaking(self, user_id: int, speaking: bool) -> None:
        pass


class MeteredLink:
    """A gateway connection whose work is timed for its join: its frames and timers, and the span
    from taking its output to the endpoint's next_deadline() call, in which the endpoint writes that
    output to the WebSocket (aiohttp's writes do not yield unless the socket is paused)."""

    def __init__(self, inner: Connection, meter: LoopMeter, record: JoinRecord) -> None:
        self.inner = inner
        self.meter = meter
        self.record = record
        self._writing: tuple[float, float] | None = None

    @property
    def on_output(self) -> Callable[[], None] | None:
        return self.inner.on_output

    @on_output.setter
    def on_output(self, callback: Callable[[], None] | None) -> None:
        self.inner.on_output = callback

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def poll_output(self) -> list[Output]:
        self._writing = (time.perf_counter(), time.thread_time())
        return self.inner.poll_output()

    def next_deadline(self) -> float | None:
        if self._writing is not None:
            t, c = self._writing
            self.record.loop_s += time.perf_counter() - t
            self.record.cpu_s += time.thread_time() - c
            self._writing = None
        return self.inner.next_deadline()

    def handle_timer(self, now: float) -> None:
        self.meter.call(self.record, self.inner.handle_timer, now)

    def receive(self, frame: str | bytes, now: float) -> None:
        self.meter.call(self.record, self.inner.receive, frame, now)

    def transport_closed(self, now: float, code: int | None = None) -> None:
        self.meter.call(self.record, self.inner.transport_closed, now, code)


class MeteredEndpoint(GatewayEndpoint):
    """The gateway's WebSocket endpoint, each connection a MeteredLink with a record of its own."""

    def __init__(self, gateway: Gateway, meter: LoopMeter) -> None:
        super().__init__(gateway)
        self.meter = meter
        self.connect = self._metered_connect

    def _metered_connect(self, version: int | None, now: float) -> GatewayLink:
        record = JoinRecord("discord")
        conn = self.meter.call(record, self.gateway.connect, version, now)
        return MeteredLink(conn, self.meter, record)


class MeteredVoice(DiscordVoice):
    """DiscordVoice telling the storm server which join an IDENTIFY starts and when it has ended,
    and timing its transport's IP discovery for that join."""

    def __init__(self, server: StormServer, rooms: Rooms, auth: TokenAuth) -> None:
        super().__init__(rooms, auth.authenticate, {SERVER_ID: ROOM_KEY}, only_mapped=True)
        self.server = server

    def identify(self, session: Session, d: dict[str, Any]) -> dict[str, Any]:
        ready = super().identify(session, d)
        record = self.server.meter.current or JoinRecord("discord")  # the connection's, in receive()
        self.server.records[("discord", session.user_id)] = record
        member = session.attachment
        if isinstance(member, DiscordMember) and member.udp is not None:
            udp = member.udp
            timed = self.server.meter.wrap(record, udp._on_slow_datagram)
            udp._on_slow_datagram = timed  # type: ignore[method-assign]
        return ready

    def ended(self, session: Session) -> None:
        super().ended(session)
        record = self.server.records.get(("discord", session.user_id))
        if record is not None:
            record.done = True


class StormServer:
    """The room's registry and first room, the Discord gateway and the control socket of one SUT."""

    def __init__(self, engine: Engine, control_path: str, room_members: int) -> None:
        self.engine = engine
        self.control_path = control_path
        # Room for the members and every joiner at once; joiners are never refused for size.
        self.rooms = Rooms(engine, max_members=room_members + MAX_JOINS)
        self.room = self.rooms.acquire(ROOM_KEY)
        self.meter = LoopMeter()
        self.records: dict[tuple[str, str], JoinRecord] = {}  # this storm's joins by (kind, key)
        self.summaries: list[dict[str, Any]] = []
        self.producers: list[Producer] = []
        self._auth_secret = generate_secret()
        self._webrtc: dict[int, tuple[Any, JoinRecord]] = {}  # join id -> (transport, record)
        self._ids = itertools.count(1)
        self._storm: dict[str, Any] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._gateway: Gateway | None = None
        self.gateway_url = ""

    @property
    def router(self) -> Router:
        return self.room.router

    async def start(self, members: list[tuple[int, Producer]]) -> None:
        """Put the generator's participants into the room, then open the gateway and the control socket."""
        for user_id, producer in members:
            self.room.add(BenchMember(user_id, producer))
            self.producers.append(producer)
        # Made once as a server starts, not by its first join: the DTLS certificate, the media port.
        _ = self.engine.dtls_certificate
        self.engine.media_socket()
        auth = TokenAuth(self._auth_secret)
        voice = MeteredVoice(self, self.rooms, auth)
        # As `fastsfu serve`: a big room's join runs in slices with the loop free in between.
        voice.schedule = self.meter.scheduler(asyncio.get_running_loop().call_soon)
        self._gateway = Gateway(voice)
        endpoint = MeteredEndpoint(self._gateway, self.meter)
        app = make_gateway_app(self._gateway, endpoint)
        guard = ConnectionGuard("discord", EdgeLimits())
        guard.install(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = GuardedSite(self._runner, "127.0.0.1", 0, guard)
        await site.start()
        self.gateway_url = f"ws://127.0.0.1:{site.port}/?v=8"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        self._server = await asyncio.start_unix_server(self._serve, self.control_path, limit=MAX_LINE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._gateway is not None:
            self._gateway.shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
        for transport, _ in self._webrtc.values():
            transport.close()
        self._webrtc.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)

    # ------------------------------------------------------------------ the control channel

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        joins: set[int] = set()  # this connection's WebRTC joins: closed with it
        inflight: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):  # a line over MAX_LINE: drop the peer
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    rid, op = req["id"], req["op"]
                except (ValueError, KeyError, TypeError):
                    _reply(writer, {"id": None, "ok": False, "error": "bad request"})
                    continue
                if op in ("webrtc_produce", "storm_end"):  # they wait: the others go on meanwhile
                    if len(inflight) >= MAX_INFLIGHT:
                        _reply(writer, {"id": rid, "ok": False, "error": "too many requests in flight"})
                        continue
                    t = asyncio.ensure_future(self._answer_async(writer, rid, req))
                    inflight.add(t)
                    t.add_done_callback(inflight.discard)
                    continue
                try:
                    _reply(writer, {"id": rid, "ok": True, **self._handle(op, req, joins)})
                except Exception as exc:  # a refused or failed step is the client's failure, not ours
                    _reply(writer, {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            for t in inflight:
                t.cancel()
            for jid in joins:
                entry = self._webrtc.pop(jid, None)
                if entry is not None:
                    entry[0].close()
            writer.close()
            self._connections.discard(task)

    async def _answer_async(self, writer: asyncio.StreamWriter, rid: Any, req: dict[str, Any]) -> None:
        try:
            if req["op"] == "storm_end":
                answer = await self._storm_end(req.get("results"))
            else:
                answer = await self._webrtc_produce(req)
            _reply(writer, {"id": rid, "ok": True, **answer})
        except Exception as exc:
            _reply(writer, {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _handle(self, op: str, req: dict[str, Any], joins: set[int]) -> dict[str, Any]:
        if op == "hello":
            return {
                "members": [m.user_id for m in self.room.members.values()],
                "gateway": self.gateway_url,
                "server_id": SERVER_ID,
                "token_secret": self._auth_secret,  # a benchmark's own: the client mints its tokens
            }
        if op == "storm_begin":
            self.records.clear()
            self._storm = {k: req.get(k) for k in ("rate", "seconds", "hold_s", "discord_share")}
            return {}
        if op == "webrtc_create":
            return self._webrtc_create(joins)
        if op == "webrtc_connect":
            transport, record = self._join(req)
            params = {"role": "client", "fingerprints": req.get("fingerprints")}
            self.meter.call(record, transport.connect, params)
            return {}
        if op == "webrtc_close":
            entry = self._webrtc.pop(int(req["join"]), None)
            joins.discard(int(req["join"]))
            if entry is None:
                raise StormError("no such join")
            transport, record = entry
            self.meter.call(record, transport.close)
            record.done = True
            return {}
        raise StormError(f"unknown op {op!r}")

    def _join(self, req: dict[str, Any]) -> tuple[Any, JoinRecord]:
        entry = self._webrtc.get(int(req["join"]))
        if entry is None:
            raise StormError("no such join")
        return entry

    def _webrtc_create(self, joins: set[int]) -> dict[str, Any]:
        if len(self._webrtc) >= MAX_JOINS:
            raise StormError("too many joins at once")
        record = JoinRecord("webrtc")

        def create() -> tuple[Any, dict[str, Any]]:
            # What a signaling reply carries (ICE and DTLS parameters) is the server's work too.
            t = self.router.create_webrtc_transport()
            desc = {
                "ice_parameters": t.ice_parameters,
                "ice_candidates": t.ice_candidates,
                "dtls_parameters": t.dtls_parameters,
            }
            return t, desc

        transport, desc = self.meter.call(record, create)
        # Its own STUN and DTLS callbacks (ICE and the handshake's server side) run on the loop for
        # this join: count them (the engine looks the method up per datagram).
        transport._on_slow_datagram = self.meter.wrap(record, transport._on_slow_datagram)
        jid = next(self._ids)
        self._webrtc[jid] = (transport, record)
        joins.add(jid)
        self.records[("webrtc", str(jid))] = record
        return {"join": jid, **desc}

    async def _webrtc_produce(self, req: dict[str, Any]) -> dict[str, Any]:
        transport, record = self._join(req)
        # The server's last flight can reach the client before the server has handled the client's
        # Finished: wait for its state (a few ms at most) rather than race it.
        deadline = time.monotonic() + DTLS_WAIT_S
        while transport.dtls_state != "connected":
            if transport.closed or time.monotonic() > deadline:
                raise StormError(f"server DTLS state {transport.dtls_state}")
            await asyncio.sleep(0.005)
        ssrc = int(req["ssrc"])

        def produce_consume() -> None:
            transport.produce(producer_params(ssrc))
            caps = client_caps()
            for p in self.producers:
                transport.consume(p.id, caps)

        self.meter.call(record, produce_consume)
        return {"consumers": len(self.producers)}

    # ------------------------------------------------------------------ the summary

    async def _storm_end(self, results: Any) -> dict[str, Any]:
        results = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
        # A Discord leave ends in the WebSocket's handler a moment after aiohttp answered the
        # client's close frame, so the client can be done first: wait for those ends (bounded).
        records = [self.records.get((str(r.get("kind")), str(r.get("key")))) for r in results if r.get("ok")]
        deadline = time.monotonic() + LEAVE_WAIT_S
        while any(rec is not None and not rec.done for rec in records) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        summary = self._summarize(results)
        self.summaries.append(summary)
        return {"summary": summary}

    def _summarize(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """One storm: the client's word on each join (ok, or why not, and its setup time) with the
        server's loop time for it. A join the client completed whose server side has not finished
        its leave counts as failed."""
        per_kind: dict[str, dict[str, list[Any]]] = {
            k: {"loop": [], "cpu": [], "setup": [], "failures": []} for k in KINDS
        }
        for r in results:
            if r.get("kind") not in KINDS:
                continue
            acc = per_kind[r["kind"]]
            record = self.records.get((r["kind"], str(r.get("key"))))
            if not r.get("ok"):
                acc["failures"].append(str(r.get("error")))
            elif record is None or not record.done:
                acc["failures"].append("the server did not finish the join's leave")
            else:
                acc["loop"].append(record.loop_s)
                acc["cpu"].append(record.cpu_s)
                acc["setup"].append(float(r.get("setup_s") or 0.0))
        self.records.clear()

        def rows(acc: dict[str, list[Any]]) -> dict[str, Any]:
            return {
                "joins": len(acc["loop"]),
                "failures": len(acc["failures"]),
                "failure_reasons": sorted(set(acc["failures"]))[:5],
                "loop_ms": _percentiles(acc["loop"]),
                "loop_cpu_ms": _percentiles(acc["cpu"]),
                "setup_ms": _percentiles(acc["setup"]),
            }

        everything = {key: [x for acc in per_kind.values() for x in acc[key]] for key in per_kind["webrtc"]}
        return {**(self._storm or {}), **rows(everything), "kinds": {k: rows(per_kind[k]) for k in KINDS}}


def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(obj).encode() + b"\n")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50": round(statistics.median(ms), 3), "p99": round(p99, 3), "max": round(ms[-1], 3)}
