"""The scheduler: starts queued jobs in free slots, follows running ones, finishes them.

One background thread runs :meth:`Scheduler.tick` every ``poll_s`` (and at once when
woken):

* every RUNNING job's process is polled; a cancel request becomes SIGTERM to its group,
  then SIGKILL once ``cancel_grace_s`` has passed; its epoch progress is copied from
  ``events.jsonl`` onto the job;
* a job whose process ended is settled by its run directory: ``result.json`` there means
  the run wrote its archive (the job is *finished*: deploy policy, then SUCCEEDED, in a
  worker thread, since a deployment waits for workers); otherwise a cancel request makes
  it CANCELLED; an attempt that hit a limit of its runner (``runner.limit(handle)``: the
  memory limit or the deadline, MODELCTL_JOB_MEMORY_LIMIT_MB / MODELCTL_JOB_DEADLINE_S) is
  FAILED with that reason, its checkpoint kept, never resumed; an interruption (killed by a
  signal, or gone while no service watched it
  and its log shows no error of its own) relaunches it on the same run directory, so the
  trainer resumes from its checkpoint, until ``max_attempts`` (attempts stopped by a
  graceful shutdown of the service do not count); any other exit (or an unwatched one
  whose log ends in the trainer's error) is FAILED with the trainer's error line;
* while fewer than ``max_concurrent_jobs`` are RUNNING, the oldest QUEUED job starts.

:meth:`Scheduler.recover` (at start) adopts the trainers a killed service left running
(by their recorded pid, else by their run directory, so a trainer is never relaunched
beside itself);
the RUNNING jobs whose process is gone are settled by the next tick as above. No job is
ever left RUNNING without a process or a decision.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from service.control.runners.local import RunHandle
from service.control.jobs.jobstore import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobStore
from service.errors import FailedPrecondition, ServiceError
from service.rundir import (
    CHECKPOINT_FILE,
    EVENTS_FILE,
    EventTail,
    ended_with_error,
    failure_message,
    latest_epoch,
    read_result,
)

log = logging.getLogger(__name__)


class FinishDeferred(Exception):
    """Raised by ``on_result`` to leave the job RUNNING, unfinished: the service stops while
    the job's deploy policy was still deciding (a speed check). The next service settles
    the job again from its result.json and finishes it."""


def failure_reason(log_path: Path | str, code: int | None) -> str:
    """Why a trainer failed, in one line: its error line, else its last exception line
    (:func:`service.rundir.failure_message`)."""
    message = failure_message(log_path)
    status = f"exit status {code}" if code is not None else "exited"
    return f"trainer {status}: {message}" if message else f"trainer {status} (see {log_path})"


def checkpoint_note(run_dir: Path | str) -> str:
    """What a stopped run left to resume from: its checkpoint's last epoch, if any."""
    epoch = (latest_epoch(run_dir) or {}).get("epoch")
    checkpoint = Path(run_dir) / CHECKPOINT_FILE
    if not checkpoint.exists():
        return "no epoch completed, so there is no checkpoint"
    return f"its checkpoint ({f'epoch {epoch}, ' if epoch else ''}{checkpoint}) is kept"


def interrupted(code: int | None) -> bool:
    """Whether an exit looks like an interruption (worth resuming), not a failure."""
    return code is None or code >= 128


class Scheduler:
    """Runs the jobs of ``jobs`` on ``runners`` (name -> runner).

    ``on_result(job, result) -> dict``: called in a worker thread for a job whose run wrote
    its archive (``result``: the trainer's result.json); returns the job fields to set
    with SUCCEEDED (result version, metrics, deploy outcome).
    """

    def __init__(self, jobs: JobStore, runners: dict, on_result: Callable[[Job, dict], dict], *,
                 max_concurrent_jobs: int = 1, cancel_grace_s: float = 20.0, max_attempts: int = 3,
                 poll_s: float = 0.2):
        self.jobs = jobs
        self.runners = runners
        self.on_result = on_result
        self.max_concurrent_jobs = max_concurrent_jobs
        self.cancel_grace_s = cancel_grace_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self._handles: dict[str, RunHandle] = {}
        self._tails: dict[str, EventTail] = {}
        self._finishing: set[str] = set()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="modelctl-finish")

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="modelctl-scheduler", daemon=True)
        self._thread.start()

    def stop(self, *, stop_jobs: bool = True, timeout_s: float | None = None) -> None:
        """Stop scheduling. ``stop_jobs``: SIGTERM every running trainer (SIGKILL after the
        grace period); their jobs stay RUNNING and are resumed by the next service. Runs of
        a runner whose runs outlive the service (Kubernetes Jobs) are left running: the next
        service adopts them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._pool.shutdown(wait=True)
        if not stop_jobs:
            return
        with self._lock:
            handles = {job_id: handle for job_id, handle in self._handles.items()
                       if not getattr(self._runner_of(job_id), "outlives_service", False)}
        for job_id, handle in handles.items():
            job = self.jobs.get(job_id)
            if not job.cancel_requested:  # resumed by the next service, not counted as a failure
                self.jobs.update(job_id, service_stops=job.service_stops + 1)
            self._runner_of(job_id).signal(handle, signal.SIGTERM)
        deadline = time.monotonic() + (self.cancel_grace_s if timeout_s is None else timeout_s)
        for job_id, handle in handles.items():
            runner = self._runner_of(job_id)
            while runner.poll(handle)[0] and time.monotonic() < deadline:
                time.sleep(0.05)
            runner.reap(handle)
            if handle.proc is not None:
                handle.proc.wait()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # never let one bad job stop the scheduler
                log.exception("scheduler tick failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _runner_of(self, job_id: str):
        return self.runners[self.jobs.get(job_id).runner]

    # ---- recovery --------------------------------------------------------------------------
    def recover(self) -> None:
        """Adopt the trainers of RUNNING jobs that are still alive (from a previous service)."""
        for job in self.jobs.list(states=[RUNNING], limit=1_000_000):
            runner = self.runners.get(job.runner)
            handle = runner.adopt(job.pid, job.proc_started) if runner is not None else None
            if handle is None and runner is not None and hasattr(runner, "find_running"):
                handle = runner.find_running(job.run_dir)  # e.g. killed before its pid was recorded
                if handle is not None:
                    self.jobs.update(job.id, pid=handle.ref, proc_started=handle.started)
            if handle is not None:
                with self._lock:
                    self._handles[job.id] = handle
                log.info("job %s: adopted its running trainer (pid %d)", job.id, handle.ref)
            else:
                log.info("job %s was RUNNING and its trainer is gone; settling it", job.id)

    # ---- the tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        for job in self.jobs.list(states=[RUNNING], limit=1_000_000):
            with self._lock:
                if job.id in self._finishing:
                    continue
                handle = self._handles.get(job.id)
            runner = self.runners.get(job.runner)
            if runner is None:
                self._fail(job, f"unknown runner {job.runner!r}")
                continue
            self._progress(job)
            limit = None
            if handle is not None:
                running, code = runner.poll(handle)
                limit = self._limit(runner, handle)  # enforced while it runs, named once it ended
                if running:
                    self._signal_cancel(job, runner, handle)
                    continue
                runner.reap(handle)
                with self._lock:
                    self._handles.pop(job.id, None)
            else:
                code = None  # gone while no service watched it: its status is unknown
            self._settle(self.jobs.get(job.id), code, limit)
            with self._lock:
                if job.id not in self._finishing:
                    self._tails.pop(job.id, None)
        while self.jobs.count(RUNNING) < self.max_concurrent_jobs:
            job = self.jobs.oldest_queued()
            if job is None:
                break
            self._launch(job)

    @staticmethod
    def _limit(runner, handle: RunHandle) -> str | None:
        check = getattr(runner, "limit", None)
        if check is None:
            return None
        try:
            return check(handle)
        except Exception:  # noqa: BLE001 - a failed look at the limits must not stop the tick
            log.exception("checking the limits of pid/run %s failed", handle.ref)
            return None

    def _signal_cancel(self, job: Job, runner, handle: RunHandle) -> None:
        if not job.cancel_requested:
            return
        if not handle.term_sent:
            log.info("job %s: cancelling: SIGTERM to its trainer (pid/run %d)", job.id, handle.ref)
            runner.signal(handle, signal.SIGTERM)
            handle.term_sent = True
        elif time.time() - job.cancel_requested > self.cancel_grace_s:
            log.warning("job %s: still running %.0fs after SIGTERM: SIGKILL to its trainer (pid/run %d)", job.id,
                        self.cancel_grace_s, handle.ref)
            runner.signal(handle, signal.SIGKILL)

    def _progress(self, job: Job) -> None:
        tail = self._tails.setdefault(job.id, EventTail(Path(job.run_dir) / EVENTS_FILE))
        epoch, epochs = job.epoch, job.epochs
        for event in tail.read_new():
            if event.get("event") == "epoch":
                epoch = int(event.get("epoch", epoch))
                epochs = int(event.get("epochs", epochs))
            elif event.get("event") in ("start", "resume") and event.get("epochs"):
                epochs = int(event["epochs"])
                if event.get("event") == "resume":
                    epoch = int(event.get("from_epoch", epoch))
        if (epoch, epochs) != (job.epoch, job.epochs):
            self.jobs.update(job.id, epoch=epoch, epochs=epochs)

    def _launch(self, job: Job, *, resume: bool = False) -> None:
        runner = self.runners.get(job.runner)
        if runner is None:
            if not resume:
                job = self.jobs.transition(job.id, RUNNING, expect=QUEUED, attempts=0)
            self._fail(job, f"unknown runner {job.runner!r}")
            return
        try:
            if resume:
                job = self.jobs.update(job.id, expect=RUNNING, attempts=job.attempts + 1, pid=None,
                                       proc_started=None, exit_code=None)
            else:
                job = self.jobs.transition(job.id, RUNNING, expect=QUEUED, attempts=1)
        except FailedPrecondition:
            return  # cancelled meanwhile
        try:
            handle = runner.start(job)
        except Exception as exc:  # noqa: BLE001 - any failure to start is the job's end
            log.exception("job %s: could not start its trainer", job.id)
            self._fail(job, f"could not start the trainer: {exc}")
            return
        with self._lock:
            self._handles[job.id] = handle
        self.jobs.update(job.id, pid=handle.ref, proc_started=handle.started)

    def _settle(self, job: Job, code: int | None, limit: str | None = None) -> None:
        """Decide the fate of a RUNNING job whose process has ended (``limit``: the limit
        its runner stopped it for)."""
        result = read_result(job.run_dir)
        if result is not None:
            with self._lock:
                self._finishing.add(job.id)
            self.jobs.update(job.id, exit_code=code, pid=None)
            self._pool.submit(self._finish, job.id, result)
        elif job.cancel_requested:
            self.jobs.transition(job.id, CANCELLED, expect=RUNNING, exit_code=code, error="cancelled by request")
            log.info("job %s CANCELLED", job.id)
        elif limit is not None:
            self._fail(job, f"{limit}; {checkpoint_note(job.run_dir)}", code)
        elif code is None and ended_with_error(job.log_path):
            # it failed on its own while no service followed it: resuming would fail again
            self._fail(job, failure_reason(job.log_path, code) + " (while no control service followed it)")
        elif interrupted(code) and job.attempts - job.service_stops < self.max_attempts:
            how = "was killed" if code is not None else "ended while no control service followed it"
            log.warning("job %s: its trainer %s (%s); resuming from its checkpoint, attempt %d of %d", job.id,
                        how, f"exit status {code}" if code is not None else "status unknown",
                        job.attempts - job.service_stops + 1, self.max_attempts)
            self._launch(job, resume=True)
        elif interrupted(code):
            self._fail(job, f"interrupted {job.attempts - job.service_stops} times (last: "
                            f"{'exit status %d' % code if code is not None else 'status unknown'}); "
                            f"gave up after {self.max_attempts} attempts", code)
        elif code == 0:
            self._fail(job, "trainer exited 0 but wrote no result.json", code)
        else:
            self._fail(job, failure_reason(job.log_path, code), code)

    def _fail(self, job: Job, reason: str, code: int | None = None) -> None:
        try:
            self.jobs.transition(job.id, FAILED, exit_code=code, error=reason)
            log.warning("job %s FAILED: %s", job.id, reason)
        except FailedPrecondition:
            pass

    def _finish(self, job_id: str, result: dict) -> None:
        try:
            job = self.jobs.get(job_id)
            try:
                fields = self.on_result(job, result)
            except FinishDeferred as exc:
                log.info("job %s: left RUNNING, to be finished by the next service (%s)", job_id, exc)
                return
            except ServiceError as exc:
                self._fail(job, f"could not finish the job: {exc.message}")
                return
            except Exception as exc:  # noqa: BLE001
                log.exception("job %s: finishing failed", job_id)
                self._fail(job, f"could not finish the job: {type(exc).__name__}: {exc}")
                return
            self.jobs.transition(job_id, SUCCEEDED, expect=RUNNING, **fields)
            log.info("job %s SUCCEEDED: %s version %s (%s)", job_id, result.get("name"), result.get("version"),
                     fields.get("deploy_reason", ""))
        finally:
            with self._lock:
                self._finishing.discard(job_id)
            self._tails.pop(job_id, None)
            self.wake()
