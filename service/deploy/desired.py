"""A model's desired serving state: ``<store>/<name>/deployment.json``.

Deployments (the control service's deployer, :mod:`service.deploy.deployer`) write it; every
serving replica reads it and converges on it (:mod:`service.deploy.converge`). It names the
model's default version and its workers; a model without one serves its latest version.

This module owns the record: its file name, its fields and how it is read and written. The
model store (:class:`service.modelstore.ModelStore`: ``desired``, ``set_desired``,
``default_version`` and ``write(keep_default=True)``) reads and writes it under its
per-model lock, beside the versions it names, so this module imports nothing of the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service import atomic
from service.errors import InvalidSpec

#: ``<root>/<name>/deployment.json``: the model's desired serving state, shared by replicas.
DEPLOYMENT_FILE = "deployment.json"


@dataclass(frozen=True)
class DesiredState:
    """How every serving replica should serve a model: ``version`` is the default, with
    ``workers`` workers. Kept in ``<root>/<name>/deployment.json`` and written only by
    deployments (the control service); replicas read it and converge to it. A model
    without one serves its latest version."""

    name: str
    version: int
    workers: int
    updated_at: str = ""
    #: What set it: "deploy", "rollback", or "deploy job-…".
    reason: str = ""

    def to_dict(self) -> dict:
        return {"version": self.version, "workers": self.workers, "updated_at": self.updated_at,
                "reason": self.reason}


def read_desired(model_dir: Path, name: str) -> DesiredState | None:
    """The desired state recorded in ``model_dir``; None when there is none.

    A file that cannot be read as one (hand-edited, truncated) raises InvalidSpec naming it:
    replicas keep what they serve rather than guess.
    """
    path = Path(model_dir) / DEPLOYMENT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidSpec(str(path), f"is not a deployment record: {exc}") from exc
    data = data if isinstance(data, dict) else {}
    version, workers = data.get("version"), data.get("workers", 0)
    if not (isinstance(version, int) and version >= 1 and isinstance(workers, int) and workers >= 0):
        raise InvalidSpec(str(path), "needs an integer version >= 1 and an integer workers >= 0")
    return DesiredState(name, version, workers, str(data.get("updated_at", "")), str(data.get("reason", "")))


def write_desired(model_dir: Path, state: DesiredState) -> None:
    """Replace ``model_dir``'s record with ``state``, atomically and durably (the caller holds
    the model's lock)."""
    atomic.write_text(Path(model_dir) / DEPLOYMENT_FILE, json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")
