"""The run directory: what the control service and the trainer exchange, written down once.

A fine-tune run lives in one directory. The control service writes ``spec.json`` and starts
the trainer with :func:`trainer_argv` (``python -m service.training run <dir>/spec.json
--run-dir <dir> …``); the trainer writes the rest, and the control service reads it back:

=================== ============ ===============================================================
``spec.json``       the service  the validated run spec (service.control.jobs.intake)
``run.json``        the trainer  the spec and the run id, fsynced and renamed into place
``checkpoint.pt``   the trainer  every epoch (service.training.checkpoint; torch, not read here)
``events.jsonl``    the trainer  one JSON object per line (:class:`EventLog`; :class:`EventTail`)
``result.json``     the trainer  the written archive and every fact the control plane decides on
                                 (:func:`result_record`, :func:`write_result`, :func:`read_result`)
``train.log``       both         the runner's header per attempt (:func:`attempt_header`), then
                                 the trainer's stdout and stderr, ending in its :func:`error_line`
                                 when it fails on its own
=================== ============ ===============================================================

This module imports no torch: the control service imports it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from service.atomic import atomic_write

RUN_SPEC_FILE = "spec.json"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"

#: The trainer's module: ``python -m service.training``.
TRAINER_MODULE = "service.training"
RUN_DIR_FLAG = "--run-dir"


def now() -> str:
    """An event's ``time``: UTC, ISO 8601 with milliseconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# ---- the trainer's command line -------------------------------------------------------------
def trainer_argv(run_dir: Path | str, *, spec: Path | str | None = None, store: Path | str | None = None,
                 data_roots: Iterable[Path | str] = ()) -> list[str]:
    """The arguments after ``python -m service.training`` that run ``spec`` (default: the run
    directory's ``spec.json``) on ``run_dir``, writing to the model store ``store`` (omitted:
    the trainer's default) and reading datasets under ``data_roots``."""
    argv = ["run", str(spec if spec is not None else Path(run_dir) / RUN_SPEC_FILE), RUN_DIR_FLAG, str(run_dir)]
    if store:
        argv += ["--store", str(store)]
    for root in data_roots:
        argv += ["--data-root", str(root)]
    return argv


def names_run_dir(cmdline: list[str], run_dir: Path | str) -> bool:
    """Whether a process's command line is a trainer's (:func:`trainer_argv`) on ``run_dir``."""
    wanted = str(run_dir)
    return TRAINER_MODULE in cmdline and any(
        arg == RUN_DIR_FLAG and value == wanted for arg, value in zip(cmdline, cmdline[1:]))


# ---- events.jsonl ------------------------------------------------------------------------------
class EventLog:
    """The trainer's side of ``events.jsonl``.

    Every line has ``event`` ("start", "resume", "epoch", "stopped", "done") and ``time``.
    Epoch lines carry epoch, epochs, train_loss, val_loss, val_metric, metric, val_count,
    lr, samples_per_s and epoch_seconds; the done line name, version, epochs, val_metric (the
    kept weights' on the validation split), test_metric and test_count (on the test split,
    evaluated once at the end) and metric. Only rank 0 writes. Lines are appended, flushed
    and fsynced one at a time, so a reader (:class:`EventTail`, :func:`latest_epoch`) may
    follow the file.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def append(self, event: str, **fields) -> dict:
        record = {"event": event, "time": now(), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def read(self) -> list[dict]:
        """Every whole line (one cut by a kill mid-write is skipped)."""
        return read_events(self.path)

    def reconcile(self, history: list[dict]) -> None:
        """Make the epoch lines agree with a checkpoint's ``history`` when resuming: drop
        epoch lines past it, add the ones it has and the file lacks (a kill between the
        checkpoint and the event). The file is replaced whole (a follower starts over)."""
        events = self.read()
        done = {e["epoch"] for e in history}
        kept = [e for e in events if e.get("event") != "epoch" or e.get("epoch") in done]
        seen = {e["epoch"] for e in kept if e.get("event") == "epoch"}
        missing = [{"event": "epoch", **e} for e in history if e["epoch"] not in seen]
        if len(kept) == len(events) and not missing:
            return
        atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in kept + missing))


def _parse_event(line: bytes | str) -> dict | None:
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a line cut by a kill mid-write, or being written
    return event if isinstance(event, dict) else None


def read_events(path: Path | str) -> list[dict]:
    """The events of an ``events.jsonl`` (its whole lines), oldest first; [] when there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    return [e for e in map(_parse_event, data.splitlines()) if e is not None]


def latest_epoch(run_dir: Path | str) -> dict | None:
    """The last ``epoch`` event of a run directory, or None."""
    return next((e for e in reversed(read_events(Path(run_dir) / EVENTS_FILE)) if e.get("event") == "epoch"), None)


class EventTail:
    """Following an ``events.jsonl`` while the trainer writes it.

    The trainer appends one line at a time; on resume it may rewrite the file (dropping epoch
    lines past its checkpoint, adding ones the checkpoint has). A tail reads only complete
    lines, notices a rewritten or shortened file and starts over, and never yields the same
    line twice (a line is identified by its event, epoch and time), so a follower sees every
    event once, in order, also across resumes.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        self._seen: set[tuple] = set()

    @staticmethod
    def _key(event: dict) -> tuple:
        return (event.get("event"), event.get("epoch"), event.get("time"))

    def skip_to_end(self) -> None:
        """Mark everything written so far as seen."""
        self.read_new()

    def read_new(self) -> list[dict]:
        """Events appended (or rewritten) since the last call, oldest first."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if self._inode is not None and (st.st_ino != self._inode or st.st_size < self._offset):
            self._offset, self._partial = 0, b""  # rewritten: read again, skip what was seen
        self._inode = st.st_ino
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        out = []
        for event in map(_parse_event, lines):
            if event is None or self._key(event) in self._seen:
                continue
            self._seen.add(self._key(event))
            out.append(event)
        return out


# ---- result.json -------------------------------------------------------------------------------
#: The facts of the run that result.json carries beside the archive's name and version since
#: it is the control plane's one channel (an older result.json lacks them: :func:`complete_result`).
RUN_FACTS = ("task", "parent", "dataset_sha256")
#: The figures copied from the archive's ``metrics``.
RESULT_METRICS = ("metric", "val_metric", "val_loss", "parent_val_metric", "test_metric", "test_loss", "test_count")


def result_record(*, name: str, version: int, path: Path | str, epochs: int, run_id: str,
                  lineage: Mapping) -> dict:
    """The ``result.json`` of a run that wrote archive ``name`` ``version`` at ``path`` with
    ``lineage`` (the model store's record of it): where the archive is, the run's facts the
    control plane decides on (task, parent, dataset, distillation) and its metrics."""
    metrics = lineage.get("metrics") or {}
    record = {"name": name, "version": int(version), "path": str(path), "epochs": epochs, "run_id": run_id,
              "task": lineage.get("task"), "parent": lineage.get("parent"),
              "dataset_sha256": (lineage.get("dataset") or {}).get("sha256"),
              **{k: metrics.get(k) for k in RESULT_METRICS}}
    if lineage.get("distill"):
        record["distill"] = dict(lineage["distill"])
    return record


def write_result(run_dir: Path | str, record: Mapping) -> Path:
    """Write ``result.json`` (fsynced, renamed into place: whole or absent)."""
    path = Path(run_dir) / RESULT_FILE
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def read_result(run_dir: Path | str) -> dict | None:
    """The run's ``result.json``, or None when it has none (the run wrote no archive)."""
    try:
        record = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def has_run_facts(result: Mapping) -> bool:
    """Whether a result.json carries the run's facts (written since it is the one channel)."""
    return all(k in result for k in RUN_FACTS)


def complete_result(result: Mapping, lineage: Mapping) -> dict:
    """An older ``result.json`` (without the run's facts) completed from the archive's lineage
    record, as the control plane read the two before: the lineage's metric figures first."""
    metrics = lineage.get("metrics") or {}
    out = dict(result)
    out.update(task=lineage.get("task"), parent=lineage.get("parent"),
               dataset_sha256=(lineage.get("dataset") or {}).get("sha256"))
    if lineage.get("distill"):
        out["distill"] = dict(lineage["distill"])
    out["metric"] = metrics.get("metric") or result.get("metric")
    if "val_metric" in metrics:
        out["val_metric"] = metrics["val_metric"]
    if _number(metrics.get("parent_val_metric")):
        out["parent_val_metric"] = metrics["parent_val_metric"]
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- train.log ---------------------------------------------------------------------------------
ATTEMPT_MARK = "==== "
ERROR_PREFIX = "error: "
TRACEBACK_HEAD = "Traceback (most recent call last)"
#: Bytes of the log's end searched for the last attempt's error.
LOG_TAIL_BYTES = 16 * 1024


def attempt_header(job_id: str, attempt: int, what: str) -> str:
    """The line a runner writes to ``train.log`` before an attempt's output (``what``: how it runs)."""
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return f"{ATTEMPT_MARK}{stamp} job {job_id} attempt {attempt}: {what}\n"


def error_line(message: str) -> str:
    """The line the trainer's entry point ends with when it refuses or fails a run."""
    return f"{ERROR_PREFIX}{message}"


def error_message(line: str) -> str | None:
    """The message of an :func:`error_line`, or None for any other line."""
    line = line.strip()
    return line[len(ERROR_PREFIX):] if line.startswith(ERROR_PREFIX) else None


def last_attempt_lines(log_path: Path | str) -> list[str]:
    """The non-blank lines the last attempt wrote to ``train.log`` (from its tail), stripped."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    lines = [line.strip() for line in lines if line.strip()]
    attempt = max((i for i, line in enumerate(lines) if line.startswith(ATTEMPT_MARK)), default=-1)
    return lines[attempt + 1:]


def ended_with_error(log_path: Path | str) -> bool:
    """Whether the last attempt's log shows the trainer's own failure (its :func:`error_line`,
    or an uncaught exception's traceback), as opposed to a kill, which writes neither."""
    return any(error_message(line) is not None or line.startswith(TRACEBACK_HEAD)
               for line in last_attempt_lines(log_path))


def failure_message(log_path: Path | str) -> str | None:
    """Why the last attempt failed, from its log: its error line's message, else its last
    exception line; None when it shows neither."""
    lines = last_attempt_lines(log_path)
    message = next((m for m in map(error_message, reversed(lines)) if m is not None), None)
    if message is None:
        message = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))
                        and ("Error" in line or "Exception" in line)), None)
    return message
