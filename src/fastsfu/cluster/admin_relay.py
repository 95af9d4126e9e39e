"""Recording admin requests across the cluster (docs/cluster.md#recording): a start goes to the
room's home, a listing gathers every live node's recordings, a stop asks the nodes for the ID; each
over NATS request/reply with a bounded timeout, every message versioned (`"v": 1`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from fastsfu.cluster.bus import Bus, BusError
from fastsfu.cluster.placement import VERSION, room_subject_key
from fastsfu.cluster.registry import Registry

log = logging.getLogger(__name__)

TIMEOUT = 3.0  # seconds for a node to answer a start or a listing
STOP_TIMEOUT = 5.0  # a stop answers once the files are written and closed (within the heartbeat TTL)
OPS = ("start", "list", "stop")

Answer = tuple[int, Any]  # an HTTP status and its JSON body


def admin_subject(node: str) -> str:
    return f"fastsfu.v1.admin.{node}.recordings"


class LocalAdmin(Protocol):
    """This node's recordings, as the admin endpoint answers them (docs/recording.md)."""

    def start(self, key: tuple[int | str, ...]) -> Answer: ...

    def listing(self) -> list[Any]: ...

    async def stop(self, recorder_id: str) -> Answer: ...


def unavailable(why: str, **extra: Any) -> Answer:
    return 503, {"error": f"voice cluster unavailable: {why}", **extra}


class AdminRelay:
    """Forwards admin requests to the node that can answer them, and answers other nodes' requests
    from `local` (set when recording is enabled here)."""

    def __init__(self, node: str, registry: Callable[[], Registry | None]) -> None:
        self.node = node
        self._registry = registry
        self.local: LocalAdmin | None = None
        self.counts: Counter[tuple[str, str]] = Counter()  # (op, sent|served)
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the serving side

    async def serve(self, bus: Bus) -> None:
        async def received(msg: Any) -> None:
            # A task per request: nats-py runs one subscription's callbacks in turn, and a stop
            # waits for its files to close.
            task = asyncio.create_task(self._answer(bus, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            await bus.nc.subscribe(admin_subject(self.node), cb=received)
        except Exception as exc:  # nats-py's own errors: the node retries joining
            raise BusError(str(exc) or type(exc).__name__) from exc

    async def _answer(self, bus: Bus, msg: Any) -> None:
        try:
            request = bus.decode(msg.data)
            op = request["op"]
            if op not in OPS or not msg.reply:
                raise ValueError(f"unknown op {op!r}")
            if op == "start":
                key = room_key(request["room"])
            elif op == "stop":
                recorder_id = request["id"]
                if not isinstance(recorder_id, str):
                    raise ValueError("bad id")
            until = request.get("until")
            if until is not None and not isinstance(until, (int, float)):
                raise ValueError("bad deadline")
        except (ValueError, KeyError, TypeError) as exc:
            bus.drop("admin", exc)  # counted and ignored: the sender's timeout is its answer
            return
        if until is not None and time.time() > until:
            # The asker already answered 503 (e.g. this node was stopped): doing it now would
            # start or stop a recording behind the operator's back.
            self.counts[op, "expired"] += 1
            return
        self.counts[op, "served"] += 1
        local = self.local
        if local is None:
            answer: Answer = 404, {"error": "recording is not enabled on this node"}
        elif op == "start":
            answer = local.start(key)
        elif op == "list":
            answer = 200, local.listing()
        else:
            answer = await local.stop(recorder_id)
        with contextlib.suppress(Exception):  # the asker may be gone; its timeout answers for it
            await msg.respond(bus.encode({"v": VERSION, "status": answer[0], "body": answer[1]}))

    # ------------------------------------------------------------------ the asking side

    async def start(self, key: tuple[int | str, ...]) -> Answer | None:
        """The home's answer to a start of room `key`, or None when this node should answer (the
        room has no live home, or its home is here)."""
        registry = self._registry()
        if registry is None:
            return unavailable("not connected to the cluster")
        try:
            home = await registry.lookup(room_subject_key(key))
        except BusError as exc:
            return unavailable(str(exc))
        if home is None or home == self.node:
            return None
        answer = await self._ask(registry.bus, home, {"op": "start", "room": list(key)}, TIMEOUT)
        return answer if answer is not None else unavailable(f"the room's home {home} did not answer")

    async def listing(self, local: list[Any]) -> Answer:
        """Every live node's recordings; 503 naming the nodes that did not answer."""
        registry = self._registry()
        if registry is None:
            return unavailable("not connected to the cluster", recordings=local, missing=[])
        others = sorted(n for n in registry.nodes() if n != self.node)
        answers = await asyncio.gather(
            *(self._ask(registry.bus, node, {"op": "list"}, TIMEOUT) for node in others)
        )
        recordings, missing = list(local), []
        for node, answer in zip(others, answers, strict=True):
            if answer is None or answer[0] != 200 or not isinstance(answer[1], list):
                missing.append(node)
            else:
                recordings.extend(answer[1])
        if missing:
            return unavailable(f"no answer from {', '.join(missing)}", recordings=recordings, missing=missing)
        return 200, recordings

    async def stop(self, recorder_id: str) -> Answer:
        """The answer of the node that holds recording `recorder_id` (asked of every live node,
        the first 200 wins); 404 when every node answered that it has none."""
        registry = self._registry()
        if registry is None:
            return unavailable("not connected to the cluster")
        others = sorted(n for n in registry.nodes() if n != self.node)
        request = {"op": "stop", "id": recorder_id}
        asks = [asyncio.ensure_future(self._ask(registry.bus, n, request, STOP_TIMEOUT)) for n in others]
        silent = 0
        try:
            for done in asyncio.as_completed(asks):
                answer = await done
                if answer is not None and answer[0] == 200:
                    return answer
                silent += answer is None
        finally:
            for task in asks:
                task.cancel()
        if silent:
            return unavailable(f"{silent} node(s) did not answer; the recording may be on one of them")
        return 404, {"error": "no such recording"}

    async def _ask(self, bus: Bus, node: str, request: dict[str, Any], timeout: float) -> Answer | None:
        """One node's answer, or None if the bus failed, it did not answer in time, or badly."""
        self.counts[request["op"], "sent"] += 1
        # A wall-clock deadline (nodes' clocks agree within NTP's error, far below the timeout).
        message = {"v": VERSION, **request, "until": time.time() + timeout}
        try:
            reply = await asyncio.wait_for(
                bus.call(bus.nc.request(admin_subject(node), bus.encode(message), timeout)), timeout + 0.5
            )
        except (BusError, TimeoutError) as exc:
            log.info("admin %s to %s: %s", request["op"], node, exc)
            return None
        try:
            answer = bus.decode(reply.data)
            status, body = answer["status"], answer["body"]
            if not isinstance(status, int):
                raise ValueError("bad status")
        except (ValueError, KeyError) as exc:
            bus.drop("admin", f"answer from {node}: {exc}")
            return None
        return status, body


def room_key(raw: object) -> tuple[int | str, ...]:
    """A room key as the admin endpoint takes it: a non-empty list of ints and strings."""
    if not isinstance(raw, list) or not raw or not all(type(k) in (int, str) for k in raw):
        raise ValueError('expected {"room": [guild_id, channel_id]}')
    return tuple(raw)


class AdminRelayCollector(Collector):
    def __init__(self, relay: AdminRelay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        relayed = CounterMetricFamily(
            "fastsfu_cluster_admin_relayed",
            "Recording admin requests by op: sent (to the node that answers them), served (for "
            "another node), expired (came after the asker's timeout, not carried out)",
            labels=["op", "way"],
        )
        for op in OPS:
            for way in ("sent", "served", "expired"):
                relayed.add_metric([op, way], self.relay.counts[op, way])
        yield relayed
