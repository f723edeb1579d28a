"""The run's event log: one JSON object per line in ``<run dir>/events.jsonl``.

Every line has ``event`` ("start", "resume", "epoch", "stopped", "done") and ``time``.
Epoch lines carry epoch, epochs, train_loss, val_loss, val_metric, metric, val_count,
lr, samples_per_s and epoch_seconds; the done line name, version, epochs, val_metric (the
kept weights' on the validation split), test_metric and test_count (on the test split,
evaluated once at the end) and metric. Only rank 0 writes. Lines are appended and
flushed one at a time, so a reader (a job watcher, a test) may tail the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

EVENTS_FILE = "events.jsonl"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class EventLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: str, **fields) -> dict:
        record = {"event": event, "time": now(), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        return out

    def reconcile(self, history: list[dict]) -> None:
        """Make the epoch lines agree with a checkpoint's ``history`` when resuming: drop
        epoch lines past it, add the ones it has and the file lacks (a kill between the
        checkpoint and the event)."""
        events = self.read()
        done = {e["epoch"] for e in history}
        kept = [e for e in events if e.get("event") != "epoch" or e.get("epoch") in done]
        seen = {e["epoch"] for e in kept if e.get("event") == "epoch"}
        missing = [{"event": "epoch", **e} for e in history if e["epoch"] not in seen]
        if len(kept) == len(events) and not missing:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept + missing), encoding="utf-8")
        os.replace(tmp, self.path)
