"""Engine / Router / PlainTransport / Producer / Consumer: mediasoup's close cascade, events, errors."""

from __future__ import annotations

import asyncio
import collections
import gc
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from helpers import client_caps, producer_params

from fastsfu import Engine, OrtcError, RouterLimitError, Settings, TransportError
from fastsfu.srtp import SrtpError


def run(coro_fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh loop (the Engine needs a running loop)."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(coro_fn(*args, **kwargs), 20))

    wrapper.__name__ = coro_fn.__name__
    return wrapper


class Recorder:
    """Counts every event name emitted on the objects it watches."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def watch(self, label: str, emitter: Any, *events: str) -> None:
        for event in events:
            emitter.on(event, lambda *a, e=event: self.counts.update([f"{label}:{e}"]))


def room(engine: Engine, n: int = 3) -> tuple[Any, list[Any], list[Any], list[list[Any]]]:
    router = engine.create_router()
    transports = [router.create_plain_transport() for _ in range(n)]
    producers = [t.produce(producer_params(1000 + i)) for i, t in enumerate(transports)]
    consumers = [
        [t.consume(p.id, client_caps()) for p in producers if p.transport is not t] for t in transports
    ]
    return router, transports, producers, consumers


@run
async def test_engine_close_cascades_once_with_mediasoup_events() -> None:
    engine = Engine()
    router, transports, producers, consumers = room(engine)
    rec = Recorder()
    rec.watch("router", router, "engineclose")
    rec.watch("router.observer", router.observer, "close")
    for t in transports:
        rec.watch("transport", t, "routerclose")
        rec.watch("transport.observer", t.observer, "close")
    for p in producers:
        rec.watch("producer", p, "transportclose")
        rec.watch("producer.observer", p.observer, "close")
    for c in sum(consumers, []):
        rec.watch("consumer", c, "transportclose", "producerclose")
        rec.watch("consumer.observer", c.observer, "close")
    engine.close()
    engine.close()
    assert rec.counts == {
        "router:engineclose": 1,
        "router.observer:close": 1,
        "transport:routerclose": 3,
        "transport.observer:close": 3,
        "producer:transportclose": 3,
        "producer.observer:close": 3,
        # Each consumer closes once: with its own transport, or earlier with its producer.
        "consumer.observer:close": 6,
        "consumer:transportclose": rec.counts["consumer:transportclose"],
        "consumer:producerclose": rec.counts["consumer:producerclose"],
    }
    assert rec.counts["consumer:transportclose"] + rec.counts["consumer:producerclose"] == 6
    assert engine.datapath.stats()["forwarded_packets"] == 0


@run
async def test_producer_close_closes_its_consumers_only() -> None:
    async with Engine() as engine:
        router, transports, producers, consumers = room(engine)
        victim = producers[0]
        its = [c for c in sum(consumers, []) if c.producer is victim]
        others = [c for c in sum(consumers, []) if c.producer is not victim]
        rec = Recorder()
        for c in its + others:
            rec.watch(c.id, c, "producerclose")
        victim.close()
        assert all(c.closed for c in its) and not any(c.closed for c in others)
        assert {rec.counts[f"{c.id}:producerclose"] for c in its} == {1}
        assert victim.id not in router.producers
        for t in transports:
            assert not any(c.producer is victim for c in t.consumers.values())
        with pytest.raises(KeyError):
            engine.datapath.producer_stats(victim.slot)
        assert victim.get_stats() == [] and its[0].get_stats() == []


@run
async def test_transport_close_closes_consumers_of_its_producers_elsewhere() -> None:
    async with Engine() as engine:
        router, transports, producers, consumers = room(engine)
        rec = Recorder()
        downstream = [c for c in sum(consumers, []) if c.producer is producers[0]]
        for c in downstream:
            rec.watch("c", c, "producerclose")
        transports[0].close()
        assert rec.counts["c:producerclose"] == len(downstream) == 2
        assert transports[0].id not in router.transports
        with pytest.raises(TransportError):
            transports[0].produce(producer_params(5))


@run
async def test_pause_resume_events_and_datapath_state() -> None:
    async with Engine() as engine:
        _, transports, producers, consumers = room(engine, 2)
        consumer = consumers[1][0]
        rec = Recorder()
        rec.watch("c", consumer, "producerpause", "producerresume")
        rec.watch("p.observer", producers[0].observer, "pause", "resume")
        rec.watch("c.observer", consumer.observer, "pause", "resume")
        producers[0].pause()
        producers[0].pause()
        assert consumer.producer_paused
        producers[0].resume()
        consumer.pause()
        assert engine.datapath.producer_stats(producers[0].slot)["active_consumers"] == 0
        consumer.resume()
        assert engine.datapath.producer_stats(producers[0].slot)["active_consumers"] == 1
        assert rec.counts == {
            "c:producerpause": 1,
            "c:producerresume": 1,
            "p.observer:pause": 1,
            "p.observer:resume": 1,
            "c.observer:pause": 1,
            "c.observer:resume": 1,
        }


@run
async def test_consumer_parameters_follow_the_receiver() -> None:
    async with Engine() as engine:
        router = engine.create_router()
        a, b = router.create_plain_transport(), router.create_plain_transport()
        p = a.produce(producer_params(77))
        c1 = b.consume(p.id, client_caps(opus_pt=109, mid_id=9))
        c2 = b.consume(p.id, client_caps(opus_pt=120, mid_id=2, level_id=3))
        assert c1.rtp_parameters["codecs"][0]["payloadType"] == 109
        assert c2.rtp_parameters["codecs"][0]["payloadType"] == 120
        assert (c1.rtp_parameters["mid"], c2.rtp_parameters["mid"]) == ("0", "1")
        assert c1.ssrc != c2.ssrc
        ids = {e["uri"].rsplit(":", 1)[-1]: e["id"] for e in c2.rtp_parameters["headerExtensions"]}
        assert ids["mid"] == 2 and ids["ssrc-audio-level"] == 3
        assert router.can_consume(p.id, client_caps()) and not router.can_consume("nope", client_caps())
        pinned = b.consume(p.id, client_caps(), ssrc=123456)
        assert pinned.ssrc == 123456 == pinned.rtp_parameters["encodings"][0]["ssrc"]
        for bad in (123456, 0, 2**32, True):
            with pytest.raises(TransportError, match="ssrc"):
                b.consume(p.id, client_caps(), ssrc=bad)
        # The transport reuses its last validation of the receiver's capabilities only while
        # they are equal: the same dict changed in place is validated (and honoured) again.
        caps = client_caps(opus_pt=109)
        assert b.consume(p.id, caps).rtp_parameters["codecs"][0]["payloadType"] == 109
        caps["codecs"][0]["preferredPayloadType"] = 101
        assert b.consume(p.id, caps).rtp_parameters["codecs"][0]["payloadType"] == 101
        caps["codecs"][0]["preferredPayloadType"] = "101"
        with pytest.raises(OrtcError, match="preferredPayloadType"):
            b.consume(p.id, caps)
        with pytest.raises(TransportError, match="mid"):
            b.consume(p.id, client_caps(), mid="")


@run
async def test_invalid_calls_raise_clear_errors() -> None:
    async with Engine() as engine:
        router = engine.create_router()
        t = router.create_plain_transport()
        with pytest.raises(OrtcError, match="audio"):
            t.produce(producer_params(1), kind="video")
        with pytest.raises(OrtcError, match="payloadType"):
            t.produce(
                {**producer_params(1), "codecs": [{**producer_params(1)["codecs"][0], "payloadType": True}]}
            )
        p = t.produce(producer_params(1))
        with pytest.raises(OrtcError, match="already in use"):
            t.produce(producer_params(1))
        with pytest.raises(TransportError, match="no producer"):
            t.consume("missing", client_caps())
        pcmu = {
            "codecs": [
                {"kind": "audio", "mimeType": "audio/PCMU", "preferredPayloadType": 0, "clockRate": 8000}
            ]
        }
        with pytest.raises(OrtcError, match="cannot consume"):
            t.consume(p.id, pcmu)
        with pytest.raises(TransportError, match="ip and port"):
            t.connect()
        with pytest.raises(TransportError, match="not an IP"):
            t.connect("localhost", 5000)
        with pytest.raises(TransportError, match="port"):
            t.connect("127.0.0.1", 70000)
        with pytest.raises(TransportError, match="not enabled"):
            t.connect("127.0.0.1", 5000, {"cryptoSuite": "AEAD_AES_128_GCM", "keyBase64": "AAAA"})
        t.connect("127.0.0.1", 5000)
        with pytest.raises(TransportError, match="already"):
            t.connect("127.0.0.1", 5001)
        s = router.create_plain_transport(enable_srtp=True)
        with pytest.raises(TransportError, match="required"):
            s.connect("127.0.0.1", 5002)
        with pytest.raises(SrtpError):
            s.connect("127.0.0.1", 5002, {"cryptoSuite": "AES_CM_128_HMAC_SHA1_80", "keyBase64": "AAAA"})
        comedia = router.create_plain_transport(comedia=True)
        with pytest.raises(TransportError, match="comedia"):
            comedia.connect("127.0.0.1", 5003)
        with pytest.raises(SrtpError):
            router.create_plain_transport(enable_srtp=True, srtp_crypto_suite="ROT13")
        with pytest.raises(ValueError, match="rtcp_mux"):
            router.create_plain_transport(rtcp_mux=False)


@run
async def test_local_srtp_parameters_follow_the_remote_suite() -> None:
    async with Engine() as engine:
        t = engine.create_router().create_plain_transport(enable_srtp=True)
        assert t.srtp_parameters["cryptoSuite"] == "AES_CM_128_HMAC_SHA1_80"
        from fastsfu.srtp import generate_key, srtp_parameters

        t.connect("127.0.0.1", 5000, srtp_parameters("AEAD_AES_256_GCM", generate_key("AEAD_AES_256_GCM")))
        assert t.srtp_parameters["cryptoSuite"] == "AEAD_AES_256_GCM"


@run
async def test_router_limits() -> None:
    async with Engine(Settings(max_producers_per_router=2, max_consumers_per_router=1)) as engine:
        router = engine.create_router()
        a, b, c = (router.create_plain_transport() for _ in range(3))
        p = a.produce(producer_params(1))
        b.produce(producer_params(2))
        with pytest.raises(RouterLimitError):
            c.produce(producer_params(3))
        first = b.consume(p.id, client_caps())
        with pytest.raises(RouterLimitError):
            c.consume(p.id, client_caps())
        # Every way a consumer goes frees its place: its own close, its transport's, its producer's.
        first.close()
        second = c.consume(p.id, client_caps())
        c.close()
        third = b.consume(p.id, client_caps(), ssrc=second.ssrc)  # the SSRC is free on b too
        p.close()
        assert third.closed
        b.consume(b.produce(producer_params(4)).id, client_caps(), ssrc=third.ssrc)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        Settings(max_transports=0)
    with pytest.raises(ValueError):
        Settings(rtcp_interval=0)


def test_engine_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        Engine()


@run
async def test_churn_leaks_no_slots_or_sockets() -> None:
    settings = Settings(max_sockets=8, max_transports=8, max_producers=8, max_consumers=8)
    gc.collect()  # objects of earlier tests must not close descriptors during the count
    fds_outside = len(os.listdir("/proc/self/fd"))
    async with Engine(settings) as engine:
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            router = engine.create_router()
            a, b = router.create_plain_transport(enable_srtp=True), router.create_plain_transport()
            p = a.produce(producer_params(9))
            b.consume(p.id, client_caps())
            router.close() if _ % 2 else (a.close(), b.close(), router.close())
        assert len(os.listdir("/proc/self/fd")) == fds_before
        assert engine.stats()["transports"] == 0 and engine.routers == {}
    assert len(os.listdir("/proc/self/fd")) == fds_outside  # the engine's epoll fd is released too
