"""Deploying model versions to TorchServe, and rollback.

A deployment (:meth:`Deployer.deploy`):

1. checks the store holds the version (NotFound for an unknown model, FailedPrecondition
   for a missing version) and that its archive passes the archive check
   (:func:`service.modelstore.check_archive`, cached): a corrupt archive, or one whose
   weights need pickled code or do not fit its spec, is ArchiveRefused
   (FAILED_PRECONDITION) naming the file and the problem, whatever the target, and nothing
   changes;
2. with ``target="torchserve"`` (the TorchServe beside this service): registers it
   through :func:`service.deploy.store_scan.checked_link` (never a ``file://`` URL) with
   the requested workers, or rescales it if it is registered; waits until every worker is
   READY (:func:`service.deploy.readiness.wait_until_ready`); if they are not, it
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

Whether a finished run's version is deployed at all is a deploy policy's decision
(:mod:`service.deploy.policies`); this module carries deployments out.
"""

from __future__ import annotations

import logging
from typing import Callable

from service import faultpoints
from service.errors import AlreadyExists, FailedPrecondition, InvalidSpec, NotFound, ServiceError, Unavailable
from service.deploy import readiness
from service.deploy.converge import ModelLocks
from service.modelstore import require_archive
from service.deploy.store_scan import checked_link

log = logging.getLogger(__name__)

class Deployer:
    """Deploys to the TorchServe whose management API ``mgmt()`` returns.

    ``settings``: the ServeSettings of that TorchServe (model store, archive dir, timeouts).
    ``mgmt``: a callable returning its ManagementClient, raising Unavailable while there is
    none. ``history``: the deployment history (:class:`service.deploy.history.DeploymentHistory`).
    """

    def __init__(self, settings, mgmt: Callable, history, model_store, *, timeout_s: float = 120.0,
                 default_workers: int = 0, max_workers: int | None = None, target: str = "torchserve",
                 locks: ModelLocks | None = None):
        self.settings = settings
        self._mgmt = mgmt
        self.history = history
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
        top = self.history.top_deployment(name)
        return top.previous_version if top is not None and top.version == version else None

    def _committed(self, name: str, intent, step: str, **done) -> object:
        """Mark ``intent`` done once deployment.json names its version (the fault point
        ``<step>.desired_written`` falls between the two)."""
        faultpoints.point(f"{step}.desired_written")
        return self.history.complete_deployment(intent.id, **done)

    def _abandon(self, intent) -> None:
        try:
            self.history.discard_deployment(intent.id)
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
            top = self.history.top_deployment(name)
            if job_id is not None and top is not None and top.job_id == job_id and top.version == version:
                # finishing a job again after a restart: it was deployed already
                if self.current_default(name) == version:
                    return top
            previous = self._previous(name, version)
            intent = self.history.push_deployment(model=name, version=version, previous_version=previous,
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
                intent = self.history.push_deployment(model=name, version=int(version), previous_version=previous,
                                                   workers=workers, ready_workers=0, action="rollback", done=False)
            else:
                top = self.history.top_deployment(name)
                if top is None:
                    raise FailedPrecondition(f"model {name!r} has no deployment to roll back")
                if top.previous_version is None:
                    raise FailedPrecondition(f"{name} version {top.version} was deployed when the model had no "
                                             "default: there is no earlier default to roll back to")
                self._check_version(name, top.previous_version, "roll back to")
                intent = self.history.pop_deployment(top.id, model=name, version=top.previous_version,
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
        for intent in self.history.pending_deployments():
            try:
                desired = self.model_store.desired(intent.model)
            except ServiceError as exc:  # unreadable: leave it; a later start tries again
                log.warning("deployment intent %d of %s left pending: %s", intent.id, intent.model, exc.message)
                continue
            if desired is not None and desired.version == intent.version:
                self.history.complete_deployment(intent.id, ready_workers=0)
                line = (f"{intent.action} of {intent.model} version {intent.version} was interrupted after "
                        "deployment.json was written: recorded as done")
            else:
                self.history.discard_deployment(intent.id)
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
        for name, dep in self.history.desired_defaults().items():
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
