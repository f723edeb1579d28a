"""A distill job through the real control API (gRPC server in process, the local runner's
trainer subprocess, no TorchServe: deploy policy none). The loss, the teacher, the spec and the
runs in process are tests/test_distill.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from service._gen.modelctl.v1 import control_pb2 as pb
from service.auth import ApiToken
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.control.jobs.plane import ControlPlane
from service.control.api.servicer import ControlService
from service.errors import ServiceError, Unavailable
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from tests.test_distill import IMAGE, TEACHER, distill_spec, write_teacher

pytestmark = pytest.mark.integration


def test_a_distill_job_through_the_control_api(tmp_path):
    store = ModelStore(tmp_path / "store")
    ref = write_teacher(store, "teacher")
    write_teacher(store, "tags", spec={**TEACHER, "task": "multilabel"})
    write_teacher(store, "big", spec={**TEACHER, "input": {**IMAGE, "size": 16}})

    def no_torchserve():
        raise Unavailable("no TorchServe in this test")

    settings = ServeSettings(model_store=store.root, state_dir=tmp_path / "state")
    config = ControlConfig(port=0, db_path=tmp_path / "control.db", runs_dir=tmp_path / "runs",
                           model_store=store.root, data_roots=(tmp_path,), deploy_target="store", poll_s=0.1)
    token = ApiToken("d" * 32, "test")
    service = ControlService(config, ControlPlane(config, settings, no_torchserve), token=token).start()
    try:
        with ControlClient(service.target, token=token, timeout_s=60) as client:
            spec = distill_spec(ref, "ctl-student", {"temperature": 3, "alpha": 0.5}, epochs=1, batch_size=32)
            for bad, code, words in (
                    ({**spec, "teacher": "nobody:1"}, "NOT_FOUND", "teacher: model 'nobody'"),
                    ({**spec, "teacher": "teacher"}, "INVALID_ARGUMENT", "teacher: needs its version"),
                    ({**spec, "teacher": "tags:1"}, "INVALID_ARGUMENT", "tags:1 is a multilabel model"),
                    ({**spec, "teacher": "big:1"}, "INVALID_ARGUMENT", "same input"),
                    ({**spec, "distill": {"alpha": 2}}, "INVALID_ARGUMENT", "distill.alpha"),
                    ({**spec, "task": "multiclass"}, "INVALID_ARGUMENT", "teacher: is only for task: distill")):
                with pytest.raises(ServiceError) as info:
                    client.create_job(bad)
                assert info.value.grpc_code == code and words in info.value.message, info.value.message
            assert client.list_jobs().jobs == []
            job = client.create_job(spec)
            done = client.wait(job.id, timeout_s=240)
            log = Path(done.log_path).read_text() if Path(done.log_path).exists() else ""
            assert pb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", (done.error, log[-3000:])
            assert store.versions("ctl-student") == [1], log[-3000:]
        d = store.lineage("ctl-student", 1)["distill"]
        assert (d["teacher"], d["temperature"], d["alpha"]) == ("teacher:1", 3.0, 0.5)
        assert d["teacher_val_count"] == 100
    finally:
        service.stop()
