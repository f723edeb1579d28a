"""gRPC health (``grpc.health.v1``) from the models' real readiness: one servicer for both engines.

Service names: ``""`` and each of the engine's inference services are SERVING only when every
registered version is ready; ``"<model>"`` when every version of that model is;
``"<model>/<version>"`` for one version. Probes need no token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def health_statuses(report, services: tuple[str, ...] = ()) -> dict[str, int]:
    """Health status per service name from a readiness report (list of ModelReadiness):
    ``"<model>/<version>"``, ``"<model>"``, and ``""`` plus each of ``services`` overall."""
    statuses: dict[str, int] = {}
    by_model: dict[str, bool] = {}
    for r in report:
        statuses[f"{r.name}/{r.version}"] = SERVING if r.ready else NOT_SERVING
        by_model[r.name] = by_model.get(r.name, True) and r.ready
    for name, ready in by_model.items():
        statuses[name] = SERVING if ready else NOT_SERVING
    overall = SERVING if all(by_model.values()) else NOT_SERVING
    for service in ("", *services):
        statuses[service] = overall
    return statuses


class ReadinessHealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 whose statuses come from ``readiness_fn`` (a blocking callable).

    Refreshed before a Check (at most every ``min_refresh_s``) and every ``poll_s``
    while the server runs (for Watch). If ``readiness_fn`` fails, everything is
    NOT_SERVING.
    """

    def __init__(self, readiness_fn: Callable[[], list], *, services: tuple[str, ...] = (),
                 poll_s: float = 2.0, min_refresh_s: float = 0.5):
        super().__init__()
        self._services = tuple(services)
        self._readiness_fn = readiness_fn
        self._poll_s = poll_s
        self._min_refresh_s = min_refresh_s
        self._last_refresh = float("-inf")
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        for service in ("", *self._services):  # until the first refresh says otherwise
            self._server_status[service] = NOT_SERVING

    async def refresh(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._last_refresh < self._min_refresh_s:
                return
            try:
                report = await asyncio.to_thread(self._readiness_fn)
                statuses = health_statuses(report, self._services)
            except Exception as exc:  # TorchServe unreachable: nothing is serving
                log.warning("health: readiness check failed: %s", exc)
                statuses = {k: NOT_SERVING for k in self._server_status}
                for service in ("", *self._services):
                    statuses[service] = NOT_SERVING
            for service in list(self._server_status):
                if service not in statuses:  # a model that is gone
                    if service in self._server_watchers:
                        await self.set(service, SERVICE_UNKNOWN)
                    else:
                        self._server_status.pop(service, None)
            for service, status in statuses.items():
                if self._server_status.get(service) != status:
                    await self.set(service, status)
            self._last_refresh = time.monotonic()

    def start_polling(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poller die
                log.exception("health: refresh failed")
            await asyncio.sleep(self._poll_s)

    async def Check(self, request, context):
        await self.refresh()
        return await super().Check(request, context)

    async def Watch(self, request, context):
        await self.refresh()  # the first answer is a real status, not SERVICE_UNKNOWN
        self.start_polling()
        return await super().Watch(request, context)

    async def close(self) -> None:
        await self.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
