"""Discord voice gateway sessions over the bridge (docs/cluster.md#discord): the edge's
WebSocket learns the room from IDENTIFY or RESUME, runs the session here when the room's home is
this node, else relays the JSON frames to the home, where the gateway core runs the connection (so
READY's ip/port and the webrtc answer name the home's media address, and a RESUME finds its
session whichever worker the new socket reached)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

from fastsfu.cluster.bridge import BridgeLink, Edge, Message, NodeFullError, Wake, b64, unb64
from fastsfu.cluster.bus import BusError
from fastsfu.cluster.placement import VERSION, room_subject_key
from fastsfu.cluster.registry import RoomFullError
from fastsfu.discord import payloads
from fastsfu.discord.gateway import Close, Connection, Gateway, GatewayError, Output, Send
from fastsfu.discord.opcodes import CloseCode, Op
from fastsfu.discord.voice import DiscordVoice
from fastsfu.rooms import RoomError

log = logging.getLogger(__name__)

CLOSE_SUBJECT = "fastsfu.v1.discord.close"  # {"user_id", "server_id"?, "code", "reason"?}: any node
CLOSE_CODES = frozenset({CloseCode.DISCONNECTED, CloseCode.VOICE_SERVER_CRASHED, CloseCode.CALL_TERMINATED})

State = Literal["hello", "placing", "local", "bridged", "closed"]


def _frame(frame: str | bytes) -> Message:
    return {"k": "f", "d": frame} if isinstance(frame, str) else {"k": "f", "b": b64(frame)}


class HostedConnection:
    """The home's `Hosted` for a bridged Discord WebSocket: a gateway Connection fed the relayed
    frames (the edge sent HELLO), its outputs sent back, its heartbeat deadline timed here."""

    def __init__(self, gateway: Gateway, request: Message, wake: Wake) -> None:
        version = request["version"]
        if not isinstance(version, int):
            raise TypeError("version must be an integer")
        self.clock = asyncio.get_running_loop().time
        self.conn = gateway.connect(version, self.clock(), greet=False)
        self.conn.on_output = wake

    def feed(self, message: Message) -> None:
        now = self.clock()
        if message.get("k") == "x":  # the client's socket closed at the edge, with its status
            code = message.get("code")
            self.conn.transport_closed(now, code if isinstance(code, int) else None)
        elif message.get("k") == "f":
            frame = message.get("d")
            if "b" in message:
                frame = unb64(message["b"])  # ValueError: counted by the bridge
            if not isinstance(frame, str | bytes):
                raise ValueError("a bridged Discord frame that is neither text nor binary")
            self.conn.receive(frame, now)

    def take(self) -> tuple[list[Message], bool]:
        out: list[Message] = []
        for output in self.conn.poll_output():
            if isinstance(output, Send):
                out.append({"v": VERSION, "k": "m", "d": output.text})
            else:
                out.append({"v": VERSION, "k": "c", "code": output.code, "reason": output.reason})
        return out, self.conn.closed

    def timeout(self) -> float | None:
        deadline = self.conn.next_deadline()
        return None if deadline is None else max(deadline - self.clock(), 0.0)

    def expire(self) -> None:
        self.conn.handle_timer(self.clock())

    def orphaned(self) -> None:
        # Its client's connection died with the edge's node: the session ends (not suspended), so
        # the others get CLIENT_DISCONNECT once, as when any node dies (docs/cluster.md).
        self.conn.close(CloseCode.DISCONNECTED, "the edge of this session went away")

    def dispose(self) -> None:
        self.conn.on_output = None
        if not self.conn.closed:
            self.conn.transport_closed(self.clock())


class RoutedConnection:
    """The edge's link for one Discord WebSocket (a `GatewayLink`): HELLO and everything up to the
    first IDENTIFY or RESUME from a local Connection; then that Connection goes on here (the room's
    home is here, or the frame is refused anyway) or the frames are relayed to the home."""

    def __init__(
        self, gateway: Gateway, voice: DiscordVoice, edge: Edge, version: int | None, now: float
    ) -> None:
        self.gateway = gateway
        self.voice = voice
        self.edge = edge
        self.version = version or 0
        self.local: Connection = gateway.connect(version, now)
        self.local.on_output = self._wake
        self.on_output: Callable[[], None] | None = None
        self.state: State = "hello"
        self.link: BridgeLink | None = None
        self._queue: list[str | bytes] = []  # frames that came while placing
        self._out: list[Output] = []
        self._client_code: int | None = None  # the client's close status, if it closed while placing
        self._task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self.state == "closed" or (self.state in ("hello", "local") and self.local.closed)

    def _wake(self) -> None:
        if self.on_output is not None:
            self.on_output()

    def poll_output(self) -> list[Output]:
        out = self.local.poll_output()
        mine, self._out = self._out, []
        if self.state != "bridged":
            return [*out, *mine]
        # A relayed Connection outputs only its close (this node's shutdown): the client goes, and
        # the home hears the code as the client's, so after 4015 the session waits for RESUME.
        closes = [output for output in out if isinstance(output, Close)]
        if closes:
            self._unlink({"k": "x", "code": closes[0].code})
            self.state = "closed"
            return [*mine, closes[0]]
        return mine

    def next_deadline(self) -> float | None:
        return self.local.next_deadline() if self.state in ("hello", "local") else None

    def handle_timer(self, now: float) -> None:
        if self.state in ("hello", "local"):
            self.local.handle_timer(now)

    def receive(self, frame: str | bytes, now: float) -> None:
        if self.state == "hello":
            key = self._room(frame)
            if not key:  # not a valid IDENTIFY/RESUME (None), or a RESUME of a session held here ("")
                if key == "":
                    self.edge.counts["discord", "here"] += 1
                self.state = "local"
                self.local.receive(frame, now)
                return
            self.state = "placing"
            self._queue.append(frame)
            self._task = asyncio.get_running_loop().create_task(self._place(key))
        elif self.state == "local":
            self.local.receive(frame, now)
        elif self.state == "placing":
            self._queue.append(frame)
        elif self.state == "bridged" and self.link is not None:
            self.link.send(_frame(frame))

    def transport_closed(self, now: float, code: int | None = None) -> None:
        if self.state in ("hello", "local"):
            self.local.transport_closed(now, code)
            return
        if self.state == "bridged":
            self._unlink({"k": "x", "code": code})
        self._client_code = code
        self.state = "closed"
        self.local.transport_closed(now)  # no session here: nothing but the socket's place ends

    def _room(self, frame: str | bytes) -> str | None:
        """The bucket key of the room an IDENTIFY or RESUME with a good token names, when its home
        must be asked; "" for a RESUME of a session held here; None when the local Connection
        refuses it anyway (a bad frame or token, an unmapped server with only_mapped)."""
        try:
            op, d = payloads.decode(frame, self.gateway.config.max_frame_bytes)
            if op == Op.IDENTIFY:
                creds = payloads.identify(d)
            elif op == Op.RESUME:
                creds = payloads.resume(d, self.version)
                held = self.gateway.session(creds.session_id)
                if held is not None and held.server_id == creds.server_id:
                    return ""
            else:
                return None
            user = self.voice.authenticate(creds.token)  # placements only for real users
        except (GatewayError, RoomError):
            return None
        if op == Op.IDENTIFY and str(user) != creds.user_id:
            return None
        if self.voice.only_mapped and creds.server_id not in self.voice.room_map:
            return None
        return room_subject_key(self.voice.room_key(creds.server_id))

    async def _place(self, key: str) -> None:
        refused: set[str] = set()  # nodes that have the room at their cap (docs/cluster.md#spill)
        try:
            while True:
                registry, node = await self.edge.serving(key, refused)
                if self.closed:  # the client went meanwhile
                    return
                if node == registry.node:
                    if not self.edge.admit(key):
                        refused.add(node)
                        continue
                    self.edge.counts["discord", "here"] += 1
                    self.state = "local"
                    now = asyncio.get_running_loop().time()
                    for frame in self._take_queue():  # in the same step as the check: holds the room
                        self.local.receive(frame, now)
                    return
                frames = [_frame(f) for f in self._queue]  # taken once the home accepted them
                fields = {"version": self.version, "room": key, "frames": frames}
                try:
                    link = await self.edge.link(
                        registry, node, "discord", fields, self._from_home, self._home_gone
                    )
                except NodeFullError:
                    refused.add(node)
                    continue
                del self._queue[: len(frames)]
                break
        except RoomFullError as exc:
            log.info("discord: room %s: %s", key, exc)
            self._fail("every node has this server's room at its cap")
            return
        except (BusError, ValueError) as exc:
            log.info("discord: cannot place room %s: %s", key, exc)
            self._fail("the voice cluster cannot place this server now")
            return
        except Exception:  # a bug: this socket closes with a clear code, the others go on
            log.exception("discord: placing room %s failed", key)
            self._fail("the voice cluster cannot place this server now")
            return
        if self.closed:  # the client went while the home was accepting it
            link.end({"k": "x", "code": self._client_code})
            return
        self.link = link
        self.state = "bridged"
        self.local.relay()
        self.edge.counts["discord", "bridged"] += 1
        for frame in self._take_queue():
            link.send(_frame(frame))

    def _take_queue(self) -> list[str | bytes]:
        queue, self._queue = self._queue, []
        return queue

    def _fail(self, reason: str) -> None:
        if self.state != "closed":
            self._end(Close(CloseCode.CLUSTER_UNAVAILABLE, reason), None)

    def _from_home(self, message: Message) -> None:
        if self.state not in ("placing", "bridged"):  # the home may answer before its open reply
            return
        kind = message.get("k")
        if kind == "m":
            if not isinstance(message.get("d"), str):
                raise ValueError("a bridged Discord message that is not text")  # counted by the link
            self._out.append(Send(message["d"]))
            self._wake()
        elif kind != "c":
            raise ValueError(f"unknown kind {kind!r}")
        else:  # the home closed it: that code, that reason
            code, reason = message.get("code"), message.get("reason")
            if not isinstance(code, int) or not 4000 <= code <= 4999:
                code = CloseCode.VOICE_SERVER_CRASHED
            self._end(Close(code, str(reason or "")), None)

    def _home_gone(self) -> None:
        """The home's node is gone (no heartbeat within the TTL): close resumably, so the client
        comes back, its RESUME finds no session (4006) and its new IDENTIFY is placed on a live node."""
        if self.state == "bridged":
            self.link = None
            self._end(
                Close(CloseCode.VOICE_SERVER_CRASHED, "the voice server of this server went away"), None
            )

    def _end(self, close: Close, tell: Message | None) -> None:
        self._unlink(tell)
        self.state = "closed"
        self._out.append(close)
        self.local.transport_closed(asyncio.get_running_loop().time())
        self._wake()

    def _unlink(self, message: Message | None) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.end(message)


class DiscordCloses:
    """`fastsfu.v1.discord.close`: any node closes its sessions of a user (in a server) with 4014,
    4015 or 4022, wherever the user's socket is (an operator's kick or move across the cluster)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.closed = 0

    def __call__(self, data: object) -> None:
        # A bad request raises ValueError: the bus counts it (fastsfu_cluster_bus_dropped_total).
        if not isinstance(data, dict) or data.get("v") != VERSION:
            raise ValueError("not a v1 discord close request")
        user, server, code = data.get("user_id"), data.get("server_id"), data.get("code")
        if not isinstance(user, str) or code not in CLOSE_CODES or not isinstance(server, str | None):
            raise ValueError("bad user, server or close code in a discord close request")
        reason = str(data.get("reason") or "")[:100]
        for session in list(self.gateway.sessions.values()):
            if session.user_id == user and server in (None, session.server_id) and session.state != "ended":
                session.close(int(code), reason)
                self.closed += 1


def hosted_factory(gateway: Gateway) -> Callable[[Message, Wake], HostedConnection]:
    return lambda request, wake: HostedConnection(gateway, request, wake)


def connection_factory(
    gateway: Gateway, voice: DiscordVoice, edge: Edge
) -> Callable[[int | None, float], RoutedConnection]:
    return lambda version, now: RoutedConnection(gateway, voice, edge, version, now)
