"""Container health probe: exit 0 when the local fastsfu answers SERVING on grpc.health.v1 for the
voice service (it turns NOT_SERVING on SIGTERM, before sessions end), else 1.
Address: argument 1, else 127.0.0.1 and the port of FASTSFU_GRPC_PORT (2290)."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "protocol.voice.v1.VoiceService"


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('FASTSFU_GRPC_PORT') or 2290}"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=3
            )
        except grpc.RpcError as exc:
            print(f"fastsfu health: {address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"fastsfu health: {address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
