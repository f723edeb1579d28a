"""Corrupt archives in a replica's model store (issue 7, point 4d): a real TorchServe with the
control API beside it (modelctl serve's composition) refuses each at registration, names the
problem, and serves the good model. The check itself is tests/test_archive_check.py."""

from __future__ import annotations

import logging
import random
import time

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.predict_client import PredictionClient, read_token
from service.control.settings import ControlConfig
from service.app import ServingWithControl
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from tests.helpers import free_port, make_bundle, random_image

from tests.test_archive_check import CHECK_LOGGER, DAMAGE, bad_crc, damage, wrong_shape
from tests.test_archive_check import only_modelctl_archives  # noqa: F401 (autouse: production's archive check)

pytestmark = pytest.mark.torchserve


def _metrics(serving) -> str:
    return requests.get(f"http://127.0.0.1:{serving.exporter.port}/metrics", timeout=10).text


def test_corrupt_archives_are_refused_at_registration_and_the_good_model_serves(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path
    store = ModelStore(root / "store")
    store.write("good", make_bundle("cnn", seed=1))
    store.write("good", make_bundle("cnn", seed=2))
    source = store.path("good", 1)
    marker = root / "pickled-code-ran"
    refused = {}
    for kind in sorted(DAMAGE):
        name = f"bad-{kind}"
        damage(kind, source, store.path(name, 1), name, 1, marker)
        refused[(name, 1)] = DAMAGE[kind][1]
    wrong_shape(source, store.path("good", 3), "good", 3)  # the latest version of the good model
    refused[("good", 3)] = DAMAGE["wrong-shape"][1]

    settings = ServeSettings(
        model_store=store.root, state_dir=root / "state", inference_port=free_port(),
        management_port=free_port(), metrics_port=free_port(), grpc_inference_port=free_port(),
        grpc_management_port=free_port(), ts_grpc_inference_port=free_port(), ts_inference_port=free_port(),
        exporter_port=free_port(), worker_port_base=random.randint(20000, 40000),
        startup_timeout_s=150, sync_interval_s=0.3)
    control = ControlConfig(port=0, db_path=root / "control.db", runs_dir=root / "runs", data_roots=(root,),
                            max_concurrent_jobs=1, poll_s=0.1, deploy_timeout_s=60)
    serving = ServingWithControl(settings, control)
    started = time.monotonic()
    report = serving.start()
    took = time.monotonic() - started
    channel = grpc.insecure_channel(serving.control.target)
    metadata = tuple(serving.api_token.metadata())
    stub = pb_grpc.ModelControlStub(channel)
    try:
        # Readiness: only what is registered counts; the refused archives do not hold it down.
        assert {r.key for r in report} == {("good", "1"), ("good", "2")}, report
        assert all(r.ready for r in report), report
        assert took < settings.startup_timeout_s, took
        with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as probe:  # what a readiness probe asks
            health = health_pb2_grpc.HealthStub(probe)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "the replica's health is not SERVING"
                time.sleep(0.3)

        # The refused archives are not registered; the good model's good versions are.
        mgmt = serving.mgmt
        assert {m["modelName"] for m in mgmt.list_models()} == {"good"}
        assert {e["modelVersion"] for e in mgmt.describe("good", "all")} == {"1", "2"}
        assert mgmt.describe("good")[0]["modelVersion"] == "2", "the latest version that passed is the default"
        client = PredictionClient(serving.torchserve.inference_url, grpc_target=f"127.0.0.1:{serving.grpc_port}",
                                  token=read_token(settings.state_dir))
        image = {"data": random_image(1, 16, 16)}
        assert client.rest("good", image)["version"] == "2"
        assert client.grpc("good", image)["version"] == "2"

        # Passes of the converger do not register them either, nor check them again.
        time.sleep(1.5)  # several passes at 0.3 s
        for _ in range(3):
            serving.converger.converge_once()
        assert set(serving.converger.refused) == set(refused), serving.converger.refused
        assert not serving.converger.given_up, serving.converger.given_up
        assert {m["modelName"] for m in mgmt.list_models()} == {"good"}

        # No worker of a refused archive ever started, so none crash-looped; nothing pickled ran.
        assert all(r.ready for r in serving.readiness())
        worker_logs = "".join(p.read_text(errors="replace") for p in (settings.state_dir / "logs").glob("*.log"))
        assert "loaded good version 2" in worker_logs, "the workers' log is read"
        assert "bad-" not in worker_logs and "needs pickled code" not in worker_logs
        assert not marker.exists()

        # Operators: one ERROR line per refused archive, naming the file and the problem ...
        for (name, version), problem in refused.items():
            path = str(store.path(name, version))
            lines = [r.getMessage() for r in caplog.records
                     if r.name == CHECK_LOGGER and r.levelno == logging.ERROR and path in r.getMessage()]
            assert len(lines) == 1, (path, lines)
            assert problem in lines[0] and "it is not registered" in lines[0], lines[0]
        # ... a metric per refused archive ...
        metrics = _metrics(serving)
        for name, version in refused:
            assert f'modelctl_archive_refused{{model="{name}",version="{version}"}} 1.0' in metrics
        assert 'modelctl_archive_refused{model="good",version="1"}' not in metrics
        # ... and ListModels says why.
        listed = stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        status = {(v.name, v.version): v for v in listed.versions}
        for key, problem in refused.items():
            assert not status[key].registered and status[key].serving_status.startswith("refused: "), status[key]
            assert problem in status[key].serving_status, status[key].serving_status
        assert status[("good", 2)].registered and status[("good", 2)].serving_status.endswith("workers READY")

        # A deploy of a refused archive: FAILED_PRECONDITION with the reason; nothing changes.
        for key in (("good", 3), ("bad-pickled-code", 1)):
            with pytest.raises(grpc.RpcError) as info:
                stub.DeployModel(pb.DeployModelRequest(name=key[0], version=key[1]), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert str(store.path(*key)) in info.value.details() and refused[key] in info.value.details()
        assert mgmt.describe("good")[0]["modelVersion"] == "2"
        assert not (store.root / "good" / "deployment.json").exists()

        # A corrupt archive that lands while serving is refused by the converger, once; the
        # other versions still deploy and answer.
        bad_crc(source, store.path("good", 4), "good", 4)
        deadline = time.monotonic() + 30
        while ("good", 4) not in serving.converger.refused:
            assert time.monotonic() < deadline, "the converger did not look at version 4"
            time.sleep(0.2)
        assert {e["modelVersion"] for e in mgmt.describe("good", "all")} == {"1", "2"}
        dep = stub.DeployModel(pb.DeployModelRequest(name="good", version=1, workers=1), metadata=metadata)
        assert (dep.version, dep.previous_version, dep.ready_workers) == (1, 2, 1)
        assert client.rest("good", image)["version"] == "1"
        time.sleep(1.0)  # more converge passes
        path4 = str(store.path("good", 4))
        assert sum(path4 in r.getMessage() for r in caplog.records if r.name == CHECK_LOGGER) == 1
        assert client.rest("good", image)["version"] == "1"
    finally:
        channel.close()
        serving.stop()
