"""The one data plane both protocols of the native engine call: admission, predict, metadata.

REST (:mod:`.rest`) and gRPC (:mod:`.grpc_api`) only translate their wire format into
:meth:`DataPlane.predict` and back; the rules live here once:

* a model or version that is not registered: NotFound; registered but not READY:
  Unavailable;
* admission: at most ``job_queue_size`` requests of one version in flight, and at most
  ``inflight_bytes_budget`` bytes of request bodies in flight on the replica (REST
  reserves a body's declared length before reading it); beyond either, ResourceExhausted
  (429 / RESOURCE_EXHAUSTED with a retry-after). A request keeps its place until the
  device thread has answered it, even when its caller left, so the counts are those of
  the work really queued;
* the answer is the predictor's, exactly as the TorchServe handler returns it.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from service.errors import ResourceExhausted, Unavailable
from service.serving.native.models import NativeModels, Version
from service.serving.native.runner import Request


@dataclass(frozen=True)
class Admission:
    """A place taken by one request: released once, when it is answered or refused."""

    plane: "DataPlane"
    version: Version | None
    nbytes: int

    def release(self) -> None:
        self.plane._release(self)


class DataPlane:
    def __init__(self, models: NativeModels, settings):
        self.models = models
        self.settings = settings
        self.byte_budget = settings.inflight_bytes_budget
        self._lock = threading.Lock()
        self._bytes = 0
        #: True until the engine has registered the store and waited for it: not ready then,
        #: even when every version registered so far is.
        self.starting = True

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes

    # -- readiness ------------------------------------------------------------------------

    def live(self) -> bool:
        return all(r.alive() for r in self.models.runners)

    def ready(self) -> bool:
        """Start-up done, and every registered version READY (at least one registered)."""
        versions = self.models.versions()
        return not self.starting and self.live() and bool(versions) and all(v.ready for v in versions)

    def version(self, name: str, version: str | None = None) -> Version:
        return self.models.get(name, version or None)

    # -- admission ------------------------------------------------------------------------

    def reserve_bytes(self, nbytes: int) -> Admission:
        """Take ``nbytes`` of the replica's byte budget (before a body is read)."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            if self._bytes + nbytes > self.byte_budget:
                raise ResourceExhausted(
                    f"request bodies in flight on this replica would exceed {self.byte_budget} bytes "
                    f"(max_inflight_bytes); retry after {self.settings.retry_after_s}s")
            self._bytes += nbytes
        return Admission(self, None, nbytes)

    def _admit(self, entry: Version, reserved: Admission | None, nbytes: int) -> Admission:
        if not entry.ready:
            raise Unavailable(f"{entry.name} version {entry.version} is not ready "
                              f"({entry.state.lower()}{': ' + entry.error if entry.error else ''})")
        with self._lock:
            limit = self.settings.job_queue_size
            if entry.lane.in_flight >= limit:
                raise ResourceExhausted(
                    f"{entry.name} version {entry.version} has {limit} requests in flight "
                    f"(job_queue_size); retry after {self.settings.retry_after_s}s")
            extra = 0 if reserved is not None else max(0, int(nbytes))
            if self._bytes + extra > self.byte_budget:
                raise ResourceExhausted(
                    f"request bodies in flight on this replica would exceed {self.byte_budget} bytes "
                    f"(max_inflight_bytes); retry after {self.settings.retry_after_s}s")
            self._bytes += extra
            entry.lane.in_flight += 1
        return Admission(self, entry, (reserved.nbytes if reserved is not None else 0) + extra)

    def _release(self, admission: Admission) -> None:
        with self._lock:
            self._bytes -= admission.nbytes
            if admission.version is not None:
                admission.version.lane.in_flight -= 1

    # -- predicting -----------------------------------------------------------------------

    async def predict(self, name: str, version: str | None, payload: Mapping[str, Any], *, k: Any = None,
                      nbytes: int = 0, reserved: Admission | None = None) -> dict:
        """The predictor's answer for one request; raises the named error otherwise.

        ``reserved``: the bytes the caller took with :meth:`reserve_bytes` for this body (they
        are released with the request); else ``nbytes`` are taken here."""
        try:
            entry = self.version(name, version)
            admission = self._admit(entry, reserved, nbytes)
        except BaseException:
            if reserved is not None:
                reserved.release()
            raise
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(result) -> None:  # on the device thread, once
            admission.release()
            loop.call_soon_threadsafe(_settle, future, result)

        if not entry.runner.enqueue(entry.lane, Request(payload, k, deliver)):
            admission.release()
            raise Unavailable(f"{name} version {entry.version} was unregistered")
        return await future


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the caller left
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
