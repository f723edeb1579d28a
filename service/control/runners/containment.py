"""The memory of a local trainer: a memory cgroup where this service can make one, else a watch.

Each attempt of a job run by the local runner may use at most ``MODELCTL_JOB_MEMORY_LIMIT_MB``
(:class:`~service.control.settings.ControlConfig`, ``job_memory_limit_mb``), all its processes
together (the trainer, its DataLoader workers, torchrun's ranks). Two ways, chosen per attempt:

* :class:`JobCgroup`: a child of the control service's own memory cgroup (cgroup v1's memory
  hierarchy, or cgroup v2 where the service's cgroup offers the memory controller to its
  children), named ``modelctl-<job id>-<attempt>``, with the limit as ``memory.limit_in_bytes``
  (v1, and ``memory.memsw.limit_in_bytes``: no swap beyond it) or ``memory.max`` (v2, and
  ``memory.swap.max`` 0). The kernel charges each page once and kills inside the cgroup at the
  limit; the runner reads ``oom_kill`` to tell why the trainer died. It needs a writable
  cgroup tree: root on a machine (as in this project's test machines), a delegated cgroup
  under systemd; a container as uid 10001 has none.
* otherwise :func:`group_memory`: the runner adds up the resident anonymous and shared-memory
  pages (``RssAnon + RssShmem``) of the trainer's processes at every scheduler tick, and kills
  the group past the limit. It works anywhere, but it is a watch, not a wall (an allocation
  faster than a tick can pass the limit before the kill), and it counts a page that forked
  DataLoader workers share copy-on-write once per process: a ResNet-18 run with 2 workers
  measured 2.2 GB this way and 1.1 GB in a cgroup.

``RLIMIT_AS`` was measured and not used: it bounds address space, not memory. A CNN trainer on
8x8 digits reserved 3.8 GB of address space for 0.8 GB resident (0.43 GB anonymous), and CUDA
reserves far more address space than it uses, so a limit that lets a trainer start says little
about its memory.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

PREFIX = "modelctl-"
_MOUNTINFO = Path("/proc/self/mountinfo")


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of each cgroup mount."""
    found = []
    try:
        lines = _MOUNTINFO.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4].replace("\\040", " "), tail[0], tail[2]))
    return found


def _memory_cgroup_of(pid: int | str = "self") -> tuple[Path, int] | None:
    """The directory of ``pid``'s memory cgroup and its version, or None: cgroup v1's memory
    hierarchy when it is mounted, else the unified (v2) one."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    mounts = _mounts()
    v1 = v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif controllers == "":
            v2 = path
    if v1 is not None:
        for point, kind, options in mounts:
            if kind == "cgroup" and "memory" in options.split(","):
                return Path(point) / v1.lstrip("/"), 1
    if v2 is not None:
        for point, kind, _ in mounts:
            if kind == "cgroup2":
                return Path(point) / v2.lstrip("/"), 2
    return None


class JobCgroup:
    """The memory cgroup of one attempt (see the module's docstring)."""

    def __init__(self, path: Path, version: int):
        self.path = Path(path)
        self.version = version

    def __repr__(self) -> str:
        return f"JobCgroup({str(self.path)!r}, v{self.version})"

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> "JobCgroup | None":
        """A new cgroup ``name`` under this process's memory cgroup, limited to ``limit_bytes``;
        None where none can be made (no cgroup tree, not writable, no memory controller)."""
        own = _memory_cgroup_of()
        if own is None:
            return None
        base, version = own
        path = base / (PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", name))
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            return None
        group = cls(path, version)
        try:
            if version == 2:
                if "memory" not in (path / "cgroup.controllers").read_text().split():
                    raise OSError("the memory controller is not offered to child cgroups")
                (path / "memory.max").write_text(str(limit_bytes))
                _try_write(path / "memory.swap.max", "0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                _try_write(path / "memory.memsw.limit_in_bytes", str(limit_bytes))
        except OSError as exc:
            log.debug("no memory cgroup at %s: %s", path, exc)
            group.remove(wait_s=0)
            return None
        return group

    @classmethod
    def of_process(cls, pid: int) -> "JobCgroup | None":
        """The job cgroup ``pid`` runs in (an adopted trainer's), or None."""
        found = _memory_cgroup_of(pid)
        if found is None or not found[0].name.startswith(PREFIX):
            return None
        return cls(*found)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def _stat(self, name: str, key: str) -> int:
        try:
            for line in (self.path / name).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except (OSError, ValueError):
            pass
        return 0

    def oom_kills(self) -> int:
        """Processes the kernel killed in this cgroup for its limit."""
        return self._stat("memory.events" if self.version == 2 else "memory.oom_control", "oom_kill")

    def peak_bytes(self) -> int | None:
        try:
            return int((self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"))
                       .read_text())
        except (OSError, ValueError):
            return None

    def remove(self, wait_s: float = 2.0) -> bool:
        """Remove the (empty) cgroup; waits up to ``wait_s`` for its last processes to go."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if time.monotonic() >= deadline:
                    log.debug("cgroup %s not removed: %s", self.path, exc)
                    return False
            time.sleep(0.05)


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:  # no swap accounting: nothing to limit
        pass


def remove_stale(keep=()) -> int:
    """Remove the empty job cgroups a previous service left (a killed one cannot clean up);
    returns how many. Non-empty ones (a trainer still running) stay."""
    own = _memory_cgroup_of()
    if own is None:
        return 0
    removed = 0
    try:
        children = [p for p in own[0].iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    except OSError:
        return 0
    for path in children:
        if path.name in keep:
            continue
        try:
            path.rmdir()
            removed += 1
        except OSError:
            pass
    return removed


def _anonymous_bytes(pid: int) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total


def group_memory(pid: int) -> int:
    """Resident anonymous and shared-memory bytes of ``pid`` and its descendants (see the
    module's docstring: pages shared copy-on-write count once per process)."""
    try:
        leader = psutil.Process(pid)
        members = [leader.pid] + [c.pid for c in leader.children(recursive=True)]
    except psutil.Error:
        return 0
    return sum(_anonymous_bytes(p) for p in members)


def cgroups_available() -> bool:
    """Whether this service can make a job cgroup with a memory limit here (tests)."""
    group = JobCgroup.create(f"probe-{os.getpid()}", 1 << 30)
    if group is None:
        return False
    group.remove(wait_s=0)
    return True
