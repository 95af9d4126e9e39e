"""The pipes between this node and another node serving the same room (docs/cluster.md#spill):
one pipe transport in each direction per pair of nodes and room, each producer once on it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastsfu.rooms import RemoteMember
from fastsfu.transport import TransportError

if TYPE_CHECKING:
    from fastsfu.cluster.room_messages import PipeRequest
    from fastsfu.consumer import Consumer
    from fastsfu.pipe_transport import PipeTransport
    from fastsfu.rooms import Room

log = logging.getLogger(__name__)


class PipeCounts:
    """Pipes open and the RTP packets they carried, closed pipes included (for the metrics)."""

    def __init__(self) -> None:
        self.open: dict[str, PipeTransport] = {}
        self._last: dict[str, int] = {}  # packets of each open pipe at its last reading
        self._closed_packets = 0

    def track(self, pipe: PipeTransport) -> None:
        self.open[pipe.id] = pipe
        self._last[pipe.id] = 0

        def closed() -> None:
            self.open.pop(pipe.id, None)
            self._closed_packets += self._last.pop(pipe.id, 0)

        pipe.observer.once("close", closed)

    def packets(self) -> int:
        """Sent and received over all pipes so far (a closed pipe counts as at its last reading,
        taken at least every heartbeat)."""
        for pipe_id, pipe in list(self.open.items()):
            for stats in pipe.get_stats():
                self._last[pipe_id] = stats["rtpPacketsReceived"] + stats["rtpPacketsSent"]
        return self._closed_packets + sum(self._last.values())


@dataclass
class Peer:
    """Another node serving a room: the members it announced, those presented here, and the two
    pipes (its producers come in on `inbound`, ours go out on `outbound`)."""

    node: str
    created: float = field(default_factory=time.monotonic)
    heard: float = field(default_factory=time.monotonic)  # its last word on the room (registry clock)
    announced: dict[int, str] = field(default_factory=dict)  # user -> producer id, as it says
    # user -> (producer paused, speaking flags its client reported or None), as it says
    media: dict[int, tuple[bool, int | None]] = field(default_factory=dict)
    remote: dict[int, RemoteMember] = field(default_factory=dict)
    inbound: PipeTransport | None = None
    inbound_connected: bool = False
    outbound: PipeTransport | None = None
    outbound_to: tuple[str, int] | None = None
    sent: dict[str, Consumer] = field(default_factory=dict)  # our producers on `outbound`
    pulling: bool = False  # a pipe request to it is in flight
    dirty: bool = False  # it announced members we do not present yet

    def close_pipes(self) -> None:
        for pipe in (self.inbound, self.outbound):
            if pipe is not None:
                pipe.close()  # its producers and consumers close with it
        self.inbound = self.outbound = None
        self.inbound_connected = False
        self.outbound_to = None
        self.sent.clear()


def serve_pipe_request(
    room: Room, peer: Peer, request: PipeRequest, listen_ip: str, counts: PipeCounts
) -> tuple[PipeTransport, dict[str, dict[str, object]]]:
    """Our end of the pipe towards `peer` (made and connected to the asker's end when new or
    when the asker's end moved) and a pipe consumer of each asked producer of a local member,
    each at most once: their rtp_parameters by producer id. TransportError if the pipe fails."""
    outbound = peer.outbound
    if outbound is None or outbound.closed or peer.outbound_to != (request.ip, request.port):
        if outbound is not None:
            outbound.close()
        peer.sent.clear()
        outbound = room.router.create_pipe_transport(
            listen_ip, enable_srtp=request.srtp is not None, app_data={"pipe": "out", "peer": peer.node}
        )
        counts.track(outbound)
        try:
            outbound.connect(request.ip, request.port, request.srtp)  # type: ignore[arg-type]
        except Exception:
            outbound.close()
            raise
        peer.outbound, peer.outbound_to = outbound, (request.ip, request.port)
    local = {m.producer.id: m.producer for m in room.local_members() if m.producer is not None}
    answer: dict[str, dict[str, object]] = {}
    for producer_id in request.producers:
        if producer_id not in local:  # gone, or not of a member here: never relayed further
            continue
        consumer = peer.sent.get(producer_id)
        if consumer is None or consumer.closed:
            try:
                consumer = outbound.consume(producer_id)
            except TransportError as exc:
                log.info("pipe to %s: cannot send producer %s: %s", peer.node, producer_id, exc)
                continue
            peer.sent[producer_id] = consumer
            consumer.observer.once("close", lambda pid=producer_id: peer.sent.pop(pid, None))
        answer[producer_id] = dict(consumer.rtp_parameters)
    return outbound, answer
