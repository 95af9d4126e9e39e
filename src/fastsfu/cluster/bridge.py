"""Harmony sessions bridged to their room's home (docs/cluster.md#bridging): the worker a stream
lands on places the room at its first message (Initialize) and, when the home is another node,
forwards the stream's frames over NATS; the session's state machine runs at the home, so its ICE
candidates name the home's media port and media goes straight there."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.cluster.bus import BusError, NoResponders
from fastsfu.cluster.placement import TOKEN, VERSION, NodeLoad
from fastsfu.cluster.registry import RETRY_PAUSE, Registry
from fastsfu.harmony.session import VoiceError, VoiceRooms, VoiceSession

log = logging.getLogger(__name__)

Req, Resp = voice_pb2.StreamMessageRequest, voice_pb2.StreamMessageResponse
OPEN_TIMEOUT = 3.0  # seconds for the home to accept a bridged session
UNAVAILABLE = "fastsfu.voice-cluster-unavailable"  # the bus cannot place or bridge: join elsewhere/later
# Seconds after a bridge opened from which the other end's heartbeats must list it: a session one
# end no longer lists ended there (its last message lost, e.g. in a NATS outage) and ends here too.
LIST_GRACE = 3.0


def open_subject(node: str) -> str:
    return f"fastsfu.v1.bridge.{node}.open"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(data: object) -> bytes:
    if not isinstance(data, str):
        raise ValueError("not base64 text")
    return base64.b64decode(data, validate=True)


def _frame(data: object, kind: type[Any]) -> Any:
    """A protobuf message from base64 text (ValueError if it is not one)."""
    raw = _unb64(data)
    try:
        return kind.FromString(raw)
    except Exception:  # protobuf's DecodeError (and RecursionError on deep nesting)
        raise ValueError(f"not a {kind.__name__}") from None


def unlisted(registry: Registry, node: str, sid: str, since: float) -> bool:
    """Whether `node` is live and a heartbeat of it that arrived LIST_GRACE after `since` does
    not list the bridged session `sid` (so that end has closed it)."""
    load: NodeLoad | None = registry.nodes().get(node)
    heard = registry.heard_at(node)
    return load is not None and heard is not None and heard > since + LIST_GRACE and sid not in load.bridges


def error_message(error: VoiceError) -> dict[str, object]:
    return {
        "v": VERSION,
        "k": "e",
        "id": error.identifier,
        "msg": error.human_message,
        "det": _b64(error.details),
    }


class BridgeHost:
    """The home's side: a local VoiceSession per bridged stream, its output sent to the edge."""

    def __init__(self, rooms: VoiceRooms, registry: Registry) -> None:
        self.rooms = rooms
        self.registry = registry
        self.bus = registry.bus
        self.sessions: dict[str, VoiceSession] = {}
        self.edges: dict[str, str] = {}  # the node each bridged session's stream is on
        self.opened: dict[str, float] = {}  # when each was accepted (the registry's clock)
        self.hosted = 0  # bridged sessions accepted (a metric)

    def drop_orphans(self, live: set[str]) -> int:
        """End the bridged sessions whose edge node is gone (its stream died with it), or whose
        edge no longer lists them (it ended the stream and its word was lost): the others in the
        room get UserLeft. The count ended."""
        gone = [
            sid
            for sid, edge in self.edges.items()
            if edge not in live or unlisted(self.registry, edge, sid, self.opened.get(sid, 0.0))
        ]
        for sid in gone:
            session = self.sessions.get(sid)
            if session is not None:
                session.close("the edge of this session went away")
        return len(gone)

    async def start(self) -> None:
        await self.bus.nc.subscribe(open_subject(self.registry.node), cb=self._open)

    @staticmethod
    def _parse_open(req: dict[str, Any]) -> tuple[str, int, str, Any]:
        """The session id, user, edge node and first frame (an Initialize) of an open request."""
        sid, user, edge = req.get("sid"), req.get("user"), req.get("edge")
        if not isinstance(sid, str) or not TOKEN.fullmatch(sid):
            raise ValueError("bad session id")
        if not isinstance(user, int) or isinstance(user, bool) or not 0 <= user < 2**64:
            raise ValueError("bad user id")
        if not isinstance(edge, str) or not TOKEN.fullmatch(edge):
            raise ValueError("bad edge node")
        first = _frame(req.get("first"), Req)
        if first.WhichOneof("message") != "initialize":
            raise ValueError("the first frame is not an Initialize")
        return sid, user, edge, first

    async def _open(self, msg: Any) -> None:
        try:
            req = self.bus.decode(msg.data)
            sid, user_id, edge, first = self._parse_open(req)
            if sid in self.sessions:
                raise ValueError("the session is open already")
        except ValueError as exc:  # counted and refused, so that a real edge fails at once
            self.bus.drop("bridge_open", exc)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(self.bus.encode({"v": VERSION, "ok": False, "why": str(exc)}))
            return
        session = VoiceSession(self.rooms, user_id, str(req.get("frontend", "")), str(req.get("remote", "")))
        self.rooms.open_sessions.add(session)
        self.sessions[sid] = session
        self.edges[sid] = edge
        self.opened[sid] = self.registry.clock()
        self.hosted += 1
        out = f"fastsfu.v1.bridge.{sid}.out"
        wake = asyncio.Event()
        session.on_output = wake.set
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_in(m: Any) -> None:
            try:
                item = self.bus.decode(m.data)
                if item.get("k") == "f":
                    item["req"] = _frame(item.get("d"), Req)
                elif item.get("k") != "x":
                    raise ValueError(f"unknown kind {item.get('k')!r}")
            except ValueError as exc:
                self.bus.drop("bridge_in", exc)
                return
            inbox.put_nowait(item)
            wake.set()

        sub = await self.bus.nc.subscribe(f"fastsfu.v1.bridge.{sid}.in", cb=on_in)
        task = asyncio.create_task(self._run(sid, session, first, inbox, wake, out, sub))
        try:
            await msg.respond(self.bus.encode({"v": VERSION, "ok": True}))
        except Exception as exc:  # no reply subject, or the connection went: the edge times out
            log.debug("bridged session %s: cannot answer the open: %s", sid, exc)
            session.close("the edge cannot be answered")
            task.cancel()

    async def _run(
        self,
        sid: str,
        session: VoiceSession,
        first: Any,
        inbox: asyncio.Queue[dict[str, Any]],
        wake: asyncio.Event,
        out: str,
        sub: Any,
    ) -> None:
        """Mirror of a front-end's stream loop, with the edge at the other end of two subjects."""
        pending: list[Any] = [first]
        try:
            while True:
                wake.clear()
                for message in session.take_outgoing():
                    if isinstance(message, VoiceError):
                        session.end_reason = message.identifier
                        await self.bus.publish(out, error_message(message))
                        return
                    await self.bus.publish(
                        out, {"v": VERSION, "k": "m", "d": _b64(message.SerializeToString())}
                    )
                if session.state == "closed":
                    await self.bus.publish(out, {"v": VERSION, "k": "c", "left": session.left_by_peer})
                    return
                while not inbox.empty():
                    item = inbox.get_nowait()
                    if item.get("k") == "x":
                        session.end_reason = str(item.get("why", "")) or session.end_reason
                        return
                    if item.get("k") == "f":
                        pending.append(item["req"])
                if pending:
                    request = pending.pop(0)
                    wake.set()
                    try:
                        session.handle(request)
                    except VoiceError as exc:
                        for message in session.take_outgoing():
                            if not isinstance(message, VoiceError):
                                await self.bus.publish(
                                    out, {"v": VERSION, "k": "m", "d": _b64(message.SerializeToString())}
                                )
                        session.end_reason = exc.identifier
                        await self.bus.publish(out, error_message(exc))
                        return
                    continue
                try:
                    async with asyncio.timeout(session.timeout()):
                        await wake.wait()
                except TimeoutError:
                    error = session.timed_out()
                    session.end_reason = error.identifier
                    await self.bus.publish(out, error_message(error))
                    return
        except BusError as exc:
            log.info("bridged session %s: the bus failed: %s", sid, exc)
        finally:
            session.on_output = None
            session.close()
            self.sessions.pop(sid, None)
            self.edges.pop(sid, None)
            self.opened.pop(sid, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class RoutedSession(VoiceSession):
    """The edge's side, in place of a VoiceSession for the front-ends: at Initialize it asks the
    registry for the room's home, then runs the session here or bridges it there."""

    def __init__(
        self,
        rooms: VoiceRooms,
        user_id: int,
        frontend: str,
        remote: str,
        registry: Callable[[], Registry | None],
        counts: Counter[str],
        connected: asyncio.Event | None = None,
    ) -> None:
        super().__init__(rooms, user_id, frontend, remote)
        self._registry = registry
        self.counts = counts  # sessions by where they ran: here, or bridged to another home
        self.connected = connected  # set once the node reached NATS (a stream may come just before)
        self.inner: VoiceSession | None = None  # the session, when the room is homed here
        self.sid = ""  # the bridge, when it is homed elsewhere
        self.home = ""
        self.bridged_at = 0.0  # when the home accepted it (the registry's clock)
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    def timeout(self) -> float | None:
        if self.inner is not None:
            return self.inner.timeout()
        return super().timeout() if self.state == "init" else None  # the home times the rest

    def timed_out(self) -> VoiceError:
        return self.inner.timed_out() if self.inner is not None else super().timed_out()

    def handle(self, request: Any) -> None:
        if self.state == "closed":
            return
        if self.inner is not None:
            self.inner.handle(request)
            return
        if self.sid:
            self._forward({"v": VERSION, "k": "f", "d": _b64(request.SerializeToString())})
            return
        if self.state != "init":  # placing: the client must wait for Initialized
            raise VoiceError("fastsfu.voice-unexpected-message", "expected nothing before initialized")
        if request.WhichOneof("message") != "initialize":
            super().handle(request)  # raises the unexpected-message error
            return
        self.state = "placing"
        self._task = asyncio.get_running_loop().create_task(self._place(request))

    async def _place(self, first: Any) -> None:
        init = first.initialize
        key = f"{init.guild_id}.{init.channel_id}"
        try:
            if self.connected is not None and not self.connected.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.connected.wait(), OPEN_TIMEOUT)
            registry = self._registry()
            if registry is None:
                raise BusError("not connected to the cluster")
            home = (await registry.home(key)).home
            if self.state == "closed":
                return
            if home == registry.node:
                self.counts["here"] += 1
                self._run_here(first)
                return
            sid = uuid.uuid4().hex
            self._sub = await registry.bus.nc.subscribe(f"fastsfu.v1.bridge.{sid}.out", cb=self._from_home)
            request = {
                "v": VERSION,
                "sid": sid,
                "user": self.user_id,
                "edge": registry.node,
                "frontend": self.frontend,
                "remote": self.remote,
                "first": _b64(first.SerializeToString()),
            }
            subject, payload = open_subject(home), registry.bus.encode(request)
            deadline = time.monotonic() + OPEN_TIMEOUT
            while True:  # the home may be reconnecting (e.g. its NATS server died): not there yet
                left = deadline - time.monotonic()
                try:
                    answer = await registry.bus.call(registry.bus.nc.request(subject, payload, timeout=left))
                    break
                except NoResponders:
                    if left < 2 * RETRY_PAUSE:
                        raise
                    await asyncio.sleep(RETRY_PAUSE)
            reply = registry.bus.decode(answer.data)
            if not reply.get("ok"):
                raise BusError(f"the home refused the session: {reply.get('why')}")
        except (BusError, ValueError) as exc:
            log.info("user %d: cannot place room %s: %s", self.user_id, key, exc)
            self._error(VoiceError(UNAVAILABLE, "the voice cluster cannot place this channel now"))
            return
        except Exception:  # a bug: this stream ends with an error, the others go on
            log.exception("user %d: placing room %s failed", self.user_id, key)
            self._error(VoiceError(UNAVAILABLE, "the voice cluster cannot place this channel now"))
            return
        if self.state == "closed":  # the stream ended while the home was accepting it
            self.sid = sid
            self._forward({"v": VERSION, "k": "x", "why": self.end_reason})
            return
        self.sid, self.home = sid, home
        self.bridged_at = registry.clock()
        self.state = "bridged"
        self.counts["bridged"] += 1

    def _run_here(self, first: Any) -> None:
        inner = VoiceSession(self.rooms, self.user_id, self.frontend, self.remote)
        self.inner = inner
        inner.on_output = self._pull
        self.state = "local"
        try:
            inner.handle(first)
        except VoiceError as exc:
            self._error(exc)
        self._pull()

    def _pull(self) -> None:
        inner = self.inner
        if inner is None:
            return
        self.outbox.extend(inner.take_outgoing())
        if inner.state == "closed" and self.state != "closed":
            self.left_by_peer = inner.left_by_peer
            self._closed_here()
        elif self.on_output is not None:
            self.on_output()

    async def _from_home(self, msg: Any) -> None:
        bus = self._bus()
        if bus is None or self.state == "closed":
            return
        try:
            data = bus.decode(msg.data)
            kind = data.get("k")
            if kind == "m":
                self.outbox.append(_frame(data.get("d"), Resp))
            elif kind == "e":
                ident, text = data.get("id"), data.get("msg")
                if not isinstance(ident, str) or not isinstance(text, str):
                    raise ValueError("bad error identifier or message")
                self.outbox.append(VoiceError(ident, text, _unb64(data.get("det", ""))))
            elif kind == "c":
                self.left_by_peer = data.get("left") is True
                self.sid = ""  # the home ended it: nothing to tell it back
                self._closed_here()
                return
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except ValueError as exc:
            bus.drop("bridge_out", exc)
            return
        if self.on_output is not None:
            self.on_output()

    def check_home(self, live: set[str]) -> None:
        """A bridged session whose home is gone, or no longer lists it (the home ended it and its
        word was lost), ends with a clear error (the client may rejoin and be placed anew)."""
        registry = self._registry()
        if self.state != "bridged" or registry is None:
            return
        if self.home not in live or unlisted(registry, self.home, self.sid, self.bridged_at):
            self.sid = ""
            self._error(VoiceError(UNAVAILABLE, "the voice server of this channel went away"))

    def _error(self, error: VoiceError) -> None:
        self.outbox.append(error)
        if self.on_output is not None:
            self.on_output()

    def _bus(self) -> Any:
        registry = self._registry()
        return registry.bus if registry is not None else None

    def _forward(self, message: dict[str, object]) -> None:
        bus = self._bus()
        if bus is not None and self.sid:
            task = asyncio.get_running_loop().create_task(
                bus.publish(f"fastsfu.v1.bridge.{self.sid}.in", message)
            )
            task.add_done_callback(
                lambda t: t.cancelled() or t.exception()
            )  # a lost frame: the home times out

    def _closed_here(self) -> None:
        self.state = "closed"
        self.rooms.open_sessions.discard(self)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            asyncio.get_running_loop().create_task(sub.unsubscribe())
        if self.on_output is not None:
            self.on_output()

    def close(self, reason: str = "") -> None:
        if self.state == "closed":
            return
        if self.inner is not None:
            self.inner.end_reason = self.end_reason
            self.inner.on_output = None
            self.inner.close(reason)
        elif self.sid:
            self._forward({"v": VERSION, "k": "x", "why": reason or self.end_reason})
        self._closed_here()
