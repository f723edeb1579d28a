"""Real readiness: the workers of every registered model version, not TorchServe's /ping.

TorchServe's ``/ping`` answers Healthy even while every worker crash-loops, so readiness
is read from the management API instead.

Rule: a model version is ready iff it has at least one worker and at least as many READY
workers as it is meant to have (``minWorkers``, what it was registered or scaled with).
So a version is not ready while any of its desired workers is starting, restarting or
failing to load, and a version scaled to zero workers is not ready either (it cannot
answer). TorchServe shows a worker that is not READY as ``UNLOADING`` (also while it is
still loading); the reason lists those statuses.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from service.errors import NotFound, ServiceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelReadiness:
    name: str
    #: TorchServe's version string (``"3"`` for ``<name>/3.mar``).
    version: str
    is_default: bool
    #: Workers TorchServe reports, and how many of them are READY.
    workers: int
    ready_workers: int
    ready: bool
    #: Human-readable: "1/1 workers READY", "0/1 workers READY (status: UNLOADING)", ...
    reason: str
    #: Pids of the current workers (TorchServe gives a restarted worker a new pid).
    pids: tuple[int, ...] = ()
    #: Workers it is meant to have (TorchServe's ``minWorkers``).
    min_workers: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


def _assess(name: str, entry: dict, default_version: str | None) -> ModelReadiness:
    version = str(entry.get("modelVersion", ""))
    workers = entry.get("workers") or []
    statuses = [str(w.get("status", "?")) for w in workers]
    ready_workers = statuses.count("READY")
    wanted = max(1, int(entry.get("minWorkers") or 0))
    ready = bool(workers) and ready_workers >= wanted
    if not workers:
        reason = f"0/{wanted} workers (none running)"
    else:
        reason = f"{ready_workers}/{max(wanted, len(workers))} workers READY"
        others = sorted({s for s in statuses if s != "READY"})
        if others:
            reason += f" (status: {', '.join(others)})"
    return ModelReadiness(name=name, version=version, is_default=version == default_version,
                          workers=len(workers), ready_workers=ready_workers, ready=ready,
                          reason=reason, min_workers=int(entry.get("minWorkers") or 0),
                          pids=tuple(int(w["pid"]) for w in workers
                                     if isinstance(w.get("pid"), int) and w["pid"] > 0))


def _crash_looping(r: ModelReadiness, restarts: int) -> ModelReadiness:
    return dataclasses.replace(
        r, reason=f"{r.reason}; crash-looping: {restarts} worker(s) died without "
                  "becoming READY (see TorchServe's log)")


def check(mgmt) -> list[ModelReadiness]:
    """Readiness of every registered version of every model, sorted by name and version.

    Raises Unavailable when the management API cannot be reached.
    """
    report: list[ModelReadiness] = []
    for model in mgmt.list_models():
        name = model.get("modelName")
        if not name:
            continue
        try:
            default = mgmt.describe(name)  # TorchServe describes the default version
            entries = mgmt.describe(name, "all")
        except NotFound:
            continue  # unregistered meanwhile
        default_version = str(default[0].get("modelVersion")) if default else None
        report.extend(_assess(name, e, default_version) for e in entries)
    return sorted(report, key=lambda r: (r.name, _version_key(r.version)))


def _version_key(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def wait_until_ready(mgmt, expected: Iterable[tuple[str, object]] | None, timeout_s: float,
                     poll_s: float = 0.25) -> list[ModelReadiness]:
    """Poll :func:`check` until every expected ``(name, version)`` is ready.

    ``expected=None`` waits for every registered version. Returns the last report, which
    also has an entry (not ready, reason "not registered") for each expected version
    TorchServe does not know; it never raises on timeout: the caller decides. While the
    management API is unreachable the expected versions are reported not ready with
    that reason.

    A version that is not ready and one of whose workers died meanwhile (its pid
    vanished: TorchServe restarts a worker whose load failed) is crash-looping: waiting
    longer will not help, so it counts as settled, not ready, with that reason.
    """
    wanted = None if expected is None else [(n, str(v)) for n, v in expected]
    deadline = time.monotonic() + timeout_s
    seen: dict[tuple[str, str], set[int]] = {}
    dead: dict[tuple[str, str], set[int]] = {}
    while True:
        try:
            report = check(mgmt)
            error = None
        except ServiceError as exc:
            report, error = [], exc.message
        known = {r.key for r in report}
        missing = [] if wanted is None else [k for k in wanted if k not in known]
        report = report + [
            ModelReadiness(name=n, version=v, is_default=False, workers=0, ready_workers=0,
                           ready=False,
                           reason=f"management API unavailable: {error}" if error
                           else "not registered")
            for n, v in missing
        ]
        relevant = report if wanted is None else [r for r in report if r.key in set(wanted)]
        for r in relevant:  # a worker pid that vanished is a worker that died
            dead.setdefault(r.key, set()).update(seen.get(r.key, set()) - set(r.pids))
            seen.setdefault(r.key, set()).update(r.pids)
        looping = {r.key for r in relevant if not r.ready and dead.get(r.key)}
        if looping:
            report = [_crash_looping(r, len(dead[r.key])) if r.key in looping else r
                      for r in report]
        if error is None and all(r.ready or r.key in looping for r in relevant):
            return report
        if time.monotonic() >= deadline:
            return report
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def summary(report: Iterable[ModelReadiness]) -> str:
    """One line: ``echo:2 (default) ready 1/1 workers READY; broken:1 NOT READY ...``."""
    parts = []
    for r in report:
        tag = f"{r.name}:{r.version}" + (" (default)" if r.is_default else "")
        parts.append(f"{tag} {'ready' if r.ready else 'NOT READY'}: {r.reason}")
    return "; ".join(parts) if parts else "no models registered"
