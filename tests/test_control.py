"""The control API for real: a gRPC server on a free port, a real TorchServe (one per module,
free ports), real SQLite and real trainer subprocesses on tiny built-in runs.

Run ``python scripts/build_protos.py`` first.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from torchvision.io import ImageReadMode, decode_image, encode_png

from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.predict_client import PredictionClient, read_token
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.app import ServingWithControl
from service.control.jobs.jobstore import RUNNING
from service.models import ModelSpec, image_eval_transform, load_model
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from tests.helpers import HeldWatches, broken_archive_copy, free_port, make_bundle, wait_for

pytestmark = pytest.mark.torchserve

REPO = Path(__file__).resolve().parent.parent
CNN = {"family": "cnn", "config": {"channels": [8, 16]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}
DIGITS = {"source": "builtin:digits", "train_size": 300, "val_size": 100}
SLOW_DIGITS = {"source": "builtin:digits"}  # the full set at batch size 8: about 1 s per epoch
SOME_DIGITS = {"source": "builtin:digits", "train_size": 400, "val_size": 100}  # ~2 s per epoch, 2 at once
PARENT = "ctl-digits"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One TorchServe and the control API beside it (``modelctl serve``'s composition)."""
    root = tmp_path_factory.mktemp("control")
    (root / "store").mkdir()
    settings = ServeSettings(
        model_store=root / "store", state_dir=root / "state",
        inference_port=free_port(), management_port=free_port(), metrics_port=free_port(),
        grpc_inference_port=free_port(), grpc_management_port=free_port(),
        ts_grpc_inference_port=free_port(), exporter_port=free_port(), ts_inference_port=free_port(),
        worker_port_base=random.randint(20000, 40000), startup_timeout_s=90,
    )
    control = ControlConfig(port=0, db_path=root / "control.db", runs_dir=root / "runs", data_roots=(root,),
                            max_concurrent_jobs=1, cancel_grace_s=10, poll_s=0.1, deploy_timeout_s=90)
    serving = ServingWithControl(settings, control)
    serving.start()
    target = serving.control.target
    token = serving.api_token  # generated into the state dir: the one token of this instance
    channel = grpc.intercept_channel(grpc.insecure_channel(target), WithMetadata(token.metadata()))
    try:
        yield SimpleNamespace(
            root=root, settings=settings, serving=serving, plane=serving.control.plane, target=target,
            token=token, stub=pb_grpc.ModelControlStub(channel), channel=channel,
            client=ControlClient(target, token=token),
            store=ModelStore(settings.model_store),
            predict=PredictionClient(rest_url=f"http://127.0.0.1:{settings.inference_port}",
                                     grpc_target=f"127.0.0.1:{settings.grpc_inference_port}",
                                     token=read_token(settings.state_dir)),
        )
    finally:
        channel.close()
        serving.stop()


@pytest.fixture(scope="module")
def parent(served):
    """A first run, from a family spec, deployed: watched from creation to SUCCEEDED."""
    spec = {"model": CNN, "dataset": DIGITS, "output": {"name": PARENT},
            "hyperparameters": {"epochs": 3, "batch_size": 32, "lr": 0.01}}
    job = served.client.create_job(spec, deploy="deploy")
    updates = list(served.client.watch(job.id, timeout_s=300))
    return SimpleNamespace(job=updates[-1].job, created=job, updates=updates)


# ---- helpers ------------------------------------------------------------------------------------
class WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """A raw stub's calls carry ``metadata`` (the API token), as ControlClient's do."""

    def __init__(self, metadata):
        self.metadata = tuple(metadata)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream fails on its first message
            next(result)
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *needles: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    for needle in needles:
        assert needle in error.details(), (needle, error.details())


def digit_png(index: int) -> bytes:
    from sklearn.datasets import load_digits

    image = load_digits().images[index]  # 8x8, values 0..16
    pixels = torch.from_numpy(np.round(image * 255 / 16).astype(np.uint8)).unsqueeze(0)
    return encode_png(pixels).numpy().tobytes()


def checkpoint_probs(run_dir: Path, png: bytes) -> torch.Tensor:
    """Softmax of the archived weights, rebuilt from the run's checkpoint, on one image."""
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(state["model_spec"])
    weights = state["best_model"] if state["best_model"] is not None else state["model"]
    model = load_model(spec, weights)
    x = image_eval_transform(spec.input)(decode_image(torch.frombuffer(bytearray(png), dtype=torch.uint8),
                                                      ImageReadMode.GRAY))
    with torch.no_grad():
        return torch.softmax(model(x.unsqueeze(0)), 1)[0]


def events(run_dir) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def defaults(served, name: str) -> dict[int, pb.ModelVersion]:
    return {v.version: v for v in served.client.list_models(name).versions}


# ---- the server itself ------------------------------------------------------------------------------
def test_health_and_reflection_are_served(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "modelctl.v1.ModelControl"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"modelctl.v1.ModelControl", "grpc.health.v1.Health"} <= names


# ---- create, watch, succeed, deploy, predict ---------------------------------------------------------
def test_create_watch_succeed_deploy_and_serve_the_checkpoints_predictions(served, parent):
    job, updates = parent.job, parent.updates
    assert parent.created.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    states = [u.state for u in updates if u.WhichOneof("update") == "state"]
    assert states[-2:] == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED]
    epochs = [u.epoch for u in updates if u.WhichOneof("update") == "epoch"]
    assert [e.epoch for e in epochs] == [1, 2, 3] and all(e.epochs == 3 for e in epochs)
    assert all(e.metric == "accuracy" and e.val_count == 100 and e.samples_per_s > 0 for e in epochs)
    others = [u.event.event for u in updates if u.WhichOneof("update") == "event"]
    assert others == ["start", "done"]

    assert (job.output_model, job.result_version, job.attempts, job.exit_code) == (PARENT, 1, 1, 0)
    assert job.deploy_outcome == pb.DEPLOY_OUTCOME_DEPLOYED and job.parent == ""
    lineage = served.store.lineage(PARENT, 1)
    assert job.val_metric == pytest.approx(lineage["metrics"]["val_metric"])
    assert job.metric == "accuracy" and (job.epoch, job.epochs) == (3, 3)
    assert job.spec["output"]["name"] == PARENT and job.spec["hyperparameters"]["epochs"] == 3

    # the new version answers at once, as the default, with the checkpoint's predictions
    versions = defaults(served, PARENT)
    assert versions[1].is_default and versions[1].ready_workers == 1 and versions[1].source == "finetune"
    assert versions[1].lineage["metrics"]["val_metric"] == pytest.approx(job.val_metric)
    images = {f"d{i}": digit_png(i) for i in (0, 7, 13)}
    for answer in (served.predict.rest(PARENT, images, k=10), served.predict.grpc(PARENT, images, k=10)):
        assert answer["version"] == "1"
        for pred in answer["predictions"]:
            expected = checkpoint_probs(job.run_dir, images[pred["input"]])
            for entry in pred["top_k"]:
                assert entry["probability"] == pytest.approx(expected[entry["index"]].item(), abs=1e-4)
            assert pred["top_k"][0]["index"] == int(expected.argmax())

    history = served.plane.jobs.history.deployments(PARENT)
    assert [(d.version, d.previous_version, d.action, d.job_id) for d in history] == [(1, None, "deploy", job.id)]
    listed = served.client.list_jobs(output_model=PARENT, states=["SUCCEEDED"]).jobs
    assert [j.id for j in listed] == [job.id]


# ---- deploy-if-better, deploy, rollback ----------------------------------------------------------------
def test_deploy_if_better_keeps_the_parent_when_worse_promotes_when_not_then_rollback(served, parent):
    base = f"{PARENT}:1"
    parent_metric = parent.job.val_metric
    # far too large a learning rate, the last weights kept: worse than the parent (YAML text)
    worse_spec = (f"base: {base}\ndataset: {json.dumps(DIGITS)}\n"
                  "hyperparameters: {epochs: 1, batch_size: 32, lr: 0.5, keep: last}\n")
    worse = served.client.wait(served.client.create_job(worse_spec, deploy="deploy-if-better").id, timeout_s=300)
    assert worse.state == pb.JOB_STATE_SUCCEEDED, worse
    assert worse.result_version == 2 and worse.parent == base
    assert worse.deploy_outcome == pb.DEPLOY_OUTCOME_KEPT_PARENT, worse.deploy_reason
    assert worse.parent_val_metric == pytest.approx(parent_metric)
    assert worse.val_metric < worse.parent_val_metric
    assert f"kept {base}" in worse.deploy_reason
    versions = defaults(served, PARENT)
    assert versions[1].is_default and not versions[2].is_default  # registered, as every archive is

    # a frozen backbone and a negligible learning rate: the parent's own accuracy, so >=: promoted
    same_spec = {"base": base, "dataset": DIGITS,
                 "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 1e-9, "freeze_backbone": True}}
    same = served.client.wait(served.client.create_job(same_spec, deploy="deploy-if-better").id, timeout_s=300)
    assert same.state == pb.JOB_STATE_SUCCEEDED, same
    assert same.deploy_outcome == pb.DEPLOY_OUTCOME_DEPLOYED, same.deploy_reason
    assert same.result_version == 3
    assert same.val_metric == pytest.approx(parent_metric) and same.parent_val_metric == pytest.approx(parent_metric)
    assert served.predict.rest(PARENT, {"x": digit_png(3)})["version"] == "3"

    # rollback restores the previous default: version 1
    back = served.client.rollback(PARENT)
    assert (back.action, back.version, back.previous_version) == ("rollback", 1, 3)
    versions = defaults(served, PARENT)
    assert versions[1].is_default and not versions[3].is_default
    assert served.predict.rest(PARENT, {"x": digit_png(3)})["version"] == "1"

    # an explicit deployment (the worse version 2), then rollback again: back to 1
    dep = served.client.deploy(PARENT, 2, workers=1)
    assert (dep.action, dep.version, dep.previous_version, dep.ready_workers) == ("deploy", 2, 1, 1)
    assert defaults(served, PARENT)[2].is_default
    assert served.client.rollback(PARENT).version == 1
    assert defaults(served, PARENT)[1].is_default

    # the first deployment had no previous default: nothing left to roll back to
    assert_status(rpc_error(served.stub.RollbackModel, pb.RollbackModelRequest(name=PARENT)),
                  grpc.StatusCode.FAILED_PRECONDITION, "no earlier default")
    actions = [(d.action, d.version, d.active) for d in served.plane.jobs.history.deployments(PARENT)]
    assert actions == [("deploy", 1, True), ("deploy", 3, False), ("rollback", 1, False),
                       ("deploy", 2, False), ("rollback", 1, False)]


# ---- bounded concurrency, cancel -------------------------------------------------------------------------
def test_queue_is_bounded_and_cancel_stops_the_process_group_without_an_archive(served, parent):
    slow = {"model": CNN, "dataset": SLOW_DIGITS, "output": {"name": "ctl-cancelled"},
            "hyperparameters": {"epochs": 30, "batch_size": 8}}
    queued = {"model": CNN, "dataset": DIGITS, "output": {"name": "ctl-never"}, "hyperparameters": {"epochs": 1}}
    running = served.client.create_job(slow)
    waiting = served.client.create_job(queued)
    first_epoch = next(u for u in served.client.watch(running.id, timeout_s=120) if u.WhichOneof("update") == "epoch")
    assert first_epoch.epoch.epoch == 1
    running = served.client.get_job(running.id)
    assert running.state == pb.JOB_STATE_RUNNING and running.pid > 0
    # one slot: the second job waits
    assert served.client.get_job(waiting.id).state == pb.JOB_STATE_QUEUED

    cancelled = served.client.cancel_job(waiting.id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.attempts == 0 and not cancelled.HasField("started_at")

    pgid = running.pid
    cancelled = served.client.cancel_job(running.id)
    assert cancelled.state == pb.JOB_STATE_CANCELLED, cancelled
    assert cancelled.exit_code == 128 + signal.SIGTERM and cancelled.error == "cancelled by request"
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the whole process group is gone
    assert served.store.versions("ctl-cancelled") == []
    assert not (served.settings.model_store / "ctl-cancelled").exists() or \
        not list((served.settings.model_store / "ctl-cancelled").glob("*.mar"))
    trail = events(cancelled.run_dir)
    assert trail[-1]["event"] == "stopped" and trail[-1]["signal"] == "SIGTERM"
    assert "stopped by SIGTERM" in Path(cancelled.log_path).read_text()

    assert_status(rpc_error(served.stub.CancelFineTuneJob, pb.CancelFineTuneJobRequest(job_id=running.id)),
                  grpc.StatusCode.FAILED_PRECONDITION, running.id, "is CANCELLED")


# ---- restart of a killed control service -------------------------------------------------------------------
def _start_control(served, root: Path, port: int, log_name: str) -> subprocess.Popen:
    s = served.settings
    cmd = [sys.executable, "-m", "service.control", "--port", str(port), "--db", str(root / "control.db"),
           "--runs-dir", str(root / "runs"), "--data-root", str(served.root), "--max-concurrent-jobs", "2",
           "--model-store", str(s.model_store), "--state-dir", str(s.state_dir),
           "--management-port", str(s.management_port)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(root / log_name, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_serving(proc: subprocess.Popen, target: str, log: Path) -> None:
    def up():
        assert proc.poll() is None, log.read_text()
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False
    wait_for(up, 60, f"the control service at {target}", poll=0.2)


def test_sigkill_the_control_service_mid_job_restart_and_the_jobs_finish(served, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = _start_control(served, tmp_path, port, "first.log")
    pids: list[int] = []
    try:
        _wait_serving(proc, target, tmp_path / "first.log")
        client = ControlClient(target, token=served.token)  # the state dir's token: the same one
        # A: its trainer dies with the service (resumed from its checkpoint after the restart);
        # B: its trainer outlives the service (adopted by the next one).
        a = client.create_job({"model": CNN, "dataset": SOME_DIGITS, "output": {"name": "ctl-resumed"},
                               "hyperparameters": {"epochs": 4, "batch_size": 8}})
        b = client.create_job({"model": CNN, "dataset": SOME_DIGITS, "output": {"name": "ctl-adopted"},
                               "hyperparameters": {"epochs": 6, "batch_size": 8}})
        next(u for u in client.watch(a.id, timeout_s=120) if u.WhichOneof("update") == "epoch")
        a, b = client.get_job(a.id), client.get_job(b.id)
        assert a.state == b.state == pb.JOB_STATE_RUNNING and a.pid and b.pid
        pids += [a.pid, b.pid]
        client.close()

        proc.kill()
        proc.wait(timeout=30)
        os.killpg(a.pid, signal.SIGKILL)
        wait_for(lambda: not _alive(a.pid), 10, "A's trainer to die")
        done_epochs = torch.load(Path(a.run_dir) / "checkpoint.pt", weights_only=True)["epoch"]
        assert done_epochs >= 1
        with sqlite3.connect(tmp_path / "control.db") as db:  # nothing lost, nothing torn
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = dict(db.execute("SELECT id, state FROM jobs").fetchall())
        assert rows == {a.id: RUNNING, b.id: RUNNING}
        assert _alive(b.pid)

        proc = _start_control(served, tmp_path, port, "second.log")
        _wait_serving(proc, target, tmp_path / "second.log")
        with ControlClient(target, token=served.token) as client:
            a = client.wait(a.id, timeout_s=300)
            b = client.wait(b.id, timeout_s=300)
            assert len(client.list_jobs().jobs) == 2
        assert a.state == pb.JOB_STATE_SUCCEEDED, (a, (tmp_path / "second.log").read_text())
        assert b.state == pb.JOB_STATE_SUCCEEDED, (b, (tmp_path / "second.log").read_text())
        assert a.attempts == 2 and a.result_version == 1
        trail = events(a.run_dir)
        assert [e["from_epoch"] for e in trail if e["event"] == "resume"] == [done_epochs]
        assert [e["epoch"] for e in trail if e["event"] == "epoch"] == [1, 2, 3, 4]
        assert served.store.lineage("ctl-resumed", 1)["metrics"]["epochs_run"] == 4
        # B was followed by the new service without a restart: one attempt, its exit unseen
        assert b.attempts == 1 and not b.HasField("exit_code") and b.result_version == 1
        assert [e["event"] for e in events(b.run_dir)].count("resume") == 0
        log = (tmp_path / "second.log").read_text()
        assert f"job {b.id}: adopted its running trainer" in log
        assert f"job {a.id}: its trainer ended while no control service followed it" in log
        with sqlite3.connect(tmp_path / "control.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- errors: one mapping, every case -------------------------------------------------------------------------
def _create(served, spec, **kwargs) -> grpc.RpcError:
    request = pb.CreateFineTuneJobRequest(**kwargs)
    if isinstance(spec, str):
        request.spec_text = spec
    elif spec is not None:
        request.spec_struct.update(spec)
    return rpc_error(served.stub.CreateFineTuneJob, request)


def test_every_error_maps_to_its_status_with_a_message(served, parent, tmp_path, monkeypatch):
    good = {"model": CNN, "dataset": DIGITS, "output": {"name": "ctl-err"}}
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    # invalid specs name the field
    assert_status(_create(served, {**good, "hyperparameters": {"lr": -1}}), invalid, "hyperparameters.lr", "> 0")
    assert_status(_create(served, {**good, "hyperparameters": {"optimiser": "adam"}}), invalid,
                  "hyperparameters.optimiser: unknown key")
    assert_status(_create(served, {**good, "hyperparameters": {"epochs": 2.5}}), invalid, "hyperparameters.epochs")
    assert_status(_create(served, {**good, "dataset": "builtin:nope"}), invalid, "dataset.source", "builtin:digits")
    assert_status(_create(served, {**good, "dataset": "/etc"}), invalid, "dataset.source", "outside the data roots")
    assert_status(_create(served, {"dataset": DIGITS}), invalid, "base: give exactly one")
    assert_status(_create(served, "{not: [json"), invalid, "spec:")
    assert_status(_create(served, None), invalid, "spec: is required")
    assert_status(_create(served, good, deploy_policy=42), invalid, "deploy_policy")
    assert_status(_create(served, good, runner="kubernetes"), invalid, "runner", "local")
    # unknown things
    assert_status(_create(served, {**good, "model": None, "base": "ctl-nope"}), not_found, "'ctl-nope'")
    assert_status(_create(served, {**good, "model": None, "base": f"{PARENT}:99"}), not_found, "no version 99")
    assert_status(_create(served, {**good, "output": {"name": PARENT, "version": 1}}), grpc.StatusCode.ALREADY_EXISTS,
                  "output.version", "immutable")
    for call, request in ((served.stub.GetFineTuneJob, pb.GetFineTuneJobRequest(job_id="job-nope")),
                          (served.stub.CancelFineTuneJob, pb.CancelFineTuneJobRequest(job_id="job-nope")),
                          (served.stub.WatchFineTuneJob, pb.WatchFineTuneJobRequest(job_id="job-nope"))):
        assert_status(rpc_error(call, request), not_found, "no fine-tuning job 'job-nope'")
    assert_status(rpc_error(served.stub.ListModels, pb.ListModelsRequest(name="ctl-nope")), not_found, "'ctl-nope'")
    assert_status(rpc_error(served.stub.DeployModel, pb.DeployModelRequest(name="ctl-nope", version=1)), not_found,
                  "'ctl-nope'")
    assert_status(rpc_error(served.stub.RollbackModel, pb.RollbackModelRequest(name="ctl-nope")), not_found,
                  "'ctl-nope'")
    # wrong state
    assert_status(rpc_error(served.stub.CancelFineTuneJob, pb.CancelFineTuneJobRequest(job_id=parent.job.id)),
                  precondition, parent.job.id, "is SUCCEEDED")
    assert_status(rpc_error(served.stub.DeployModel, pb.DeployModelRequest(name=PARENT, version=99)), precondition,
                  "no version 99 to deploy")
    served.store.write("ctl-never-deployed", make_bundle("cnn"))
    assert_status(rpc_error(served.stub.RollbackModel, pb.RollbackModelRequest(name="ctl-never-deployed")),
                  precondition, "no deployment to roll back")
    # malformed requests
    assert_status(rpc_error(served.stub.DeployModel, pb.DeployModelRequest(name=PARENT, version=0)), invalid,
                  "version: must be >= 1")
    assert_status(rpc_error(served.stub.DeployModel, pb.DeployModelRequest(name="../etc", version=1)), invalid,
                  "not a valid model name")
    assert_status(rpc_error(served.stub.ListFineTuneJobs, pb.ListFineTuneJobsRequest(page_token="x")), invalid,
                  "page_token")
    # anything unexpected: INTERNAL, without its details
    def boom(job_id):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(served.plane, "get_job", boom)
    error = rpc_error(served.stub.GetFineTuneJob, pb.GetFineTuneJobRequest(job_id=parent.job.id))
    assert_status(error, grpc.StatusCode.INTERNAL, "internal error (RuntimeError)")
    assert "secret" not in error.details()


def test_list_jobs_pages(served, parent):
    everything = served.client.list_jobs().jobs
    assert len(everything) >= 2
    pages, token = [], ""
    while True:
        reply = served.client.list_jobs(page_size=1, page_token=token)
        pages += [j.id for j in reply.jobs]
        token = reply.next_page_token
        if not token:
            break
    assert pages == [j.id for j in everything]  # newest first, each once


# ---- the command line --------------------------------------------------------------------------------------
def _cli(*argv) -> tuple[int, str, str]:
    from service.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_finetune_and_models_commands(served, parent, tmp_path, monkeypatch):
    target = ("--control", served.target)
    for var in ("MODELCTL_API_TOKEN", "MODELCTL_API_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELCTL_STATE_DIR", str(tmp_path / "elsewhere"))
    rc, _, err = _cli("finetune", "list", *target)  # no token to be found: refused
    assert rc == 2 and "missing bearer token" in err
    # The CLI finds the token that `modelctl serve` generated in its state dir.
    monkeypatch.setenv("MODELCTL_STATE_DIR", str(served.settings.state_dir))
    rc, out, _ = _cli("finetune", "watch", parent.job.id, *target)
    assert rc == 0 and out.index("epoch 1/3") < out.index("epoch 3/3") < out.index("state SUCCEEDED")
    rc, out, _ = _cli("finetune", "list", "--state", "succeeded", *target)
    assert rc == 0 and parent.job.id in out
    rc, out, _ = _cli("finetune", "get", parent.job.id, "--json", *target)
    assert rc == 0 and json.loads(out)["state"] == "JOB_STATE_SUCCEEDED"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {json.dumps(CNN)}\ndataset: builtin:digits\noutput: {{name: x}}\n"
                   "hyperparameters: {batch_size: 0}\n")
    rc, _, err = _cli("finetune", "create", str(bad), *target)
    assert rc == 2 and "error: hyperparameters.batch_size: must be >= 1" in err
    rc, _, err = _cli("finetune", "cancel", parent.job.id, *target)
    assert rc == 2 and "is SUCCEEDED" in err
    rc, out, _ = _cli("models", "deploy", PARENT, "1", *target)
    assert rc == 0 and f"{PARENT} version 1 is the default" in out
    rc, _, err = _cli("models", "rollback", "ctl-nope", *target)
    assert rc == 2 and "ctl-nope" in err


# ---- failures that are not the caller's --------------------------------------------------------------------
def test_a_run_the_trainer_refuses_is_failed_with_its_message(served, parent):
    # valid as a spec, wrong for the data (only the trainer reads the data): FAILED, with why
    spec = {"model": {**CNN, "num_classes": 3}, "dataset": DIGITS, "output": {"name": "ctl-failed"},
            "hyperparameters": {"epochs": 1}}
    job = served.client.wait(served.client.create_job(spec).id, timeout_s=300)
    assert job.state == pb.JOB_STATE_FAILED, job
    assert job.exit_code == 2 and job.attempts == 1
    assert job.error.startswith("trainer exit status 2: model.num_classes: the dataset has 10 labels"), job.error
    assert served.store.versions("ctl-failed") == []


def test_a_version_whose_archive_is_refused_is_not_made_default(served, parent):
    before = {v: m.is_default for v, m in defaults(served, PARENT).items()}
    default = next(v for v, is_default in before.items() if is_default)
    broken = max(before) + 1
    broken_archive_copy(served.store.path(PARENT, 1), served.store.path(PARENT, broken), modelVersion=str(broken))
    # Its weights do not fit its spec: the archive check refuses it before anything is registered.
    error = rpc_error(served.stub.DeployModel, pb.DeployModelRequest(name=PARENT, version=broken, timeout_s=60))
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, f"{served.store.path(PARENT, broken)} is refused",
                  "weights.pt does not fit spec.json")
    after = defaults(served, PARENT)
    assert after[default].is_default and not after[broken].is_default
    assert served.plane.jobs.history.top_deployment(PARENT).version != broken


# ---- job metrics on the instance's Prometheus endpoint -------------------------------------------------
def scrape(served) -> dict:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{served.settings.exporter_port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_job_metrics_change_as_a_real_job_runs(served, parent):
    before = scrape(served)
    succeeded = ("modelctl_finetune_jobs", (("state", "SUCCEEDED"),))
    durations = ("modelctl_finetune_job_duration_seconds_count", ())
    spec = {"base": f"{PARENT}:1", "dataset": DIGITS, "output": {"name": PARENT},
            "hyperparameters": {"epochs": 6, "batch_size": 16, "lr": 0.001}}
    job = served.client.create_job(spec, deploy="none")
    loss_key = ("modelctl_finetune_epoch_loss", (("job_id", job.id), ("model", PARENT)))
    metric_key = ("modelctl_finetune_epoch_metric", (("job_id", job.id), ("model", PARENT)))
    during = wait_for(lambda: (lambda s: s if loss_key in s else None)(scrape(served)), 240,
                      "the running job's epoch loss on /metrics", poll=0.2)
    assert during[("modelctl_finetune_jobs", (("state", "RUNNING"),))] >= 1
    assert during[loss_key] > 0 and 0 <= during[metric_key] <= 1
    final = served.client.wait(job.id, timeout_s=300)
    assert final.state == pb.JOB_STATE_SUCCEEDED
    after = scrape(served)
    assert after[succeeded] == before[succeeded] + 1
    assert after[durations] == before[durations] + 1
    assert loss_key not in after  # only running jobs report an epoch loss


# ---- open streams (issue 12, point 3) -------------------------------------------------------------
def test_open_watch_streams_starve_nothing_on_the_control_api_and_the_gateway(served, parent):
    """200 health Watch streams without a token, never read, on the control API and 200 on the
    gateway's port, at once: Check answers within 1 s on both, ListFineTuneJobs and predictions
    succeed; the streams beyond the bound (MODELCTL_MAX_OPEN_STREAMS, 100) are RESOURCE_EXHAUSTED;
    once they close, as many new streams as the bound open again."""
    limit = served.serving.control.config.max_open_streams
    assert limit == served.settings.max_open_streams == 100
    gateway = f"127.0.0.1:{served.settings.grpc_inference_port}"
    images = {"d0": digit_png(0)}
    with HeldWatches(served.target, 200) as on_control, HeldWatches(gateway, 200) as on_gateway:
        on_control.settle(open_streams=limit)
        on_gateway.settle(open_streams=limit)
        for target in (served.target, gateway):
            with grpc.insecure_channel(target) as channel:
                for _ in range(3):
                    started = time.monotonic()
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    assert time.monotonic() - started < 1, target
                # The control API is SERVING; the gateway's answer is the readiness of every
                # version this module's tests registered (the predictions below are the proof).
                assert reply.status in ((health_pb2.HealthCheckResponse.SERVING,) if target == served.target else (
                    health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)), target
        assert served.stub.ListFineTuneJobs(pb.ListFineTuneJobsRequest(output_model=PARENT), timeout=5).jobs
        assert served.client.get_job(parent.job.id).state == pb.JOB_STATE_SUCCEEDED
        for answer in (served.predict.grpc(PARENT, images, k=3), served.predict.rest(PARENT, images, k=3)):
            assert answer["model"] == PARENT and answer["predictions"][0]["top_k"]
        assert len(on_control.calls) - len(on_control.refused()) == limit  # the held ones are still open
    counts = (served.serving.control.server._modelctl_streams[0].counts, served.serving.gateway._server._modelctl_streams.counts)
    for count in counts:
        wait_for(lambda: count()["anonymous"] == 0, 10, "the closed streams' places back")
    for target in (served.target, gateway):
        with HeldWatches(target, limit) as again:
            again.settle(open_streams=limit)
