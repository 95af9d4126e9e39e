"""Audio levels and active speaker (docs/observers.md): two SRTP senders on real PlainTransports send
ssrc-audio-level (RFC 6464) from loopback, one loud and one quiet, then they swap; the observers'
events follow, evaluated on their timers."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from helpers import AUDIO_LEVEL_ID, SrtpClient, producer_params
from test_loopback import server_addr

from fastsfu import Engine, Settings
from fastsfu.plain_transport import PlainTransport
from fastsfu.producer import Producer
from fastsfu.router import Router
from fastsfu.rtp import RtpPacket

LOUD, QUIET = 20, 100  # -dBov (RFC 6464 §3)


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def level_packet(ssrc: int, seq: int, level: int, voice: bool) -> RtpPacket:
    byte = (0x80 if voice else 0) | level
    return RtpPacket(
        111, seq, seq * 960, ssrc, extensions=[(AUDIO_LEVEL_ID, bytes([byte]))], payload=os.urandom(60)
    )


def speaker(router: Router, ssrc: int) -> tuple[SrtpClient, PlainTransport, Producer]:
    client = SrtpClient()
    t = router.create_plain_transport(enable_srtp=True)
    t.connect("127.0.0.1", client.port, client.srtp_parameters)
    return client, t, t.produce(producer_params(ssrc))


async def talk(senders: list[tuple[SrtpClient, PlainTransport, int, int]], seconds: float, start: int) -> int:
    """Every sender sends a 20 ms packet at its level (V bit when loud) for `seconds`; next seq."""
    seq = start
    for _ in range(int(seconds / 0.02)):
        for client, t, ssrc, level in senders:
            client.send_rtp(server_addr(t), level_packet(ssrc, seq, level, level < 60))
        seq += 1
        await asyncio.sleep(0.02)
    return seq


def test_volumes_silence_and_dominant_speaker_follow_who_is_loud() -> None:
    """No receiver at all: levels are read anyway (the observed producers' packets are still
    authenticated). A loud, B quiet; then B loud, A quiet; then both stop."""

    async def main() -> None:
        async with Engine(Settings(datapath_thread=True)) as engine:
            router = engine.create_router()
            ca, ta, a = speaker(router, 1111)
            cb, tb, b = speaker(router, 2222)
            levels = router.create_audio_level_observer(max_entries=2, threshold=-80, interval=250)
            active = router.create_active_speaker_observer(interval=300)
            events: list[tuple[float, str, Any]] = []
            loop = asyncio.get_running_loop()
            levels.on(
                "volumes",
                lambda v: events.append(
                    (loop.time(), "volumes", [(x["producer"].id, x["volume"]) for x in v])
                ),
            )
            levels.on("silence", lambda: events.append((loop.time(), "silence", None)))
            active.on("dominantspeaker", lambda d: events.append((loop.time(), "dominant", d["producer"].id)))
            for o in (levels, active):
                o.add_producer(a.id)
                o.add_producer(b.id)
            t0 = loop.time()
            seq = await talk([(ca, ta, 1111, LOUD), (cb, tb, 2222, QUIET)], 1.5, 0)
            t1 = loop.time()
            await talk([(ca, ta, 1111, QUIET), (cb, tb, 2222, LOUD)], 1.5, seq)
            t2 = loop.time()
            await asyncio.sleep(0.8)
            vols = [(t, v) for t, kind, v in events if kind == "volumes"]
            # Phase 1 (after the first full interval): only A is over the threshold, at -20 dBov.
            phase1 = [v for t, v in vols if t0 + 0.3 < t <= t1]
            assert phase1 and all(v == [(a.id, -LOUD)] for v in phase1), vols
            phase2 = [v for t, v in vols if t1 + 0.3 < t <= t2]
            assert phase2 and all(v == [(b.id, -LOUD)] for v in phase2), vols
            # After both stop: one "silence", then nothing more.
            silences = [t for t, kind, _ in events if kind == "silence"]
            assert len(silences) == 1 and silences[0] > t2, events
            dominant = [(t, p) for t, kind, p in events if kind == "dominant"]
            assert [p for _, p in dominant] == [a.id, b.id], dominant
            assert t0 < dominant[0][0] < t0 + 0.7 and t1 < dominant[1][0] < t1 + 1.2, (t0, t1, dominant)
            assert engine.stats()["drops"]["decrypt_failed"] == 0
            for c in (ca, cb):
                c.close()

    run(main())


def test_a_cough_over_the_dominant_speaker_does_not_switch_and_a_paused_observer_starts_afresh() -> None:
    """Through real sockets (levels read per packet in the datapath, frames handed over by
    take_levels): B's 200 ms cough over A, who talks on, leaves A dominant; paused and resumed,
    the observer hears B take over once A has stopped."""

    async def main() -> None:
        async with Engine(Settings(datapath_thread=True)) as engine:
            router = engine.create_router()
            ca, ta, a = speaker(router, 6666)
            cb, tb, b = speaker(router, 7777)
            active = router.create_active_speaker_observer(interval=300)
            dominant: list[str] = []
            active.on("dominantspeaker", lambda d: dominant.append(d["producer"].id))
            active.add_producer(a.id)
            active.add_producer(b.id)
            seq = await talk([(ca, ta, 6666, LOUD), (cb, tb, 7777, QUIET)], 1.2, 0)
            seq = await talk([(ca, ta, 6666, LOUD), (cb, tb, 7777, LOUD)], 0.2, seq)
            seq = await talk([(ca, ta, 6666, LOUD), (cb, tb, 7777, QUIET)], 0.9, seq)
            assert dominant == [a.id], dominant
            active.pause()
            seq = await talk([(ca, ta, 6666, QUIET), (cb, tb, 7777, LOUD)], 0.4, seq)
            assert dominant == [a.id], dominant  # paused: nothing decided
            active.resume()
            await talk([(ca, ta, 6666, QUIET), (cb, tb, 7777, LOUD)], 1.5, seq)
            assert dominant == [a.id, b.id], dominant
            assert active.dominant is b
            for c in (ca, cb):
                c.close()

    run(main())


def test_two_observers_share_a_producer_and_closing_cleans_up() -> None:
    """Two observers of one producer each see every level (read once from the datapath); a closed
    producer leaves both; pause stops events; the router's close closes its observers."""

    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            router = engine.create_router()
            ca, ta, a = speaker(router, 3333)
            one = router.create_audio_level_observer(interval=250)
            two = router.create_audio_level_observer(interval=250)
            got: dict[str, list[int]] = {"one": [], "two": []}
            one.on("volumes", lambda v: got["one"].append(v[0]["volume"]))
            two.on("volumes", lambda v: got["two"].append(v[0]["volume"]))
            one.add_producer(a.id)
            two.add_producer(a.id)
            seq = await talk([(ca, ta, 3333, 30)], 0.8, 0)
            assert got["one"] and got["two"] and set(got["one"]) == set(got["two"]) == {-30}, got
            two.pause()
            got["two"].clear()
            seq = await talk([(ca, ta, 3333, 30)], 0.6, seq)
            assert got["two"] == [] and got["one"], got
            removed: list[str] = []
            one.observer.on("removeproducer", lambda p: removed.append(p.id))
            a.close()
            assert removed == [a.id] and not one.producers and not two.producers
            closed: list[str] = []
            one.on("routerclose", lambda: closed.append("one"))
            two.on("routerclose", lambda: closed.append("two"))
            router.close()
            assert sorted(closed) == ["one", "two"] and one.closed and two.closed and not router.rtp_observers
            ca.close()

    run(main())


def test_bad_options_and_unknown_producer_are_refused() -> None:
    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            router = engine.create_router()
            for kwargs in ({"max_entries": 0}, {"threshold": 1}, {"threshold": -128}):
                try:
                    router.create_audio_level_observer(**kwargs)
                except ValueError:
                    continue
                raise AssertionError(f"accepted {kwargs}")
            observer = router.create_active_speaker_observer()
            try:
                observer.add_producer("nope")
            except KeyError:
                pass
            else:
                raise AssertionError("an unknown producer was accepted")
            observer.close()
            assert not router.rtp_observers

    run(main())


def test_room_speaking_goes_on_at_once_and_off_after_the_hold_without_flapping() -> None:
    """A room's measured members (fastsfu.rooms): A talks in bursts with 200 ms pauses between
    words, then stops. B hears "speaking" once when A starts and "quiet" once after A stops, and
    nothing in between (the hold covers the pauses); the metric's set follows."""
    from test_rooms import Recorder

    from fastsfu.rooms import Rooms

    async def main() -> None:
        async with Engine(Settings(datapath_thread=True)) as engine:
            rooms = Rooms(engine)
            room = rooms.acquire(("g", 1))
            ca, ta, a = speaker(room.router, 4444)
            alice, bob = Recorder(1, a), Recorder(2, None)
            room.add(bob)
            room.add(alice)
            loop = asyncio.get_running_loop()
            seq = 0
            started = loop.time()
            for _ in range(4):  # words of 0.5 s, pauses of 0.2 s (DTX: nothing sent)
                seq = await talk([(ca, ta, 4444, 25)], 0.5, seq)
                assert 1 in room.speaking_users or loop.time() - started < 0.6
                await asyncio.sleep(0.2)
            assert room.speaking_users == {1}
            stopped = loop.time()
            while 1 in room.speaking_users and loop.time() - stopped < 3:
                await asyncio.sleep(0.05)
            quiet_after = loop.time() - stopped
            assert bob.events == [("speaking", 1), ("quiet", 1)], bob.events
            assert 0.5 <= quiet_after <= 1.5, quiet_after  # 3 intervals of 250 ms, plus the timer phase
            assert alice.events == []  # nobody tells a member about itself
            for member in (alice, bob):
                room.remove(member)
            rooms.release(room)
            assert room.router.closed and not room.router.rtp_observers
            ca.close()

    run(main())


def test_a_speaking_members_closed_producer_leaves_the_speaking_set() -> None:
    """A member's producer closes while it talks (its transport failed; the member is still in
    the room for a moment): it is no longer counted as speaking, and the others hear it stop."""
    from test_rooms import Recorder

    from fastsfu.rooms import Rooms

    async def main() -> None:
        async with Engine(Settings(datapath_thread=False)) as engine:
            rooms = Rooms(engine)
            room = rooms.acquire(("g", 2))
            ca, ta, a = speaker(room.router, 5555)
            alice, bob = Recorder(1, a), Recorder(2, None)
            room.add(bob)
            room.add(alice)
            await talk([(ca, ta, 5555, 20)], 0.6, 0)
            assert room.speaking_users == {1} and bob.events == [("speaking", 1)]
            ta.close()
            assert room.speaking_users == set() and bob.events == [("speaking", 1), ("quiet", 1)]
            ca.close()

    run(main())
