"""Crash-safe order (issue 12, point 6): each writer killed at each of its steps.

The writer runs in a subprocess with ``MODELCTL_FAULT_POINT=<point>`` (service/faultpoints.py),
which ends it with ``os._exit`` at that point: no cleanup, no ``finally``, as a kill leaves
it. The test then looks at what is on disk and in SQLite, and starts again as the service
would:

* the model store: an archive is never visible without its lineage; a crash leaves no
  version, or a whole one;
* the trainer: killed before run.json, between the lineage and the archive, between the
  archive and result.json, before result.json is renamed: run again on the same run
  directory, it ends with exactly one version, the one its result.json names;
* deployments: the history (SQLite) and ``deployment.json`` agree after a crash at any
  step once the control plane has started again, and a rollback then goes to the right
  version;
* ``api_token`` is never visible empty; ``spec.json`` / ``run.json`` / ``result.json``
  (service/atomic.py) are fsynced, file and directory, and never seen half written.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from service import atomic
from service.auth import find_token, load_token, state_token_path
from service.control.settings import ControlConfig
from service.deploy.deployer import Deployer
from service.control.jobs.plane import ControlPlane
from service.control.jobs.jobstore import JobStore
from service.errors import InvalidArgument, StoreUnwritable, Unavailable
from service.faultpoints import FAULT_ENV, FAULT_EXIT_CODE
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from tests.helpers import make_bundle

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, point: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCTL_")}
    if point is not None:
        env[FAULT_ENV] = point
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def crash_at(point: str, code: str, *args: str) -> None:
    done = run_python(code, *args, point=point)
    assert done.returncode == FAULT_EXIT_CODE, (point, done.returncode, done.stderr[-3000:])
    assert f"fault point {point}: exiting" in done.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_every_archive_has_its_lineage(store: ModelStore, name: str) -> None:
    for mar in (store.root / name).glob("*.mar"):
        lineage = json.loads(mar.with_suffix(".json").read_text())
        assert lineage["archive_sha256"] == sha256(mar), mar


# ---- the model store ---------------------------------------------------------------------------
WRITE = ("import sys; from service.modelstore import ModelStore; from tests.helpers import make_bundle; "
         "ModelStore(sys.argv[1]).write('m', make_bundle('cnn', seed=int(sys.argv[2])))")


def test_a_store_write_killed_at_each_step_leaves_no_version_or_a_whole_one(tmp_path):
    store = ModelStore(tmp_path / "store")
    crash_at("store.lineage_published", WRITE, str(store.root), "1")
    # the lineage was published first: without its .mar it is no version
    assert store.versions("m") == [] and store.models() == {}
    assert (store.root / "m" / "1.json").is_file() and not (store.root / "m" / "1.mar").exists()
    assert list((store.root / "m").glob(".staging-*"))  # what the killed writer left
    info = store.write("m", make_bundle("cnn", seed=2))  # the next write takes version 1 over
    assert info.version == 1 and store.versions("m") == [1]
    assert store.lineage("m", 1)["archive_sha256"] == sha256(info.path)
    assert not list((store.root / "m").glob(".staging-*"))  # the next writer removes it
    crash_at("store.archive_published", WRITE, str(store.root), "3")
    assert store.versions("m") == [1, 2]  # published whole, lineage and all
    assert_every_archive_has_its_lineage(store, "m")
    assert store.get("m", 2).lineage["version"] == 2


# ---- the trainer -------------------------------------------------------------------------------
def test_a_trainer_killed_at_each_step_resumes_to_exactly_one_version(tmp_path):
    store = ModelStore(tmp_path / "store")
    run_dir = tmp_path / "run"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "model": {"family": "cnn", "config": {"channels": [4]},
                  "input": {"type": "image", "channels": 1, "size": 8, "resize": None}},
        "dataset": {"source": "builtin:digits", "train_size": 120, "val_size": 60},
        "output": {"name": "crashy"}, "hyperparameters": {"epochs": 1, "batch_size": 32}}))
    args = ["-m", "service.training", "run", str(spec), "--run-dir", str(run_dir), "--store", str(store.root),
            "--data-root", str(tmp_path)]
    result = run_dir / "result.json"

    crash_at("atomic.temp_written:run.json", "", *args)
    assert not (run_dir / "run.json").exists() and store.versions("crashy") == []
    crash_at("store.lineage_published", "", *args)  # trained its epoch, then killed mid-publish
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert store.versions("crashy") == [] and not result.exists()
    crash_at("train.archive_written", "", *args)  # resumed from its checkpoint, published, killed
    assert store.versions("crashy") == [1] and not result.exists()
    assert store.lineage("crashy", 1)["run_id"] == run_id
    assert_every_archive_has_its_lineage(store, "crashy")
    crash_at("atomic.temp_written:result.json", "", *args)  # found its archive; killed before the rename
    assert store.versions("crashy") == [1] and not result.exists()

    done = run_python("", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.versions("crashy") == [1], "a resumed run wrote a duplicate version"
    written = json.loads(result.read_text())
    assert (written["name"], written["version"], written["run_id"]) == ("crashy", 1, run_id)
    assert_every_archive_has_its_lineage(store, "crashy")


# ---- deployments ---------------------------------------------------------------------------------
DEPLOY = """
import sys
from pathlib import Path
from service.deploy.deployer import Deployer
from service.control.jobs.jobstore import JobStore
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
root, action = Path(sys.argv[1]), sys.argv[2]
store = ModelStore(root / "store")
deployer = Deployer(ServeSettings(model_store=store.root, state_dir=root / "state"), None,
                    JobStore(root / "control.db").history, store, target="store", default_workers=1)
deployer.deploy("m", 3) if action == "deploy" else deployer.rollback("m")
"""


@pytest.fixture(scope="module")
def three_versions(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("versions") / "store")
    for seed in (1, 2, 3):
        store.write("m", make_bundle("cnn", seed=seed))
    return store.root


def _deployer(root: Path, store: ModelStore, jobs: JobStore) -> Deployer:
    return Deployer(ServeSettings(model_store=store.root, state_dir=root / "state"), None, jobs.history, store,
                    target="store", default_workers=1)


@pytest.mark.parametrize("action, point, deployed, pending, now, after_rollback", [
    ("deploy", "deploy.intent_recorded", [1, 2], 3, 2, 1),    # deployment.json never said 3: dropped
    ("deploy", "deploy.desired_written", [1, 2], 3, 3, 2),    # it did: completed
    ("rollback", "rollback.intent_recorded", [1, 2, 3], 2, 3, 2),
    ("rollback", "rollback.desired_written", [1, 2, 3], 2, 2, 1),
])
def test_history_and_deployment_json_agree_after_a_crash_and_rollback_goes_right(
        tmp_path, three_versions, action, point, deployed, pending, now, after_rollback):
    import shutil

    shutil.copytree(three_versions, tmp_path / "store")
    store = ModelStore(tmp_path / "store")
    jobs = JobStore(tmp_path / "control.db")
    deployer = _deployer(tmp_path, store, jobs)
    for version in deployed:
        deployer.deploy("m", version)
    before = store.desired("m").version
    jobs.close()

    crash_at(point, DEPLOY, str(tmp_path), action)
    jobs = JobStore(tmp_path / "control.db")
    try:
        (intent,) = jobs.history.pending_deployments()  # what the crash left: an intent, not a done row
        assert (intent.version, intent.done) == (pending, False)
        assert store.desired("m").version == (pending if point.endswith("desired_written") else before)
        assert jobs.history.top_deployment("m").version == before  # rollbacks do not see it yet
    finally:
        jobs.close()

    # the control plane starts again on the same database and store, and settles it
    config = ControlConfig(port=0, db_path=tmp_path / "control.db", runs_dir=tmp_path / "runs",
                           model_store=store.root, data_roots=(tmp_path,), deploy_target="store")

    def no_torchserve():
        raise Unavailable("no TorchServe in this test")

    settings = ServeSettings(model_store=store.root, state_dir=tmp_path / "state")
    plane = ControlPlane(config, settings, no_torchserve)
    plane.start(reconcile=False)
    try:
        assert plane.jobs.history.pending_deployments() == []
        assert plane.jobs.history.top_deployment("m").version == store.desired("m").version == now
        assert plane.jobs.history.desired_defaults()["m"].version == now
        dep = plane.rollback("m")
        assert dep.version == store.desired("m").version == after_rollback
        assert plane.jobs.history.top_deployment("m").version == after_rollback
    finally:
        plane.stop()


def test_a_failed_deployment_leaves_no_intent(tmp_path, three_versions, monkeypatch):
    import shutil

    shutil.copytree(three_versions, tmp_path / "store")
    store = ModelStore(tmp_path / "store")
    jobs = JobStore(tmp_path / "control.db")
    try:
        deployer = _deployer(tmp_path, store, jobs)
        deployer.deploy("m", 1)
        deployer.deploy("m", 2)

        def full(*args, **kwargs):
            raise StoreUnwritable("the store is full (a test)")

        monkeypatch.setattr(store, "set_desired", full)
        for call in (lambda: deployer.deploy("m", 3), lambda: deployer.rollback("m"),
                     lambda: deployer.rollback("m", 3)):
            with pytest.raises(StoreUnwritable):
                call()
            assert jobs.history.pending_deployments() == []
            assert [(d.version, d.active) for d in jobs.history.deployments("m")] == [(1, True), (2, True)]
        monkeypatch.undo()
        assert deployer.rollback("m").version == 1 and store.desired("m").version == 1
        assert [(d.action, d.version, d.active, d.done) for d in jobs.history.deployments("m")] == [
            ("deploy", 1, True, True), ("deploy", 2, False, True), ("rollback", 1, False, True)]
    finally:
        jobs.close()


def test_a_version_1_job_database_gains_the_intent_columns(tmp_path):
    import sqlite3

    db = tmp_path / "control.db"
    JobStore(db).close()
    with sqlite3.connect(db) as conn:  # as version 1 made it
        conn.execute("DROP TABLE deployments")
        conn.execute("CREATE TABLE deployments (id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, "
                     "version INTEGER NOT NULL, previous_version INTEGER, workers INTEGER NOT NULL, "
                     "ready_workers INTEGER NOT NULL DEFAULT 0, action TEXT NOT NULL, job_id TEXT, "
                     "created_at REAL NOT NULL, active INTEGER NOT NULL DEFAULT 1)")
        conn.execute("INSERT INTO deployments (model, version, workers, action, created_at) "
                     "VALUES ('m', 4, 1, 'deploy', 0)")
        conn.execute("PRAGMA user_version=1")
    jobs = JobStore(db)
    try:
        (dep,) = jobs.history.deployments("m")
        assert (dep.version, dep.done, dep.popped_id) == (4, True, None)
        assert jobs.history.top_deployment("m").version == 4 and jobs.history.pending_deployments() == []
    finally:
        jobs.close()


# ---- the API token ---------------------------------------------------------------------------------
TOKEN = "import sys; from service.auth import load_token; load_token(sys.argv[1], environ={}, create=True)"


def test_the_api_token_is_never_visible_empty(tmp_path):
    state = tmp_path / "state"
    crash_at("token.temp_written", TOKEN, str(state))
    path = state_token_path(state)
    assert not path.exists()  # killed after writing the temp file: nothing published
    (leftover,) = state.glob(".api_token.*.tmp")
    assert stat.S_IMODE(leftover.stat().st_mode) == 0o600 and leftover.read_text().strip()
    token = load_token(state, environ={}, create=True)
    assert path.read_text().strip() == token.value and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert find_token(state, environ={}).value == token.value
    assert load_token(state, environ={}, create=True).value == token.value  # once: kept after
    # a file an older version left empty (it created the file, then wrote it) is replaced
    path.write_text("")
    with pytest.raises(InvalidArgument, match="an API token must be"):
        load_token(state, environ={})  # a client cannot use it
    renewed = load_token(state, environ={}, create=True)
    assert renewed.value != token.value and path.read_text().strip() == renewed.value


# ---- spec.json, run.json, result.json ---------------------------------------------------------------
def test_run_dir_files_are_fsynced_file_and_directory(tmp_path, monkeypatch):
    from service.control.jobs import intake as specs
    from service.training.run_spec import Policy, RunSpec

    synced: list[tuple[int, int]] = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spec = RunSpec.from_dict({"model": {"family": "cnn", "config": {"channels": [4]},
                                        "input": {"type": "image", "channels": 1, "size": 8, "resize": None}},
                              "dataset": "builtin:digits", "output": {"name": "n"}}, Policy((tmp_path,)))
    run_dir = tmp_path / "run"
    path = specs.write_spec(spec, run_dir, "spec.json")
    for written in (path, run_dir):
        st = os.stat(written)
        assert (st.st_dev, st.st_ino) in synced, written
    assert json.loads(path.read_text()) == spec.to_dict()
    synced.clear()
    result = atomic.write_text(run_dir / "result.json", "{}\n")  # as the trainer writes run.json and result.json
    assert {(os.stat(p).st_dev, os.stat(p).st_ino) for p in (result, run_dir)} <= set(synced)
    assert not list(run_dir.glob(".*.tmp"))


def test_an_atomic_write_killed_before_its_rename_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text('{"version": 1}\n')
    code = "import sys; from service import atomic; atomic.write_text(sys.argv[1], '{\"version\": 2}\\n')"
    crash_at("atomic.temp_written:result.json", code, str(target))
    assert json.loads(target.read_text()) == {"version": 1}
    done = run_python(code, str(target))
    assert done.returncode == 0 and json.loads(target.read_text()) == {"version": 2}
