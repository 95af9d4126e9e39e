"""grpc.health.v1.Health for the gRPC server: Check and Watch per service name, and a shutdown that
reports NOT_SERVING and then ends every Watch stream cleanly, before the server stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # generated, not analysed
    """Statuses by service name ("" is the whole server). Unlike grpcio-health-checking's servicer,
    Watch streams end after NOT_SERVING at shutdown: a stream still open when the server stops is
    cancelled, which grpc reports with a traceback on stderr (not a log line)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.shutting_down = False
        self._changed = asyncio.Event()  # replaced at each change; watchers wait on the one they saw

    def set(self, service: str, status: int) -> None:
        if self.shutting_down:
            return
        self.status[service] = status
        self._notify()

    def shutdown(self) -> None:
        """NOT_SERVING for every service, for good."""
        for service in self.status:
            self.status[service] = Status.NOT_SERVING
        self.shutting_down = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(  # noqa: N802 - the generated servicer's method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self.status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return Status(status=status)

    async def Watch(  # noqa: N802 - the generated servicer's method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status.get(request.service, Status.SERVICE_UNKNOWN)
            changed = self._changed  # taken before yielding: a change meanwhile is not missed
            if status != last:
                yield Status(status=status)
                last = status
                # Look again before ending: the shutdown may have come while grpc sent that
                # message (it resumes us only then), and its NOT_SERVING is still owed.
                continue
            if self.shutting_down:
                return
            await changed.wait()
