"""Loudest-N (fastsfu.last_n, docs/observers.md#loudest-n): four SRTP senders on real PlainTransports
at different levels, one receiver; the receiver gets only the N loudest, counted per SSRC on its
socket, and the set follows the levels when a new speaker gets loud."""

from __future__ import annotations

import asyncio
from collections import Counter

from helpers import SrtpClient, client_caps
from test_observers import run, speaker, talk

from fastsfu import Engine, Settings
from fastsfu.last_n import LastN
from fastsfu.rtp import RtpPacket


async def heard(receiver: SrtpClient, seconds: float) -> Counter[int]:
    """RTP packets per SSRC that reached the receiver's socket in `seconds`."""
    assert receiver.rx is not None
    out: Counter[int] = Counter()
    for data in await receiver.receive_rtp(100000, seconds):
        out[RtpPacket.parse(receiver.rx.unprotect(data)).ssrc] += 1
    return out


def test_only_the_n_loudest_reach_the_receiver_and_the_set_follows_the_talkers() -> None:
    async def main() -> None:
        async with Engine(Settings(datapath_thread=True)) as engine:
            router = engine.create_router()
            senders = [speaker(router, ssrc) for ssrc in (11, 22, 33, 44)]
            receiver = SrtpClient()
            t = router.create_plain_transport(enable_srtp=True)
            t.connect("127.0.0.1", receiver.port, receiver.srtp_parameters)
            receiver.set_server_parameters(t.srtp_parameters)  # type: ignore[arg-type]
            ssrc_of = {t.consume(p.id, client_caps(opus_pt=100)).ssrc: p.info.ssrc for _, _, p in senders}
            policy = LastN(router, 2)
            policy.apply(t)

            async def phase(levels: dict[int, int], seconds: float, seq: int) -> tuple[Counter[int], int]:
                active = [
                    (c, tr, p.info.ssrc, levels[p.info.ssrc]) for c, tr, p in senders if p.info.ssrc in levels
                ]
                listen = asyncio.ensure_future(heard(receiver, seconds))
                seq = await talk(active, seconds, seq)
                got = await listen
                return Counter({ssrc_of[s]: n for s, n in got.items()}), seq

            # Before anyone was loud, nothing is forwarded; then A (-20) and B (-35) are the loudest.
            _, seq = await phase({11: 20, 22: 35, 33: 60, 44: 90}, 0.8, 0)
            got, seq = await phase({11: 20, 22: 35, 33: 60, 44: 90}, 1.0, seq)
            assert set(got) == {11, 22} and min(got.values()) >= 40, got
            assert policy.forwarded == {senders[0][2].id, senders[1][2].id}
            # A stops; C gets loud (-15): C displaces A (the least recent), B stays.
            _, seq = await phase({22: 35, 33: 15, 44: 90}, 0.8, seq)
            got, seq = await phase({22: 35, 33: 15, 44: 90}, 1.0, seq)
            assert set(got) == {22, 33} and min(got.values()) >= 40, got
            # Held-back producers are dropped before any per-consumer work (no active consumer).
            stats = engine.stats()["drops"]
            assert stats["no_consumers"] > 0 and stats["decrypt_failed"] == 0
            # Without the policy the receiver hears everyone again.
            policy.remove(t)
            got, seq = await phase({11: 60, 22: 35, 33: 15, 44: 90}, 0.6, seq)
            assert set(got) == {11, 22, 33, 44}, got
            policy.close()
            receiver.close()
            for c, _, _ in senders:
                c.close()

    run(main())


def test_a_room_policy_applies_to_every_receiver_and_a_user_pause_is_kept() -> None:
    """every_transport (the `[voice] last_n` room policy): a transport made later is covered; a
    consumer the receiver paused stays paused when the policy lets its producer through."""

    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            router = engine.create_router()
            policy = LastN(router, 1, every_transport=True)
            ca, ta, a = speaker(router, 55)
            receiver = SrtpClient()
            t = router.create_plain_transport(enable_srtp=True)
            t.connect("127.0.0.1", receiver.port, receiver.srtp_parameters)
            consumer = t.consume(a.id, client_caps(opus_pt=100))
            assert consumer.suppressed and not consumer.paused  # nobody loud yet
            consumer.pause()
            await talk([(ca, ta, 55, 20)], 0.8, 0)
            assert policy.forwarded == {a.id} and not consumer.suppressed and consumer.paused
            assert engine.datapath.producer_stats(a.slot)["active_consumers"] == 0
            consumer.resume()
            assert engine.datapath.producer_stats(a.slot)["active_consumers"] == 1
            policy.close()
            receiver.close()
            ca.close()

    run(main())


def test_voice_settings_reach_the_rooms() -> None:
    """`[voice] last_n` and `speaking_detection` (VoiceSettings) are each room's policy."""
    from fastsfu.harmony import VoiceRooms
    from fastsfu.harmony.session import VoiceSettings

    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            rooms = VoiceRooms(engine, VoiceSettings(last_n=3, speaking_detection=False))
            room = rooms.acquire((1, 2))
            assert room.last_n is not None and room.last_n.n == 3 and room.last_n.every_transport
            assert not room.speaking_detection
            plain = VoiceRooms(engine).acquire((1, 3))
            assert plain.last_n is None and plain.speaking_detection
            for r in (room, plain):
                r.router.close()

    run(main())
