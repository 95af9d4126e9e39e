"""Transport base: produce/consume, SRTP streams, RTCP reports and the close cascade.

Concrete transports (PlainTransport now, WebRtcTransport later) decide how the 5-tuple and the
SRTP keys are learned; everything they share lives here.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from fastsfu import ortc, rtp
from fastsfu.consumer import Consumer
from fastsfu.events import EventEmitter
from fastsfu.producer import Producer
from fastsfu.rtcp_clock import RtcpEntry
from fastsfu.srtp import SrtpContext
from fastsfu.table_hold import TableHold
from fastsfu.types import RtpCapabilities, RtpCodecParameters, RtpParameters, TransportStats

if TYPE_CHECKING:
    from fastsfu.engine import Engine, UdpSocket
    from fastsfu.router import Router

log = logging.getLogger(__name__)

RTCP_MTU = 1200  # bytes of compound RTCP per datagram (before SRTCP's trailer)
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix), RFC 5905 §6


def ntp_now() -> int:
    """64-bit NTP timestamp of the wall clock (RFC 3550 §4)."""
    return ntp_from(time.time())


def ntp_from(unix: float) -> int:
    """64-bit NTP timestamp of a wall-clock time in Unix seconds (RFC 3550 §4)."""
    t = unix + NTP_EPOCH_OFFSET
    return (int(t) << 32) | int((t % 1) * (1 << 32))


class TransportError(RuntimeError):
    """A control-plane call that does not fit the transport's state."""


class TransportListener(Protocol):
    """A transport's upward calls, to its router (as mediasoup's Transport::Listener): limits
    before a producer or consumer is made, then its life; nothing else reaches into the router."""

    def on_transport_will_produce(self) -> None: ...  # raises RouterLimitError
    def on_transport_new_producer(self, producer: Producer) -> None: ...
    def on_transport_producer_closed(self, producer: Producer) -> None: ...
    def on_transport_will_consume(self) -> None: ...  # raises RouterLimitError
    def on_transport_new_consumer(self, consumer: Consumer) -> None: ...
    def on_transport_consumer_closed(self, consumer: Consumer) -> None: ...
    def on_transport_closed(self, transport: Transport) -> None: ...


# Validated remote capabilities by their canonical JSON: receivers of one kind (one browser, one
# client library) send equal ones, and sharing the object lets producers key derivations on it.
_CAPS_POOL: dict[str, RtpCapabilities] = {}
_CAPS_POOL_MAX = 256
_TEMPLATES_PER_PRODUCER = 8


def _intern_caps(caps: RtpCapabilities) -> RtpCapabilities:
    key = json.dumps(caps, sort_keys=True)
    shared = _CAPS_POOL.get(key)
    if shared is None:
        if len(_CAPS_POOL) >= _CAPS_POOL_MAX:
            _CAPS_POOL.clear()  # rare (that many kinds of receiver): start over, nothing breaks
        shared = _CAPS_POOL[key] = caps
    return shared


def _consumer_template(
    producer: Producer, router_caps: RtpCapabilities, remote_caps: RtpCapabilities
) -> RtpParameters | None:
    """A consumer's RtpParameters for `producer` and these (validated) remote capabilities with
    no SSRC or mid yet, only with extensions the datapath forwards; None if unconsumable.
    Derived once per producer and kind of receiver: a join into a room of N derives 2N of them
    on the event loop, and each derivation costs more than the rest of a consume."""
    templates = producer.consumer_templates
    entry = templates.get(id(remote_caps))
    if entry is not None and entry[0] is remote_caps:
        return entry[1]
    # The producer's parameters were validated by produce() and the router made its own
    # capabilities: only the remote's needed checking (Transport._validated_caps).
    template = ortc.consumer_rtp_parameters(producer.rtp_parameters, router_caps, remote_caps, 0, None)
    if template is not None:
        template["headerExtensions"] = [
            e for e in template.get("headerExtensions", []) if e["uri"] in rtp.EXTENSION_KINDS
        ]
    if len(templates) >= _TEMPLATES_PER_PRODUCER:
        templates.clear()
    templates[id(remote_caps)] = (remote_caps, template)  # holding the caps keeps the id unique
    return template


def _instantiate(template: RtpParameters, producer: Producer, ssrc: int, mid: str | None) -> RtpParameters:
    """A consumer's own copy of `template` with its SSRC and mid (as ortc.consumer_rtp_parameters
    builds it, key order included: the JSON reads in mediasoup's order)."""
    codecs: list[RtpCodecParameters] = [
        {
            **codec,
            "parameters": dict(codec.get("parameters", {})),
            "rtcpFeedback": [{**fb} for fb in codec.get("rtcpFeedback", [])],
        }
        for codec in template["codecs"]  # Opus, then audio/red for a receiver that takes it
    ]
    params: RtpParameters = {"mid": mid, "codecs": codecs} if mid is not None else {"codecs": codecs}
    params["headerExtensions"] = [{**e, "parameters": {}} for e in template.get("headerExtensions", [])]
    params["encodings"] = [{"ssrc": ssrc}]
    # A producer without a CNAME gets a random one per consumer, as ortc does.
    cname = producer.rtp_parameters.get("rtcp", {}).get("cname") or ortc.random_cname()
    params["rtcp"] = {"cname": cname, "reducedSize": True}
    return params


class Transport(EventEmitter):
    """What every transport has: a socket, a datapath slot, producers and consumers.

    Events: "routerclose". Observer events: "close", "newproducer", "newconsumer".
    """

    STATS_TYPE = "transport"  # mediasoup's stats "type" of the concrete class

    def __init__(self, router: Router, socket: UdpSocket, app_data: dict[str, Any] | None) -> None:
        super().__init__()
        self.id = str(uuid.uuid4())
        self.router = router
        self._listener: TransportListener = router
        self.engine: Engine = router.engine
        self.socket = socket
        self.app_data: dict[str, Any] = app_data if app_data is not None else {}
        self.observer = EventEmitter()
        self.producers: dict[str, Producer] = {}
        self.consumers: dict[str, Consumer] = {}
        self.srtp_in: SrtpContext | None = None
        self.srtp_out: SrtpContext | None = None
        self._closed = False
        self._next_mid = 0
        self.rtcp_ssrc = ortc.random_ssrc()  # sender SSRC of our receiver reports
        self.rtcp_cname = ortc.random_cname()
        self._caps_cache: tuple[RtpCapabilities, RtpCapabilities] | None = None
        self._consumer_ssrcs: set[int] = {self.rtcp_ssrc}  # SSRCs we send: RTCP's and each consumer's
        # RTCP names streams by SSRC: kept up to date so a report costs O(its blocks), not O(consumers).
        self._consumers_by_ssrc: dict[int, Consumer] = {}
        self._producers_by_ssrc: dict[int, Producer] = {}
        self.rtcp_malformed = 0
        self.rtcp_received: collections.Counter[int] = collections.Counter()  # by packet type
        self.slot: int = self.engine.datapath.add_transport(socket.slot, False)
        self.engine.add_transport(self)
        self._rtcp_timer: RtcpEntry | None = None
        self._schedule_rtcp()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ produce / consume

    def produce(
        self,
        rtp_parameters: RtpParameters,
        kind: str = "audio",
        paused: bool = False,
        app_data: dict[str, Any] | None = None,
        id: str | None = None,  # noqa: A002 - mediasoup's option name
    ) -> Producer:
        """Accept an audio stream from the remote side (mediasoup `transport.produce`)."""
        self._check_open()
        if kind != "audio":
            raise ortc.OrtcError("kind must be 'audio': fastsfu is a voice SFU")
        params = ortc.validate_rtp_parameters(rtp_parameters)
        info = ortc.get_producer_rtp_info(params, self.router.rtp_capabilities)
        if any(p.ssrc == info.ssrc for p in self.producers.values()):
            raise ortc.OrtcError(f"rtpParameters.encodings[0].ssrc {info.ssrc} is already in use")
        if id is not None and id in self.router.producers:
            raise TransportError(f"a producer with id {id!r} already exists")
        self._listener.on_transport_will_produce()
        producer = Producer(self, params, info, paused, app_data, id)
        self.producers[producer.id] = producer
        self._producers_by_ssrc[info.ssrc] = producer
        if self.srtp_in is not None:
            with self.engine.datapath.tables_lock:  # the datapath thread may be using this session
                self.srtp_in.add_stream(info.ssrc)
        self._listener.on_transport_new_producer(producer)
        self.observer.emit("newproducer", producer)
        return producer

    def consume(
        self,
        producer_id: str,
        rtp_capabilities: RtpCapabilities,
        paused: bool = False,
        mid: str | None = None,
        app_data: dict[str, Any] | None = None,
        ssrc: int | None = None,
    ) -> Consumer:
        """Forward a producer of this router to this transport's remote (mediasoup `transport.consume`).

        `ssrc` pins the outgoing SSRC (for receivers provisioned with one, such as a gateway);
        by default a random one unique on this transport is chosen.
        """
        self._check_open()
        producer = self.router.producers.get(producer_id)
        if producer is None:
            raise TransportError(f"no producer with id {producer_id!r} in this router")
        remote_caps = self._validated_caps(rtp_capabilities)
        self._listener.on_transport_will_consume()
        if ssrc is None:
            ssrc = self._new_ssrc()
        elif isinstance(ssrc, bool) or not isinstance(ssrc, int) or not 0 < ssrc <= 0xFFFFFFFF:
            raise TransportError("ssrc must be an integer 1..2^32-1")
        elif ssrc in self._consumer_ssrcs:
            raise TransportError(f"ssrc {ssrc} is already used on this transport")
        if mid is None:
            mid = str(self._next_mid)
            self._next_mid += 1
        elif not isinstance(mid, str) or not mid:
            raise TransportError("mid must be a non-empty string")
        template = _consumer_template(producer, self.router.rtp_capabilities, remote_caps)
        if template is None:
            raise ortc.OrtcError("cannot consume: the rtpCapabilities have no codec for this producer")
        params = _instantiate(template, producer, ssrc, mid)
        ext_ids = {rtp.EXTENSION_KINDS[e["uri"]]: e["id"] for e in params["headerExtensions"]}
        return self._attach_consumer(producer, params, ext_ids, paused, app_data)

    def _attach_consumer(
        self,
        producer: Producer,
        params: RtpParameters,
        ext_ids: dict[int, int],
        paused: bool,
        app_data: dict[str, Any] | None,
        passthrough: bool = False,
    ) -> Consumer:
        """Create and register a consumer whose SSRC (in `params`) is free on this transport."""
        ssrc = int(params["encodings"][0]["ssrc"])
        # A session of its own: the datapath protects its packets without walking past the
        # transport's other consumers (benchmarks/README.md, "Where the time goes at 24.5 k").
        stream = self.srtp_out.stream_session(ssrc) if self.srtp_out is not None else None
        consumer = Consumer(self, producer, params, ext_ids, paused, app_data, passthrough, stream)
        self._consumer_ssrcs.add(ssrc)
        self._consumers_by_ssrc[ssrc] = consumer
        self.consumers[consumer.id] = consumer
        producer.consumers[consumer.id] = consumer
        self._listener.on_transport_new_consumer(consumer)
        self.observer.emit("newconsumer", consumer)
        return consumer

    def _validated_caps(self, rtp_capabilities: RtpCapabilities) -> RtpCapabilities:
        """The remote's capabilities, validated; a receiver passes the same ones for every
        consumer, so the last validation is reused while they compare equal (a C-level compare).
        Equal validated capabilities are one shared object (`_intern_caps`), so that consumers of
        a producer for receivers of the same kind share one derivation (`_consumer_template`)."""
        cached = self._caps_cache
        if cached is not None and cached[0] == rtp_capabilities:
            return cached[1]
        validated = _intern_caps(ortc.validate_rtp_capabilities(rtp_capabilities))
        self._caps_cache = (copy.deepcopy(rtp_capabilities), validated)
        return validated

    def _new_ssrc(self) -> int:
        while (ssrc := ortc.random_ssrc()) in self._consumer_ssrcs:
            pass
        return ssrc

    # ------------------------------------------------------------------ SRTP

    def _install_srtp(self, inbound: SrtpContext | None, outbound: SrtpContext | None) -> None:
        """Give the datapath new contexts, with a specific stream for every known SSRC
        (libsrtp then never allocates on a packet, docs/transports.md#srtp): the producers' in
        the inbound session, each consumer's in a session of its own."""
        if inbound is not None:
            for producer in self.producers.values():
                inbound.add_stream(producer.ssrc)
        dp = self.engine.datapath
        streams = [
            (c, outbound.stream_session(c.ssrc) if outbound is not None else None)
            for c in self.consumers.values()
        ]
        with dp.tables_lock:  # consumers and transport switch together
            for consumer, stream in streams:
                dp.set_consumer_srtp(consumer.slot, stream)
            dp.set_transport_srtp(self.slot, inbound, outbound)
        self.srtp_in, self.srtp_out = inbound, outbound

    # ------------------------------------------------------------------ ProducerListener, ConsumerListener

    def on_producer_closed(self, producer: Producer) -> None:
        """A producer of this transport closed: its SRTP stream is freed, the router forgets it."""
        self.producers.pop(producer.id, None)
        self._producers_by_ssrc.pop(producer.ssrc, None)
        if self.srtp_in is not None:
            with self.engine.datapath.tables_lock:  # the datapath thread may be using this session
                self.srtp_in.remove_stream(producer.ssrc)
        self._listener.on_transport_producer_closed(producer)

    def on_consumer_closed(self, consumer: Consumer) -> None:
        """A consumer of this transport closed: its SSRC, SRTP stream and router slot are free."""
        self.consumers.pop(consumer.id, None)
        if self.srtp_out is not None:
            with self.engine.datapath.tables_lock:  # the datapath thread may be using this session
                # Its RTP had a session of its own (freed with the consumer's datapath slot);
                # its sender reports went through ours, cloned from the template.
                self.srtp_out.forget_stream(consumer.ssrc)
        self._consumer_ssrcs.discard(consumer.ssrc)
        self._consumers_by_ssrc.pop(consumer.ssrc, None)
        self._listener.on_transport_consumer_closed(consumer)

    # ------------------------------------------------------------------ slow path

    def _on_slow_datagram(self, kind: int, data: bytes, addr: tuple[str, int]) -> None:
        if kind == rtp.SLOW_RTCP:
            self._on_rtcp(data)
        else:
            self.engine.unhandled_datagrams += 1  # STUN/DTLS on a transport that speaks neither

    def _on_rtcp(self, data: bytes) -> None:
        try:
            packets = rtp.parse_rtcp(data)
        except rtp.RtpError:
            self.rtcp_malformed += 1
            return
        # RTT and DLSR count from the report's arrival, which may be a little before now.
        arrival = self.engine.slow_arrival
        now = time.time() if arrival is None else arrival
        by_ssrc = self._consumers_by_ssrc
        producers = self._producers_by_ssrc
        for pkt in packets:
            self.rtcp_received[pkt.packet_type] += (
                1  # SR, RR, SDES, BYE, transport-cc (RTPFB): counted, not forwarded
            )
            if pkt.packet_type == rtp.RTCP_SR and pkt.ssrc in producers:
                producer = producers[pkt.ssrc]
                producer.last_sr_ntp_mid = (pkt.ntp_timestamp >> 16) & 0xFFFFFFFF
                producer.last_sr_arrival = now
            for block in pkt.reports:
                consumer = by_ssrc.get(block.ssrc)
                if consumer is None:
                    continue
                consumer.fraction_lost = block.fraction_lost
                if block.lsr:
                    # RFC 3550 §6.4.1: RTT = A - LSR - DLSR, in 1/65536 s.
                    a = (ntp_from(now) >> 16) & 0xFFFFFFFF
                    rtt = (a - block.lsr - block.dlsr) & 0xFFFFFFFF
                    if rtt < 0x80000000:
                        consumer.round_trip_time = rtt / 65536.0

    def rtcp_reports(self) -> list[bytes]:
        """This transport's RTCP now, as few compound packets as fit RTCP_MTU.

        Each compound is SRs (one per sending consumer) or an RR (our producers' report
        blocks), then one SDES with a CNAME chunk per SSRC (RFC 3550 §6.1), as mediasoup sends.
        """
        out: list[bytes] = []
        ntp = ntp_now()
        srs: list[tuple[bytes, tuple[int, str]]] = []
        # One hold of the table mutex and one call for every stream's counters: a call per
        # stream would take the mutex each time, and each time the datapath thread holds it
        # costs a hand-off (docs/datapath.md).
        consumers = [c for c in self.consumers.values() if not c.paused]
        with self.engine.datapath.tables_lock:
            sent = self.engine.datapath.sender_states([c.slot for c in consumers])
            blocks = [
                b
                for p in self.producers.values()
                if not p.closed and (b := self._report_block(p)) is not None
            ]
        now_ns = time.monotonic_ns()
        states = [
            (c, c.report_state(st, now_ns)) for c, st in zip(consumers, sent, strict=True) if st is not None
        ]
        for consumer, (rtp_ts, packets, octets) in states:
            cname = consumer.rtp_parameters.get("rtcp", {}).get("cname") or self.rtcp_cname
            srs.append(
                (rtp.build_sender_report(consumer.ssrc, ntp, rtp_ts, packets, octets), (consumer.ssrc, cname))
            )
        # An SR is 28 bytes and its SDES chunk at most 264: 4 pairs always fit 1200 bytes; pack greedily.
        group: list[tuple[bytes, tuple[int, str]]] = []
        size = 0
        for sr, chunk in srs:
            cost = len(sr) + 12 + len(chunk[1])
            if group and (size + cost > RTCP_MTU or len(group) == 31):
                out.append(b"".join(g[0] for g in group) + rtp.build_sdes([g[1] for g in group]))
                group, size = [], 0
            group.append((sr, chunk))
            size += cost
        if group:
            out.append(b"".join(g[0] for g in group) + rtp.build_sdes([g[1] for g in group]))
        for i in range(0, len(blocks), 31):  # the RC field holds 31 blocks (RFC 3550 §6.4.2)
            out.append(
                rtp.build_receiver_report(self.rtcp_ssrc, blocks[i : i + 31])
                + rtp.build_sdes_cname(self.rtcp_ssrc, self.rtcp_cname)
            )
        return out

    def _report_block(self, producer: Producer) -> rtp.ReportBlock | None:
        s = self.engine.datapath.producer_stats(producer.slot)
        if s["extended_highest_seq"] is None:
            return None
        expected, received = s["expected"], s["packets"]
        # RFC 3550 A.3: fraction lost over the interval since the last report.
        exp_int = expected - producer.report_expected
        rec_int = received - producer.report_received
        producer.report_expected, producer.report_received = expected, received
        lost_int = exp_int - rec_int
        fraction = 0 if exp_int <= 0 or lost_int <= 0 else min(255, (lost_int << 8) // exp_int)
        lost = max(-(1 << 23), min((1 << 23) - 1, expected - received))
        dlsr = 0
        if producer.last_sr_arrival:
            dlsr = int((time.time() - producer.last_sr_arrival) * 65536) & 0xFFFFFFFF
        return rtp.ReportBlock(
            ssrc=producer.ssrc,
            fraction_lost=fraction,
            packets_lost=lost,
            highest_sequence=s["extended_highest_seq"] & 0xFFFFFFFF,
            jitter=s["jitter"],
            lsr=producer.last_sr_ntp_mid,
            dlsr=dlsr,
        )

    def send_rtcp_reports(self) -> int:
        """Send this transport's periodic RTCP; returns how many compound packets went out."""
        dp = self.engine.datapath
        if self._closed or not dp.transport_stats(self.slot)["has_remote"]:
            return 0
        packets = self.rtcp_reports()
        with dp.tables_lock:  # one hold for the sends and their flush
            sent = sum(bool(dp.send_rtcp(self.slot, packet, False)) for packet in packets)
            dp.flush()
        return sent

    def _schedule_rtcp(self) -> None:
        # RFC 3550 §6.3.1: randomize each interval to [0.5, 1.5] x T so that transports created
        # together never report together (one big report tick would stall the datapath); the
        # engine's RtcpClock sends the reports due within 100 ms of each other in one wake-up.
        delay = self.engine.settings.rtcp_interval * random.uniform(0.5, 1.5)
        self._rtcp_timer = self.engine.rtcp_clock.call_later(delay, self._on_rtcp_timer)

    def _on_rtcp_timer(self) -> None:
        self._rtcp_timer = None
        if self._closed:
            return
        try:
            self.send_rtcp_reports()
        except Exception:
            self.engine.slow_path_errors += 1
            log.exception("RTCP report failed")
        self._schedule_rtcp()

    # ------------------------------------------------------------------ close

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport closed")

    def close(self) -> None:
        """Close the transport, its producers ("transportclose") and its consumers ("transportclose")."""
        if self._close():
            self._listener.on_transport_closed(self)

    def _router_closed(self) -> None:
        if self._close():
            self.emit("routerclose")

    def _close(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        # A leave closes N consumers here and N more of our producer elsewhere: one hold of
        # the tables for them all, handed back to a waiting datapath thread (table_hold.py).
        with TableHold(self.engine.datapath.tables_lock) as hold:
            for consumer in list(self.consumers.values()):
                hold.tick()
                consumer._transport_closed()
            for producer in list(self.producers.values()):
                hold.tick()
                producer._transport_closed()
        # Closed children reference us: dropping them now lets reference counting free the lot,
        # instead of leaving cycles for the garbage collector (a full collection pauses the loop).
        self.consumers.clear()
        self.producers.clear()
        self._consumers_by_ssrc.clear()
        self._producers_by_ssrc.clear()
        if self._rtcp_timer is not None:
            self.engine.rtcp_clock.cancel(self._rtcp_timer)
            self._rtcp_timer = None
        self.engine.datapath.remove_transport(self.slot)
        self.engine.remove_transport(self)
        self.srtp_in = self.srtp_out = None
        self.observer.emit("close")
        return True

    # ------------------------------------------------------------------ stats

    def get_stats(self) -> list[TransportStats]:
        if self._closed:
            return []
        s = self.engine.datapath.transport_stats(self.slot)
        return [
            {
                "type": self.STATS_TYPE,
                "transportId": self.id,
                "timestamp": int(time.time() * 1000),
                "rtpPacketsReceived": s["rx_packets"],
                "bytesReceived": s["rx_bytes"],
                "rtpPacketsSent": s["tx_packets"],
                "bytesSent": s["tx_bytes"],
                "rtcpPacketsReceived": s["rtcp_rx_packets"],
                "rtcpPacketsMalformed": self.rtcp_malformed,
                "rtcpPacketsByType": dict(self.rtcp_received),
                "drops": s["drops"],
            }
        ]
