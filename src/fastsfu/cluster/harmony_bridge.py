"""Harmony sessions over the bridge (docs/cluster.md#bridging): the edge places the room at the
stream's Initialize and runs the session here or relays its frames to the home, where a
`VoiceSession` runs, so ICE candidates name the home's media port."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastsfu._proto.protocol.voice.v1 import voice_pb2
from fastsfu.cluster.bridge import BridgeLink, Edge, Message, NodeFullError, Wake, b64, unb64
from fastsfu.cluster.bus import BusError
from fastsfu.cluster.placement import VERSION
from fastsfu.cluster.registry import RoomFullError
from fastsfu.harmony.session import VoiceError, VoiceRooms, VoiceSession, parse_request
from fastsfu.rooms import RoomFullError as RoomFull

log = logging.getLogger(__name__)

Resp = voice_pb2.StreamMessageResponse
UNAVAILABLE = "fastsfu.voice-cluster-unavailable"  # the bus cannot place or bridge: join elsewhere/later


def error_message(error: VoiceError) -> Message:
    return {
        "v": VERSION,
        "k": "e",
        "id": error.identifier,
        "msg": error.human_message,
        "det": b64(error.details),
    }


def _response(message: Any) -> Message:
    return {"v": VERSION, "k": "m", "d": b64(message.SerializeToString())}


class HostedVoice:
    """The home's `Hosted` for a bridged Harmony stream: a local VoiceSession."""

    def __init__(self, rooms: VoiceRooms, request: Message, wake: Wake) -> None:
        self.session = VoiceSession(
            rooms, int(request["user"]), str(request.get("frontend", "")), str(request.get("remote", ""))
        )
        rooms.open_sessions.add(self.session)
        self.session.on_output = wake
        self.out: list[Message] = []
        self.over = False

    def feed(self, message: Message) -> None:
        if self.over:
            return
        if message.get("k") == "x":  # the stream ended at the edge
            self.session.end_reason = str(message.get("why", "")) or self.session.end_reason
            self.over = True
        elif message.get("k") == "f":
            request = parse_request(unb64(message.get("d")))
            if isinstance(request, VoiceError):  # counted by the bridge: the home's timeout notices
                raise ValueError("a bridged frame that is no StreamMessageRequest")
            try:
                self.session.handle(request)
            except VoiceError as exc:
                self.out.extend(
                    _response(m) for m in self.session.take_outgoing() if not isinstance(m, VoiceError)
                )
                self._fail(exc)

    def _fail(self, error: VoiceError) -> None:
        self.session.end_reason = error.identifier
        self.out.append(error_message(error))
        self.over = True

    def take(self) -> tuple[list[Message], bool]:
        out, self.out = self.out, []
        if self.over:
            return out, True
        for message in self.session.take_outgoing():
            if isinstance(message, VoiceError):
                self._fail(message)
                out.extend(self.out)
                self.out = []
                return out, True
            out.append(_response(message))
        if self.session.state == "closed":
            out.append({"v": VERSION, "k": "c", "left": self.session.left_by_peer})
            self.over = True
        return out, self.over

    def timeout(self) -> float | None:
        return self.session.timeout()

    def expire(self) -> None:
        self._fail(self.session.timed_out())

    def orphaned(self) -> None:
        self.session.close("the edge of this session went away")

    def dispose(self) -> None:
        self.session.on_output = None
        self.session.close()


class RoutedSession(VoiceSession):
    """The edge's side, in place of a VoiceSession for the front-ends: at Initialize it asks the
    registry for the room's home, then runs the session here or bridges it there."""

    def __init__(self, rooms: VoiceRooms, user_id: int, frontend: str, remote: str, edge: Edge) -> None:
        super().__init__(rooms, user_id, frontend, remote)
        self.edge = edge
        self.inner: VoiceSession | None = None  # the session, when the room is homed here
        self.link: BridgeLink | None = None  # the bridge, when it is homed elsewhere
        self._task: asyncio.Task[None] | None = None

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
        if self.link is not None:
            self.link.send({"k": "f", "d": b64(request.SerializeToString())})
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
        fields = {
            "user": self.user_id,
            "frontend": self.frontend,
            "remote": self.remote,
            "room": key,
            "frames": [{"k": "f", "d": b64(first.SerializeToString())}],
        }
        refused: set[str] = set()  # nodes that have the room at their cap (docs/cluster.md#spill)
        try:
            while True:
                registry, node = await self.edge.serving(key, refused)
                if self.state == "closed":
                    return
                if node == registry.node:
                    if not self.edge.admit(key):
                        refused.add(node)
                        continue
                    self.edge.counts["harmony", "here"] += 1
                    self._run_here(first)  # in the same step as the check: it holds the room
                    return
                try:
                    link = await self.edge.link(
                        registry, node, "harmony", fields, self._from_home, self._home_gone
                    )
                    break
                except NodeFullError:
                    refused.add(node)
        except RoomFullError as exc:
            log.info("user %d: room %s: %s", self.user_id, key, exc)
            self._error(VoiceError.of(RoomFull()))
            return
        except (BusError, ValueError) as exc:
            log.info("user %d: cannot place room %s: %s", self.user_id, key, exc)
            self._error(VoiceError(UNAVAILABLE, "the voice cluster cannot place this channel now"))
            return
        except Exception:  # a bug: this stream ends with an error, the others go on
            log.exception("user %d: placing room %s failed", self.user_id, key)
            self._error(VoiceError(UNAVAILABLE, "the voice cluster cannot place this channel now"))
            return
        if self.state == "closed":  # the stream ended while the home was accepting it
            link.end({"k": "x", "why": self.end_reason})
            return
        self.link = link
        self.state = "bridged"
        self.edge.counts["harmony", "bridged"] += 1

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

    def _from_home(self, data: Message) -> None:
        """One message of the home; ValueError for one that does not decode (the link counts it)."""
        if self.state == "closed":
            return
        kind = data.get("k")
        if kind == "m":
            raw = unb64(data.get("d"))
            try:
                response = Resp.FromString(raw)
            except Exception:  # protobuf's DecodeError (and RecursionError on deep nesting)
                raise ValueError("a bridged frame that is no StreamMessageResponse") from None
            self.outbox.append(response)
        elif kind == "e":
            ident, text = data.get("id"), data.get("msg")
            if not isinstance(ident, str) or not isinstance(text, str):
                raise ValueError("bad error identifier or message")
            self.outbox.append(VoiceError(ident, text, unb64(data.get("det", ""))))
        elif kind == "c":
            self.left_by_peer = data.get("left") is True
            self._closed_here()  # the home ended it: nothing to tell it back
            return
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if self.on_output is not None:
            self.on_output()

    def _home_gone(self) -> None:
        """The home's node is gone: a clear error (the client may rejoin and be placed on a live node)."""
        if self.state == "bridged":
            self._unlink(None)
            self._error(VoiceError(UNAVAILABLE, "the voice server of this channel went away"))

    def _error(self, error: VoiceError) -> None:
        self.outbox.append(error)
        if self.on_output is not None:
            self.on_output()

    def _unlink(self, message: Message | None) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.end(message)

    def _closed_here(self) -> None:
        self.state = "closed"
        self.rooms.open_sessions.discard(self)
        self._unlink(None)
        if self.on_output is not None:
            self.on_output()

    def close(self, reason: str = "") -> None:
        if self.state == "closed":
            return
        if self.inner is not None:
            self.inner.end_reason = self.end_reason
            self.inner.on_output = None
            self.inner.close(reason)
        else:
            self._unlink({"k": "x", "why": reason or self.end_reason})
        self._closed_here()
