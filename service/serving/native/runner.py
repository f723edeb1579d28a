"""The native engine's torch: one thread per device owns it, and batches form adaptively.

Every piece of torch work of a device (loading an archive, building and warming its model,
compiling, decoding the requests' images, every forward) runs on that device's
:class:`DeviceRunner` thread. Torch is never touched by the threads that speak HTTP or gRPC:
when two threads of a process have run torch work, libgomp stops spin-waiting, and the
same ResNet-18 forward ran at 46 img/s instead of 72 (measured here).

Stages, per batch: *batch* (:func:`batch_target` and :meth:`DeviceRunner._take`) → *decode,
predict, unbatch* (:meth:`service.inference.Predictor.predict`, the same predictor the
TorchServe handler calls) → *deliver* (each caller's future, on its own event loop).

Batch formation decides closed-loop throughput. A fixed wait either splits the batches of
8 clients into 2 and 6 (1 ms; the 6 then pays for a padded 8) or adds its whole wait at
concurrency 1 (5 ms). So the wait here is adaptive: a batch waits for more requests only
while it holds fewer than the version has in flight, or than its last batch held (the
clients of a closed loop come back together), never beyond the version's batch size (the
largest compiled size), and never longer than the archive's ``max_batch_delay_ms`` or
``batch_wait_cap_ms`` (10 ms), whichever is larger, after its first request arrived. At
concurrency 1 nothing waits. (With the bench archive's 1 ms alone, 8 closed-loop clients got
batches of 4.3 on average: their requests do not all come back within 1 ms.)
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)


def batch_target(queued: int, in_flight: int, last_batch: int, max_batch: int) -> int:
    """How many requests the next batch waits for: what is in flight or came back last
    time, at most ``max_batch``, at least what is queued already (capped)."""
    return max(1, min(max_batch, max(queued, in_flight, last_batch)))


@dataclass
class Request:
    """One caller's request: its payload for :meth:`Predictor.predict`, its ``k``, and
    ``deliver(result_or_error)``, called once on the device thread."""

    payload: Mapping[str, Any]
    k: Any
    deliver: Callable[[Any], None]
    arrived: float = field(default_factory=time.monotonic)


class Lane:
    """The queue of one model version on a device, and its batching state."""

    def __init__(self, key: tuple[str, str], max_batch: int, wait_cap_s: float = 0.0):
        self.key = key
        self.max_batch = max(1, int(max_batch))
        #: The longest a batch waits after its first request (the archive's max_batch_delay_ms).
        self.wait_cap_s = max(0.0, float(wait_cap_s))
        self.queue: collections.deque[Request] = collections.deque()
        #: Requests admitted for this version and not answered yet (queued, running, or
        #: still being read by a protocol); kept by the data plane.
        self.in_flight = 0
        self.last_batch = 1
        #: Called with (requests, BatchResult, seconds) after each batch (metrics).
        self.on_batch: Callable | None = None
        #: The predictor, set by the load task on the device thread.
        self.predictor = None
        self.closed = False


class DeviceRunner:
    """The thread that owns torch for one device: control tasks (load, unload) and batches."""

    def __init__(self, device: str, *, threads: int | None = None):
        self.device = device
        self.threads = threads
        self._cv = threading.Condition()
        self._tasks: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._lanes: list[Lane] = []
        self._rr = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        #: Why the thread died, if it did (an exception outside any request).
        self.died: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"modelctl-torch-{self.device}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting -----------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the device thread (before any further batch); its Future."""
        future: Future = Future()
        with self._cv:
            if self._stop:
                future.set_exception(RuntimeError(f"the {self.device} runner is stopped"))
                return future
            self._tasks.append((fn, future))
            self._cv.notify_all()
        return future

    def add_lane(self, lane: Lane) -> None:
        with self._cv:
            self._lanes.append(lane)

    def remove_lane(self, lane: Lane) -> list[Request]:
        """Take ``lane`` out; returns the requests it still had queued (to be refused)."""
        with self._cv:
            lane.closed = True
            if lane in self._lanes:
                self._lanes.remove(lane)
            left = list(lane.queue)
            lane.queue.clear()
            return left

    def enqueue(self, lane: Lane, request: Request) -> bool:
        """Queue ``request`` on ``lane``; False when the lane is closed (unregistered)."""
        with self._cv:
            if lane.closed or self._stop:
                return False
            lane.queue.append(request)
            self._cv.notify_all()
            return True

    def queued(self, lane: Lane) -> int:
        with self._cv:
            return len(lane.queue)

    # -- the thread -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            import torch

            if self.threads:
                torch.set_num_threads(max(1, int(self.threads)))
            while True:
                work = self._next()
                if work is None:
                    return
                kind, item = work
                if kind == "task":
                    fn, future = item
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as exc:  # the caller sees it
                            future.set_exception(exc)
                else:
                    lane, batch = item
                    self._run_batch(lane, batch)
        except BaseException as exc:  # pragma: no cover - a bug; the engine ends the process
            self.died = exc
            log.critical("the torch thread of %s died: %r", self.device, exc, exc_info=True)

    def _next(self):
        with self._cv:
            while True:
                if self._stop:
                    return None
                if self._tasks:
                    return "task", self._tasks.popleft()
                ready = [lane for lane in self._lanes if lane.queue and lane.predictor is not None]
                if ready:
                    lane = ready[next(self._rr) % len(ready)]
                    return "batch", (lane, self._take(lane))
                self._cv.wait()

    def _take(self, lane: Lane) -> list[Request]:
        """The next batch of ``lane`` (lock held): wait while it can still fill, then take it."""
        deadline = lane.queue[0].arrived + lane.wait_cap_s
        while not self._stop and not self._tasks:
            target = batch_target(len(lane.queue), lane.in_flight, lane.last_batch, lane.max_batch)
            left = deadline - time.monotonic()
            if len(lane.queue) >= target or left <= 0:
                break
            self._cv.wait(left)
        batch = [lane.queue.popleft() for _ in range(min(lane.max_batch, len(lane.queue)))]
        lane.last_batch = len(batch)
        return batch

    def _run_batch(self, lane: Lane, batch: list[Request]) -> None:
        from service.errors import Internal

        start = time.perf_counter()
        try:
            result = lane.predictor.predict([r.payload for r in batch], [r.k for r in batch])
        except Exception as exc:  # a failure of the forward itself: this batch fails, 500
            log.exception("%s version %s: a batch of %d failed on %s", *lane.key, len(batch), self.device)
            error = Internal(f"inference failed on {self.device} ({type(exc).__name__})")
            for request in batch:
                request.deliver(error)
            return
        took = time.perf_counter() - start
        for request, output in zip(batch, result.outputs):
            request.deliver(output)
        if lane.on_batch is not None:
            try:
                lane.on_batch(batch, result, took)
            except Exception:  # metrics never fail a batch
                log.exception("recording a batch's metrics failed")
