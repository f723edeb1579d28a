"""deploy-if-faster (issue 13, section 6): a new version is deployed only when it is faster
than the serving version and its metric is within the tolerance of that version's.

Real parts: a real model store holding a slow version (a CNN of 128 and 256 channels, about
19 M multiply-adds per 16x16 image) and fast ones (one block of 4 channels, about 9 K: some
2000x fewer), written directly as archives; the real speed check
(``python -m service.deploy.speed`` as a subprocess, both versions in alternating rounds);
the real control plane, job store and deployer (target "store": deployments write
``deployment.json``, as on Kubernetes, so no TorchServe starts); and one real fine-tuning
job created through the real control API with ``modelctl finetune create --deploy
deploy-if-faster``. Nothing asserts a time beyond "the much slower model is judged slower".

The measuring processes run torch with one thread (MODELCTL_TORCH_THREADS, which serving
workers honour too): on two cores that other work shares, two threads made a tiny model's
p50 swing from 0.9 ms to 92 ms between runs.

The decision as a plain function, and the settings' bounds, are tests/test_deploy_if_faster_unit.py.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil
import pytest
import torch

from service._gen.modelctl.v1 import control_pb2 as pb
from service.auth import ApiToken
from service.deploy import policies
from service.control.api import display, messages
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.control.jobs.plane import ControlPlane, check_tolerance, serving_metric
from service.control.jobs.scheduler import FinishDeferred
from service.rundir import complete_result
from service.control.api.servicer import ControlService
from service.deploy.speed import SpeedCheck, SpeedCheckInterrupted, run_speed_check
from service.control.jobs.jobstore import RUNNING, SUCCEEDED
from service.errors import ServiceError, Unavailable
from service.models import ModelSpec, build_model
from service.modelstore import ModelBundle, ModelStore
from service.serving.settings import ServeSettings

pytestmark = pytest.mark.integration

LABELS = [str(i) for i in range(10)]  # builtin:digits' labels
SLOW, FAST = [128, 256], [4]
ROUNDS = 3


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    monkeypatch.setenv("MODELCTL_TORCH_THREADS", "1")


def cnn(channels: list[int], size: int = 16, lineage: dict | None = None, seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict({"family": "cnn", "num_classes": 10, "config": {"channels": channels},
                                "input": {"type": "image", "channels": 1, "size": size, "resize": None,
                                          "mean": [0.5], "std": [0.5]}})
    return ModelBundle(spec, build_model(spec).state_dict(), LABELS, None, dict(lineage or {}))


def finetuned(parent: str, val: float, parent_val: float | None) -> dict:
    """The lineage facts a run records (service/training/recipe.py, _write_archive)."""
    return {"source": "finetune", "parent": parent, "head": "kept",
            "dataset": {"name": "builtin:digits", "sha256": "d" * 64},
            "metrics": {"metric": "accuracy", "val_metric": val, "parent_val_metric": parent_val}}


class NoTorchServe:
    """No TorchServe here: deployments only write the store (target "store"). A call that would
    change what is served fails the test; a look (ListModels' serving report) is answered as
    TorchServe being down."""

    def __getattr__(self, name):
        if name in ("register", "scale", "set_default", "unregister"):
            raise AssertionError(f"TorchServe's management API was asked to {name}")
        raise Unavailable("no TorchServe in this test")


def plane_for(tmp_path: Path, **config) -> ControlPlane:
    settings = ServeSettings(model_store=tmp_path / "store", state_dir=tmp_path / "state")
    cfg = ControlConfig(port=0, db_path=tmp_path / "control.db", runs_dir=tmp_path / "runs", data_roots=(tmp_path,),
                        deploy_target="store", speed_check_rounds=ROUNDS, **config)
    return ControlPlane(cfg, settings, lambda: NoTorchServe())


def finish(plane: ControlPlane, name: str, version: int, *, tolerance: float | None = None):
    """A job of policy deploy-if-faster whose run wrote ``name`` ``version``, finished the way
    the scheduler finishes one (the plane's decision, then SUCCEEDED with its fields)."""
    job = plane.jobs.create_job(spec={}, output_model=name, base=f"{name}:1", runner="local",
                                run_dir=plane.config.runs_dir / "j", log_path=plane.config.runs_dir / "j.log",
                                deploy_policy="deploy-if-faster",
                                deploy_tolerance=check_tolerance(tolerance, "deploy-if-faster"))
    job = plane.jobs.transition(job.id, RUNNING)
    lineage = plane.models.lineage(name, version)
    result = {"name": name, "version": version, "epochs": 1, **lineage.get("metrics", {})}
    fields = plane._on_result(job, result)
    return plane.jobs.transition(job.id, SUCCEEDED, expect=RUNNING, **fields), result


def check_of(job) -> tuple[dict, SpeedCheck]:
    check = job.deploy_check
    return check, SpeedCheck.from_dict(check["speed"])


# ---- the real speed check through the plane ----------------------------------------------------------
def test_a_slower_version_is_not_deployed(tmp_path):
    plane = plane_for(tmp_path)
    try:
        store = plane.models
        store.write("m", cnn(FAST))
        store.write("m", cnn(SLOW, lineage=finetuned("m:1", 0.95, 0.90)), keep_default=True)  # better, but slow
        job, _ = finish(plane, "m", 2)
        check, speed = check_of(job)
        assert job.deploy_outcome == policies.NOT_FASTER, job.deploy_reason
        assert speed.measured and not speed.faster and speed.rounds == ROUNDS and speed.device == "cpu", speed
        assert speed.new_p50_ms_b1 > speed.serving_p50_ms_b1 and speed.new_throughput_b8 < speed.serving_throughput_b8
        assert check["serving_version"] == 1 and check["serving_val_metric"] == 0.90 and check["within_tolerance"]
        assert "(not faster by the 5% margin)" in job.deploy_reason and job.deploy_reason.endswith("kept version 1")
        assert "accuracy 0.9500 vs 0.9000 within 0.01" in job.deploy_reason
        assert store.default_version("m") == 1 and plane.jobs.history.deployments("m") == []
        (record,) = store.deploy_decisions("m", 2)
        assert (record["job_id"], record["outcome"], record["reason"]) == (job.id, "NOT_FASTER", job.deploy_reason)
        assert record["speed"]["new_runtime"]["precision"] == "fp32" and record["speed"]["faster"] is False
    finally:
        plane.stop()


def test_a_faster_version_within_tolerance_is_deployed_and_decides_once(tmp_path):
    plane = plane_for(tmp_path)
    try:
        store = plane.models
        store.write("m", cnn(SLOW))
        store.write("m", cnn(FAST, lineage=finetuned("m:1", 0.905, 0.915)), keep_default=True)  # 1 point worse
        job, result = finish(plane, "m", 2)
        check, speed = check_of(job)
        assert job.deploy_outcome == policies.DEPLOYED, job.deploy_reason
        assert speed.faster and speed.new_p50_ms_b1 < speed.serving_p50_ms_b1, speed
        reason = (f"p50 {speed.new_p50_ms_b1:.2f} ms vs {speed.serving_p50_ms_b1:.2f} ms, "
                  f"{speed.new_throughput_b8:.0f} vs {speed.serving_throughput_b8:.0f} img/s at batch 8, "
                  "accuracy 0.9050 vs 0.9150 within 0.01: deployed")
        assert job.deploy_reason == reason
        assert store.desired("m").version == 2 and store.desired("m").reason == f"deploy {job.id}"
        (dep,) = plane.jobs.history.deployments("m")
        assert (dep.version, dep.previous_version, dep.job_id) == (2, 1, job.id)
        # The job's message and its text say what was measured.
        msg = messages.job_message(job)
        assert msg.deploy_outcome == pb.DEPLOY_OUTCOME_DEPLOYED and msg.deploy_tolerance == pytest.approx(0.01)
        assert msg.deploy_check.serving_version == 1 and msg.deploy_check.speed.faster
        assert msg.deploy_check.speed.new_p50_ms_b1 == pytest.approx(speed.new_p50_ms_b1)
        text = display.job_text(msg)
        assert f"deploy: {reason}" in text and "compared with: m:1, the serving version" in text
        assert "speed on cpu: p50 at batch 1" in text and "accuracy: 0.9050 vs 0.9150, within the tolerance 0.01" in text

        # Finished again (a restart after the switch): the recorded check decides, nothing is re-measured.
        job_again = plane.jobs.get(job.id)
        fields = plane._on_result(job_again, result)
        assert (fields["deploy_outcome"], fields["deploy_reason"]) == (policies.DEPLOYED, reason)
        assert fields["deploy_check"] == check
        assert len(plane.jobs.history.deployments("m")) == 1 and len(store.deploy_decisions("m", 2)) == 1
    finally:
        plane.stop()


def test_a_faster_version_outside_tolerance_is_not_deployed(tmp_path):
    plane = plane_for(tmp_path)
    try:
        store = plane.models
        store.write("m", cnn(SLOW))
        store.write("m", cnn(FAST, lineage=finetuned("m:1", 0.80, 0.915)), keep_default=True)
        job, _ = finish(plane, "m", 2, tolerance=0.1)
        check, speed = check_of(job)
        assert job.deploy_outcome == policies.OUTSIDE_TOLERANCE, job.deploy_reason
        assert speed.faster, speed  # measured and faster: the metric alone keeps the serving version
        assert check["within_tolerance"] is False and check["tolerance"] == 0.1
        assert "accuracy 0.8000 vs 0.9150 outside 0.1: kept version 1" in job.deploy_reason
        assert store.default_version("m") == 1
        assert messages.job_message(job).deploy_outcome == pb.DEPLOY_OUTCOME_OUTSIDE_TOLERANCE
        views, _ = plane.list_models("m")
        decision = messages.model_version_message(views[1]).deploy_decision
        assert messages.struct_to_dict(decision)["outcome"] == "OUTSIDE_TOLERANCE"
    finally:
        plane.stop()


def test_the_serving_versions_metric_and_a_model_without_another_version(tmp_path):
    """The serving version's metric is the parent's on this validation set when it is the
    parent; otherwise its own from a run on the same data; else none. With no other
    version serving, the new one is deployed without a speed check."""
    plane = plane_for(tmp_path)
    try:
        store = plane.models
        store.write("solo", cnn(FAST, lineage=finetuned("other:1", 0.5, None)))
        job, _ = finish(plane, "solo", 1)
        assert job.deploy_outcome == policies.DEPLOYED and job.deploy_reason == "solo has no other version serving: deployed"
        assert job.deploy_check == {"serving_version": None, "serving_val_metric": None, "within_tolerance": False,
                                    "tolerance": 0.01, "speed": None}
        assert messages.job_message(job).deploy_check.serving_version == 0 and store.desired("solo").version == 1

        store.write("m", cnn(FAST, lineage=finetuned("x:1", 0.7, None)))          # trained on the digits
        store.write("m", cnn(FAST, lineage=finetuned("m:1", 0.8, 0.75)))    # its parent: m:1
        other = finetuned("x:1", 0.6, None)
        other["dataset"]["sha256"] = "e" * 64
        store.write("m", cnn(FAST, lineage=other))                              # other data
        new = store.lineage("m", 2)
        # each run's facts as its result.json carries them (here: from lineage records)
        assert serving_metric(store, complete_result({}, new), "m", 1) == 0.75   # the parent, as the run measured it
        lineage = finetuned("x:1", 0.9, None)
        run = complete_result({}, lineage)
        assert serving_metric(store, run, "m", 1) == 0.7  # not the parent: its own, same data
        assert serving_metric(store, run, "m", 3) is None  # other data: nothing comparable
        assert serving_metric(store, run, "m", 9) is None
        # a distilled student of the serving version: the teacher's metric on the run's validation set
        student = {**lineage, "parent": None, "distill": {"teacher": "m:3", "metric": "accuracy",
                                                           "teacher_val_metric": 0.93}}
        assert serving_metric(store, complete_result({}, student), "m", 3) == 0.93
        other_metric = {**student, "distill": {**student["distill"], "metric": "mse"}}
        assert serving_metric(store, complete_result({}, other_metric), "m", 3) is None
    finally:
        plane.stop()


def test_the_speed_check_is_bounded_in_time_and_ends_when_the_service_stops(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.write("m", cnn(SLOW))
    store.write("m", cnn(FAST))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    check = run_speed_check(store.root, "m", 2, 1, timeout_s=0.5)
    assert check.error == "timed out after 0.5 s (MODELCTL_SPEED_CHECK_TIMEOUT_S)" and not check.faster
    assert time.monotonic() - start < 5
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    start = time.monotonic()
    with pytest.raises(SpeedCheckInterrupted):
        run_speed_check(store.root, "m", 2, 1, timeout_s=120, cancel=stop)
    assert time.monotonic() - start < 5
    with pytest.raises(SpeedCheckInterrupted):  # already stopping: nothing is started
        run_speed_check(store.root, "m", 2, 1, cancel=stop)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # every measuring process gone
    # a version that is not there: an error, not an exception, and no process
    assert run_speed_check(store.root, "m", 7, 1).error == "m version 7 is not in the model store"

    # The plane leaves the job RUNNING (FinishDeferred) when it stops during a check.
    plane = plane_for(tmp_path / "p")
    try:
        plane.models.write("m", cnn(SLOW))
        plane.models.write("m", cnn(FAST, lineage=finetuned("m:1", 0.9, 0.9)), keep_default=True)
        plane._stopping.set()
        with pytest.raises(FinishDeferred):
            finish(plane, "m", 2)
        assert plane.models.deploy_decisions("m", 2) == [] and plane.models.default_version("m") == 1
    finally:
        plane.stop()


# ---- end to end: a fine-tuning job through the real control API and the CLI ------------------------------
def _cli(*argv) -> tuple[int, str, str]:
    from service.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_a_fine_tuning_job_with_deploy_if_faster_through_the_control_api(tmp_path):
    """``modelctl finetune create --deploy deploy-if-faster`` from the serving version: the run
    evaluates its parent (the serving version) on its validation set, the speed check measures
    both, and the outcome follows what was measured (the two share an architecture, so which
    way the speed goes is the machine's; each way is asserted deterministically above)."""
    token = ApiToken("t" * 32, "test")
    plane = plane_for(tmp_path, poll_s=0.1)
    plane.models.write("m", cnn([8, 16], size=8))  # digits are 8x8; labels "0".."9"
    service = ControlService(plane.config, plane, token=token).start()
    target = ("--control", service.target, "--token", token.value)
    try:
        with ControlClient(service.target, token=token, timeout_s=30) as client:
            spec = {"base": "m:1", "dataset": {"source": "builtin:digits", "train_size": 200, "val_size": 100},
                    "hyperparameters": {"epochs": 1, "batch_size": 32}, "output": {"name": "m"}}
            for bad in (-0.01, 1.5, math.nan):
                with pytest.raises(ServiceError) as err:
                    client.create_job(spec, deploy="deploy-if-faster", tolerance=bad)
                assert err.value.grpc_code == "INVALID_ARGUMENT" and "deploy_tolerance: must be" in err.value.message
            with pytest.raises(ServiceError, match="deploy_tolerance: applies to deploy-if-faster only"):
                client.create_job(spec, deploy="deploy", tolerance=0.1)
            assert client.list_jobs().jobs == []

            spec_file = tmp_path / "spec.json"
            spec_file.write_text(json.dumps(spec))
            rc, out, err = _cli("finetune", "create", str(spec_file), "--deploy", "deploy-if-faster",
                                "--tolerance", "0.5", "--watch", *target)
            assert rc == 0, (out, err)
            assert "(deploy-if-faster)" in out and "compared with: m:1, the serving version" in out, out
            job = client.list_jobs().jobs[0]
            assert job.state == pb.JOB_STATE_SUCCEEDED and job.deploy_tolerance == 0.5
            c, s = job.deploy_check, job.deploy_check.speed
            assert c.serving_version == 1 and job.parent == "m:1"
            assert c.serving_val_metric == pytest.approx(job.parent_val_metric)  # the parent is the serving version
            assert s.rounds == ROUNDS and not s.error and s.new_p50_ms_b1 > 0 and s.serving_throughput_b8 > 0, s
            assert c.within_tolerance == (job.val_metric >= job.parent_val_metric - 0.5 - 1e-12)
            faster = s.new_p50_ms_b1 < s.serving_p50_ms_b1 * 0.95 and s.new_throughput_b8 > s.serving_throughput_b8 * 1.05
            assert s.faster == faster
            expected = ("DEPLOYED" if faster and c.within_tolerance else
                        "OUTSIDE_TOLERANCE" if not c.within_tolerance else "NOT_FASTER")
            assert job.deploy_outcome == messages.OUTCOMES[expected], (expected, job.deploy_reason)
            assert plane.models.default_version("m") == (2 if expected == "DEPLOYED" else 1)
            assert f"p50 {s.new_p50_ms_b1:.2f} ms vs {s.serving_p50_ms_b1:.2f} ms" in job.deploy_reason

            # The record beside the version, through ListModels and `modelctl models list`.
            listed = {v.version: v for v in client.list_models("m").versions}
            record = messages.struct_to_dict(listed[2].deploy_decision)
            assert (record["job_id"], record["outcome"], record["reason"]) == (job.id, expected, job.deploy_reason)
            assert not listed[1].HasField("deploy_decision")
            rc, out, _ = _cli("models", "list", "--store", str(plane.models.root))
            assert rc == 0 and f"deploy-if-faster ({job.id}): {expected}: {job.deploy_reason}" in out, out
            rc, out, _ = _cli("models", "list", "--store", str(plane.models.root), "--json")
            (entry,) = [e for e in json.loads(out) if e["version"] == 2]
            assert entry["deploy_decisions"][0]["speed"]["new_p50_ms_b1"] == pytest.approx(s.new_p50_ms_b1)
            rc, out, _ = _cli("finetune", "get", job.id, *target)
            assert rc == 0 and f"deploy: {job.deploy_reason}" in out and "speed on cpu" in out, out
    finally:
        service.stop()
