"""Runners: where a job's trainer process runs. :data:`RUNNERS` maps a name to a factory.

``local`` (:class:`LocalRunner`) runs ``python -m service.training run <run_dir>/spec.json
--run-dir <run_dir> --store <model store> --data-root …`` as a subprocess in its own
process group (``start_new_session``), with stdout and stderr appended to
``<run_dir>/train.log``. A spec with ``hyperparameters.nproc > 1`` makes the trainer
relaunch itself under torchrun, inside the same group. Stopping signals the whole group:
SIGTERM first (the trainer stops at a safe point, keeps its checkpoint and writes no
archive), SIGKILL when the grace period is over, and SIGKILL again for any member left
once the leader has exited.

A process that outlived a previous control service is *adopted*: found by pid and
checked by its start time (so a reused pid is never mistaken for it), then followed by
polling; its exit status is unknown, so the run directory tells how it ended.

A trainer whose pid was never recorded (the service was killed between starting it and
recording it) is found by its ``--run-dir`` (:meth:`LocalRunner.find_running`).

A runner is an object with ``start(job) -> RunHandle``, ``adopt(pid, started)``,
optionally ``find_running(run_dir)``, ``poll(handle)``, ``signal(handle, sig)`` and
``reap(handle)``. (Kubernetes comes later.)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
LOG_FILE = "train.log"
RESULT_FILE = "result.json"  # the trainer's (service.training.recipe.RESULT_FILE)
#: Seconds of tolerance when matching a process's start time to the recorded one.
_START_TOLERANCE_S = 1.0


@dataclass
class RunHandle:
    """A started (or adopted) trainer: ``pid`` leads process group ``pid``."""

    pid: int
    #: The process's start time (``psutil.Process.create_time``), against pid reuse.
    started: float
    proc: subprocess.Popen | None = None  # None when adopted
    term_sent: bool = False

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
                 env: dict[str, str] | None = None, extra_env: dict[str, str] | None = None):
        self.model_store = Path(model_store)
        self.data_roots = tuple(Path(r) for r in data_roots)
        self.python = python or sys.executable
        self.env = env
        #: Set on top of the environment (the operator's run bounds, service/bounds.py).
        self.extra_env = dict(extra_env or {})

    def command(self, run_dir: Path) -> list[str]:
        cmd = [self.python, "-m", "service.training", "run", str(run_dir / SPEC_FILE),
               "--run-dir", str(run_dir), "--store", str(self.model_store)]
        for root in self.data_roots:
            cmd += ["--data-root", str(root)]
        return cmd

    def start(self, job) -> RunHandle:
        run_dir = Path(job.run_dir)
        cmd = self.command(run_dir)
        from service.auth import scrubbed_env

        env = scrubbed_env(os.environ if self.env is None else self.env)  # never the API token
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(job.log_path, "ab") as logf:
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            logf.write(f"==== {stamp} job {job.id} attempt {job.attempts}: {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    close_fds=True)
        try:
            started = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            started = 0.0  # already gone: poll() reports its exit
        log.info("job %s attempt %d: pid %d, log %s", job.id, job.attempts, proc.pid, job.log_path)
        return RunHandle(proc.pid, started, proc)

    def adopt(self, pid: int | None, started: float | None) -> RunHandle | None:
        """The handle of a trainer left running by a previous service; None if it is gone."""
        if not pid or not _same_process_alive(pid, started):
            return None
        return RunHandle(pid, float(started or 0.0), None)

    def find_running(self, run_dir: Path | str) -> RunHandle | None:
        """The trainer running on ``run_dir``, found by its command line, or None.

        For a job whose pid was never recorded: a service killed between starting the
        trainer and writing its pid leaves a RUNNING job without one, while the trainer
        (its own session) runs on. Relaunching it would put two trainers on one run
        directory. Only a process group leader whose arguments are this runner's
        ``--run-dir <run_dir>`` matches (torchrun's workers are members of its group).
        """
        wanted = str(Path(run_dir))
        for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
            try:
                cmd = proc.info["cmdline"] or []
                if ("service.training" not in cmd or proc.info["status"] == psutil.STATUS_ZOMBIE
                        or os.getpgid(proc.pid) != proc.pid):
                    continue
            except (psutil.Error, ProcessLookupError):
                continue
            if any(arg == "--run-dir" and value == wanted for arg, value in zip(cmd, cmd[1:])):
                return RunHandle(proc.pid, float(proc.info["create_time"] or 0.0), None)
        return None

    def poll(self, handle: RunHandle) -> tuple[bool, int | None]:
        """``(running, exit status)``; the status is None for an adopted process."""
        if handle.proc is not None:
            code = handle.proc.poll()
            return (code is None, None if code is None else exit_code(code))
        return (_same_process_alive(handle.pid, handle.started), None)

    def signal(self, handle: RunHandle, sig: int) -> None:
        """Send ``sig`` to the trainer's process group (nothing if it is gone)."""
        try:
            os.killpg(handle.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, handle: RunHandle) -> None:
        """After the leader exited: SIGKILL whatever is left of its group."""
        self.signal(handle, signal.SIGKILL)

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

    return LocalRunner(model_store=config.model_store, data_roots=config.data_roots, extra_env=trainer_env(config))


#: Runner name -> factory taking the ControlConfig.
RUNNERS: dict[str, Callable] = {
    "local": local_runner,
    **({"kubernetes": lambda config: __import__("service.control.k8s_runner", fromlist=["_"]).kubernetes_runner(config)} if os.environ.get("MODELCTL_K8S_IMAGE") else {}),  # noqa: E501 - service/control/k8s_runner.py; offered where an image is configured
}
