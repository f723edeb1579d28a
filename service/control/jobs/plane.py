"""The control plane: what the control API does, as plain Python (no gRPC here).

:class:`ControlPlane` composes the job store, the runners, the scheduler and the
deployer. The gRPC servicer only translates messages to and from its methods, which
raise the named errors of :mod:`service.errors`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from service.control.jobs import intake as specs
from service.control.settings import ControlConfig
from service.deploy.deployer import Deployer
from service.deploy.policies import (
    DEFAULT_TOLERANCE,
    DEPLOY_FAILED,
    DEPLOY_POLICIES,
    SERVING_POLICIES,
    RunFacts,
    within_tolerance,
)
from service.control.runners.local import build_runners
from service.control.jobs.scheduler import FinishDeferred, Scheduler
from service.deploy.speed import SpeedCheck, SpeedCheckInterrupted, run_speed_check
from service.control.jobs.jobstore import FINAL_STATES, QUEUED, RUNNING, Job, JobStore, new_job_id
from service.errors import FailedPrecondition, InvalidSpec, NotFound, ServiceError, shown
from service.modelstore import ArchiveInfo, ModelStore, known_refusal
from service.rundir import EVENTS_FILE, LOG_FILE, RUN_SPEC_FILE, EventTail, complete_result, has_run_facts

log = logging.getLogger(__name__)

#: The longest page of ListFineTuneJobs, and its default.
MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE = 1000, 100


@dataclass(frozen=True)
class JobUpdate:
    """One update of a watched job: ``kind`` "state" (``job.state`` was entered), "epoch" or
    "event" (``event``: the trainer's event line)."""

    kind: str
    job: Job
    event: dict | None = None


@dataclass(frozen=True)
class ModelView:
    """A model store archive and how TorchServe serves it (``serving`` None: not registered
    or TorchServe unreachable)."""

    archive: ArchiveInfo
    serving: object | None  # service.deploy.readiness.ModelReadiness
    #: Why the archive check refused the archive ("" if it did not, or it was not checked here).
    refused: str = ""
    #: The latest deploy decision recorded about the version (ModelStore.deploy_decisions).
    deploy_decision: dict | None = None


# ---- facts of a finished run ------------------------------------------------------------------
def metric_mode(task: str | None) -> str:
    """"max" or "min": which way the task's validation metric is better."""
    from service.training.catalog import TASK_METRICS  # torch-free, unlike the trainer's tasks

    return TASK_METRICS[task].mode if task in TASK_METRICS else "max"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parent_metric(models: ModelStore, run: dict) -> float | None:
    """The parent's validation metric on the new version's validation set, when known.

    ``run`` is the run's result.json (:func:`service.rundir.result_record`). In order: its
    ``parent_val_metric`` (where the trainer records its evaluation of the parent); else the
    parent's own lineage metric when the parent was trained on the same data (same dataset
    sha256, which covers the validation split) with the same metric.
    """
    value = run.get("parent_val_metric")
    if _number(value):
        return float(value)
    parent = run.get("parent")
    return same_data_metric(models, run, str(parent)) if parent else None


def same_data_metric(models: ModelStore, run: dict, ref: str) -> float | None:
    """The metric of version ``ref`` ("name:version") from its own lineage, when it was
    trained on the same data as ``run`` (its result.json: same dataset sha256, which covers
    the validation split) with the same metric; else None."""
    name, _, version = ref.partition(":")
    try:
        theirs = models.lineage(name, int(version))
    except (ValueError, ServiceError, OSError):
        return None
    ours_sha = run.get("dataset_sha256")
    their_sha = (theirs.get("dataset") or {}).get("sha256")
    their_metrics = theirs.get("metrics") or {}
    value = their_metrics.get("val_metric")
    if ours_sha and ours_sha == their_sha and their_metrics.get("metric") == run.get("metric") and _number(value):
        return float(value)
    return None


def serving_metric(models: ModelStore, run: dict, name: str, serving: int) -> float | None:
    """The serving version's metric on the new version's validation set, when known, the
    first of: the parent's, as the trainer measured it, when the serving version is the run's
    parent; the teacher's, as a distillation run measured it (``distill.teacher_val_metric``),
    when it is the run's teacher; its own lineage metric from a run on the same data
    (:func:`same_data_metric`). ``run``: the run's result.json."""
    ref = f"{name}:{serving}"
    value = parent_metric(models, run) if run.get("parent") == ref else None
    distill = run.get("distill") or {}
    teacher = distill.get("teacher_val_metric")
    if value is None and distill.get("teacher") == ref and _number(teacher) and distill.get("metric") == run.get("metric"):
        value = float(teacher)
    return value if value is not None else same_data_metric(models, run, ref)


def check_tolerance(value, deploy_policy: str) -> float | None:
    """A job's deploy tolerance: None for a policy other than deploy-if-faster (InvalidSpec if
    one was given), the default when not given, else a finite number from 0 to 1."""
    if deploy_policy not in SERVING_POLICIES:
        if value is not None:
            raise InvalidSpec("deploy_tolerance", f"applies to deploy-if-faster only, not {deploy_policy}")
        return None
    if value is None:
        return DEFAULT_TOLERANCE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise InvalidSpec("deploy_tolerance", f"must be a number from 0 to 1 (metric units; 0.01 is one point "
                                              f"of accuracy), got {shown(value)}")
    return float(value)


class ControlPlane:
    """Jobs and deployments. ``serve_settings``: the ServeSettings of the TorchServe to deploy
    to; ``mgmt``: a callable returning its ManagementClient (Unavailable while none)."""

    def __init__(self, config: ControlConfig, serve_settings, mgmt: Callable, *, locks=None):
        self.config = config.resolved(serve_settings)
        self.jobs = JobStore(self.config.db_path)
        self.models = ModelStore(self.config.model_store)
        self.runners = build_runners(self.config)
        default_workers = self.config.deploy_workers or serve_settings.workers_per_model
        self.deployer = Deployer(serve_settings, mgmt, self.jobs.history, self.models,
                                 timeout_s=self.config.deploy_timeout_s,
                                 default_workers=self.config.deploy_workers,
                                 max_workers=self.config.deploy_workers_limit(default_workers),
                                 target=self.config.deploy_target, locks=locks)
        self.scheduler = Scheduler(self.jobs, self.runners, self._on_result,
                                   max_concurrent_jobs=self.config.max_concurrent_jobs,
                                   cancel_grace_s=self.config.cancel_grace_s,
                                   max_attempts=self.config.max_attempts, poll_s=self.config.poll_s)
        self._policy = None
        self._instance_lock = None
        self._started = False
        #: Set when the service stops: a speed check under way is ended, its job left RUNNING.
        self._stopping = threading.Event()

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not since (the scheduler is running)."""
        return self._started

    def start(self, *, reconcile: bool = True) -> None:
        """Take the database (one service per database), settle the deployments a crash left
        half done, recover the jobs and start scheduling; restore the recorded defaults in
        TorchServe in the background."""
        self._instance_lock = _lock_exclusively(self.config.db_path.with_name(self.config.db_path.name + ".lock"))
        self._stopping.clear()
        self.deployer.recover()  # deployments a crash left half done, before any new one
        self.scheduler.start()
        self._started = True
        if reconcile:
            threading.Thread(target=self.deployer.reconcile, name="modelctl-reconcile", daemon=True).start()

    def stop(self, *, stop_jobs: bool = True) -> None:
        self._stopping.set()  # before the scheduler waits for the jobs it is finishing
        if self._started:
            self.scheduler.stop(stop_jobs=stop_jobs)
            self._started = False
        self.jobs.close()
        if self._instance_lock is not None:
            os.close(self._instance_lock)
            self._instance_lock = None

    @property
    def policy(self):
        if self._policy is None:
            self._policy = specs.policy_for(self.config)
        return self._policy

    # ---- jobs ------------------------------------------------------------------------------
    def create_job(self, spec_data, *, deploy_policy: str = "none", deploy_workers: int = 0,
                   runner: str = "", deploy_tolerance: float | None = None) -> Job:
        """``deploy_tolerance``: deploy-if-faster's metric tolerance (None: the default, 0.01)."""
        runner = runner or self.config.default_runner
        if runner not in self.runners:
            raise InvalidSpec("runner", f"unknown runner {shown(runner)}", allowed=list(self.runners))
        if deploy_policy not in DEPLOY_POLICIES:
            raise InvalidSpec("deploy_policy", f"unknown deploy policy {shown(deploy_policy)}",
                              allowed=list(DEPLOY_POLICIES))
        deploy_tolerance = check_tolerance(deploy_tolerance, deploy_policy)
        self.deployer.check_workers(deploy_workers, "deploy_workers")
        spec = specs.validate(spec_data, self.policy, self.models)
        job_id = new_job_id()
        run_dir = self.config.runs_dir / job_id
        specs.write_spec(spec, run_dir, RUN_SPEC_FILE)
        job = self.jobs.create_job(spec=spec.to_dict(), output_model=spec.output.name, base=spec.base,
                                   runner=runner, run_dir=run_dir, log_path=run_dir / LOG_FILE,
                                   deploy_policy=deploy_policy, deploy_workers=deploy_workers, job_id=job_id,
                                   deploy_tolerance=deploy_tolerance)
        log.info("job %s QUEUED: %s from %s, deploy policy %s", job.id, spec.output.name,
                 spec.base or "a family spec", deploy_policy)
        self.scheduler.wake()
        return job

    def get_job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def list_jobs(self, *, states=(), output_model: str = "", page_size: int = 0,
                  page_token: str = "") -> tuple[list[Job], str]:
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidSpec("page_size", f"must be 0..{MAX_PAGE_SIZE}, got {page_size}")
        bad = [s for s in states if s not in FINAL_STATES | {QUEUED, RUNNING}]
        if bad:
            raise InvalidSpec("states", f"unknown state {shown(bad[0])}")
        before = None
        if page_token:
            if not (page_token.isascii() and page_token.isdigit()) or len(page_token) > 18:
                raise InvalidSpec("page_token", f"{shown(page_token, 60)} is not a token this service gave")
            before = int(page_token)
        size = page_size or DEFAULT_PAGE_SIZE
        jobs = self.jobs.list(states=states, output_model=output_model or None, limit=size + 1,
                              before_seq=before)
        more = len(jobs) > size
        jobs = jobs[:size]
        return jobs, (str(jobs[-1].seq) if more else "")

    def cancel_job(self, job_id: str, *, wait_s: float | None = None) -> Job:
        """Cancel; wait for a running job's process to end (returns the job as it is then)."""
        job = self.jobs.get(job_id)
        if job.state == QUEUED:
            try:
                job = self.jobs.transition(job_id, "CANCELLED", expect=QUEUED, error="cancelled before it started")
                log.info("job %s CANCELLED (it was QUEUED)", job_id)
                return job
            except FailedPrecondition:
                job = self.jobs.get(job_id)  # it started meanwhile
        if job.state != RUNNING:
            raise FailedPrecondition(f"job {job_id} is {job.state}; only QUEUED or RUNNING jobs can be cancelled")
        if not job.cancel_requested:
            self.jobs.update(job_id, cancel_requested=time.time())
        self.scheduler.wake()
        deadline = time.monotonic() + (self.config.cancel_grace_s + 30 if wait_s is None else wait_s)
        revision = self.jobs.revision
        while True:
            job = self.jobs.get(job_id)
            if job.final or time.monotonic() >= deadline:
                return job
            revision = self.jobs.wait_for_change(revision, min(self.config.poll_s, deadline - time.monotonic()))

    def watch_job(self, job_id: str, *, skip_history: bool = False,
                  active: Callable[[], bool] = lambda: True) -> Iterator[JobUpdate]:
        """The trainer events written so far (unless ``skip_history``), the job's current state,
        then its new events and state changes as they come, until it is final."""
        job = self.jobs.get(job_id)
        tail = EventTail(Path(job.run_dir) / EVENTS_FILE)
        if skip_history:
            tail.skip_to_end()
        else:
            yield from self._events(tail, job)
        job = self.jobs.get(job_id)
        yield JobUpdate("state", job)
        state = job.state
        revision = self.jobs.revision
        while active():
            yield from self._events(tail, job)
            if job.final:
                return
            job = self.jobs.get(job_id)
            if job.final:
                yield from self._events(tail, job)  # the last ones ("done") before the final state
            if job.state != state:
                state = job.state
                yield JobUpdate("state", job)
            if job.final:
                return
            revision = self.jobs.wait_for_change(revision, self.config.poll_s)

    @staticmethod
    def _events(tail: EventTail, job: Job) -> Iterator[JobUpdate]:
        for event in tail.read_new():
            yield JobUpdate("epoch" if event.get("event") == "epoch" else "event", job, event)

    # ---- models --------------------------------------------------------------------------------
    def list_models(self, name: str = "") -> tuple[list[ModelView], bool]:
        if name:
            versions = {name: self.models.versions(name)}
            if not versions[name]:
                raise NotFound(f"model {name!r} has no version in the model store")
        else:
            versions = self.models.models()
        try:
            report = {r.key: r for r in self.deployer.serving_report()}
            available = True
        except ServiceError:
            report, available = {}, False
        views = []
        for n, vs in versions.items():
            for v in vs:
                info = self.models.get(n, v)
                refusal = known_refusal(info.path, name=n, version=v)
                try:
                    decisions = self.models.deploy_decisions(n, v)
                except ServiceError as exc:
                    decisions = [{"error": exc.message}]
                views.append(ModelView(info, report.get((n, str(v))), refusal.problem if refusal else "",
                                       decisions[-1] if decisions else None))
        return views, available

    def deploy(self, name: str, version: int, *, workers: int = 0, timeout_s: float = 0.0):
        if version < 1:
            raise InvalidSpec("version", f"must be >= 1, got {version}")
        self.deployer.check_workers(workers)
        if timeout_s < 0:
            raise InvalidSpec("timeout_s", f"must be >= 0, got {timeout_s}")
        return self.deployer.deploy(name, version, workers, timeout_s=timeout_s or None)

    def rollback(self, name: str, version: int = 0, *, workers: int = 0):
        if version < 0:
            raise InvalidSpec("version", f"must be >= 0 (0: the previous default), got {version}")
        self.deployer.check_workers(workers)
        return self.deployer.rollback(name, version, workers)

    # ---- a finished run --------------------------------------------------------------------------
    def _on_result(self, job: Job, result: dict) -> dict:
        """Read what the run wrote, apply the job's deploy policy; the fields of SUCCEEDED."""
        name, version = str(result["name"]), int(result["version"])
        run = self._run_record(result, name, version)
        metric, value = run.get("metric"), run.get("val_metric")
        facts = RunFacts(name=name, version=version, metric=metric, mode=metric_mode(run.get("task")),
                         val_metric=None if value is None else float(value), parent=run.get("parent"),
                         parent_val_metric=parent_metric(self.models, run))
        if job.deploy_policy in SERVING_POLICIES:
            facts = self._compare_with_serving(job, facts, run)
        decision = DEPLOY_POLICIES[job.deploy_policy](facts)
        outcome, reason = decision.outcome, decision.reason
        check = None
        if job.deploy_policy in SERVING_POLICIES:  # recorded before the switch: the job has decided
            check = self._record_check(job, facts, outcome, reason)
        if decision.deploy:
            try:
                self.deployer.deploy(name, version, job.deploy_workers, job_id=job.id)
            except ServiceError as exc:
                outcome, reason = DEPLOY_FAILED, f"deployment failed: {exc.message}"
                log.warning("job %s: %s", job.id, reason)
                if check is not None:
                    self._record_check(job, facts, outcome, reason)
        fields = {"result_version": version, "parent": facts.parent, "metric": metric,
                  "val_metric": facts.val_metric, "parent_val_metric": facts.parent_val_metric,
                  "deploy_outcome": outcome, "deploy_reason": reason, "epoch": int(result.get("epochs") or job.epoch)}
        if check is not None:
            fields["deploy_check"] = check
        return fields

    def _run_record(self, result: dict, name: str, version: int) -> dict:
        """The run's result.json, the one record of what it wrote and measured; one written
        before it carried the run's facts is completed from the archive's lineage record."""
        if has_run_facts(result):
            if version not in self.models.versions(name):
                raise NotFound(f"the run's archive {name} version {version} is not in the store")
            return result
        lineage = self.models.lineage(name, version)
        if not lineage:
            raise NotFound(f"the run's archive {name} version {version} has no lineage record in the store")
        return complete_result(result, lineage)

    def _serving_default(self, name: str) -> int | None:
        """The model's serving default: TorchServe's here (or the store's with target
        "store"); the store's when TorchServe does not answer."""
        try:
            return self.deployer.current_default(name)
        except ServiceError:
            return self.models.default_version(name)

    def _compare_with_serving(self, job: Job, facts: RunFacts, run: dict) -> RunFacts:
        """``facts`` with the serving version, its metric on the run's validation set, the
        job's tolerance and a speed check of both (skipped without another serving version).
        Raises FinishDeferred when the service stops during the check (the job stays RUNNING;
        the next service finishes it).

        A job measures once: finished again after a restart (its decision recorded, its
        version perhaps deployed already), it takes the facts of its record in the model
        store, so the same decision follows (a new measurement could differ, and the new
        version may be the serving one by now)."""
        prior = self._recorded_check(job, facts)
        if prior is not None:
            log.info("job %s: deciding again from the check recorded before the restart", job.id)
            speed = prior.get("speed")
            return dataclasses.replace(
                facts, serving_version=prior.get("serving_version"), serving_val_metric=prior.get("serving_val_metric"),
                tolerance=float(prior.get("tolerance", DEFAULT_TOLERANCE)),
                speed=SpeedCheck.from_dict(speed) if isinstance(speed, dict) else None)
        serving = self._serving_default(facts.name)
        if serving == facts.version:
            serving = None
        tolerance = DEFAULT_TOLERANCE if job.deploy_tolerance is None else job.deploy_tolerance
        if serving is None:
            return dataclasses.replace(facts, tolerance=tolerance)
        c = self.config
        log.info("job %s: measuring %s version %d against serving version %d", job.id, facts.name, facts.version,
                 serving)
        try:
            speed = run_speed_check(self.models.root, facts.name, facts.version, serving,
                                    device=c.speed_check_device, rounds=c.speed_check_rounds,
                                    margin=c.speed_check_margin, timeout_s=c.speed_check_timeout_s,
                                    cancel=self._stopping)
        except SpeedCheckInterrupted as exc:
            raise FinishDeferred(str(exc)) from None
        return dataclasses.replace(
            facts, serving_version=serving, tolerance=tolerance, speed=speed,
            serving_val_metric=serving_metric(self.models, run, facts.name, serving))

    def _recorded_check(self, job: Job, facts: RunFacts) -> dict | None:
        """This job's decision recorded beside its version, if any (an earlier attempt to finish)."""
        try:
            decisions = self.models.deploy_decisions(facts.name, facts.version)
        except ServiceError:
            return None
        return next((d for d in reversed(decisions) if d.get("job_id") == job.id), None)

    def _record_check(self, job: Job, facts: RunFacts, outcome: str, reason: str) -> dict:
        """The deploy check of a serving policy: kept in the job store (returned) and beside
        the new version in the model store (``<version>.deploy.json``; a failed write there
        is logged, the job keeps its copy)."""
        check = {"serving_version": facts.serving_version, "serving_val_metric": facts.serving_val_metric,
                 "within_tolerance": bool(within_tolerance(facts)), "tolerance": facts.tolerance,
                 "speed": facts.speed.to_dict() if facts.speed is not None else None}
        decided_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        record = {"job_id": job.id, "policy": job.deploy_policy, "decided_at": decided_at,
                  "version": facts.version, "metric": facts.metric, "val_metric": facts.val_metric,
                  **check, "outcome": outcome, "reason": reason}
        try:
            self.models.record_deploy_decision(facts.name, facts.version, record)
        except ServiceError as exc:
            log.warning("job %s: could not record the deploy decision beside %s version %d: %s", job.id,
                        facts.name, facts.version, exc.message)
        return check


def _lock_exclusively(path: Path) -> int:
    """An exclusive lock held for the service's life (released by the OS if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(f"another control service uses the job database next to {path}") from None
    return fd
