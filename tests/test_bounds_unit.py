"""Bounds set by the operator, in process (issue 12, point 4): DeployModel over the workers
maximum against a management client that records every call (nothing reaches TorchServe), the
default maximum, and bounded error messages. A real control service taking hostile specs is
tests/test_bounds.py; the run bounds in process are tests/test_limits.py."""

from __future__ import annotations

import pytest

from service import bounds
from service.auth import ApiToken
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.control.jobs.plane import ControlPlane
from service.control.api.servicer import ControlService
from service.errors import MAX_SHOWN_CHARS, InvalidArgument, Unavailable
from service.modelstore import ModelStore
from service.serving.settings import ServeSettings
from tests.helpers import make_bundle
from tests.test_bounds import rpc_error

pytestmark = pytest.mark.unit


class RecordingManagement:
    """A management client that records every call and answers none (TorchServe is down)."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            raise Unavailable("the recording management client answers nothing")
        return call


def test_deploy_model_over_the_maximum_starts_no_worker(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.write("m", make_bundle("cnn"))
    settings = ServeSettings(model_store=store.root, state_dir=tmp_path / "state")
    config = ControlConfig(port=0, db_path=tmp_path / "control.db", runs_dir=tmp_path / "runs",
                           data_roots=(tmp_path,), max_deploy_workers=2, max_workers=4)
    mgmt = RecordingManagement()
    token = ApiToken("t" * 32, "test")
    service = ControlService(config, ControlPlane(config, settings, lambda: mgmt), token=token).start()
    try:
        with ControlClient(service.target, token=token, timeout_s=30) as client:
            for workers in (3, 2**31 - 1):
                err = rpc_error(lambda: client.deploy("m", 1, workers=workers))
                assert err.grpc_code == "INVALID_ARGUMENT" and f"got {workers}" in err.message, err
                err = rpc_error(lambda: client.rollback("m", 1, workers=workers))
                assert err.grpc_code == "INVALID_ARGUMENT", err
            assert mgmt.calls == []  # nothing registered, scaled or even described: no worker started
            assert service.plane.jobs.history.deployments() == [] and store.desired("m") is None
            # the same deployment within the bound does reach TorchServe
            assert rpc_error(lambda: client.deploy("m", 1, workers=2)).grpc_code == "UNAVAILABLE"
            assert mgmt.calls == ["describe"] and service.plane.jobs.history.deployments() == []
    finally:
        service.stop()


def test_the_default_maximum_is_the_gpus_else_the_cores_and_never_below_the_default(monkeypatch):
    monkeypatch.setattr(bounds, "visible_gpus", lambda environ=None: 0)
    assert ControlConfig().deploy_workers_limit(1) == bounds.cores()
    assert ControlConfig().deploy_workers_limit(bounds.cores() + 3) == bounds.cores() + 3
    monkeypatch.setattr(bounds, "visible_gpus", lambda environ=None: 2)
    assert ControlConfig().deploy_workers_limit(1) == 2
    assert ControlConfig(max_deploy_workers=7).deploy_workers_limit(4) == 7
    with pytest.raises(InvalidArgument, match="above MODELCTL_MAX_DEPLOY_WORKERS"):
        ControlConfig(max_deploy_workers=2).deploy_workers_limit(3)
    with pytest.raises(InvalidArgument, match="MODELCTL_DEPLOY_WORKERS .3. is above MODELCTL_MAX_DEPLOY_WORKERS"):
        ControlConfig.from_env(environ={"MODELCTL_MAX_DEPLOY_WORKERS": "2", "MODELCTL_DEPLOY_WORKERS": "3"})
    assert ControlConfig.from_env(environ={"MODELCTL_MAX_DEPLOY_WORKERS": "3"}).max_deploy_workers == 3
    # CUDA_VISIBLE_DEVICES caps what NVML counts; an empty or negative entry hides them all
    monkeypatch.undo()
    assert bounds.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert bounds.visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_error_messages_show_at_most_a_bounded_repr():
    from service.errors import shown

    assert shown("m\n") == "'m\\n'" and shown(3) == "3"
    for value in ("x" * 10**6, list(range(10**6)), {str(i): i for i in range(10**5)}, 10**5000,
                  [[[[[[1]]]]]] * 100):
        assert len(shown(value)) <= MAX_SHOWN_CHARS
