"""The datapath thread's lead over the event loop in nice levels (docs/datapath.md, "Thread
priority"): raised when the process may, the loop lowered instead when it may not."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Coroutine

import pytest

from fastsfu import Engine, Settings
from fastsfu.thread_priority import ThreadNice


def nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def run(coro: Coroutine[None, None, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_the_datapath_thread_is_raised_above_the_loop() -> None:
    run(raised())


async def raised() -> None:
    # CI runs as root (CAP_SYS_NICE): the datapath's own priority goes up, the loop's stays.
    loop_tid = threading.get_native_id()
    before = nice(loop_tid)
    async with Engine(Settings(listen_ip="127.0.0.1", datapath_priority=7)) as engine:
        tid = engine.datapath.thread_id
        assert tid is not None and tid != loop_tid
        assert nice(tid) == max(-20, before - 7) and nice(loop_tid) == before
        assert engine.thread_nice == ThreadNice(max(-20, before - 7), before, "datapath raised")
    assert nice(loop_tid) == before


def test_a_library_engine_leaves_priorities_alone_by_default() -> None:
    run(left_alone())


async def left_alone() -> None:
    loop_tid = threading.get_native_id()
    before = nice(loop_tid)
    async with Engine(Settings(listen_ip="127.0.0.1")) as engine:
        tid = engine.datapath.thread_id
        assert tid is not None and nice(tid) == before == nice(loop_tid)
        assert engine.thread_nice == ThreadNice(before, before, "off")
    async with Engine(Settings(listen_ip="127.0.0.1", datapath_thread=False)) as engine:
        assert engine.datapath.thread_id is None and engine.thread_nice is None


def test_settings_refuse_a_lead_outside_the_nice_range() -> None:
    for bad in (-1, 40):
        with pytest.raises(ValueError, match="datapath_priority"):
            Settings(datapath_priority=bad)


PROBE = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading
    from fastsfu import Engine, Settings

    async def main() -> None:
        out = []
        for lower in (False, True):
            settings = Settings(listen_ip="127.0.0.1", datapath_priority=5, lower_loop_priority=lower)
            async with Engine(settings) as engine:
                tid = engine.datapath.thread_id
                out.append([engine.thread_nice.how, os.getpriority(os.PRIO_PROCESS, tid),
                            os.getpriority(os.PRIO_PROCESS, threading.get_native_id())])
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_without_cap_sys_nice_the_loop_gives_way_when_allowed_to() -> None:
    # setpriv drops CAP_SYS_NICE from the bounding set (RLIMIT_NICE is 0): raising is refused.
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_nice", sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    base = nice(threading.get_native_id())  # the child starts at this process's nice
    refused, lowered = json.loads(out)
    # Not allowed to lower the loop: both threads stay where they were, with a warning.
    assert refused == ["refused", base, base]
    # Allowed: the loop gives way by the lead instead, the datapath keeps its nice.
    assert lowered == ["loop lowered", base, min(19, base + 5)]
