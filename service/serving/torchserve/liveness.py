"""What ``Serving.run_forever`` needs to restart what dies: backoff, the give-up rule, causes.

Pure bookkeeping and text reading (no process is started or signalled here), so each rule
is tested on its own; :mod:`service.serving.torchserve.supervisor` applies them.

* :class:`RestartPolicy` / :class:`Restarts`: one component's restarts (``torchserve``,
  ``nginx``, ``gateway``). The first restart waits :data:`INITIAL_BACKOFF_S` (1 s), each
  one after it twice as long, up to :data:`MAX_BACKOFF_S` (30 s); a component that stayed
  up :data:`STABLE_AFTER_S` (60 s) starts from 1 s again. More than ``limit`` restarts of
  one component within ``window_s`` seconds (``MODELCTL_RESTART_LIMIT``,
  ``MODELCTL_RESTART_WINDOW_S``) and ``modelctl serve`` gives up: it exits non-zero, to be
  restarted whole by what runs it (Kubernetes restarts the container).
* :func:`describe_exit`: a ``Popen.returncode`` in words (exit code or signal).
* :func:`oom_line`: the JVM's own word that it ran out of memory, from ``torchserve.log``.
* :class:`WorkerWatch` and :func:`worker_death_cause`: a TorchServe worker that died (its
  pid vanished from the management API's description of its version, which still wants as
  many workers), and what TorchServe's log says about it. A worker is TorchServe's child,
  not ours: its exit status is not ours to read.
"""

from __future__ import annotations

import os
import re
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

#: The first restart of a component waits this long ...
INITIAL_BACKOFF_S = 1.0
#: ... each next one twice as long, up to this ...
MAX_BACKOFF_S = 30.0
#: ... and a component that stayed up this long starts from INITIAL_BACKOFF_S again.
STABLE_AFTER_S = 60.0

COMPONENTS = ("torchserve", "nginx", "gateway")

#: What the JVM writes when its heap ran out (``-XX:+ExitOnOutOfMemoryError``).
_OOM_MARKERS = ("java.lang.OutOfMemoryError", "Terminating due to")
#: The line TorchServeProcess writes before each start (the log is appended to).
START_MARKER = "===== modelctl: starting TorchServe"
#: What TorchServe logs when one of its workers ends.
_WORKER_END_MARKERS = ("Worker disconnected", "process died", "exit code", "exited",
                       "OutOfMemory", "Killed", "-> WORKER_STOPPED", "-> WORKER_ERROR")
#: A worker's first words: ``W-9000-echo_1-stdout MODEL_LOG - [PID]1234``.
_PID_LINE = re.compile(r"\b(W-\d+-\S+?)-stdout MODEL_LOG - \[PID\](\d+)\s*$")
#: A handler's exception, as the worker prints it (``RuntimeError: ...``).
_ERROR_LINE = re.compile(r"MODEL_LOG - \w*(Error|Exception)\b: ")


def describe_exit(returncode: int | None) -> str:
    """``Popen.returncode`` in words: "killed by SIGKILL", "exit code 3", "exit status unknown"."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def this_run(log_text: str) -> str:
    """The part of ``torchserve.log`` written since the last start of TorchServe."""
    start = log_text.rfind(START_MARKER)
    return log_text if start < 0 else log_text[start:]


def oom_line(log_text: str) -> str | None:
    """The last line of the current run saying the JVM ran out of memory, or None."""
    for line in reversed(this_run(log_text).splitlines()):
        if any(marker in line for marker in _OOM_MARKERS):
            return line.strip()
    return None


def read_tail(path: os.PathLike, max_bytes: int = 512 * 1024) -> str:
    """The last ``max_bytes`` of a log file as text ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff and give-up rule shared by every component."""

    #: More restarts than this of one component within ``window_s`` seconds: give up.
    limit: int = 5
    window_s: float = 600.0
    initial_s: float = INITIAL_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    stable_s: float = STABLE_AFTER_S


@dataclass
class Restarts:
    """One component's restarts: when the next may happen, and whether to give up.

    ``died(now)`` when it is seen dead: returns when to restart it (now + the backoff);
    ``attempt(now)`` before each restart: False when the give-up rule says stop (the
    restart is then not made), else the attempt is counted; ``up(now)`` once it runs again.
    """

    component: str
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    #: Monotonic times of the restarts (attempts) within the window.
    times: deque = field(default_factory=deque)
    #: The wait before the next restart.
    delay_s: float | None = None
    #: Since when it runs (None: dead, or never restarted and never seen dead).
    up_since: float | None = None
    #: When it was seen dead; None while it runs.
    dead_since: float | None = None
    #: When the pending restart is due (None: nothing pending).
    due: float | None = None
    total: int = 0

    def died(self, now: float) -> float:
        if self.delay_s is None or (self.up_since is not None
                                    and now - self.up_since >= self.policy.stable_s):
            self.delay_s = self.policy.initial_s
        self.up_since = None
        self.dead_since = now
        self.due = now + self.delay_s
        self.delay_s = min(self.policy.max_s, self.delay_s * 2)
        return self.due

    def recent(self, now: float) -> int:
        """Restarts within the window that ends now."""
        while self.times and now - self.times[0] > self.policy.window_s:
            self.times.popleft()
        return len(self.times)

    def attempt(self, now: float) -> bool:
        if self.recent(now) >= self.policy.limit:
            return False
        self.times.append(now)
        self.total += 1
        self.due = None
        return True

    def failed(self, now: float) -> float:
        """The attempt did not bring it back: the next one after the (doubled) backoff."""
        self.due = now + self.delay_s
        self.delay_s = min(self.policy.max_s, self.delay_s * 2)
        return self.due

    def up(self, now: float) -> None:
        self.up_since = now
        self.dead_since = None
        self.due = None

    def give_up_message(self) -> str:
        return (f"{self.component} needed more than {self.policy.limit} restarts within "
                f"{self.policy.window_s:.0f}s (MODELCTL_RESTART_LIMIT, MODELCTL_RESTART_WINDOW_S)")


# -- workers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerDeath:
    name: str
    version: str
    pid: int


class WorkerWatch:
    """Worker pids per model version, from successive readiness reports.

    A pid that vanished while its version is still registered and still wants as many
    workers (``minWorkers`` unchanged) is a worker that died (TorchServe starts another);
    a version unregistered or scaled in between is not watched for that round. Callers may
    pass ``alive`` to confirm that a vanished pid is really gone.
    """

    def __init__(self):
        self._seen: dict[tuple[str, str], tuple[int, frozenset[int]]] = {}

    def reset(self) -> None:
        """Forget every pid (TorchServe restarted: its old workers went with it)."""
        self._seen.clear()

    def update(self, report: Iterable, alive=None) -> list[WorkerDeath]:
        deaths: list[WorkerDeath] = []
        now = {r.key: r for r in report}
        for key, (min_workers, pids) in self._seen.items():
            r = now.get(key)
            if r is None or r.min_workers != min_workers:
                continue
            for pid in sorted(pids - set(r.pids)):
                if alive is None or not alive(pid):
                    deaths.append(WorkerDeath(key[0], key[1], pid))
        self._seen = {key: (r.min_workers, frozenset(r.pids)) for key, r in now.items()}
        return deaths


def worker_death_cause(log_text: str, death: WorkerDeath, lines: int = 3) -> str:
    """What TorchServe's log says about a dead worker: its last few lines about that worker's
    end (between the ``[PID]<pid>`` line it printed when it started and the next start of
    its worker thread), e.g. "Worker disconnected. WORKER_MODEL_LOADED", "Backend worker
    monitoring thread interrupted or backend worker process died." or the handler's error."""
    text = this_run(log_text).splitlines()
    start = thread = None
    for i, line in enumerate(text):
        match = _PID_LINE.search(line)
        if match and int(match.group(2)) == death.pid:
            start, thread = i, match.group(1)  # W-<port>-<model>_<version>
    if thread is None:
        return "TorchServe's log does not name this worker"
    port = thread.split("-")[1]
    # The last line of each kind, most telling first: the handler's error, the disconnect,
    # "process died", the state change.
    kinds: dict[int, tuple[int, str]] = {}
    for i, line in enumerate(text[start + 1:]):
        match = _PID_LINE.search(line)
        if match and match.group(1) == thread:
            break  # the next worker of this thread started
        if f" {port} Worker disconnected" in line:
            kinds[1] = (i, line)
        elif thread in line:
            if _ERROR_LINE.search(line):
                kinds[0] = (i, line)
            elif "process died" in line or "OutOfMemory" in line or "Killed" in line:
                kinds[2] = (i, line)
            elif any(m in line for m in _WORKER_END_MARKERS):
                kinds[3] = (i, line)
    if not kinds:
        return f"TorchServe's log says nothing about the end of {thread}"
    chosen = sorted((kinds[k] for k in sorted(kinds)[:lines]), key=lambda item: item[0])
    return " | ".join(_short(line.strip()) for _, line in chosen)


def _short(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[:limit] + "..."
