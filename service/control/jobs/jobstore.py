"""The job store: fine-tuning jobs in SQLite.

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

The deployment history is a table of the same database (``deployments``), kept by
:class:`service.deploy.history.DeploymentHistory` (:attr:`JobStore.history`): the store
opens the database, creates and upgrades both tables, and owns the schema version.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

from service.deploy import history
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
            history.ensure_schema(self._conn)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
            for column, decl in _ADDED_JOB_COLUMNS.items():
                if column not in columns:  # a version-1 or -2 database
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        #: The deployment history, a table of this database (service.deploy.history).
        self.history = history.DeploymentHistory(self._conn, self._lock, self._write)

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
