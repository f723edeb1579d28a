"""Deploying model versions to TorchServe, deploy policies, and rollback.

A deployment (:meth:`Deployer.deploy`):

1. checks the store holds the version (NotFound for an unknown model, FailedPrecondition
   for a missing version) and that its archive passes the archive check
   (:func:`service.modelstore.check_archive`, cached): a corrupt archive, or one whose
   weights need pickled code or do not fit its spec, is ArchiveRefused
   (FAILED_PRECONDITION) naming the file and the problem, whatever the target, and nothing
   changes;
2. with ``target="torchserve"`` (the TorchServe beside this service): registers it
   through :func:`service.serving.store_scan.checked_link` (never a ``file://`` URL) with
   the requested workers, or rescales it if it is registered; waits until every worker is
   READY (:func:`service.serving.readiness.wait_until_ready`); if they are not, it
   unregisters what it registered and raises Unavailable, leaving the default as it was;
   then makes it the default;
3. records the model's desired state in the model store (``deployment.json``), which every
   serving replica converges on (:mod:`service.deploy.converge`); with ``target="store"``
   (replicas elsewhere, as on Kubernetes) this is all it does;
4. pushes it on the model's deployment history with the default it replaced.

The workers asked for are checked first (1 to ``max_workers``, or 0 for the default):
beyond, InvalidSpec (INVALID_ARGUMENT), and nothing is registered or started.

:meth:`Deployer.rollback` pops the history: the default before the latest deployment is
deployed the same way. :meth:`Deployer.reconcile` copies the history's defaults into the
store for models that have no desired state there yet.

**Crash-safe order.** ``deployment.json`` is the commit point of a deployment. The history
row is written first as an intent (``done = 0``, invisible to rollbacks and to
reconcile), then ``deployment.json``, then the row is marked done (for a rollback: the
popped row is taken off the stack in that same transaction). A deployment that fails
deletes its intent. After a crash at any step, :meth:`Deployer.recover` (run when the
control service starts, before any call) settles every intent left: done when
``deployment.json`` names its version (the switch happened), deleted otherwise (it did
not; the converger of each replica follows ``deployment.json``, so TorchServe comes back
to it too). The history and ``deployment.json`` then agree, and a rollback goes to the
version before the one ``deployment.json`` names.

Deploy policies are plain functions of a finished run's facts, in :data:`DEPLOY_POLICIES`.
Those in :data:`SERVING_POLICIES` compare with the model's serving version: the control
plane first gathers that version, its metric on the run's validation set, and a speed
check of both (:mod:`service.deploy.speed`) into the facts.

**deploy-if-faster** deploys the new version only when it is faster *and* its metric is
within the tolerance of the serving version's:

* the serving version is the model's default when the run finished (:meth:`Deployer.current_default`);
  a model with no other version serving gets the new one deployed, with nothing to compare;
* its metric on this run's validation set is the one the trainer measured for the run's
  parent, when the serving version *is* the parent; or for the run's teacher, when it is the
  teacher of a distillation run (a student); otherwise its own lineage metric when it was
  trained on the same data (same dataset sha256, same metric). With none of these (a serving
  version that is neither parent nor teacher and was trained on other data, a replaced
  head) nothing is comparable: NO_COMPARABLE_METRIC, not deployed;
* within tolerance: ``new >= serving - tolerance`` for a metric where larger is better,
  ``new <= serving + tolerance`` where smaller is (mse: absolute on the loss side);
* faster: :attr:`service.deploy.speed.SpeedCheck.faster` (batch-1 p50 and batch-8
  throughput, each better by more than the noise margin). A check that failed or timed out
  is not faster.

When several conditions fail, the outcome names the metric's first (NO_COMPARABLE_METRIC,
OUTSIDE_TOLERANCE), and the reason says every part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from service import faultpoints
from service.deploy.speed import SpeedCheck
from service.errors import AlreadyExists, FailedPrecondition, InvalidSpec, NotFound, ServiceError, Unavailable
from service.serving import readiness
from service.deploy.converge import ModelLocks
from service.modelstore import require_archive
from service.serving.store_scan import checked_link

log = logging.getLogger(__name__)

# Deploy outcomes (the proto's DeployOutcome without its prefix).
NOT_REQUESTED, DEPLOYED, KEPT_PARENT, DEPLOY_FAILED = "NOT_REQUESTED", "DEPLOYED", "KEPT_PARENT", "FAILED"
NOT_FASTER, OUTSIDE_TOLERANCE, NO_COMPARABLE_METRIC = "NOT_FASTER", "OUTSIDE_TOLERANCE", "NO_COMPARABLE_METRIC"

#: deploy-if-faster's metric tolerance unless a job sets one: one point of accuracy.
DEFAULT_TOLERANCE = 0.01


# ---- policies ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFacts:
    """What a deploy policy knows about a finished run's new version."""

    name: str
    version: int
    metric: str | None
    #: "max" when a larger metric is better, "min" when a smaller one is.
    mode: str
    val_metric: float | None
    #: "name:version" the run started from, or None.
    parent: str | None
    #: The parent's metric on the same validation set, when known.
    parent_val_metric: float | None
    # Gathered for SERVING_POLICIES only:
    #: The version serving as the model's default when the run finished (None: none but
    #: this one).
    serving_version: int | None = None
    #: That version's metric on this run's validation set, when known.
    serving_val_metric: float | None = None
    #: How much worse than the serving version's the metric may be (metric units).
    tolerance: float = DEFAULT_TOLERANCE
    #: Both versions' speed, side by side (None: not measured).
    speed: SpeedCheck | None = None


@dataclass(frozen=True)
class Decision:
    deploy: bool
    outcome: str
    reason: str


def policy_none(facts: RunFacts) -> Decision:
    return Decision(False, NOT_REQUESTED, "deploy policy none: not deployed")


def policy_deploy(facts: RunFacts) -> Decision:
    return Decision(True, DEPLOYED, "deploy policy deploy")


def policy_deploy_if_better(facts: RunFacts) -> Decision:
    metric = facts.metric or "metric"
    if facts.parent is None:
        return Decision(True, DEPLOYED, "no parent to compare with: deployed")
    if facts.val_metric is None or facts.parent_val_metric is None:
        return Decision(False, KEPT_PARENT,
                        f"the parent's {metric} on this run's validation set is unknown; kept {facts.parent}")
    new, old = facts.val_metric, facts.parent_val_metric
    ok = new >= old if facts.mode == "max" else new <= old
    sign = (">=" if ok else "<") if facts.mode == "max" else ("<=" if ok else ">")
    if ok:
        return Decision(True, DEPLOYED, f"{metric} {new:.4f} {sign} parent {facts.parent}'s {old:.4f}: deployed")
    return Decision(False, KEPT_PARENT, f"{metric} {new:.4f} {sign} parent {facts.parent}'s {old:.4f}: "
                                        f"kept {facts.parent}")


def within_tolerance(facts: RunFacts) -> bool | None:
    """Whether the new metric is no worse than the serving version's by more than the
    tolerance (in the metric's direction); None when either is unknown."""
    if facts.val_metric is None or facts.serving_val_metric is None:
        return None
    worse_by = (facts.serving_val_metric - facts.val_metric if facts.mode == "max"
                else facts.val_metric - facts.serving_val_metric)
    return worse_by <= facts.tolerance + 1e-12  # 0.905 vs 0.915 is within 0.01 despite binary floats


def policy_deploy_if_faster(facts: RunFacts) -> Decision:
    serving = facts.serving_version
    if serving is None or serving == facts.version:
        return Decision(True, DEPLOYED, f"{facts.name} has no other version serving: deployed")
    metric = facts.metric or "metric"
    ok_metric = within_tolerance(facts)
    if ok_metric is None:
        metric_text = f"no {metric} of version {serving} on this run's validation set to compare with"
    else:
        metric_text = (f"{metric} {facts.val_metric:.4f} vs {facts.serving_val_metric:.4f} "
                       f"{'within' if ok_metric else 'outside'} {facts.tolerance:g}")
    speed = facts.speed or SpeedCheck(error="not run")
    speed_text = speed.describe()
    if speed.measured and not speed.faster:
        speed_text += f" (not faster by the {speed.margin:.0%} margin)"
    if ok_metric and speed.faster:
        return Decision(True, DEPLOYED, f"{speed_text}, {metric_text}: deployed")
    outcome = NO_COMPARABLE_METRIC if ok_metric is None else OUTSIDE_TOLERANCE if not ok_metric else NOT_FASTER
    return Decision(False, outcome, f"{speed_text}, {metric_text}: kept version {serving}")


#: Deploy policy name -> decision function.
DEPLOY_POLICIES: dict[str, Callable[[RunFacts], Decision]] = {
    "none": policy_none,
    "deploy": policy_deploy,
    "deploy-if-better": policy_deploy_if_better,
    "deploy-if-faster": policy_deploy_if_faster,
}
#: Policies that compare with the model's serving version (the plane gathers
#: RunFacts.serving_version, serving_val_metric, tolerance and speed for them).
SERVING_POLICIES = frozenset({"deploy-if-faster"})


# ---- deployer --------------------------------------------------------------------------------
class Deployer:
    """Deploys to the TorchServe whose management API ``mgmt()`` returns.

    ``settings``: the ServeSettings of that TorchServe (model store, archive dir, timeouts).
    ``mgmt``: a callable returning its ManagementClient, raising Unavailable while there is
    none. ``jobs``: the JobStore holding the deployment history.
    """

    def __init__(self, settings, mgmt: Callable, jobs, model_store, *, timeout_s: float = 120.0,
                 default_workers: int = 0, max_workers: int | None = None, target: str = "torchserve",
                 locks: ModelLocks | None = None):
        self.settings = settings
        self._mgmt = mgmt
        self.jobs = jobs
        self.model_store = model_store
        self.timeout_s = timeout_s
        self.default_workers = default_workers or settings.workers_per_model
        #: The most workers a deployment may ask for (None: no bound; the control plane
        #: always sets one, ControlConfig.deploy_workers_limit).
        self.max_workers = max_workers
        self.target = target
        #: Shared with the converger of a TorchServe in this process (service.deploy.converge).
        self._lock = locks or ModelLocks()

    @property
    def local(self) -> bool:
        """Whether deployments switch a TorchServe here (else they only write the store)."""
        return self.target == "torchserve"

    def mgmt(self):
        return self._mgmt()

    # ---- facts ---------------------------------------------------------------------------
    def check_workers(self, workers, field: str = "workers") -> int:
        """The workers a deployment asking for ``workers`` gets (0: the default); InvalidSpec
        naming ``field`` when it is not 0..max_workers. Called before anything else."""
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise InvalidSpec(field, f"must be an integer, got {type(workers).__name__}")
        limit = self.max_workers
        if workers < 0 or (limit is not None and workers > limit):
            bound = f"from 1 to {limit} (this service's limit, MODELCTL_MAX_DEPLOY_WORKERS)" if limit is not None \
                else ">= 1"
            raise InvalidSpec(field, f"must be {bound}, or 0 for the default ({self.default_workers}); got {workers}")
        return workers or self.default_workers

    def _versions(self, name: str) -> list[int]:
        versions = self.model_store.versions(name)  # InvalidSpec for a malformed name
        if not versions:
            raise NotFound(f"model {name!r} has no version in the model store")
        return versions

    def _check_version(self, name: str, version: int, what: str = "deploy") -> None:
        if int(version) < 1:
            raise FailedPrecondition(f"version must be >= 1, got {version}")
        versions = self._versions(name)
        if int(version) not in versions:
            raise FailedPrecondition(f"model {name!r} has no version {version} to {what} (versions: {versions})")
        try:
            require_archive(self.model_store.path(name, version), name=name, version=int(version))
        except FileNotFoundError:
            raise FailedPrecondition(f"model {name!r} version {version} vanished from the model store") from None

    def current_default(self, name: str) -> int | None:
        """The version TorchServe answers ``/predictions/<name>`` with; None if unregistered.
        With ``target="store"``: the version the replicas serve as default."""
        if not self.local:
            return self.model_store.default_version(name)
        try:
            entries = self.mgmt().describe(name)
        except NotFound:
            return None
        value = str(entries[0].get("modelVersion", "")) if entries else ""
        return int(value) if value.isascii() and value.isdigit() else None

    def _previous(self, name: str, version: int) -> int | None:
        """The default a deployment of ``version`` replaces. Deploying the version that is
        default already (a replica may have made a model's first version default by itself)
        replaces nothing new: what it replaced before, per the history, or None."""
        current = self.current_default(name)
        if current != version:
            return current
        top = self.jobs.top_deployment(name)
        return top.previous_version if top is not None and top.version == version else None

    def _committed(self, name: str, intent, step: str, **done) -> object:
        """Mark ``intent`` done once deployment.json names its version (the fault point
        ``<step>.desired_written`` falls between the two)."""
        faultpoints.point(f"{step}.desired_written")
        return self.jobs.complete_deployment(intent.id, **done)

    def _abandon(self, intent) -> None:
        try:
            self.jobs.discard_deployment(intent.id)
        except Exception:  # noqa: BLE001 - recover() settles it at the next start
            log.exception("could not discard the deployment intent %s of %s", intent.id, intent.model)

    def serving_report(self) -> list[readiness.ModelReadiness]:
        return readiness.check(self.mgmt())

    # ---- deploy --------------------------------------------------------------------------
    def _activate(self, name: str, version: int, workers: int, timeout_s: float) -> int:
        """Register (or rescale) ``version``, wait for READY workers, set it default.

        Returns the READY worker count. Raises Unavailable (default unchanged) when the
        workers are not all READY in time.
        """
        mgmt = self.mgmt()
        url = checked_link(self.settings, name, version)
        registered_here = False
        try:
            mgmt.register(url, initial_workers=workers, response_timeout_s=self.settings.response_timeout_s,
                          synchronous=False)
            registered_here = True
        except AlreadyExists:
            mgmt.scale(name, version, workers)
        report = readiness.wait_until_ready(mgmt, [(name, version)], timeout_s)
        entry = next(r for r in report if r.key == (name, str(version)))
        if not entry.ready:
            if registered_here:
                try:
                    mgmt.unregister(name, version)
                except ServiceError as exc:
                    log.warning("could not unregister %s version %s: %s", name, version, exc.message)
            raise Unavailable(f"{name} version {version} is not ready after {timeout_s:.0f}s: {entry.reason}; "
                              "the default is unchanged")
        mgmt.set_default(name, version)
        return entry.ready_workers

    def _switch(self, name: str, version: int, workers: int, timeout_s: float, reason: str) -> int:
        """Make ``version`` the default here (when local) and in the store's desired state;
        returns the READY workers here (0 when not local). Holds the model's lock."""
        ready = self._activate(name, version, workers, timeout_s) if self.local else 0
        self.model_store.set_desired(name, version, workers, reason)
        return ready

    def deploy(self, name: str, version: int, workers: int = 0, *, timeout_s: float | None = None,
               job_id: str | None = None):
        """Deploy ``name`` ``version`` and make it the default; returns the Deployment."""
        workers = self.check_workers(workers)
        version = int(version)
        self._check_version(name, version)
        with self._lock(name):
            top = self.jobs.top_deployment(name)
            if job_id is not None and top is not None and top.job_id == job_id and top.version == version:
                # finishing a job again after a restart: it was deployed already
                if self.current_default(name) == version:
                    return top
            previous = self._previous(name, version)
            intent = self.jobs.push_deployment(model=name, version=version, previous_version=previous,
                                               workers=workers, ready_workers=0, action="deploy", job_id=job_id,
                                               done=False)
            faultpoints.point("deploy.intent_recorded")
            try:
                ready = self._switch(name, version, workers, self.timeout_s if timeout_s is None else timeout_s,
                                     f"deploy {job_id}" if job_id else "deploy")
            except BaseException:
                self._abandon(intent)
                raise
            dep = self._committed(name, intent, "deploy", ready_workers=ready)
        log.info("deployed %s version %d (%d/%d workers READY; previous default %s)", name, version, ready,
                 workers, previous)
        return dep

    def rollback(self, name: str, version: int = 0, workers: int = 0, *, timeout_s: float | None = None):
        """Restore the default before the latest deployment (or ``version``)."""
        workers = self.check_workers(workers)
        self._versions(name)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock(name):
            if version:
                self._check_version(name, int(version), "roll back to")
                previous = self._previous(name, int(version))
                intent = self.jobs.push_deployment(model=name, version=int(version), previous_version=previous,
                                                   workers=workers, ready_workers=0, action="rollback", done=False)
            else:
                top = self.jobs.top_deployment(name)
                if top is None:
                    raise FailedPrecondition(f"model {name!r} has no deployment to roll back")
                if top.previous_version is None:
                    raise FailedPrecondition(f"{name} version {top.version} was deployed when the model had no "
                                             "default: there is no earlier default to roll back to")
                self._check_version(name, top.previous_version, "roll back to")
                intent = self.jobs.pop_deployment(top.id, model=name, version=top.previous_version,
                                                  workers=workers, ready_workers=0)
            faultpoints.point("rollback.intent_recorded")
            try:
                ready = self._switch(name, intent.version, workers, timeout_s, "rollback")
            except BaseException:
                self._abandon(intent)
                raise
            dep = self._committed(name, intent, "rollback", ready_workers=ready)
        log.info("rolled %s back to version %d (from %s)", name, dep.version, dep.previous_version)
        return dep

    def recover(self) -> list[str]:
        """Settle the deployments a crash left half done (see the module's docstring): each
        intent is completed when ``deployment.json`` names its version, and deleted when it
        does not. Returns one line per intent settled (also logged). Run before any deploy."""
        settled = []
        for intent in self.jobs.pending_deployments():
            try:
                desired = self.model_store.desired(intent.model)
            except ServiceError as exc:  # unreadable: leave it; a later start tries again
                log.warning("deployment intent %d of %s left pending: %s", intent.id, intent.model, exc.message)
                continue
            if desired is not None and desired.version == intent.version:
                self.jobs.complete_deployment(intent.id, ready_workers=0)
                line = (f"{intent.action} of {intent.model} version {intent.version} was interrupted after "
                        "deployment.json was written: recorded as done")
            else:
                self.jobs.discard_deployment(intent.id)
                now = desired.version if desired is not None else "none"
                line = (f"{intent.action} of {intent.model} version {intent.version} was interrupted before "
                        f"deployment.json was written (it names {now}): dropped from the history")
            log.warning("%s", line)
            settled.append(line)
        return settled

    def reconcile(self) -> list[str]:
        """Record in the model store the defaults of the deployment history for models that
        have no desired state there yet (deployed before the store kept it); the serving
        replicas converge on them. Returns the models recorded. Errors are logged."""
        recorded = []
        for name, dep in self.jobs.desired_defaults().items():
            try:
                with self._lock(name):
                    if self.model_store.desired(name) is not None:
                        continue
                    self.model_store.set_desired(name, dep.version, dep.workers, f"history of {dep.action}")
                recorded.append(name)
                log.info("recorded the default of %s, version %d, in the model store", name, dep.version)
            except ServiceError as exc:
                log.warning("could not record the default of %s (version %d): %s", name, dep.version, exc.message)
        return recorded
