"""The collector's hygiene for the event loop: the start-up heap frozen out of every collection, and
each collection's pause measured by generation (what /metrics exports)."""

from __future__ import annotations

import gc

from fastsfu.server.gc_health import PAUSE_BUCKETS, GcMonitor, freeze_startup_heap


def test_monitor_times_every_collection_by_generation() -> None:
    monitor = GcMonitor().install()
    try:
        assert monitor.install() is monitor and gc.callbacks.count(monitor._on_gc) == 1  # idempotent
        for generation in (0, 1, 2, 2):
            gc.collect(generation)
    finally:
        monitor.uninstall()
    assert monitor._on_gc not in gc.callbacks
    assert monitor.collections[2] >= 2 and monitor.collections[1] >= 1 and monitor.collections[0] >= 1
    for generation in range(3):
        counts = monitor.buckets[generation]
        # Cumulative, as Prometheus histograms are: each bucket holds the ones below it.
        assert counts == sorted(counts) and counts[-1] <= monitor.collections[generation]
        assert monitor.pause_max[generation] <= monitor.pause_total[generation]
    assert monitor.pause_total[2] > 0 and len(monitor.buckets[0]) == len(PAUSE_BUCKETS)
    before = list(monitor.collections)
    gc.collect()
    assert monitor.collections == before  # uninstalled: no longer counting


def test_frozen_start_up_heap_is_not_walked_by_a_full_collection() -> None:
    """A full collection visits what is in generations 0-2; after the freeze that is only what
    was made since, not the whole interpreter with its modules and descriptors."""
    keep = [{"session": i, "state": [i]} for i in range(50_000)]  # long-lived start-up state
    try:
        frozen = freeze_startup_heap()
        assert frozen >= 100_000  # the dicts and lists above, and everything imported so far
        assert gc.get_freeze_count() == frozen
        young = [{"new": i} for i in range(100)]
        gc.collect()
        visited = len(gc.get_objects())  # what a full collection traverses now
        assert visited < 20_000 < frozen, (visited, frozen)
        del young
    finally:
        gc.unfreeze()
        del keep


def test_join_and_leave_leave_no_cyclic_garbage() -> None:
    """What a member leaves behind must be freed by reference counting alone: cyclic garbage is
    what makes the collector run (and pause the loop) under join/leave churn. Harmony sessions
    joining and leaving a room, with transports, producers and consumers, then all closed."""
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from join_loop_time import harmony_joins

    from fastsfu import Engine
    from fastsfu.harmony import VoiceRooms

    async def main() -> int:
        async with Engine() as engine:
            rooms = VoiceRooms(engine)
            harmony_joins(rooms, 2, guild=1)  # warm-up: first-use caches are not garbage
            for session in list(rooms.open_sessions):
                session.close()
            gc.collect()
            gc.disable()
            try:
                for cycle in range(10):
                    harmony_joins(rooms, 3, guild=2 + cycle)
                    for session in list(rooms.open_sessions):
                        session.close()
                await asyncio.sleep(0.05)  # transports' deferred work (timers) runs
                assert not rooms.rooms and not rooms.open_sessions
                return gc.collect()  # objects that only the collector could free
            finally:
                gc.enable()

    assert asyncio.run(main()) == 0
