"""PipeTransport: joins two routers (of one process or of two nodes) as mediasoup's does.

A pipe consumer forwards its producer's stream unchanged, and the far side produces it with the
same id and parameters (docs/transports.md, "PipeTransport").
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, TypedDict

from fastsfu import rtp
from fastsfu.consumer import Consumer
from fastsfu.plain_transport import PlainTransport
from fastsfu.transport import TransportError
from fastsfu.types import RtpParameters, SrtpParameters

if TYPE_CHECKING:
    from fastsfu.engine import UdpSocket
    from fastsfu.producer import Producer
    from fastsfu.router import Router

PIPE_SRTP_SUITE = "AEAD_AES_128_GCM"


def pipe_rtp_parameters(producer: Producer) -> RtpParameters:
    """The producer's parameters as they cross a pipe: its codec, SSRC and the extension IDs the
    datapath forwards, without MID (a receiver's own, RFC 8843 §15) and without RTX/FEC codecs."""
    src = producer.rtp_parameters
    info = producer.info
    forwarded = {uri for uri, kind in rtp.EXTENSION_KINDS.items() if kind != rtp.KIND_MID}
    params: RtpParameters = {
        "codecs": [copy.deepcopy(c) for c in src["codecs"] if c["payloadType"] == info.payload_type],
        "headerExtensions": [
            copy.deepcopy(e) for e in src.get("headerExtensions", []) if e["uri"] in forwarded
        ],
        "encodings": [{"ssrc": info.ssrc}],
        "rtcp": {"reducedSize": True},
    }
    if info.cname:
        params["rtcp"]["cname"] = info.cname
    return params


class PipeTransport(PlainTransport):
    """A PlainTransport between routers: no comedia, SRTP (AEAD_AES_128_GCM) or plain RTP, and
    `consume(producer_id)` needs no capabilities since the far router receives the stream as is."""

    STATS_TYPE = "pipe-transport"

    def __init__(
        self,
        router: Router,
        socket: UdpSocket,
        enable_srtp: bool,
        app_data: dict[str, Any] | None,
    ) -> None:
        super().__init__(router, socket, False, enable_srtp, PIPE_SRTP_SUITE, app_data)

    def connect(
        self,
        ip: str | None = None,
        port: int | None = None,
        srtp_parameters: SrtpParameters | None = None,
    ) -> None:
        """The other pipe's address and (with SRTP) its srtp_parameters."""
        if isinstance(srtp_parameters, dict) and srtp_parameters.get("cryptoSuite") != PIPE_SRTP_SUITE:
            raise TransportError(f"a pipe's SRTP suite is {PIPE_SRTP_SUITE}")
        super().connect(ip, port, srtp_parameters)

    def consume(  # type: ignore[override]  # mediasoup's PipeTransport.consume takes no capabilities
        self,
        producer_id: str,
        paused: bool = False,
        app_data: dict[str, Any] | None = None,
    ) -> Consumer:
        """Forward a producer of this router unchanged (SSRC, PT, extension IDs, seq, ts).

        The consumer's rtp_parameters are what the far side passes to `produce(id=producer_id)`.
        """
        self._check_open()
        producer = self.router.producers.get(producer_id)
        if producer is None:
            raise TransportError(f"no producer with id {producer_id!r} in this router")
        if producer.ssrc in self._consumer_ssrcs:
            # Two streams with one SSRC cannot share the pipe (the far side demultiplexes by SSRC).
            raise TransportError(f"ssrc {producer.ssrc} is already sent on this pipe")
        self._listener.on_transport_will_consume()
        params = pipe_rtp_parameters(producer)
        ext_ids = {rtp.EXTENSION_KINDS[e["uri"]]: e["id"] for e in params["headerExtensions"]}
        return self._attach_consumer(producer, params, ext_ids, paused, app_data, passthrough=True)


class PipeToRouterResult(TypedDict):
    pipeConsumer: Consumer
    pipeProducer: Producer


def pipe_pair(
    src: Router, dst: Router, listen_ip: str, enable_srtp: bool
) -> tuple[PipeTransport, PipeTransport]:
    """Two pipe transports, one per router, connected to each other (mediasoup keeps one pair
    per pair of routers and reuses it; so do we, while both ends are open)."""
    cached = src._pipes.get((dst.id, enable_srtp))
    if cached is not None and not cached[0].closed and not cached[1].closed:
        return cached
    local = src.create_pipe_transport(listen_ip, enable_srtp=enable_srtp)
    try:
        remote = dst.create_pipe_transport(listen_ip, enable_srtp=enable_srtp)
    except BaseException:
        local.close()
        raise
    try:
        local.connect(remote.tuple["localIp"], remote.tuple["localPort"], remote.srtp_parameters)
        remote.connect(local.tuple["localIp"], local.tuple["localPort"], local.srtp_parameters)
    except BaseException:
        local.close()
        remote.close()
        raise
    src._pipes[(dst.id, enable_srtp)] = (local, remote)
    dst._pipes[(src.id, enable_srtp)] = (remote, local)
    return local, remote


def pipe_to_router(
    src: Router, producer_id: str, dst: Router, listen_ip: str, enable_srtp: bool
) -> PipeToRouterResult:
    """mediasoup's `router.pipeToRouter`: the producer appears in dst with the same id.

    The two ends follow each other: closing either closes the other, and the far producer
    pauses and resumes with the source producer (the pipe consumer forwards nothing meanwhile).
    """
    if dst is src:
        raise TransportError("cannot pipe a producer to its own router")
    producer = src.producers.get(producer_id)
    if producer is None:
        raise TransportError(f"no producer with id {producer_id!r} in this router")
    if producer_id in dst.producers:
        raise TransportError(f"router {dst.id} already has a producer with id {producer_id!r}")
    local, remote = pipe_pair(src, dst, listen_ip, enable_srtp)
    consumer = local.consume(producer_id)
    try:
        far = remote.produce(
            consumer.rtp_parameters,
            kind=producer.kind,
            paused=consumer.producer_paused,
            app_data=dict(producer.app_data),
            id=producer_id,
        )
    except BaseException:
        consumer.close()
        raise
    consumer.observer.on("close", far.close)
    far.observer.on("close", consumer.close)
    consumer.on("producerpause", far.pause)
    consumer.on("producerresume", far.resume)
    return {"pipeConsumer": consumer, "pipeProducer": far}
