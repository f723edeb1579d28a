"""The job store: fine-tuning jobs and deployment history in SQLite.

A job moves through a state machine, and nothing else moves it::

    QUEUED ──▶ RUNNING ──▶ SUCCEEDED | FAILED | CANCELLED
       └──────────────────▶ CANCELLED

:meth:`JobStore.transition` checks every change against :data:`TRANSITIONS` inside one
write transaction (``BEGIN IMMEDIATE``), so two threads can never both move a job, and
an illegal change raises FailedPrecondition naming both states.

The database runs in WAL mode with ``synchronous=FULL``: a committed change survives the
control service being killed at any moment. One connection serves every thread of the
process behind a lock; every write bumps an in-memory revision and wakes the threads in
:meth:`JobStore.wait_for_change` (watchers), which also poll, so a change made by another
process is seen too.

The deployment history of each model is a stack: a deployment pushes a row; a rollback
pops the latest row and restores the version that was the default before it. The model's
desired default is the version of its latest row, of either kind.

A row is first written as an intent (``done = 0``): rollbacks, :meth:`JobStore.top_deployment`
and :meth:`JobStore.desired_defaults` do not see it until :meth:`JobStore.complete_deployment`
marks it done (and, for a rollback, takes the row it pops off the stack in the same
transaction), or :meth:`JobStore.discard_deployment` deletes it. The deployer writes
``deployment.json`` between the two (service/deploy/deployer.py, "Crash-safe order").
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from service.deploy.policies import DEPLOY_POLICIES  # the policies a job may carry
from service.errors import FailedPrecondition, NotFound, shown

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"

#: Every legal change of state; a final state has none.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
FINAL_STATES = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

#: 2: deployments.done and deployments.popped_id (a version-1 database gains them at open).
#: 3: jobs.deploy_tolerance and jobs.deploy_check (deploy-if-faster; gained at open too).
SCHEMA_VERSION = 3
#: Columns added to ``jobs`` after version 1, with their declarations (an older database
#: gains them at open).
_ADDED_JOB_COLUMNS = {"deploy_tolerance": "REAL", "deploy_check": "TEXT"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    state             TEXT NOT NULL CHECK (state IN ('QUEUED','RUNNING','SUCCEEDED','FAILED','CANCELLED')),
    spec              TEXT NOT NULL,
    output_model      TEXT NOT NULL,
    base              TEXT,
    runner            TEXT NOT NULL,
    run_dir           TEXT NOT NULL,
    log_path          TEXT NOT NULL,
    pid               INTEGER,
    proc_started      REAL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    service_stops     INTEGER NOT NULL DEFAULT 0,
    exit_code         INTEGER,
    cancel_requested  REAL,
    deploy_policy     TEXT NOT NULL,
    deploy_workers    INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    updated_at        REAL NOT NULL,
    error             TEXT,
    result_version    INTEGER,
    parent            TEXT,
    metric            TEXT,
    val_metric        REAL,
    parent_val_metric REAL,
    deploy_outcome    TEXT,
    deploy_reason     TEXT,
    epoch             INTEGER NOT NULL DEFAULT 0,
    epochs            INTEGER NOT NULL DEFAULT 0,
    deploy_tolerance  REAL,
    deploy_check      TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
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


@dataclass(frozen=True)
class Job:
    """One row of ``jobs``. Times are Unix seconds; ``spec`` is the validated run spec."""

    seq: int
    id: str
    state: str
    spec: dict
    output_model: str
    base: str | None
    runner: str
    run_dir: str
    log_path: str
    pid: int | None
    proc_started: float | None
    attempts: int
    #: Attempts stopped by a graceful shutdown of the service (they do not count as failures).
    service_stops: int
    exit_code: int | None
    cancel_requested: float | None
    deploy_policy: str
    deploy_workers: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    error: str | None
    result_version: int | None
    parent: str | None
    metric: str | None
    val_metric: float | None
    parent_val_metric: float | None
    deploy_outcome: str | None
    deploy_reason: str | None
    epoch: int
    epochs: int
    #: deploy-if-faster: the metric tolerance (None for other policies).
    deploy_tolerance: float | None = None
    #: deploy-if-faster: what it compared and measured (service.control.jobs.plane; JSON in SQLite).
    deploy_check: dict | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


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


_JOB_COLUMNS = [f.name for f in fields(Job)]
#: Columns a caller may set through update/transition (not the identity or the state).
_MUTABLE = frozenset(_JOB_COLUMNS) - {"seq", "id", "state", "spec", "output_model", "base",
                                      "runner", "run_dir", "log_path", "created_at", "updated_at"}


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


class JobStore:
    """The SQLite database at ``path`` (created with its schema if missing)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._revision = 0
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(f"job database {self.path} has schema {version}, newer than "
                                         f"this service's {SCHEMA_VERSION}")
            self._conn.executescript(_SCHEMA)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(deployments)")}
            for column, decl in (("done", "INTEGER NOT NULL DEFAULT 1"), ("popped_id", "INTEGER")):
                if column not in columns:  # a version-1 database
                    self._conn.execute(f"ALTER TABLE deployments ADD COLUMN {column} {decl}")
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
            for column, decl in _ADDED_JOB_COLUMNS.items():
                if column not in columns:  # a version-1 or -2 database
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- transactions and notification ---------------------------------------------
    def _write(self, fn):
        """Run ``fn(conn)`` in one IMMEDIATE transaction; wake the watchers."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._revision += 1
            self._changed.notify_all()
            return result

    @property
    def revision(self) -> int:
        return self._revision

    def wait_for_change(self, revision: int, timeout_s: float) -> int:
        """Block until a write of this process after ``revision``, or ``timeout_s``."""
        with self._changed:
            self._changed.wait_for(lambda: self._revision != revision, timeout=timeout_s)
            return self._revision

    # ---- jobs -----------------------------------------------------------------------
    def create_job(self, *, spec: dict, output_model: str, base: str | None, runner: str,
                   run_dir: Path | str, log_path: Path | str, deploy_policy: str,
                   deploy_workers: int = 0, job_id: str | None = None,
                   deploy_tolerance: float | None = None) -> Job:
        if deploy_policy not in DEPLOY_POLICIES:
            raise FailedPrecondition(f"unknown deploy policy {deploy_policy!r}")
        job_id = job_id or new_job_id()
        now = time.time()

        def insert(conn):
            conn.execute(
                "INSERT INTO jobs (id, state, spec, output_model, base, runner, run_dir, log_path, "
                "deploy_policy, deploy_workers, deploy_tolerance, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, QUEUED, json.dumps(spec, sort_keys=True), output_model, base, runner,
                 str(run_dir), str(log_path), deploy_policy, int(deploy_workers),
                 None if deploy_tolerance is None else float(deploy_tolerance), now, now))
        self._write(insert)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no fine-tuning job {shown(job_id, 80)}")
        return _job(row)

    def list(self, states=(), output_model: str | None = None, limit: int = 100,
             before_seq: int | None = None) -> list[Job]:
        """Jobs newest first; ``before_seq`` continues a previous page."""
        where, args = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if output_model:
            where.append("output_model = ?")
            args.append(output_model)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY seq DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*args, int(limit))).fetchall()
        return [_job(r) for r in rows]

    def count(self, state: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    def oldest_queued(self) -> Job | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
        return _job(row) if row is not None else None

    def transition(self, job_id: str, to: str, *, expect: str | None = None, **changes) -> Job:
        """Move a job to state ``to`` (setting ``changes`` with it), if that is legal.

        ``expect``: the state the caller believes the job is in; if it is in another one,
        FailedPrecondition (so a stale decision is never applied).
        """
        _check_columns(changes)
        now = time.time()

        def move(conn):
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no fine-tuning job {shown(job_id, 80)}")
            state = row["state"]
            if expect is not None and state != expect:
                raise FailedPrecondition(f"job {job_id} is {state}, not {expect}")
            if to not in TRANSITIONS[state]:
                raise FailedPrecondition(f"job {job_id} is {state}; it cannot become {to}")
            values = dict(changes, state=to, updated_at=now)
            if to == RUNNING and "started_at" not in values:
                values["started_at"] = now
            if to in FINAL_STATES:
                values.setdefault("finished_at", now)
                values.setdefault("pid", None)
            _update(conn, job_id, values)
        self._write(move)
        return self.get(job_id)

    def update(self, job_id: str, *, expect: str | None = None, **changes) -> Job:
        """Set fields of a job without changing its state (``expect``: as in transition)."""
        _check_columns(changes)

        def apply(conn):
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no fine-tuning job {shown(job_id, 80)}")
            if expect is not None and row["state"] != expect:
                raise FailedPrecondition(f"job {job_id} is {row['state']}, not {expect}")
            _update(conn, job_id, dict(changes, updated_at=time.time()))
        self._write(apply)
        return self.get(job_id)

    # ---- deployments ------------------------------------------------------------------
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

    # ---- health -----------------------------------------------------------------------
    def integrity_check(self) -> str:
        """SQLite's own check: "ok" for an intact database."""
        with self._lock:
            return self._conn.execute("PRAGMA integrity_check").fetchone()[0]


def _check_columns(changes: dict) -> None:
    bad = set(changes) - _MUTABLE
    if bad:
        raise ValueError(f"not settable job field(s): {', '.join(sorted(bad))}")


def _update(conn, job_id: str, values: dict) -> None:
    if isinstance(values.get("deploy_check"), dict):
        values = dict(values, deploy_check=json.dumps(values["deploy_check"], sort_keys=True))
    cols = sorted(values)
    conn.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                 (*[values[c] for c in cols], job_id))


def _job(row: sqlite3.Row) -> Job:
    data = {k: row[k] for k in _JOB_COLUMNS}
    data["spec"] = json.loads(data["spec"])
    if data["deploy_check"] is not None:
        data["deploy_check"] = json.loads(data["deploy_check"])
    return Job(**data)


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
