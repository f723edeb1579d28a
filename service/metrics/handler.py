"""Metrics a serving worker records per request: latency by stage, outcomes, batches.

Names follow Prometheus conventions. Labels: ``model``, ``version``, ``engine`` (torchserve
or native: the same names from either engine); ``stage`` for latency (preprocess,
inference, postprocess, request); ``outcome`` for requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets from 1 ms to 10 s: CPU inference sits in 5-500 ms, GPU lower.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGES = ("preprocess", "inference", "postprocess")


def outcome_of(status: int) -> str:
    """``ok``, ``client_error`` (4xx) or ``server_error``."""
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "server_error"


@dataclass
class HandlerMetrics:
    latency: Histogram
    requests: Counter
    batch_size: Histogram
    in_flight: Gauge
    engine: str = "torchserve"

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, engine: str = "torchserve") -> "HandlerMetrics":
        """Define the metrics on ``registry`` (a private one by default: no globals)."""
        registry = registry if registry is not None else CollectorRegistry()
        labels = ("model", "version", "engine")
        return cls(
            latency=Histogram(
                "modelctl_request_latency_seconds",
                "Time spent in the serving worker per request, by stage "
                "(stage=request is the whole handler call).",
                (*labels, "stage"), buckets=LATENCY_BUCKETS, registry=registry,
            ),
            requests=Counter(
                "modelctl_requests", "Prediction requests answered by the worker, by outcome.",
                (*labels, "outcome"), registry=registry,
            ),
            batch_size=Histogram(
                "modelctl_batch_size", "Requests per batch handed to the worker by TorchServe.",
                labels, buckets=BATCH_BUCKETS, registry=registry,
            ),
            in_flight=Gauge(
                "modelctl_in_flight_requests", "Requests being processed by the workers now.",
                labels, registry=registry, multiprocess_mode="livesum",
            ),
            engine=engine,
        )

    def observe_batch(self, model: str, version: str, timings: dict[str, float],
                      total_s: float, statuses: list[int]) -> None:
        """Record one batch: every request in it shares the batch's stage timings."""
        n, engine = len(statuses), self.engine
        self.batch_size.labels(model, version, engine).observe(n)
        for stage in STAGES:
            hist = self.latency.labels(model, version, engine, stage)
            for _ in range(n):
                hist.observe(timings.get(stage, 0.0))
        whole = self.latency.labels(model, version, engine, "request")
        for status in statuses:
            whole.observe(total_s)
            self.requests.labels(model, version, engine, outcome_of(status)).inc()
