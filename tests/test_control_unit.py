"""The control service's parts without a server: the proto's comments, the job store's state
machine, the event tail of a run directory, and deploy-if-better's comparison. The control API
for real (a TorchServe behind it) is tests/test_control.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.control.jobs.jobstore import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobStore
from service.deploy import policies as deploy_policies
from service.errors import FailedPrecondition
from service.rundir import EventTail

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def test_every_rpc_and_field_of_the_proto_is_commented():
    text = (REPO / "protos" / "modelctl" / "v1" / "control.proto").read_text().splitlines()
    assert "package modelctl.v1;" in text and any(line.startswith("service ModelControl") for line in text)
    for i, line in enumerate(text):
        stripped = line.strip()
        is_rpc = stripped.startswith("rpc ")
        is_field = (stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "//"))
                    and not stripped.startswith("syntax"))
        if is_rpc or is_field:
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"


def test_job_store_state_machine_refuses_illegal_transitions(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.create_job(spec={"k": 1}, output_model="m", base=None, runner="local", run_dir=tmp_path / "r",
                           log_path=tmp_path / "r.log", deploy_policy="none")
    assert job.state == QUEUED
    with pytest.raises(FailedPrecondition, match="QUEUED; it cannot become SUCCEEDED"):
        store.transition(job.id, SUCCEEDED)
    assert store.transition(job.id, RUNNING).started_at is not None
    with pytest.raises(FailedPrecondition, match="is RUNNING, not QUEUED"):
        store.transition(job.id, CANCELLED, expect=QUEUED)
    done = store.transition(job.id, SUCCEEDED, result_version=3)
    assert done.final and done.finished_at and done.result_version == 3
    for state in (RUNNING, CANCELLED, QUEUED):
        with pytest.raises(FailedPrecondition, match="SUCCEEDED; it cannot become"):
            store.transition(job.id, state)
    with pytest.raises(ValueError):
        store.update(job.id, state=RUNNING)  # the state moves only through transition
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    again = JobStore(tmp_path / "jobs.db")  # durable across reopen
    assert again.get(job.id).state == SUCCEEDED and again.integrity_check() == "ok"
    again.close()


def test_event_tail_follows_appends_and_rewrites_once_each(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read_new() == []
    lines = [{"event": "start", "time": "t0"}, {"event": "epoch", "epoch": 1, "time": "t1"}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "epo')  # a half-written line
    assert [e["event"] for e in tail.read_new()] == ["start", "epoch"]
    with open(path, "a") as fh:
        fh.write('ch", "epoch": 2, "time": "t2"}\n')
    assert [e["epoch"] for e in tail.read_new()] == [2]
    # a resume rewrites the file (epoch 2 dropped, then re-run): only the new lines come
    tmp = tmp_path / "new"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in lines + [{"event": "resume", "time": "t3"},
                                                                    {"event": "epoch", "epoch": 2, "time": "t4"}]))
    os.replace(tmp, path)
    assert [(e["event"], e["time"]) for e in tail.read_new()] == [("resume", "t3"), ("epoch", "t4")]


@pytest.mark.parametrize("mode, new, old, deploy", [
    ("max", 0.9, 0.8, True), ("max", 0.8, 0.8, True), ("max", 0.7, 0.8, False),
    ("min", 0.1, 0.2, True), ("min", 0.3, 0.2, False),
])
def test_deploy_if_better_compares_in_the_metrics_direction(mode, new, old, deploy):
    facts = deploy_policies.RunFacts("m", 2, "metric", mode, new, "m:1", old)
    decision = deploy_policies.DEPLOY_POLICIES["deploy-if-better"](facts)
    assert decision.deploy is deploy
    assert decision.outcome == (deploy_policies.DEPLOYED if deploy else deploy_policies.KEPT_PARENT)
    unknown = deploy_policies.RunFacts("m", 2, "metric", mode, new, "m:1", None)
    assert not deploy_policies.DEPLOY_POLICIES["deploy-if-better"](unknown).deploy
    orphan = deploy_policies.RunFacts("m", 1, "metric", mode, new, None, None)
    assert deploy_policies.DEPLOY_POLICIES["deploy-if-better"](orphan).deploy
