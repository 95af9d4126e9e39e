"""Sessions bridged to their room's home (docs/cluster.md#bridging), whatever the protocol: the
worker a client lands on (the edge) places the room at its first message and, when the home is
another node, relays the session's frames over NATS on per-session subjects; the session's state
machine runs at the home (a `Hosted` there), so media addresses name the home's media port."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from fastsfu.cluster.bus import BusError, NoResponders
from fastsfu.cluster.placement import TOKEN, VERSION, NodeLoad
from fastsfu.cluster.registry import RETRY_PAUSE, Registry

__all__ = ["BridgeHost", "BridgeLink", "Edge", "NodeFullError"]

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 3.0  # seconds for the home to accept a bridged session (and for a starting node's NATS)

# Seconds after a bridge opened from which the other end's heartbeats must list it: a session one
# end no longer lists ended there (its last message lost, e.g. in a NATS outage) and ends here too.
LIST_GRACE = 3.0

Message = dict[str, Any]  # one versioned bus message: {"v": 1, "k": kind, ...}
Wake = Callable[[], None]


class NodeFullError(BusError):
    """The node asked to host a session has the room at its cap (docs/cluster.md#spill)."""


def open_subject(node: str) -> str:
    return f"fastsfu.v1.bridge.{node}.open"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(data: object) -> bytes:
    if not isinstance(data, str):
        raise ValueError("not base64 text")
    return base64.b64decode(data, validate=True)


def unlisted(registry: Registry, node: str, sid: str, since: float) -> bool:
    """Whether `node` is live and a heartbeat of it that arrived LIST_GRACE after `since` does
    not list the bridged session `sid` (so that end has closed it)."""
    load: NodeLoad | None = registry.nodes().get(node)
    heard = registry.heard_at(node)
    return load is not None and heard is not None and heard > since + LIST_GRACE and sid not in load.bridges


class Hosted(Protocol):
    """A session the home runs for a bridged edge. Frames from the edge are `{"k": "f", ...}`, the
    edge's end `{"k": "x", ...}`; what `take` returns goes to the edge in order."""

    def feed(self, message: Message) -> None:
        """One message from the edge; ValueError if it does not decode (counted, dropped)."""
        ...

    def take(self) -> tuple[list[Message], bool]:
        """The messages for the edge, and whether the session is over (the last ones are sent)."""
        ...

    def timeout(self) -> float | None:
        """Seconds until `expire` is due (None: no timer)."""
        ...

    def expire(self) -> None: ...

    def orphaned(self) -> None:
        """The edge's node is gone (no heartbeat within the TTL): end the session."""
        ...

    def dispose(self) -> None:
        """The bridge is over (ended, or the bus failed): release what the session holds."""
        ...


# Builds the home's session for an open request of one kind ("harmony", "discord"); ValueError,
# KeyError or TypeError for a request it cannot serve. `wake` is called when output is queued.
HostedFactory = Callable[[Message, Wake], Hosted]


class BridgeHost:
    """The home's side: one `Hosted` per bridged session, by kind; its output sent to the edge."""

    def __init__(self, registry: Registry, kinds: Mapping[str, HostedFactory]) -> None:
        self.registry = registry
        self.bus = registry.bus
        self.kinds = dict(kinds)
        self.sessions: dict[str, Hosted] = {}
        self.edges: dict[str, str] = {}  # the node each bridged session's client is on
        self.opened: dict[str, float] = {}  # when each was accepted (the registry's clock)
        self.hosted: Counter[str] = Counter()  # bridged sessions accepted, by kind (a metric)
        self.full: Counter[str] = Counter()  # refused at the room's cap, by kind (a metric)
        # Whether this node takes one more session of a room (a rooms-bucket key): False at its cap.
        self.admit: Callable[[str], bool] = lambda key: True

    def drop_orphans(self, live: set[str]) -> int:
        """End the bridged sessions whose edge node is gone (its client's connection died with it),
        or whose edge no longer lists them (it ended the session and its word was lost): the others
        in the room hear them leave once. The count ended."""
        gone = [
            sid
            for sid, edge in self.edges.items()
            if edge not in live or unlisted(self.registry, edge, sid, self.opened.get(sid, 0.0))
        ]
        for sid in gone:
            session = self.sessions.get(sid)
            if session is not None:
                session.orphaned()
        return len(gone)

    async def start(self) -> None:
        await self.bus.nc.subscribe(open_subject(self.registry.node), cb=self._open)

    async def _open(self, msg: Any) -> None:
        wake = asyncio.Event()
        try:
            req = self.bus.decode(msg.data)
            sid, kind, frames, edge = req.get("sid"), req.get("kind"), req.get("frames"), req.get("edge")
            if not isinstance(sid, str) or not TOKEN.fullmatch(sid):
                raise ValueError("bad session id")
            if not isinstance(edge, str) or not TOKEN.fullmatch(edge):
                raise ValueError("bad edge node")
            if not isinstance(frames, list) or not isinstance(kind, str) or kind not in self.kinds:
                raise ValueError(f"cannot host a {kind!r} session")
            if sid in self.sessions:
                raise ValueError("the session is open already")
            room = req.get("room")
            if room is not None and (not isinstance(room, str) or not TOKEN.fullmatch(room)):
                raise ValueError("bad room key")
            if room is not None and not self.admit(room):  # the edge tries the room's next node
                self.full[kind] += 1
                if msg.reply:
                    with contextlib.suppress(Exception):
                        await msg.respond(self.bus.encode({"v": VERSION, "ok": False, "full": True}))
                return
            session = self.kinds[kind](req, wake.set)
        except (ValueError, KeyError, TypeError) as exc:  # counted and refused: a real edge fails at once
            self.bus.drop("bridge_open", exc)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(self.bus.encode({"v": VERSION, "ok": False, "why": str(exc)}))
            return
        self.sessions[sid] = session
        self.edges[sid] = edge
        self.opened[sid] = self.registry.clock()
        self.hosted[kind] += 1
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        # The first frames, in order, before any that follow on .in, in the same step as the cap
        # check: the session holds its room at once, so concurrent opens cannot pass the cap.
        for frame in frames:
            if isinstance(frame, dict):
                try:
                    session.feed(frame)
                except ValueError as exc:
                    self.bus.drop("bridge_in", exc)

        async def on_in(m: Any) -> None:
            try:
                item = self.bus.decode(m.data)
                if item.get("k") not in ("f", "x"):
                    raise ValueError(f"unknown kind {item.get('k')!r}")
            except ValueError as exc:
                self.bus.drop("bridge_in", exc)
                return
            inbox.put_nowait(item)
            wake.set()

        sub = await self.bus.nc.subscribe(f"fastsfu.v1.bridge.{sid}.in", cb=on_in)
        asyncio.create_task(self._run(sid, session, inbox, wake, sub))
        try:
            await msg.respond(self.bus.encode({"v": VERSION, "ok": True}))
        except Exception as exc:  # no reply subject, or the connection went: the edge times out
            log.debug("bridged session %s: cannot answer the open: %s", sid, exc)
            session.orphaned()
            wake.set()

    async def _run(
        self, sid: str, session: Hosted, inbox: asyncio.Queue[Message], wake: asyncio.Event, sub: Any
    ) -> None:
        """A front-end's connection loop, with the edge at the other end of two subjects."""
        out = f"fastsfu.v1.bridge.{sid}.out"
        try:
            while True:
                wake.clear()
                messages, over = session.take()
                for message in messages:
                    await self.bus.publish(out, message)
                if over:
                    return
                if not inbox.empty():
                    try:
                        session.feed(inbox.get_nowait())
                    except ValueError as exc:  # a frame that does not decode: counted, dropped
                        self.bus.drop("bridge_in", exc)
                    continue
                try:
                    async with asyncio.timeout(session.timeout()):
                        await wake.wait()
                except TimeoutError:
                    session.expire()
        except BusError as exc:
            log.info("bridged session %s: the bus failed: %s", sid, exc)
        finally:
            session.dispose()
            self.sessions.pop(sid, None)
            self.edges.pop(sid, None)
            self.opened.pop(sid, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class BridgeLink:
    """The edge's end of one bridged session: frames to the home on `.in`, the home's messages
    from `.out` to `on_message`; `on_home_gone` when the home's node stops heartbeating."""

    def __init__(
        self,
        edge: Edge,
        registry: Registry,
        home: str,
        on_message: Callable[[Message], None],
        on_home_gone: Callable[[], None],
    ) -> None:
        self.edge = edge
        self.registry = registry
        self.home = home
        self.sid = uuid.uuid4().hex
        self.bridged_at = 0.0  # when the home accepted it (the registry's clock)
        self.on_message = on_message
        self.on_home_gone = on_home_gone
        self._sub: Any = None

    async def open(self, kind: str, fields: Message) -> None:
        """Ask the home to host the session (BusError if it refuses or does not answer in time)."""
        bus = self.registry.bus
        self._sub = await bus.nc.subscribe(f"fastsfu.v1.bridge.{self.sid}.out", cb=self._from_home)
        request = {"v": VERSION, "sid": self.sid, "kind": kind, "edge": self.registry.node, **fields}
        try:
            deadline = time.monotonic() + OPEN_TIMEOUT
            while True:  # the home may be reconnecting (e.g. its NATS server died): not there yet
                left = deadline - time.monotonic()
                try:
                    answer = await bus.call(
                        bus.nc.request(open_subject(self.home), bus.encode(request), timeout=left)
                    )
                    break
                except NoResponders:
                    if left < 2 * RETRY_PAUSE:
                        raise
                    await asyncio.sleep(RETRY_PAUSE)
            reply = bus.decode(answer.data)
            if reply.get("full") is True:
                raise NodeFullError(f"node {self.home} has the room at its cap")
            if not reply.get("ok"):
                raise BusError(f"the home refused the session: {reply.get('why')}")
        except (BusError, ValueError):
            self.end(None)
            raise
        self.bridged_at = self.registry.clock()
        self.edge.links.add(self)

    async def _from_home(self, msg: Any) -> None:
        """The home's message to `on_message`, which raises ValueError for one that does not
        decode: counted and dropped, like one that is not a v1 message."""
        try:
            self.on_message(self.registry.bus.decode(msg.data))
        except ValueError as exc:
            self.registry.bus.drop("bridge_out", exc)

    def send(self, message: Message) -> None:
        """Publish to the home, in order; a frame lost to the bus is the home's timeout to notice."""
        bus = self.registry.bus
        task = asyncio.get_running_loop().create_task(
            bus.publish(f"fastsfu.v1.bridge.{self.sid}.in", {"v": VERSION, **message})
        )
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def end(self, message: Message | None) -> None:
        """Stop listening; first tell the home `message` (the client's end) if given."""
        if message is not None:
            self.send(message)
        self.edge.links.discard(self)
        if self._sub is not None:
            sub, self._sub = self._sub, None
            task = asyncio.get_running_loop().create_task(sub.unsubscribe())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class Edge:
    """A node's edge side: where a room's home is, the bridges open from here, and how many
    sessions of each protocol ran here or were bridged (a metric)."""

    def __init__(
        self, registry: Callable[[], Registry | None], connected: asyncio.Event | None = None
    ) -> None:
        self._registry = registry
        self.connected = connected  # set once the node reached NATS (a client may come just before)
        self.links: set[BridgeLink] = set()
        # Whether this node takes one more session of a room (a rooms-bucket key): False at its cap.
        self.admit: Callable[[str], bool] = lambda key: True
        self.counts: Counter[tuple[str, str]] = Counter()  # (protocol, here|bridged)

    async def home(self, key: str) -> tuple[Registry, str]:
        """The registry and the home of room `key` (placed now if it has none); BusError if the
        node is not in the cluster or the bus fails."""
        registry = await self._ready()
        return registry, (await registry.home(key)).home

    async def _ready(self) -> Registry:
        if self.connected is not None and not self.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), OPEN_TIMEOUT)
        registry = self._registry()
        if registry is None:
            raise BusError("not connected to the cluster")
        return registry

    async def serving(self, key: str, refused: set[str]) -> tuple[Registry, str]:
        """The registry and the node that serves the next member of room `key` (docs/cluster.md#spill),
        skipping the nodes in `refused` (at their cap); RoomFullError when none is left, BusError
        as for `home`."""
        registry = await self._ready()
        return registry, await registry.serving(key, refused)

    async def link(
        self,
        registry: Registry,
        home: str,
        kind: str,
        fields: Message,
        on_message: Callable[[Message], None],
        on_home_gone: Callable[[], None],
    ) -> BridgeLink:
        link = BridgeLink(self, registry, home, on_message, on_home_gone)
        await link.open(kind, fields)
        return link

    def check_homes(self, live: set[str]) -> None:
        """Bridges whose home's node is gone, or no longer lists them (the home ended the session
        and its word was lost), end at the edge with the protocol's clear error."""
        registry = self._registry()
        gone = [
            link
            for link in self.links
            if link.home not in live
            or (registry is not None and unlisted(registry, link.home, link.sid, link.bridged_at))
        ]
        for link in gone:
            self.links.discard(link)
            link.on_home_gone()
