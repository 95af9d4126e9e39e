"""grpc.health.v1 Watch (fastsfu.harmony.health): every watcher is told NOT_SERVING at shutdown,
however late grpc resumes its stream after sending the previous status."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from fastsfu.harmony.health import Health

Status = health_pb2.HealthCheckResponse
WHOLE_SERVER = health_pb2.HealthCheckRequest(service="")


def statuses(health: Health, between: list[object]) -> list[int]:
    """Drive one Watch stream as grpc does (the next message is asked for only once the previous
    one was sent), calling `between[i]` before asking for message i + 1; every status it yields."""

    async def run() -> list[int]:
        stream = health.Watch(WHOLE_SERVER, None)
        seen: list[int] = []
        for i in range(len(between) + 2):
            try:
                seen.append((await asyncio.wait_for(anext(stream), 1.0)).status)
            except StopAsyncIteration:
                return seen
            if i < len(between):
                between[i]()  # type: ignore[operator]
        return seen

    return asyncio.run(run())


def test_a_shutdown_while_a_status_is_being_sent_still_sends_not_serving() -> None:
    # Under load grpc resumes the handler after the shutdown: before the fix the stream then ended
    # without NOT_SERVING, and a load balancer read the end of the stream instead
    # (tests/test_workers.py's SIGTERM test failed so, 1 run in several on a busy VM).
    health = Health()
    health.set("", Status.SERVING)
    assert statuses(health, [health.shutdown]) == [Status.SERVING, Status.NOT_SERVING]


def test_a_change_while_waiting_and_then_the_shutdown() -> None:
    health = Health()
    health.set("", Status.SERVING)

    def later_shutdown() -> None:
        asyncio.get_running_loop().call_later(0.01, health.shutdown)

    assert statuses(health, [later_shutdown]) == [Status.SERVING, Status.NOT_SERVING]
    # A stream opened after the shutdown is told once and ends.
    assert statuses(health, []) == [Status.NOT_SERVING]
