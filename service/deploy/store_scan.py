"""The model store as TorchServe sees it: scan ``<root>/<name>/<version>.mar`` and register.

Registration goes through a symlink per archive, ``<archive_dir>/<name>-v<version>.mar``,
registered by plain file name. A ``file://`` URL would make TorchServe copy the archive
into its model store as ``<version>.mar``: two models with the same version collide
(HTTP 500 "Model file already exists") and the copies litter the store.

Every registration of a store archive (here, the converger, the deployer) goes through
:func:`checked_link`: the archive first passes :func:`service.modelstore.check_archive`
(zip and CRCs, MANIFEST, spec, weights loaded with ``weights_only=True`` and fitted to the
spec). A refused archive is never registered, so its workers never start; the refusal is
logged once, counted by ``modelctl_archive_refused`` and shown by the control API's
ListModels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.atomic import atomic_symlink
from service.errors import AlreadyExists, ArchiveRefused, FailedPrecondition, ServiceError, Unavailable
from service.modelstore import ModelStore, check_archive, known_refusal, require_archive

log = logging.getLogger(__name__)


def scan_model_store(root: str | os.PathLike) -> dict[str, list[int]]:
    """``{name: [versions ascending]}`` of the store: the model store's own listing."""
    return ModelStore(root).models()


def archive_link_name(name: str, version: int) -> str:
    """File name under which ``<name>/<version>.mar`` is registered with TorchServe."""
    return f"{name}-v{int(version)}.mar"


def link_archive(settings, name: str, version: int) -> str:
    """Make ``<archive_dir>/<name>-v<version>.mar`` point at the store's archive.

    Returns the ``url`` to register it with. Raises FailedPrecondition if the archive
    does not exist.
    """
    target = Path(settings.model_store) / name / f"{int(version)}.mar"
    if not target.is_file():
        raise FailedPrecondition(f"no archive {target}")
    archive_dir = Path(settings.archive_dir)
    archive_dir.mkdir(parents=True, exist_ok=True)
    link = archive_dir / archive_link_name(name, version)
    atomic_symlink(target.resolve(), link)  # an existing link is replaced, never missing
    return link.name


def checked_link(settings, name: str, version: int) -> str:
    """:func:`link_archive` for an archive that passes the archive check (cached).

    Raises ArchiveRefused (a FailedPrecondition naming the file and the problem) for one
    that does not, FailedPrecondition for a missing one. Every registration uses this.
    """
    target = Path(settings.model_store) / name / f"{int(version)}.mar"
    try:
        require_archive(target, name=name, version=int(version))
    except FileNotFoundError:
        raise FailedPrecondition(f"no archive {target}") from None
    return link_archive(settings, name, version)


def precheck_store(root: str | os.PathLike) -> int:
    """Run the archive check on every archive of the store (results cached, refusals
    logged); returns how many were refused. ``Serving.start`` runs it beside TorchServe's
    start, so registration then finds the results."""
    store = ModelStore(root)
    refused = 0
    for name, versions in store.models().items():
        for version in versions:
            try:
                refused += check_archive(store.path(name, version), name=name, version=version) is not None
            except OSError:
                continue  # gone meanwhile: registration says so
    return refused


def refused_archives(root: str | os.PathLike) -> dict[tuple[str, int], str]:
    """``{(name, version): problem}`` of the store's archives refused by the archive check
    in this process (as they are now; nothing is checked here)."""
    store = ModelStore(root)
    refused = {}
    for name, versions in store.models().items():
        for version in versions:
            found = known_refusal(store.path(name, version), name=name, version=version)
            if found is not None:
                refused[(name, version)] = found.problem
    return refused


class RefusedArchivesCollector(Collector):
    """``modelctl_archive_refused``: 1 per archive of the model store that the archive
    check refused (not registered); the reason is in the log and in ListModels."""

    def __init__(self, model_store: str | os.PathLike):
        self.model_store = model_store

    def collect(self):
        gauge = GaugeMetricFamily(
            "modelctl_archive_refused",
            "Model store archives refused at registration by the archive check (not served).",
            labels=["model", "version"])
        try:
            for (name, version) in refused_archives(self.model_store):
                gauge.add_metric([name, str(version)], 1.0)
        except OSError as exc:  # the store is unreadable: the scrape still answers
            log.debug("refused archives unavailable: %s", exc)
        yield gauge


def _desired(store: ModelStore, name: str, versions: list[int], workers: int) -> tuple[int, int]:
    """(default version, its workers) of ``name`` as the store says (see converge.py)."""
    try:
        desired = store.desired(name)
    except ServiceError as exc:
        log.error("%s; serving the latest version of %s", exc.message, name)
        return versions[-1], workers
    if desired is None:
        return versions[-1], workers
    if desired.version not in versions:
        log.warning("the desired default of %s, version %d, is not in the store; serving the "
                    "latest, %d", name, desired.version, versions[-1])
        return versions[-1], workers
    return desired.version, desired.workers or workers


def register_store(mgmt, settings) -> list[tuple[str, int]]:
    """Register every archive of the store, each model's default as the store says.

    The default is the model's desired version (``deployment.json``, written by
    deployments) with its workers; a model without one defaults to its latest version.
    Every other version gets ``settings.workers_per_model`` workers (asynchronously:
    readiness is checked separately). A version that is registered already is skipped (logged).
    An archive the archive check refuses (corrupt zip, bad MANIFEST, weights that need
    pickled code or do not fit the spec; logged once by the check) or TorchServe refuses
    is logged as an error and left out, so one bad archive does not stop the others.
    Returns the ``(name, version)`` pairs that are registered, now or before.
    """
    model_store = ModelStore(settings.model_store)
    store = model_store.models()
    registered: list[tuple[str, int]] = []
    for name, versions in store.items():
        default, default_workers = _desired(model_store, name, versions, settings.workers_per_model)
        ok = []
        for version in versions:
            workers = default_workers if version == default else settings.workers_per_model
            try:
                url = checked_link(settings, name, version)
                # Batch size and delay are not passed: each archive's own
                # model-config.yaml sets them per model.
                mgmt.register(url, initial_workers=workers,
                              response_timeout_s=settings.response_timeout_s,
                              synchronous=False)
                log.info("registered %s version %s (%d workers)", name, version, workers)
            except AlreadyExists:
                log.info("%s version %s is registered already; skipped", name, version)
            except ArchiveRefused:
                continue  # logged by the check, once
            except ServiceError as exc:
                if isinstance(exc, Unavailable):
                    raise  # TorchServe itself is gone: nothing else will register
                log.error("cannot register %s version %s: %s", name, version, exc.message)
                continue
            ok.append(version)
            registered.append((name, version))
        if ok:
            chosen = default if default in ok else ok[-1]
            if chosen != default:
                log.error("the default of %s, version %s, could not be registered; serving "
                          "version %s meanwhile", name, default, chosen)
            try:
                mgmt.set_default(name, chosen)
                log.info("default version of %s: %s", name, chosen)
            except ServiceError as exc:
                if isinstance(exc, Unavailable):
                    raise
                log.error("cannot make version %s the default of %s: %s", chosen, name,
                          exc.message)
    if not store:
        log.warning("model store %s holds no <name>/<version>.mar archives",
                    settings.model_store)
    return registered
