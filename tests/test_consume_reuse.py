"""What a join reuses per consumer: RtpParameters derived once per producer and kind of receiver
(each consumer still gets its own copy, equal to ortc's derivation), and the datapath's consumer
slots, first fit as before."""

from __future__ import annotations

import asyncio
import copy
import socket
from typing import Any

import pytest
from helpers import client_caps, producer_params

from fastsfu import Engine, _rtp, ortc, rtp
from fastsfu.types import RtpCapabilities, RtpParameters

pytestmark = [pytest.mark.timeout(30)]


def expected(
    producer_rtp: RtpParameters, router_caps: RtpCapabilities, caps: Any, ssrc: int, mid: str
) -> RtpParameters:
    """ortc's own derivation, with the extensions the datapath forwards (what transport.consume offers)."""
    params = ortc.get_consumer_rtp_parameters(producer_rtp, router_caps, caps, ssrc, mid)
    params["headerExtensions"] = [e for e in params["headerExtensions"] if e["uri"] in rtp.EXTENSION_KINDS]
    return params


def test_consumers_of_a_producer_share_one_derivation_per_kind_of_receiver_not_their_parameters() -> None:
    async def main() -> None:
        async with Engine() as engine:
            router = engine.create_router()
            producer = router.create_plain_transport().produce(producer_params(1111))
            a, b, c = (router.create_plain_transport() for _ in range(3))
            caps_a, caps_b = client_caps(), client_caps(opus_pt=101, level_id=3, mid_id=4, capture_id=5)
            ca = a.consume(producer.id, caps_a)
            ca2 = b.consume(producer.id, copy.deepcopy(caps_a))  # equal, another object
            cb = c.consume(producer.id, caps_b)
            for consumer, caps in ((ca, caps_a), (ca2, caps_a), (cb, caps_b)):
                want = expected(producer.rtp_parameters, router.rtp_capabilities, caps, consumer.ssrc, "0")
                assert consumer.rtp_parameters == want
                assert list(consumer.rtp_parameters) == list(want)  # the same JSON key order
            assert cb.rtp_parameters["codecs"][0]["payloadType"] == 101
            assert len(producer.consumer_templates) == 2  # two kinds of receiver, two derivations
            # Each consumer's parameters are its own: changing one changes no other.
            ca.rtp_parameters["codecs"][0]["parameters"]["stereo"] = 1
            ca.rtp_parameters["headerExtensions"][0]["id"] = 99
            assert "stereo" not in ca2.rtp_parameters["codecs"][0]["parameters"]
            want = expected(producer.rtp_parameters, router.rtp_capabilities, caps_a, ca2.ssrc, "0")
            assert ca2.rtp_parameters == want
            again = a.consume(producer.id, caps_a)
            assert again.rtp_parameters["headerExtensions"][0]["id"] != 99

    asyncio.run(asyncio.wait_for(main(), 20))


def test_consumer_slots_are_first_fit_after_removals_and_a_full_table_refuses() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    dp = _rtp.Datapath(max_sockets=1, max_transports=2, max_producers=1, max_consumers=5)
    try:
        t = dp.add_transport(dp.add_socket(sock.fileno(), socket.AF_INET, True))
        p = dp.add_producer(t, 1, 111, 48000, {})
        slots = [dp.add_consumer(p, t, 10 + i, 100, {}) for i in range(5)]
        assert slots == [0, 1, 2, 3, 4]
        with pytest.raises(OverflowError):
            dp.add_consumer(p, t, 99, 100, {})
        for c in (3, 1):
            dp.remove_consumer(c)
        assert [dp.add_consumer(p, t, 20 + i, 100, {}) for i in range(2)] == [1, 3]  # lowest first
        with pytest.raises(OverflowError):
            dp.add_consumer(p, t, 99, 100, {})
        dp.remove_consumer(0)
        assert dp.add_consumer(p, t, 30, 100, {}) == 0
    finally:
        dp.close()
        sock.close()
