"""Faults, for real: the control service SIGKILLed while jobs run, and a model store that is
full or read-only.

The control service runs as ``python -m service.control`` does, as a subprocess with its
own SQLite database, run directories and model store, and its jobs run real trainers
(the local runner) on tiny built-in runs. No TorchServe: every job here has the deploy
policy "none", and nothing listens on the management port the service is given.

A full store is a real tmpfs filled to ENOSPC; a read-only one is that tmpfs remounted
read-only. Mounting needs root with CAP_SYS_ADMIN (``make test`` runs so); without it
these tests fail and say so (as root, chmod would not stop a write, so it is no
substitute).

Two states are made by hand, and the tests say where: trainers are paused with SIGSTOP
around the kill so that "still running when the service comes back" does not depend on
timing, and one job's pid is cleared in the database, which is what a kill between
starting a trainer and recording its pid (a window of microseconds) leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from service._gen.modelctl.v1 import control_pb2 as pb
from service.auth import load_token
from service.control.api.client import ControlClient
from service.errors import StoreUnwritable
from service.modelstore import ModelStore
from service.training.recipe import read_archive
from tests.helpers import free_port, make_bundle, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
CNN = {"family": "cnn", "config": {"channels": [8, 16]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}
SOME_DIGITS = {"source": "builtin:digits", "train_size": 300, "val_size": 100}


def job_spec(name: str, epochs: int, version: int | None = None) -> dict:
    output = {"name": name} if version is None else {"name": name, "version": version}
    return {"model": CNN, "dataset": SOME_DIGITS, "output": output,
            "hyperparameters": {"epochs": epochs, "batch_size": 16}}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def trainers_on(runs_dir: Path) -> list[int]:
    """Live trainer processes whose command line names a run directory under ``runs_dir``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if (proc.info["status"] != psutil.STATUS_ZOMBIE and "service.training" in cmd
                and any(str(runs_dir) in arg for arg in cmd)):
            found.append(proc.info["pid"])
    return found


def events(run_dir) -> list[str]:
    """The kinds of the trainer's events.jsonl lines, in order."""
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with its content's sha256."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


class ControlProcess:
    """``python -m service.control`` on a free port, over ``root``'s database and run dirs."""

    def __init__(self, root: Path, store: Path, max_concurrent_jobs: int):
        self.root, self.store, self.max_concurrent_jobs = root, store, max_concurrent_jobs
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.state = root / "state"
        self.token = load_token(self.state, environ={}, create=True)  # the one the service reads
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def start(self, log_name: str) -> None:
        self.log = self.root / log_name
        cmd = [sys.executable, "-m", "service.control", "--port", str(self.port),
               "--db", str(self.root / "control.db"), "--runs-dir", str(self.root / "runs"),
               "--data-root", str(self.root), "--max-concurrent-jobs", str(self.max_concurrent_jobs),
               "--model-store", str(self.store), "--state-dir", str(self.state),
               "--management-port", str(free_port())]  # no TorchServe there: nothing is deployed
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCTL_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for(self._serving, 60, f"the control service at {self.target}", poll=0.2)

    def _serving(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return "ready: control API on" in self.log.read_text()

    def client(self) -> ControlClient:
        return ControlClient(self.target, token=self.token)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def db_rows(self) -> dict[str, tuple]:
        with sqlite3.connect(self.root / "control.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            return {row[0]: row[1:] for row in db.execute("SELECT id, state, pid FROM jobs")}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# ---- 4b: SIGKILL of the control service during jobs ------------------------------------------------
def test_sigkill_of_the_control_service_mid_job_every_job_is_settled_after_restart(tmp_path):
    store = ModelStore(tmp_path / "store")
    seed = store.write("faults-seed", make_bundle("cnn"))
    seed_sha = sha256(seed.path)
    runs = tmp_path / "runs"
    ctl = ControlProcess(tmp_path, store.root, max_concurrent_jobs=3)
    pids: list[int] = []
    ctl.start("first.log")
    try:
        with ctl.client() as client:
            # adopted: its trainer outlives the service, which recorded its pid;
            # unrecorded: the same, but its pid is lost (below);
            # failing: its trainer fails on its own while no service follows it;
            # queued, cancelled: rows that must come through the restart as they were.
            adopted = client.create_job(job_spec("faults-adopted", epochs=2))
            unrecorded = client.create_job(job_spec("faults-unrecorded", epochs=2))
            failing = client.create_job(job_spec("faults-taken", epochs=1, version=1))
            running = [adopted, unrecorded, failing]
            for job in running:
                job = wait_for(lambda: (j := client.get_job(job.id)).pid and j, 60, f"{job.id} to get a pid")
                assert job.state == pb.JOB_STATE_RUNNING
                pids.append(job.pid)
                _signal_group(job.pid, signal.SIGSTOP)  # by hand: still there at the restart, whatever the timing
            adopted, unrecorded, failing = (client.get_job(j.id) for j in running)
            queued = client.create_job(job_spec("faults-queued", epochs=1))
            cancelled = client.create_job(job_spec("faults-cancelled", epochs=1))
            client.cancel_job(cancelled.id)
            cancelled = client.get_job(cancelled.id)
            assert client.get_job(queued.id).state == pb.JOB_STATE_QUEUED
            assert cancelled.state == pb.JOB_STATE_CANCELLED

        ctl.kill()
        assert all(alive(pid) for pid in pids)  # trainers run in their own sessions
        # Another writer takes the version the failing job was told to write: its trainer
        # ends with "error: ... version 1 exists" while no control service follows it.
        taken = store.write("faults-taken", make_bundle("cnn", seed=3), version=1)
        taken_sha = sha256(taken.path)
        _signal_group(failing.pid, signal.SIGCONT)
        wait_for(lambda: not alive(failing.pid), 120, "the failing trainer to end")
        assert ctl.db_rows() == {adopted.id: ("RUNNING", adopted.pid), unrecorded.id: ("RUNNING", unrecorded.pid),
                                 failing.id: ("RUNNING", failing.pid), queued.id: ("QUEUED", None),
                                 cancelled.id: ("CANCELLED", None)}
        with sqlite3.connect(tmp_path / "control.db") as db:  # by hand: a kill before the pid was recorded
            db.execute("UPDATE jobs SET pid = NULL, proc_started = NULL WHERE id = ?", (unrecorded.id,))

        ctl.start("second.log")
        for pid in (adopted.pid, unrecorded.pid):
            _signal_group(pid, signal.SIGCONT)
        with ctl.client() as client:
            final = {job.id: client.wait(job.id, timeout_s=240) for job in (adopted, unrecorded, failing, queued)}
            after_cancelled = client.get_job(cancelled.id)
            listed = {j.id for j in client.list_jobs().jobs}
        log = ctl.log.read_text()
        a, u, f, q = (final[j.id] for j in (adopted, unrecorded, failing, queued))

        # followed to the end by the new service, each by its one and only trainer
        for job, name, pid in ((a, "faults-adopted", adopted.pid), (u, "faults-unrecorded", unrecorded.pid)):
            assert job.state == pb.JOB_STATE_SUCCEEDED, (job, log)
            assert job.attempts == 1 and job.result_version == 1 and not job.HasField("exit_code"), job
            assert f"job {job.id}: adopted its running trainer (pid {pid})" in log  # found by its run dir
            assert Path(job.log_path).read_text().count("==== ") == 1  # never relaunched beside itself
            assert [e for e in events(job.run_dir) if e in ("start", "resume", "done")] == ["start", "done"]
            assert store.versions(name) == [1]
        # failed by itself: FAILED with its own reason, not relaunched as if interrupted
        assert f.state == pb.JOB_STATE_FAILED, (f, log)
        assert "version 1 exists" in f.error and "while no control service followed it" in f.error, f.error
        assert f.attempts == 1 and Path(f.log_path).read_text().count("==== ") == 1
        assert store.versions("faults-taken") == [1] and sha256(taken.path) == taken_sha
        # the rest, as they were: the queued job ran after the restart, the cancelled one did not
        assert q.state == pb.JOB_STATE_SUCCEEDED and q.attempts == 1, (q, log)
        assert after_cancelled == cancelled
        assert listed == {adopted.id, unrecorded.id, failing.id, queued.id, cancelled.id}
        assert store.versions("faults-seed") == [1] and sha256(seed.path) == seed_sha
        assert store.versions("faults-cancelled") == []
        assert trainers_on(runs) == []  # no trainer left behind, writing after its job was settled
        assert all(state in ("SUCCEEDED", "FAILED", "CANCELLED") for state, _ in ctl.db_rows().values())
    finally:
        ctl.stop()
        for pid in pids:
            _signal_group(pid, signal.SIGCONT)
            _signal_group(pid, signal.SIGKILL)


# ---- 4c: a full, then read-only model store ---------------------------------------------------------
@pytest.fixture
def tmpfs():
    """``mount(path, size)``: a real tmpfs at ``path``; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"mounting a tmpfs at {path} failed ({done.stderr.strip()}): these tests need root "
                        "with CAP_SYS_ADMIN (as root, chmod cannot make a store unwritable)")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` until it says ENOSPC; the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    with pytest.raises(OSError):
        (directory / "one-more").write_bytes(b"\0" * 4096)
    (directory / "one-more").unlink(missing_ok=True)
    return filler


def assert_loadable(store: ModelStore, name: str, version: int, bundle) -> None:
    """The stored version reads back, checks out, and predicts as the bundle it was written from."""
    info = store.get(name, version)
    assert info.lineage["archive_sha256"] == sha256(info.path)
    from service.models import load_model

    read = read_archive(info)
    assert read.spec == bundle.spec and read.labels == bundle.labels
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        got = load_model(read.spec, read.state_dict)(x)
        want = load_model(bundle.spec, bundle.state_dict)(x)
    assert torch.equal(got, want)


def test_a_full_then_read_only_store_fails_the_job_with_the_reason_and_publishes_nothing(tmp_path, tmpfs):
    store = ModelStore(tmpfs(tmp_path / "store", "1m"))
    seed = make_bundle("cnn")
    store.write("faults-store", seed)
    store.set_desired("faults-store", 1, 0, "seeded")
    ctl = ControlProcess(tmp_path, store.root, max_concurrent_jobs=1)
    ctl.start("control.log")
    try:
        filler = fill(store.root)
        before = tree(store.root)
        with ctl.client() as client:
            full = client.wait(client.create_job(job_spec("faults-store", epochs=1)).id, timeout_s=240)
        assert full.state == pb.JOB_STATE_FAILED, (full, ctl.log.read_text())
        assert "the store is full" in full.error and "[ENOSPC]" in full.error, full.error
        assert "nothing was published" in full.error and full.attempts == 1
        assert tree(store.root) == before  # no 2.mar, no staging directory, no temp file
        assert not (Path(full.run_dir) / "result.json").exists()

        filler.unlink()
        remount(store.root, "ro")
        before = tree(store.root)
        with ctl.client() as client:
            job = client.create_job(job_spec("faults-store", epochs=1))
            read_only = client.wait(job.id, timeout_s=240)
            new_model = client.wait(client.create_job(job_spec("faults-new", epochs=1)).id, timeout_s=240)
        for job in (read_only, new_model):
            assert job.state == pb.JOB_STATE_FAILED, (job, ctl.log.read_text())
            assert "the store is not writable" in job.error and "[EROFS]" in job.error, job.error
        assert tree(store.root) == before
        assert store.versions("faults-store") == [1] and store.models() == {"faults-store": [1]}
        assert store.default_version("faults-store") == 1
        assert_loadable(store, "faults-store", 1, seed)
        assert trainers_on(tmp_path / "runs") == []
    finally:
        ctl.stop()


def test_store_writes_on_a_full_store_leave_no_temp_file(tmp_path, tmpfs):
    """Below the jobs: the deployment record and the archive, each refused by a full store."""
    store = ModelStore(tmpfs(tmp_path / "store", "1m"))
    seed = make_bundle("cnn")
    store.write("faults-direct", seed)  # no deployment.json: a write keeping the default writes one first
    fill(store.root)
    before = tree(store.root)
    with pytest.raises(StoreUnwritable, match=r"the store is full.*\[ENOSPC\].*nothing was published"):
        store.write("faults-direct", make_bundle("cnn", seed=1), keep_default=True)
    assert tree(store.root) == before
    with pytest.raises(StoreUnwritable, match=r"deployment record of 'faults-direct'.*\[ENOSPC\]"):
        store.set_desired("faults-direct", 1, 1)
    assert tree(store.root) == before
    (store.root / "filler.bin").unlink()
    assert store.write("faults-direct", make_bundle("cnn", seed=1), keep_default=True).version == 2
    assert store.default_version("faults-direct") == 1
    assert_loadable(store, "faults-direct", 1, seed)
