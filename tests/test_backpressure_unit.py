"""Backpressure's parts without a server: the queue settings and their TorchServe config, and the
per-model admission of the proxy and the gateway. A real TorchServe with a full queue is
tests/test_backpressure.py."""

from __future__ import annotations

import pytest

from service.errors import InvalidArgument
from service.serving.torchserve.config import parse_properties, render_config_properties
from service.serving.torchserve.gateway import Admission
from service.serving.settings import ServeSettings

pytestmark = pytest.mark.unit


def test_queue_settings_and_their_config(tmp_path):
    s = ServeSettings.from_env({"MODELCTL_JOB_QUEUE_SIZE": "9", "MODELCTL_RETRY_AFTER_S": "3"},
                               model_store=tmp_path)
    assert (s.job_queue_size, s.admit_per_model, s.retry_after_s) == (9, 4, 3)
    assert ServeSettings(model_store=tmp_path).job_queue_size == 100  # TorchServe's default
    assert parse_properties(render_config_properties(s))["job_queue_size"] == "9"
    with pytest.raises(InvalidArgument, match="MODELCTL_JOB_QUEUE_SIZE: job_queue_size must be >= 2"):
        ServeSettings.from_env({"MODELCTL_JOB_QUEUE_SIZE": "1"})
    with pytest.raises(InvalidArgument, match="retry_after_s must be >= 1"):
        ServeSettings(retry_after_s=0)


def test_admission_counts_per_model():
    a = Admission(2, retry_after_s=5)
    assert a.acquire("m") and a.acquire("m") and not a.acquire("m")
    assert a.acquire("other") and a.counts() == {"m": 2, "other": 1}
    a.release("m")
    assert a.acquire("m") and not a.acquire("m")
    for _ in range(3):
        a.release("m")
    a.release("other")
    assert a.counts() == {}
    err, trailers = a.refusal("m")
    assert err.grpc_code == "RESOURCE_EXHAUSTED" and err.http_status == 429
    assert dict(trailers) == {"retry-after": "5", "grpc-retry-pushback-ms": "5000"}
    unlimited = Admission(None)
    assert all(unlimited.acquire("m") for _ in range(1000))
