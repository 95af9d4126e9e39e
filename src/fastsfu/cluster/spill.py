"""A room served by several nodes (docs/cluster.md#spill): a node takes a room's new members up to
its cap; the nodes serving a room tell each other their members on the room's subject, pull each
other's producers through pipes (a full mesh: each producer crosses each pipe once), and present
the other nodes' members to their own as RemoteMembers, so member events look like local ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastsfu.cluster.bus import Bus, BusError
from fastsfu.cluster.pipes import Peer, PipeCounts, serve_pipe_request
from fastsfu.cluster.placement import VERSION, NodeLoad, room_subject_key
from fastsfu.cluster.registry import NODE_TTL, Registry
from fastsfu.cluster.room_messages import (
    MAX_FLAGS,
    Media,
    MessageError,
    PipeRequest,
    RoomEvent,
    parse_pipe_reply,
    parse_pipe_request,
    parse_room_event,
    pipe_subject,
    room_subject,
)
from fastsfu.rooms import CREATE_ERRORS, RemoteMember, Room, RoomError, RoomMember, Rooms
from fastsfu.transport import TransportError

log = logging.getLogger(__name__)

PIPE_TIMEOUT = 2.0  # seconds for a node to answer a pipe request
# Seconds after a node's last word on a room from which its heartbeats must list the room: one that
# no longer does stopped serving it and its bye was lost (e.g. sent while NATS was down).
BYE_GRACE = 3.0


@dataclass
class Link:
    """A room served here, as the cluster sees it: the other nodes serving it."""

    key: str
    room: Room
    peers: dict[str, Peer] = field(default_factory=dict)
    sub: Any = None
    closed: bool = False
    watched: set[str] = field(default_factory=set)  # local producers whose pause we relay


class Spill:
    """This node's side of every room it serves with other nodes (a RoomsListener of its rooms)."""

    def __init__(self, rooms: Rooms, registry: Registry, cap: int, ip: str, listen_ip: str) -> None:
        self.rooms = rooms
        self.registry = registry
        self.bus = registry.bus
        self.node = registry.node
        self.cap = cap  # members (and joining sessions) per room on this node; 0: no cap
        self.ip = ip  # announced to the other end of a pipe (plain RTP to the same IP, else SRTP)
        self.listen_ip = listen_ip
        self.links: dict[str, Link] = {}
        self.pipes = PipeCounts()
        self._outbox: asyncio.Queue[tuple[str, dict[str, object]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.bus.nc.subscribe(pipe_subject(self.node), cb=self._on_pipe_request)
        self._spawn(self._send_loop())
        self.rooms.listener = self
        for room in self.rooms:
            room.listener = self
            self.room_opened(room)

    # ------------------------------------------------------------------ admission (the cap)

    def admit(self, key: str) -> bool:
        """Whether this node takes one more session of room `key` (a rooms-bucket key): False when
        the room is at this node's cap (the edge then tries the room's next node)."""
        link = self.links.get(key)
        return self.cap <= 0 or link is None or link.room.local_load() < self.cap

    # ------------------------------------------------------------------ RoomsListener

    def room_opened(self, room: Room) -> None:
        link = self.links[room_subject_key(room.key)] = Link(room_subject_key(room.key), room)
        self._spawn(self._open(link))

    def room_closed(self, room: Room) -> None:
        link = self.links.get(room_subject_key(room.key))
        if link is None or link.room is not room:
            return
        del self.links[link.key]
        link.closed = True
        for peer in link.peers.values():
            peer.close_pipes()  # closed with the router already: forget them
        link.peers.clear()
        self._publish(link.key, RoomEvent("bye", self.node))
        if link.sub is not None:
            self._spawn(_unsubscribe(link.sub))

    def member_added(self, room: Room, member: RoomMember) -> None:
        if member.producer is not None:
            link = self.links.get(room_subject_key(room.key))
            if link is not None and link.room is room:
                self._watch(link, member)
            self._publish(
                room_subject_key(room.key),
                RoomEvent(
                    "join",
                    self.node,
                    ((member.user_id, member.producer.id),),
                    media=_media(room, (member,)),
                ),
            )

    def member_reported(self, room: Room, member: RoomMember) -> None:
        """Its client's speaking changed: the other nodes tell their members (Discord op 5)."""
        link = self.links.get(room_subject_key(room.key))
        if link is not None and link.room is room and member.producer is not None:
            self._publish_media(link, member)

    def _publish_media(self, link: Link, member: RoomMember) -> None:
        # Only to a room shared with another node (one that starts serving it later is answered
        # with a state, which carries this too): a Discord client's every talk spurt calls this.
        if link.peers and not link.closed:
            self._publish(link.key, RoomEvent("media", self.node, media=(_entry(link.room, member),)))

    def _watch(self, link: Link, member: RoomMember) -> None:
        """Relay the pauses and resumes of a local member's producer: on the other nodes its piped
        producer pauses and resumes with it, as mediasoup's pipe consumer makes the far producer
        do, so their consumers follow it as local ones (and resume without a sequence gap)."""
        producer = member.producer
        if producer is None or producer.closed or producer.id in link.watched:
            return
        link.watched.add(producer.id)

        def changed() -> None:
            if link.room.members.get(member.user_id) is member:
                self._publish_media(link, member)

        producer.observer.on("pause", changed)
        producer.observer.on("resume", changed)
        producer.observer.once("close", lambda: link.watched.discard(producer.id))

    def member_removed(self, room: Room, member: RoomMember) -> None:
        self._publish(room_subject_key(room.key), RoomEvent("leave", self.node, user=member.user_id))

    # ------------------------------------------------------------------ the room's subject

    async def _open(self, link: Link) -> None:
        async def on_message(msg: Any) -> None:
            self._on_room_message(link, msg)

        try:
            sub = await self.bus.call(self.bus.nc.subscribe(room_subject(link.key), cb=on_message))
            await self.bus.flush(2)
        except BusError as exc:
            log.info("room %s: cannot follow its other nodes: %s", link.key, exc)
            return
        if link.closed:
            await _unsubscribe(sub)
            return
        link.sub = sub
        self._publish(link.key, self._state(link, hello=True))

    def _state(self, link: Link, hello: bool = False) -> RoomEvent:
        local = [m for m in link.room.local_members() if m.producer is not None]
        for member in local:
            self._watch(link, member)  # a producer made after the join (a Discord browser's)
        members = tuple((m.user_id, m.producer.id) for m in local if m.producer is not None)
        return RoomEvent("state", self.node, members, hello=hello, media=_media(link.room, local))

    def _on_room_message(self, link: Link, msg: Any) -> None:
        try:
            event = parse_room_event(msg.data)
        except MessageError as exc:  # counted by kind: fastsfu_cluster_bus_dropped_total{subject_kind}
            self.bus.drop("room", exc)
            return
        if event.node == self.node or link.closed:
            return
        if event.kind == "bye":
            self._drop_peer(link, event.node)
            return
        peer = link.peers.get(event.node)
        if peer is None:
            peer = link.peers[event.node] = Peer(event.node)
        peer.heard = self.registry.clock()
        if event.kind == "state":
            peer.announced = dict(event.members)
            peer.media = {}
            if event.hello:
                self._publish(link.key, self._state(link))
        elif event.kind == "join":
            peer.announced.update(event.members)
            for user, _ in event.members:
                peer.media.pop(user, None)
        elif event.kind == "leave":
            peer.announced.pop(event.user, None)
            peer.media.pop(event.user, None)
        # Only for members it announced: a state replaces them all, a leave takes its member's.
        peer.media.update((u, (p, s)) for u, p, s in event.media if u in peer.announced)
        self._reconcile(link, peer)

    def _reconcile(self, link: Link, peer: Peer) -> None:
        """Present what `peer` announced: members it no longer has (or has with another producer)
        leave, the ones we lack are pulled through the pipe."""
        for user, member in list(peer.remote.items()):
            producer = member.producer
            if peer.announced.get(user) != (producer.id if producer else None) or (
                producer and producer.closed
            ):
                self._drop_remote(link, peer, user)
        for user, member in peer.remote.items():
            self._follow(link, member, *peer.media.get(user, (False, None)))
        if any(u not in peer.remote for u in peer.announced):
            peer.dirty = True
            if not peer.pulling:
                peer.pulling = True
                self._spawn(self._pull(link, peer))

    @staticmethod
    def _follow(link: Link, member: RemoteMember, paused: bool, flags: int | None) -> None:
        """A remote member's producer paused or resumed on its node, its client's speaking: the
        piped producer pauses or resumes (its consumers here follow it: "producerpause"), the
        members here hear of the speaking as of a local member's."""
        producer = member.producer
        if producer is not None and paused:
            producer.pause()  # both idempotent
        elif producer is not None:
            producer.resume()
        if flags is not None:
            link.room.remote_speaking(member, flags)

    def _drop_remote(self, link: Link, peer: Peer, user: int) -> None:
        """A remote member leaves: out of the room, its piped producer closed (and with it our
        members' consumers of it), then UserLeft to our members, once."""
        member = peer.remote.pop(user)
        was_member = link.room.remove(member)
        if member.producer is not None:
            member.producer.close()
        if was_member:
            link.room.announce_left(user)

    def _drop_peer(self, link: Link, node: str) -> None:
        peer = link.peers.pop(node, None)
        if peer is None:
            return
        for user in list(peer.remote):
            self._drop_remote(link, peer, user)
        peer.close_pipes()

    # ------------------------------------------------------------------ pulling producers

    async def _pull(self, link: Link, peer: Peer) -> None:
        try:
            while peer.dirty and not link.closed and link.peers.get(peer.node) is peer:
                peer.dirty = False
                locals_ = {m.user_id for m in link.room.local_members()}
                wanted = {
                    u: p for u, p in peer.announced.items() if u not in peer.remote and u not in locals_
                }
                if not wanted:
                    continue
                await self._pull_once(link, peer, wanted)
        finally:
            peer.pulling = False

    async def _pull_once(self, link: Link, peer: Peer, wanted: dict[int, str]) -> None:
        router = link.room.router
        inbound = peer.inbound
        if inbound is None or inbound.closed:
            # Plain RTP between workers of one host; SRTP (AEAD_AES_128_GCM) to another address.
            srtp = self._peer_ip(peer.node) != self.ip
            inbound = router.create_pipe_transport(
                self.listen_ip, enable_srtp=srtp, app_data={"pipe": "in", "peer": peer.node}
            )
            self.pipes.track(inbound)
            peer.inbound, peer.inbound_connected = inbound, False
        request = PipeRequest(
            link.key,
            self.node,
            self.ip,
            inbound.tuple["localPort"],
            dict(inbound.srtp_parameters or {}) or None,
            tuple(wanted.values()),
        )
        try:
            answer = await self.bus.call(
                self.bus.nc.request(
                    pipe_subject(peer.node), self.bus.encode(request.to_json()), timeout=PIPE_TIMEOUT
                )
            )
            reply = parse_pipe_reply(answer.data)
        except (BusError, MessageError) as exc:  # retried at its next state (every heartbeat)
            log.info("room %s: no pipe from %s yet: %s", link.key, peer.node, exc)
            return
        if link.closed or link.peers.get(peer.node) is not peer or inbound.closed:
            return
        try:
            if not peer.inbound_connected:
                inbound.connect(reply.ip, reply.port, reply.srtp)  # type: ignore[arg-type]
                peer.inbound_connected = True
        except (TransportError, ValueError) as exc:
            log.info("room %s: pipe from %s: %s", link.key, peer.node, exc)
            inbound.close()
            return
        for user, producer_id in wanted.items():
            rtp = reply.consumers.get(producer_id)
            if rtp is None or peer.announced.get(user) != producer_id or user in link.room.members:
                continue
            self._present(link, peer, user, producer_id, rtp)

    def _present(self, link: Link, peer: Peer, user: int, producer_id: str, rtp: dict[str, Any]) -> None:
        """The piped producer here with the same id, and the member announced to ours: UserJoined."""
        assert peer.inbound is not None
        paused, flags = peer.media.get(user, (False, None))
        try:
            producer = peer.inbound.produce(rtp, paused=paused, id=producer_id)  # type: ignore[arg-type]
        except (*CREATE_ERRORS, ValueError, KeyError, TypeError) as exc:
            log.info("room %s: cannot present user %d of %s: %s", link.key, user, peer.node, exc)
            return
        member = RemoteMember(user, producer, peer.node, flags)
        try:
            link.room.announce_joined(member, link.room.local_members())
        except RoomError as exc:
            log.info("room %s: our members cannot consume user %d: %s", link.key, user, exc)
            producer.close()
            return
        link.room.add(member)
        peer.remote[user] = member
        if flags:  # its client speaks now (fastsfu_speaking_members, the demo page)
            link.room.speaking_users.add(user)

    # ------------------------------------------------------------------ answering pipe requests

    async def _on_pipe_request(self, msg: Any) -> None:
        try:
            request = parse_pipe_request(msg.data)
        except MessageError as exc:
            self.bus.drop("pipe", exc)
            await _respond(msg, {"v": VERSION, "ok": False, "why": str(exc)})
            return
        link = self.links.get(request.room)
        if link is None or link.closed or request.node == self.node:
            await _respond(msg, {"v": VERSION, "ok": False, "why": "room not served here"})
            return
        peer = link.peers.get(request.node)
        if peer is None:
            peer = link.peers[request.node] = Peer(request.node)
        peer.heard = self.registry.clock()
        try:
            outbound, consumers = serve_pipe_request(link.room, peer, request, self.listen_ip, self.pipes)
        except (TransportError, ValueError, RuntimeError) as exc:
            await _respond(msg, {"v": VERSION, "ok": False, "why": f"pipe: {exc}"})
            return
        srtp = outbound.srtp_parameters
        reply = {
            "v": VERSION,
            "ok": True,
            "ip": self.ip,
            "port": outbound.tuple["localPort"],
            "srtp": dict(srtp) if srtp is not None else None,
            "consumers": consumers,
        }
        await _respond(msg, reply)  # holds the SRTP key: never logged

    # ------------------------------------------------------------------ every heartbeat

    def tick(self) -> None:
        """Drop peers whose node is gone (no heartbeat within the TTL) or no longer serves the room
        (its heartbeats stopped listing it, its bye lost): their members leave once and their pipes
        close. Tell the other nodes of each shared room our members again (a lost message is
        repaired within a heartbeat), and read the pipes' packet counts."""
        nodes = self.registry.nodes()
        now = time.monotonic()
        for link in list(self.links.values()):
            for peer in list(link.peers.values()):
                if peer.node not in nodes and now - peer.created > NODE_TTL:
                    log.info("room %s: node %s is gone: its members leave", link.key, peer.node)
                    self._drop_peer(link, peer.node)
                elif self._unlisted(link, peer, nodes):
                    log.info("room %s: node %s no longer serves it: its members leave", link.key, peer.node)
                    self._drop_peer(link, peer.node)
            shared = link.peers or any(
                link.key in load.served for node, load in nodes.items() if node != self.node
            )
            if shared and link.sub is not None:
                self._publish(link.key, self._state(link))
            for peer in list(link.peers.values()):
                self._reconcile(link, peer)
        self.pipes.packets()

    def _unlisted(self, link: Link, peer: Peer, nodes: dict[str, NodeLoad]) -> bool:
        """Whether a heartbeat of `peer`'s live node, heard BYE_GRACE after its last word on the
        room, does not list the room (one node's messages arrive in order, so a room it opened
        again is listed in every heartbeat heard after its hello)."""
        load, heard = nodes.get(peer.node), self.registry.heard_at(peer.node)
        return (
            load is not None
            and heard is not None
            and heard > peer.heard + BYE_GRACE
            and link.key not in load.served
        )

    def _peer_ip(self, node: str) -> str:
        load = self.registry.nodes().get(node)
        return load.media.rsplit(":", 1)[0] if load is not None and load.media else ""

    def remote_members(self) -> int:
        return sum(len(p.remote) for link in self.links.values() for p in link.peers.values())

    def pipe_producers(self) -> int:
        return sum(len(p.producers) for p in self.pipes.open.values())

    def pipe_consumers(self) -> int:
        return sum(len(p.consumers) for p in self.pipes.open.values())

    # ------------------------------------------------------------------ sending, in order

    def _publish(self, key: str, event: RoomEvent) -> None:
        self._outbox.put_nowait((room_subject(key), event.to_json()))

    async def _send_loop(self) -> None:
        """One sender, so that a node's messages on a room's subject arrive in the order made."""
        while True:
            subject, message = await self._outbox.get()
            try:
                await self.bus.publish(subject, message)
            except BusError as exc:  # repaired by the next state
                log.debug("room message not sent: %s", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("spill task failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _entry(room: Room, member: RoomMember) -> Media:
    """A local member's media state for the other nodes (docs/cluster.md#remote-members)."""
    paused = member.producer is not None and member.producer.paused
    flags = room.reported.get(member.user_id)
    return member.user_id, paused, None if flags is None else min(max(flags, 0), MAX_FLAGS)


def _media(room: Room, members: Iterable[RoomMember]) -> tuple[Media, ...]:
    """The entries of `members` not in the default state (not paused, speaking measured)."""
    entries = (_entry(room, m) for m in members)
    return tuple(e for e in entries if e[1] or e[2] is not None)


async def _respond(msg: Any, message: dict[str, object]) -> None:
    with contextlib.suppress(Exception):  # the asker gave up (timed out): nothing to answer
        await msg.respond(Bus.encode(message))


async def _unsubscribe(sub: Any) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
