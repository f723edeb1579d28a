"""Replicas converge on the model store's desired state (issue 6, point 4).

The store part is plain files. The replica part runs three real TorchServe instances on
this machine, all sharing one model store, as serving replicas behind a Kubernetes
Service would; the deployments come from a real Deployer in ``store`` mode (the control
service on Kubernetes) with a real SQLite history.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from service.predict_client import PredictionClient, read_token
from service.deploy.deployer import Deployer
from service.control.jobs.jobstore import JobStore
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from service.serving.torchserve.supervisor import Serving
from tests.helpers import broken_archive_copy, free_port, make_bundle, random_image

pytestmark = pytest.mark.torchserve

NAME = "replicated"


# ---- replicas -------------------------------------------------------------------------------------
def _settings(root, name: str) -> ServeSettings:
    return ServeSettings(model_store=root / "store", state_dir=root / name, inference_port=free_port(),
                         management_port=free_port(), metrics_port=free_port(), grpc_inference_port=free_port(),
                         grpc_management_port=free_port(), ts_grpc_inference_port=free_port(),
                         ts_inference_port=free_port(), exporter_port=free_port(), worker_port_base=free_port(), startup_timeout_s=90,
                         sync_interval_s=0.3)


def _default(serving: Serving) -> int:
    return int(serving.mgmt.describe(NAME)[0]["modelVersion"])


def _answered_by(serving: Serving) -> str:
    """The version that answers ``/predictions/<NAME>`` on this replica, from its REST API."""
    client = PredictionClient(serving.torchserve.inference_url, grpc_target="",
                              token=read_token(serving.settings.state_dir))
    return client.rest(NAME, {"data": random_image(1, 16, 16)})["version"]


def _until(fn, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not fn():
        assert time.monotonic() < deadline, "not converged in time"
        time.sleep(0.2)


@pytest.fixture()
def replicas(tmp_path):
    store = ModelStore(tmp_path / "store")
    for seed in (1, 2):
        store.write(NAME, make_bundle("cnn", seed=seed))
    started: list[Serving] = []

    def start(name: str) -> Serving:
        serving = Serving(_settings(tmp_path, name))
        started.append(serving)
        serving.start()
        return serving

    try:
        yield store, start
    finally:
        for serving in started:
            serving.stop()


def test_replicas_converge_on_deployments_and_a_late_replica_serves_the_same(replicas, tmp_path):
    store, start = replicas
    a, b = start("a"), start("b")
    assert _default(a) == _default(b) == 2, "without a desired state: the latest version"

    # The control service on Kubernetes: it only writes the store ("store" target).
    jobs = JobStore(tmp_path / "control.db")
    deployer = Deployer(a.settings, mgmt=None, history=jobs.history, model_store=store, target="store", default_workers=1)
    dep = deployer.deploy(NAME, 1)
    assert (dep.version, dep.previous_version) == (1, 2)
    assert json.loads((tmp_path / "store" / NAME / "deployment.json").read_text())["version"] == 1
    _until(lambda: _default(a) == 1 and _default(b) == 1)
    assert _answered_by(a) == _answered_by(b) == "1"

    # A fine-tuned version lands in the store: every replica registers it, none serves it by default.
    store.write(NAME, make_bundle("cnn", seed=3), keep_default=True)
    for replica in (a, b):
        _until(lambda r=replica: {"1", "2", "3"} <= {e["modelVersion"] for e in r.mgmt.describe(NAME, "all")})
        assert _default(replica) == 1

    # A replica that starts later serves the same default from its first READY moment.
    c = start("c")
    assert _default(c) == 1 and _answered_by(c) == "1"

    # Promote the new version with 2 workers, then roll back: all three follow.
    deployer.deploy(NAME, 3, workers=2)
    _until(lambda: all(_default(r) == 3 for r in (a, b, c)))
    for replica in (a, b, c):
        entry = replica.mgmt.describe(NAME, "3")[0]
        _until(lambda r=replica: r.mgmt.describe(NAME, "3")[0]["minWorkers"] == 2)
        assert entry["modelVersion"] == "3"
    back = deployer.rollback(NAME)
    assert back.version == 1
    _until(lambda: all(_default(r) == 1 for r in (a, b, c)))
    assert {_answered_by(r) for r in (a, b, c)} == {"1"}
    jobs.close()


def test_a_desired_version_that_cannot_load_is_not_made_default(replicas, tmp_path):
    store, start = replicas
    a = start("a")
    broken_archive_copy(store.path(NAME, 2), store.path(NAME, 3), modelVersion="3")
    store.set_desired(NAME, 3, 1, "deploy")
    a.converger.settings = dataclasses.replace(a.settings, startup_timeout_s=5.0)
    # Its weights do not fit its spec: the archive check refuses it before registration
    # (tests/test_archive_check.py), so no worker of it ever starts.
    _until(lambda: (NAME, 3) in a.converger.refused, timeout_s=90)
    assert "weights.pt does not fit spec.json" in a.converger.refused[(NAME, 3)]
    assert "3" not in {e["modelVersion"] for e in a.mgmt.describe(NAME, "all")}
    assert _default(a) == 2 and _answered_by(a) == "2", "the old default keeps serving"
