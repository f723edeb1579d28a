#!/usr/bin/env python3
"""The image's HEALTHCHECK: healthy when the serving engine reports ready.

The engine is ``$MODELCTL_ENGINE``, as ``modelctl serve`` reads it (default ``torchserve``):

* ``torchserve``: the gRPC health service of ``modelctl serve``'s gateway (service ``""``;
  see service/serving/torchserve/gateway.py), SERVING only when every served model version has its
  workers READY, on 127.0.0.1 at ``$MODELCTL_GRPC_INFERENCE_PORT`` (7070). The same check as
  the Kubernetes readiness probe of k8s/base.
* ``native``: the Open Inference Protocol's server readiness, ``GET /v2/health/ready`` on
  127.0.0.1 at ``$MODELCTL_INFERENCE_PORT`` (8080), which needs no token; healthy on 200.
  The same check as the readiness probe of k8s/components/native-engine.

Exit 0 when healthy, 1 otherwise (an unknown engine included).
"""

from __future__ import annotations

import os
import sys


def _port(var: str, default: str) -> str:
    return os.environ.get(var, "").strip() or default


def torchserve() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _port("MODELCTL_GRPC_INFERENCE_PORT", "7070")
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


def native() -> int:
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{_port('MODELCTL_INFERENCE_PORT', '8080')}/v2/health/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy
    try:
        with opener.open(url, timeout=5) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:  # 4xx/5xx: answered, not ready
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


ENGINES = {"torchserve": torchserve, "native": native}


def main() -> int:
    engine = os.environ.get("MODELCTL_ENGINE", "").strip() or "torchserve"
    check = ENGINES.get(engine)
    if check is None:
        print(f"unhealthy: MODELCTL_ENGINE={engine!r} is not one of {', '.join(ENGINES)}", file=sys.stderr)
        return 1
    return check()


if __name__ == "__main__":
    sys.exit(main())
