#!/usr/bin/env python3
"""The image's HEALTHCHECK: healthy when every served model version has its workers READY.

It asks the gRPC health service of ``modelctl serve``'s gateway (service ``""``; see
service/serving/gateway.py) on 127.0.0.1 at ``$MODELCTL_GRPC_INFERENCE_PORT`` (7070), the
same check as the Kubernetes readiness probe. Exit 0 when SERVING, 1 otherwise.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = os.environ.get("MODELCTL_GRPC_INFERENCE_PORT", "").strip() or "7070"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
