"""Replicas converge on the desired serving state kept in the model store.

Every serving replica (one TorchServe each) shares the model store. A deployment writes
the model's desired state, ``<store>/<name>/deployment.json`` (default version and
workers, :meth:`service.modelstore.ModelStore.set_desired`); a model without one serves
its latest version. :class:`Converger` makes one TorchServe match the store:

- every archive in the store that passes the archive check is registered
  (:func:`service.deploy.store_scan.checked_link`); a refused one is logged once, kept in
  ``refused`` and never registered (the check is cached per file, so a pass costs a
  ``stat``; an archive replaced in place is checked again); a version TorchServe refuses is
  logged once and not retried: versions are immutable, so retrying cannot help;
- the desired default gets its workers (scaled when they differ);
- the default switches only once the desired version's workers are READY, so requests
  never reach a version that cannot answer (nor a refused one); a version that is not READY within
  ``settings.startup_timeout_s`` is given up (logged) and the old default stays.

It runs at start (through :func:`service.deploy.store_scan.register_store`, which uses
the same rule) and then every ``settings.sync_interval_s`` in :class:`ConvergeThread`.
Because the rule is a function of the store alone, a replica that starts later serves the
same defaults as the others.

A deployment in this process (the control service beside TorchServe) holds the model's
lock from :class:`ModelLocks` while it switches the default and writes the desired state;
the converger skips a model whose lock is taken rather than undo a deployment half-way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from service.errors import AlreadyExists, ArchiveRefused, ServiceError, Unavailable
from service.modelstore import ModelStore
from service.deploy import readiness
from service.deploy.store_scan import checked_link

log = logging.getLogger(__name__)


class ModelLocks:
    """One lock per model name, shared by whatever changes a model's default here."""

    def __init__(self):
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())


@dataclass
class Converger:
    """Makes the TorchServe behind ``mgmt()`` serve what the model store describes."""

    settings: object  # ServeSettings
    mgmt: Callable
    locks: ModelLocks = field(default_factory=ModelLocks)
    #: (name, version) -> why it is not retried.
    given_up: dict[tuple[str, int], str] = field(default_factory=dict)
    #: (name, version) -> why the archive check refused it (not registered; checked again
    #: only when the file changes).
    refused: dict[tuple[str, int], str] = field(default_factory=dict)
    #: (name, version) -> monotonic time its switch to default started waiting for READY.
    _waiting: dict[tuple[str, int], float] = field(default_factory=dict)
    #: Problems already logged (logged once, not every tick).
    _said: set[str] = field(default_factory=set)

    def _say_once(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def converge_once(self) -> list[str]:
        """One pass over the store; returns what was done ("registered m:2", ...).

        Raises Unavailable when TorchServe cannot be reached.
        """
        store = ModelStore(self.settings.model_store)
        models = store.models()
        for key in [k for k in self.refused if k[1] not in models.get(k[0], ())]:
            self.refused.pop(key, None)  # gone from the store
        report = {(r.name, r.version): r for r in readiness.check(self.mgmt())}
        defaults = {r.name: int(r.version) for r in report.values() if r.is_default and r.version.isdigit()}
        done: list[str] = []
        for name, versions in models.items():
            lock = self.locks(name)
            if not lock.acquire(blocking=False):
                continue  # a deployment of this model is under way here
            try:
                done += self._converge_model(store, name, versions, report, defaults.get(name))
            except Unavailable:
                raise
            except ServiceError as exc:
                self._say_once(f"{name}:{exc.message}", logging.ERROR, "cannot converge %s: %s", name, exc.message)
            finally:
                lock.release()
        return done

    def _converge_model(self, store: ModelStore, name: str, versions: list[int], report: dict,
                        current: int | None) -> list[str]:
        done = []
        desired = store.desired(name)  # InvalidSpec for an unreadable record: logged by the caller
        if desired is not None and desired.version not in versions:
            self._say_once(f"{name}:missing:{desired.version}", logging.WARNING,
                           "the desired default of %s, version %d, is not in the store (yet); keeping %s",
                           name, desired.version, current)
            return done
        target = desired.version if desired is not None else versions[-1]
        workers = (desired.workers if desired is not None and desired.workers else
                   self.settings.workers_per_model)
        for version in versions:
            if (name, str(version)) in report or (name, version) in self.given_up:
                continue
            try:
                url = checked_link(self.settings, name, version)
                self.refused.pop((name, version), None)
            except ArchiveRefused as exc:
                self.refused[(name, version)] = exc.problem  # logged by the check, once
                continue
            except Unavailable:
                raise
            except ServiceError as exc:  # the archive vanished meanwhile: next pass
                self._say_once(f"{name}:{version}:{exc.message}", logging.WARNING, "cannot register %s version %d: %s",
                               name, version, exc.message)
                continue
            try:
                self.mgmt().register(url,
                                     initial_workers=workers if version == target else self.settings.workers_per_model,
                                     response_timeout_s=self.settings.response_timeout_s, synchronous=False)
                done.append(f"registered {name}:{version}")
                log.info("registered %s version %d (new in the model store)", name, version)
            except AlreadyExists:
                pass
            except Unavailable:
                raise
            except ServiceError as exc:
                self.given_up[(name, version)] = exc.message
                log.error("cannot register %s version %d: %s", name, version, exc.message)
        entry = report.get((name, str(target)))
        if (name, target) in self.refused:
            self._say_once(f"{name}:refused:{target}:{self.refused[(name, target)]}", logging.ERROR,
                           "%s version %d, the default the model store asks for, is refused (%s); the default "
                           "stays %s", name, target, self.refused[(name, target)], current)
            return done
        if entry is None or (name, target) in self.given_up:
            return done  # registered this pass (or refused): looked at again next pass
        if desired is not None and entry.min_workers != workers:
            self.mgmt().scale(name, target, workers)
            done.append(f"scaled {name}:{target} to {workers}")
            log.info("scaled %s version %d to %d workers (desired state)", name, target, workers)
        if current == target:
            self._waiting.pop((name, target), None)
            return done
        if entry.ready:
            self.mgmt().set_default(name, target)
            self._waiting.pop((name, target), None)
            done.append(f"default {name}:{target}")
            log.info("default version of %s: %d (was %s), as the model store says", name, target, current)
            return done
        started = self._waiting.setdefault((name, target), time.monotonic())
        if time.monotonic() - started > self.settings.startup_timeout_s:
            reason = f"not ready after {self.settings.startup_timeout_s:.0f}s: {entry.reason}"
            self.given_up[(name, target)] = reason
            log.error("%s version %d is %s; the default stays %s", name, target, reason, current)
        return done


class ConvergeThread:
    """Runs :meth:`Converger.converge_once` every ``interval_s`` until stopped."""

    def __init__(self, converger: Converger, interval_s: float):
        self.converger = converger
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="modelctl-converge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.converger.converge_once()
            except ServiceError as exc:
                log.debug("converge pass skipped: %s", exc.message)
            except Exception:  # never let the loop die: the next pass may succeed
                log.exception("converge pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
