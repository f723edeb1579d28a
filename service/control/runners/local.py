"""Runners: where a job's trainer process runs. :data:`RUNNERS` maps a name to its kind: a
factory, and whether the environment offers it (:func:`build_runners`).

``local`` (:class:`LocalRunner`) runs ``python -m service.training run <run_dir>/spec.json
--run-dir <run_dir> --store <model store> --data-root …`` (:func:`service.rundir.trainer_argv`)
as a subprocess in its own process group (``start_new_session``), with stdout and stderr
appended to ``<run_dir>/train.log``. A spec with ``hyperparameters.nproc > 1`` makes the trainer
relaunch itself under torchrun, inside the same group. Stopping signals the whole group:
SIGTERM first (the trainer stops at a safe point, keeps its checkpoint and writes no
archive), SIGKILL when the grace period is over, and SIGKILL again for any member left
once the leader has exited.

A process that outlived a previous control service is *adopted*: found by pid and
checked by its start time (so a reused pid is never mistaken for it), then followed by
polling; its exit status is unknown, so the run directory tells how it ended.

A trainer whose pid was never recorded (the service was killed between starting it and
recording it) is found by its ``--run-dir`` (:meth:`LocalRunner.find_running`).

Each attempt is contained (``MODELCTL_JOB_MEMORY_LIMIT_MB``, ``MODELCTL_JOB_DEADLINE_S``):
its processes together may use ``memory_limit_mb`` (a memory cgroup where this service can
make one, else the runner's watch of their resident memory: :mod:`service.control.runners.containment`),
and it may run ``deadline_s`` seconds of wall-clock time from its start. Past the memory limit
the group is killed (SIGKILL: memory can grow faster than a trainer stops); past the deadline
it gets SIGTERM (the trainer stops at a safe point, keeping its checkpoint), and SIGKILL after
the grace period. :meth:`LocalRunner.limit` enforces both at every scheduler tick and names
the limit a trainer hit, which makes its job FAILED with that reason rather than resumed.

A runner is an object with ``start(job) -> RunHandle``, ``adopt(pid, started)``,
optionally ``find_running(run_dir)``, ``poll(handle)``, ``signal(handle, sig)``,
``reap(handle)`` and optionally ``limit(handle) -> reason | None`` (the Kubernetes runner:
:mod:`service.control.runners.kubernetes`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import psutil

from service import rundir
from service.control.runners import containment

log = logging.getLogger(__name__)

#: Seconds of tolerance when matching a process's start time to the recorded one.
_START_TOLERANCE_S = 1.0


@dataclass(kw_only=True)
class RunHandle:
    """An attempt a runner started (or adopted), as the scheduler holds it.

    :attr:`ref` is what the job records (its ``pid`` field) for the runner's ``adopt`` to
    find the attempt again after a restart: a process's pid here (:class:`ProcessHandle`),
    the attempt's run key on Kubernetes (service/control/runners/kubernetes.py)."""

    #: When the attempt started (a process's ``psutil.Process.create_time``, against pid
    #: reuse; a Job's creation).
    started: float
    #: The trainer process, a child of this service (None: adopted, or not a local process).
    proc: subprocess.Popen | None = None
    term_sent: bool = False
    #: Why the runner stopped it ("memory limit: …", "deadline: …"), once it did.
    limit_hit: str | None = None

    @property
    def ref(self) -> int:
        raise NotImplementedError


@dataclass(kw_only=True)
class ProcessHandle(RunHandle):
    """A trainer process on this machine: ``pid`` leads process group ``pid``."""

    pid: int
    #: When the deadline's SIGTERM was sent (monotonic), for the SIGKILL after the grace.
    deadline_term_at: float | None = None
    #: The attempt's memory cgroup, where one was made.
    cgroup: object | None = None

    @property
    def ref(self) -> int:
        return self.pid

    @property
    def adopted(self) -> bool:
        return self.proc is None


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell exit status: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class LocalRunner:
    """Trainer processes on this machine."""

    name = "local"
    #: Trainers are children of this service: stopping it stops them (SIGTERM; the next
    #: service resumes them from their checkpoints).
    outlives_service = False

    def __init__(self, *, model_store: Path, data_roots=(), python: str | None = None,
                 env: dict[str, str] | None = None, extra_env: dict[str, str] | None = None,
                 memory_limit_mb: int = 0, deadline_s: float = 0, grace_s: float = 20.0,
                 use_cgroup: bool = True):
        self.model_store = Path(model_store)
        self.data_roots = tuple(Path(r) for r in data_roots)
        self.python = python or sys.executable
        self.env = env
        #: Set on top of the environment (the operator's run bounds, service/bounds.py).
        self.extra_env = dict(extra_env or {})
        #: Memory of an attempt's processes together, MB (0: none), and its wall-clock
        #: seconds (0: none); SIGKILL ``grace_s`` after the deadline's SIGTERM.
        self.memory_limit_mb = int(memory_limit_mb)
        self.deadline_s = float(deadline_s)
        self.grace_s = float(grace_s)
        #: Try a memory cgroup first (False: always the watch; tests).
        self.use_cgroup = use_cgroup
        self._swept = False

    def command(self, run_dir: Path) -> list[str]:
        return [self.python, "-m", rundir.TRAINER_MODULE,
                *rundir.trainer_argv(run_dir, store=self.model_store, data_roots=self.data_roots)]

    def start(self, job) -> ProcessHandle:
        run_dir = Path(job.run_dir)
        cmd = self.command(run_dir)
        from service.auth import scrubbed_env

        env = scrubbed_env(os.environ if self.env is None else self.env)  # never the API token
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        cgroup = self._cgroup(f"{job.id}-{job.attempts}")
        with open(job.log_path, "ab") as logf:
            logf.write(rundir.attempt_header(job.id, job.attempts, " ".join(cmd)).encode())
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    close_fds=True)
        if cgroup is not None:
            # Moved in at once, before the interpreter has loaded anything (its first
            # milliseconds stay charged outside); its children are born inside.
            try:
                cgroup.add(proc.pid)
            except OSError as exc:
                log.warning("job %s: cannot move pid %d into %s (%s); watching its memory instead",
                            job.id, proc.pid, cgroup.path, exc)
                cgroup = None
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = 0.0  # already gone: poll() reports its exit
        log.info("job %s attempt %d: pid %d, log %s%s", job.id, job.attempts, proc.pid, job.log_path,
                 self._describe_limits(cgroup))
        return ProcessHandle(pid=proc.pid, started=started, proc=proc, cgroup=cgroup)

    def _cgroup(self, name: str):
        if not self.memory_limit_mb or not self.use_cgroup:
            return None
        if not self._swept:
            self._swept = True
            containment.remove_stale()
        return containment.JobCgroup.create(name, self.memory_limit_mb * 1024 * 1024)

    def _describe_limits(self, cgroup) -> str:
        parts = []
        if self.memory_limit_mb:
            how = f"cgroup {cgroup.path}" if cgroup is not None else "watched"
            parts.append(f"memory {self.memory_limit_mb} MB ({how})")
        if self.deadline_s:
            parts.append(f"deadline {self.deadline_s:g} s")
        return f"; limits: {', '.join(parts)}" if parts else ""

    def adopt(self, pid: int | None, started: float | None) -> ProcessHandle | None:
        """The handle of a trainer left running by a previous service; None if it is gone."""
        if not pid or not _same_process_alive(pid, started):
            return None
        return ProcessHandle(pid=pid, started=float(started or 0.0), cgroup=containment.JobCgroup.of_process(pid))

    def find_running(self, run_dir: Path | str) -> ProcessHandle | None:
        """The trainer running on ``run_dir``, found by its command line, or None.

        For a job whose pid was never recorded: a service killed between starting the
        trainer and writing its pid leaves a RUNNING job without one, while the trainer
        (its own session) runs on. Relaunching it would put two trainers on one run
        directory. Only a process group leader whose arguments are this runner's
        ``--run-dir <run_dir>`` matches (torchrun's workers are members of its group).
        """
        wanted = Path(run_dir)
        for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
            try:
                cmd = proc.info["cmdline"] or []
                if (not rundir.names_run_dir(cmd, wanted) or proc.info["status"] == psutil.STATUS_ZOMBIE
                        or os.getpgid(proc.pid) != proc.pid):
                    continue
            except (psutil.Error, ProcessLookupError):
                continue
            return ProcessHandle(pid=proc.pid, started=float(proc.info["create_time"] or 0.0),
                                 cgroup=containment.JobCgroup.of_process(proc.pid))
        return None

    def poll(self, handle: ProcessHandle) -> tuple[bool, int | None]:
        """``(running, exit status)``; the status is None for an adopted process."""
        if handle.proc is not None:
            code = handle.proc.poll()
            return (code is None, None if code is None else exit_code(code))
        return (_same_process_alive(handle.pid, handle.started), None)

    def signal(self, handle: ProcessHandle, sig: int) -> None:
        """Send ``sig`` to the trainer's process group (nothing if it is gone)."""
        try:
            os.killpg(handle.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, handle: ProcessHandle) -> None:
        """After the leader exited: SIGKILL whatever is left of its group (and remove its cgroup)."""
        self.signal(handle, signal.SIGKILL)
        if handle.cgroup is not None:
            handle.cgroup.remove()

    def limit(self, handle: ProcessHandle) -> str | None:
        """Enforce the attempt's memory limit and deadline; the reason once one was hit.

        Called at every scheduler tick while the trainer runs, and once after it ended (a
        cgroup's kill is seen then). Past the memory limit: SIGKILL to the group. Past the
        deadline: SIGTERM, SIGKILL ``grace_s`` later."""
        running = handle.proc.poll() is None if handle.proc is not None else \
            _same_process_alive(handle.pid, handle.started)
        if handle.limit_hit is None and self.memory_limit_mb:
            handle.limit_hit = self._memory_hit(handle, running)
            if handle.limit_hit is not None and running:
                self.signal(handle, signal.SIGKILL)
        if handle.limit_hit is None and self.deadline_s and running and handle.started \
                and time.time() - handle.started > self.deadline_s:
            handle.limit_hit = (f"deadline: the trainer ran longer than {self.deadline_s:g} s "
                                f"(MODELCTL_JOB_DEADLINE_S) and was stopped")
            log.warning("trainer pid %d: past its deadline of %g s: SIGTERM to its group", handle.pid,
                        self.deadline_s)
            self.signal(handle, signal.SIGTERM)
            handle.term_sent = True
            handle.deadline_term_at = time.monotonic()
        elif handle.deadline_term_at is not None and running \
                and time.monotonic() - handle.deadline_term_at > self.grace_s:
            log.warning("trainer pid %d: still running %.0f s after its deadline's SIGTERM: SIGKILL",
                        handle.pid, self.grace_s)
            self.signal(handle, signal.SIGKILL)
            handle.deadline_term_at = float("inf")  # sent once
        return handle.limit_hit

    def _memory_hit(self, handle: ProcessHandle, running: bool) -> str | None:
        limit = self.memory_limit_mb
        cgroup = handle.cgroup
        if cgroup is not None:
            kills = cgroup.oom_kills()
            if not kills:
                return None
            peak = cgroup.peak_bytes()
            log.warning("trainer pid %d: the kernel killed %d process(es) at the memory limit of its "
                        "cgroup %s (%d MB)", handle.pid, kills, cgroup.path, limit)
            peak_text = f" at a peak of {peak // 2**20} MB" if peak else ""
            return (f"memory limit: the trainer's processes reached their limit of {limit} MB "
                    f"(MODELCTL_JOB_MEMORY_LIMIT_MB){peak_text} and the kernel killed {kills} of them")
        if not running:
            return None
        used = containment.group_memory(handle.pid)
        if used <= limit * 2**20:
            return None
        log.warning("trainer pid %d: its processes hold %d MB, above the memory limit of %d MB: "
                    "SIGKILL to its group", handle.pid, used // 2**20, limit)
        return (f"memory limit: the trainer's processes held {used // 2**20} MB, more than {limit} MB "
                f"(MODELCTL_JOB_MEMORY_LIMIT_MB), and were killed")

    @staticmethod
    def group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _same_process_alive(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if started and abs(proc.create_time() - started) > _START_TOLERANCE_S:
            return False  # the pid was reused by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def local_runner(config) -> LocalRunner:
    from service.bounds import trainer_env

    return LocalRunner(model_store=config.model_store, data_roots=config.data_roots, extra_env=trainer_env(config),
                       memory_limit_mb=config.job_memory_limit_mb, deadline_s=config.job_deadline_s,
                       grace_s=config.cancel_grace_s)


def _kubernetes_runner(config):
    from service.control.runners.kubernetes import kubernetes_runner  # its client loads only here

    return kubernetes_runner(config)


@dataclass(frozen=True)
class RunnerKind:
    """A registry entry: the factory (taking the ControlConfig) and whether the environment
    offers this runner."""

    factory: Callable
    offered: Callable[[Mapping[str, str]], bool] = lambda environ: True


#: Runner name -> its kind. The kubernetes runner (service/control/runners/kubernetes.py) is
#: offered where an image is configured: the control Deployment's ConfigMap sets
#: MODELCTL_K8S_IMAGE.
RUNNERS: dict[str, RunnerKind] = {
    "local": RunnerKind(local_runner),
    "kubernetes": RunnerKind(_kubernetes_runner, lambda environ: bool(environ.get("MODELCTL_K8S_IMAGE"))),
}


def offered_runners(environ: Mapping[str, str] | None = None) -> list[str]:
    """The names of the runners this environment offers (``os.environ`` by default), read when
    asked, not when this module is imported."""
    environ = os.environ if environ is None else environ
    return [name for name, kind in RUNNERS.items() if kind.offered(environ)]


def build_runners(config, environ: Mapping[str, str] | None = None) -> dict:
    """Name -> runner, for every runner the environment offers."""
    return {name: RUNNERS[name].factory(config) for name in offered_runners(environ)}
