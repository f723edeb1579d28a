"""Metric definitions and the GPU collector, on this machine as it is (no GPU here)."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics.gpu import GpuCollector
from service.metrics.handler import HandlerMetrics, outcome_of

pytestmark = pytest.mark.unit


def test_gpu_collector_reports_zero_gpus_without_failing():
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    text = generate_latest(registry).decode()
    assert "modelctl_gpu_count 0.0" in text
    # A second scrape does not retry a failed NVML init in a way that raises.
    assert "modelctl_gpu_count 0.0" in generate_latest(registry).decode()


def test_batch_observation_counts_every_request():
    registry = CollectorRegistry()
    m = HandlerMetrics.create(registry)
    m.observe_batch("m", "1", {"preprocess": 0.01, "inference": 0.02, "postprocess": 0.001},
                    0.04, [200, 400, 200])
    get = registry.get_sample_value
    labels = {"model": "m", "version": "1", "engine": "torchserve"}
    assert get("modelctl_request_latency_seconds_count", {**labels, "stage": "request"}) == 3
    assert get("modelctl_request_latency_seconds_count", {**labels, "stage": "inference"}) == 3
    assert get("modelctl_requests_total", {**labels, "outcome": "ok"}) == 2
    assert get("modelctl_requests_total", {**labels, "outcome": "client_error"}) == 1
    assert get("modelctl_batch_size_count", labels) == 1
    assert get("modelctl_batch_size_sum", labels) == 3
    assert [outcome_of(s) for s in (200, 404, 503)] == ["ok", "client_error", "server_error"]
