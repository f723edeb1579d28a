"""Jobs are contained (issue 12, point 5): a memory limit and a deadline per attempt.

Local runner, for real: the scheduler, the job store and the local runner of the control
service run real trainers (a small CNN on 300 digits) in subprocesses. A test-only
``sitecustomize`` on the trainer's PYTHONPATH waits for the trainer's first checkpoint and
then, in a thread, allocates memory without end (``hog``): the trainer itself is unchanged.
The memory limit is tried both ways the runner has: a memory cgroup (where this machine lets
the test make one: root, a writable cgroup tree) and the watch of the processes' resident
memory. The deadline is set, once the first checkpoint is written, to run out 2 s later.

The settings, and the Kubernetes Job the runner builds, are tests/test_containment_unit.py;
the Kubernetes runner's reading of a Job that hit its deadline or a pod OOMKilled is in
tests/test_deploy.py (a real kube-apiserver).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from service.control.runners import containment
from service.control.runners.local import LocalRunner
from service.control.jobs.scheduler import Scheduler
from service.control.jobs.jobstore import FAILED, JobStore

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
SPEC = {"model": {"family": "cnn", "config": {"channels": [8, 16]},
                  "input": {"type": "image", "channels": 1, "size": 8, "resize": None}},
        "dataset": {"source": "builtin:digits", "train_size": 300, "val_size": 100},
        "hyperparameters": {"epochs": 1000, "batch_size": 32}}
#: Runs in every Python process of the trainer's environment; acts only in the trainer.
HOOK = textwrap.dedent('''
    import os, sys, threading, time

    def _after_checkpoint():
        while not os.path.exists("checkpoint.pt"):
            time.sleep(0.02)
        if os.environ.get("CONTAINMENT_TEST_HOG"):
            cap, held = int(os.environ["CONTAINMENT_TEST_HOG"]) << 20, []
            while sum(map(len, held)) < cap:
                chunk = bytearray(16 << 20)
                chunk[::4096] = b"x" * (len(chunk) // 4096)  # touched: resident
                held.append(chunk)
                time.sleep(0.01)
            time.sleep(3600)

    if "--run-dir" in sys.argv:
        threading.Thread(target=_after_checkpoint, daemon=True).start()
''')


@pytest.fixture
def control(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    jobs = JobStore(tmp_path / "control.db")
    made = SimpleNamespace(jobs=jobs, tmp=tmp_path, env=env, schedulers=[])

    def scheduler(runner):
        s = Scheduler(jobs, {"local": runner}, lambda job, result: {}, max_concurrent_jobs=2,
                      cancel_grace_s=5, max_attempts=3, poll_s=0.05)
        made.schedulers.append(s)
        return s

    made.scheduler = scheduler
    try:
        yield made
    finally:
        for s in made.schedulers:
            s.stop(stop_jobs=True, timeout_s=5)
        jobs.close()


def _job(c, name):
    run_dir = c.tmp / "runs" / name
    run_dir.mkdir(parents=True)
    spec = {**SPEC, "output": {"name": name}}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return c.jobs.create_job(spec=spec, output_model=name, base=None, runner="local", run_dir=run_dir,
                             log_path=run_dir / "train.log", deploy_policy="none")


def _runner(c, **kw):
    return LocalRunner(model_store=c.tmp / "store", data_roots=(c.tmp,), env=c.env, grace_s=5, **kw)


def _until(scheduler, jobs, job_id, predicate, timeout_s=240.0, what="the job"):
    deadline = time.monotonic() + timeout_s
    while True:
        scheduler.tick()
        job = jobs.get(job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"{what}: {job.state} {job.error}\n" + (
            Path(job.log_path).read_text()[-3000:] if Path(job.log_path).exists() else "")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


@pytest.mark.parametrize("way", ["cgroup", "watch"])
def test_a_trainer_past_its_memory_limit_fails_with_memory_limit_and_keeps_its_checkpoint(control, way):
    c = control
    if way == "cgroup" and not containment.cgroups_available():
        pytest.skip("no memory cgroup can be made here (needs a writable cgroup tree, e.g. root)")
    limit_mb = 1500  # a small trainer holds 450-800 MB; the hog goes on to 3 GB unless stopped
    runner = _runner(c, memory_limit_mb=limit_mb, use_cgroup=(way == "cgroup"))
    c.env["CONTAINMENT_TEST_HOG"] = str(2 * limit_mb)
    scheduler = c.scheduler(runner)
    job = _job(c, f"hog-{way}")
    scheduler.tick()
    handle = scheduler._handles[job.id]
    assert (handle.cgroup is not None) == (way == "cgroup")
    job = _until(scheduler, c.jobs, job.id, lambda j: j.state == FAILED, what="the hog's job")
    assert job.error.startswith("memory limit: "), job.error
    assert f"{limit_mb} MB (MODELCTL_JOB_MEMORY_LIMIT_MB)" in job.error
    assert "its checkpoint (epoch " in job.error and "is kept" in job.error, job.error
    assert (Path(job.run_dir) / "checkpoint.pt").stat().st_size > 0
    assert not (Path(job.run_dir) / "result.json").exists() and job.attempts == 1  # not resumed
    assert _gone(handle.pid)
    if handle.cgroup is not None:
        assert not handle.cgroup.path.exists()  # removed with its attempt
        assert "the kernel killed" in job.error


def test_a_trainer_past_its_deadline_fails_with_deadline_and_keeps_its_checkpoint(control):
    c = control
    runner = _runner(c, deadline_s=3600)
    scheduler = c.scheduler(runner)
    job = _job(c, "slow")
    scheduler.tick()
    handle = scheduler._handles[job.id]
    checkpoint = Path(job.run_dir) / "checkpoint.pt"
    _until(scheduler, c.jobs, job.id, lambda j: checkpoint.exists(), what="the first checkpoint")
    runner.deadline_s = time.time() - handle.started + 2  # runs out in 2 s
    job = _until(scheduler, c.jobs, job.id, lambda j: j.state == FAILED, timeout_s=60, what="the deadline")
    assert job.error.startswith("deadline: the trainer ran longer than"), job.error
    assert "(MODELCTL_JOB_DEADLINE_S) and was stopped" in job.error and "is kept" in job.error, job.error
    assert checkpoint.stat().st_size > 0 and job.attempts == 1
    assert not (Path(job.run_dir) / "result.json").exists()
    # SIGTERM: the trainer stopped at a safe point, by itself, keeping its checkpoint.
    log_text = Path(job.log_path).read_text()
    assert "stopped by SIGTERM" in log_text and "no archive written" in log_text, log_text[-2000:]
    assert _gone(handle.pid)


