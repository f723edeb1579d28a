"""The deployment history of every model, in the control service's SQLite database.

The history of each model is a stack (table ``deployments``): a deployment pushes a row; a
rollback pops the latest row and restores the version that was the default before it. The
model's desired default is the version of its latest row, of either kind.

A row is first written as an intent (``done = 0``): rollbacks, :meth:`DeploymentHistory.top_deployment`
and :meth:`DeploymentHistory.desired_defaults` do not see it until
:meth:`DeploymentHistory.complete_deployment` marks it done (and, for a rollback, takes the
row it pops off the stack in the same transaction), or
:meth:`DeploymentHistory.discard_deployment` deletes it. The deployer writes
``deployment.json`` between the two (service/deploy/deployer.py, "Crash-safe order").

The table lives in the job store's database (service/control/jobs/jobstore.py), which opens
it, creates and upgrades both tables (:func:`ensure_schema` for this one) and owns the
schema version; a :class:`DeploymentHistory` shares that connection, its lock and its write
transactions (every write wakes the store's watchers, as any write of the database does).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from service.errors import FailedPrecondition

#: The table and its index (created when missing).
SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    model             TEXT NOT NULL,
    version           INTEGER NOT NULL,
    previous_version  INTEGER,
    workers           INTEGER NOT NULL,
    ready_workers     INTEGER NOT NULL DEFAULT 0,
    action            TEXT NOT NULL CHECK (action IN ('deploy','rollback')),
    job_id            TEXT,
    created_at        REAL NOT NULL,
    active            INTEGER NOT NULL DEFAULT 1,
    done              INTEGER NOT NULL DEFAULT 1,
    popped_id         INTEGER
);
CREATE INDEX IF NOT EXISTS deployments_model ON deployments (model, id);
"""
#: Columns added after schema version 1, with their declarations (an older database gains
#: them at open).
_ADDED_COLUMNS = {"done": "INTEGER NOT NULL DEFAULT 1", "popped_id": "INTEGER"}


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the table where missing and add the columns an older database lacks."""
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(deployments)")}
    for column, decl in _ADDED_COLUMNS.items():
        if column not in columns:  # a version-1 database
            conn.execute(f"ALTER TABLE deployments ADD COLUMN {column} {decl}")


@dataclass(frozen=True)
class Deployment:
    """One row of ``deployments``: a change of a model's default version."""

    id: int
    model: str
    version: int
    previous_version: int | None
    workers: int
    ready_workers: int
    action: str
    job_id: str | None
    created_at: float
    active: bool = field(default=True)
    #: False while it is an intent: deployment.json may not name it yet.
    done: bool = field(default=True)
    #: For a rollback that pops the stack: the row it takes off (once done).
    popped_id: int | None = field(default=None)


class DeploymentHistory:
    """The ``deployments`` table through ``conn``, the connection of the job store's database.

    ``lock`` guards the connection; ``write(fn)`` runs ``fn(conn)`` in one IMMEDIATE
    transaction and returns its result (:meth:`service.control.jobs.jobstore.JobStore._write`).
    """

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock, write: Callable[[Callable], Any]):
        self._conn = conn
        self._lock = lock
        self._write = write

    def push_deployment(self, *, model: str, version: int, previous_version: int | None,
                        workers: int, ready_workers: int, action: str = "deploy",
                        job_id: str | None = None, done: bool = True) -> Deployment:
        """Record that ``version`` became the default (on top of the model's stack); with
        ``done=False``, the intent to make it so (see complete_deployment)."""
        def insert(conn):
            cur = conn.execute(
                "INSERT INTO deployments (model, version, previous_version, workers, ready_workers, "
                "action, job_id, created_at, active, done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (model, int(version), previous_version, int(workers), int(ready_workers), action, job_id,
                 time.time(), int(bool(done))))
            return cur.lastrowid
        return self._deployment(self._write(insert))

    def top_deployment(self, model: str) -> Deployment | None:
        """The latest done deployment of ``model`` still on its stack (what a rollback undoes)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM deployments WHERE model = ? AND active = 1 AND done = 1 ORDER BY id DESC LIMIT 1",
                (model,)).fetchone()
        return _deployment(row) if row is not None else None

    def pop_deployment(self, popped_id: int, *, model: str, version: int, workers: int,
                       ready_workers: int, done: bool = False) -> Deployment:
        """The rollback to ``version`` that takes deployment ``popped_id`` off the stack: as an
        intent (the default), which complete_deployment carries out; ``done=True`` at once."""
        def pop(conn):
            row = conn.execute("SELECT * FROM deployments WHERE id = ? AND active = 1 AND done = 1",
                               (popped_id,)).fetchone()
            if row is None:
                raise FailedPrecondition(f"deployment {popped_id} of {model} was rolled back already")
            cur = conn.execute(
                "INSERT INTO deployments (model, version, previous_version, workers, ready_workers, "
                "action, job_id, created_at, active, done, popped_id) "
                "VALUES (?, ?, ?, ?, ?, 'rollback', NULL, ?, 0, 0, ?)",
                (model, int(version), row["version"], int(workers), int(ready_workers), time.time(), popped_id))
            if done:
                _complete(conn, cur.lastrowid, None)
            return cur.lastrowid
        return self._deployment(self._write(pop))

    def complete_deployment(self, dep_id: int, *, ready_workers: int | None = None) -> Deployment:
        """Mark the intent ``dep_id`` done (a rollback's popped row leaves the stack with it)."""
        def complete(conn):
            _complete(conn, dep_id, ready_workers)
            return dep_id
        return self._deployment(self._write(complete))

    def discard_deployment(self, dep_id: int) -> None:
        """Delete the intent ``dep_id`` (a deployment that did not happen); a done row stays."""
        self._write(lambda conn: conn.execute("DELETE FROM deployments WHERE id = ? AND done = 0", (dep_id,)))

    def pending_deployments(self) -> list[Deployment]:
        """Intents not yet done nor discarded, oldest first (after a crash)."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM deployments WHERE done = 0 ORDER BY id").fetchall()
        return [_deployment(r) for r in rows]

    def deployments(self, model: str | None = None) -> list[Deployment]:
        """The history, oldest first."""
        sql, args = "SELECT * FROM deployments", ()
        if model is not None:
            sql, args = sql + " WHERE model = ?", (model,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [_deployment(r) for r in rows]

    def desired_defaults(self) -> dict[str, Deployment]:
        """For every model with a history: its latest row (the version meant to be default)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM deployments WHERE id IN (SELECT MAX(id) FROM deployments WHERE done = 1 "
                "GROUP BY model) ORDER BY model").fetchall()
        return {r["model"]: _deployment(r) for r in rows}

    def _deployment(self, dep_id: int) -> Deployment:
        with self._lock:
            row = self._conn.execute("SELECT * FROM deployments WHERE id = ?", (dep_id,)).fetchone()
        return _deployment(row)


def _complete(conn, dep_id: int, ready_workers: int | None) -> None:
    row = conn.execute("SELECT * FROM deployments WHERE id = ?", (dep_id,)).fetchone()
    if row is None:
        raise FailedPrecondition(f"no deployment {dep_id}")
    if row["done"]:
        return
    if row["popped_id"] is not None:
        conn.execute("UPDATE deployments SET active = 0 WHERE id = ?", (row["popped_id"],))
    conn.execute("UPDATE deployments SET done = 1, ready_workers = ? WHERE id = ?",
                 (row["ready_workers"] if ready_workers is None else int(ready_workers), dep_id))


def _deployment(row: sqlite3.Row) -> Deployment:
    return Deployment(id=row["id"], model=row["model"], version=row["version"],
                      previous_version=row["previous_version"], workers=row["workers"],
                      ready_workers=row["ready_workers"], action=row["action"], job_id=row["job_id"],
                      created_at=row["created_at"], active=bool(row["active"]), done=bool(row["done"]),
                      popped_id=row["popped_id"])
