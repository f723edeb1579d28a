"""Following a run's ``events.jsonl``: the trainer's one-JSON-object-per-line event log.

The trainer appends and flushes one line at a time; on resume it may rewrite the file
(dropping epoch lines past its checkpoint, adding ones the checkpoint has). An
:class:`EventTail` reads only complete lines, notices a rewritten or shortened file and
starts over, and never yields the same line twice (a line is identified by its event,
epoch and time), so a follower sees every event once, in order, also across resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EVENTS_FILE = "events.jsonl"  # the trainer's name (service.training.events.EVENTS_FILE)


class EventTail:
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
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        out = []
        for line in lines:
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line cut by a kill mid-write
            if not isinstance(event, dict):
                continue
            key = self._key(event)
            if key in self._seen:
                continue
            self._seen.add(key)
            out.append(event)
        return out
