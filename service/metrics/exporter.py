"""One Prometheus endpoint for the whole instance.

It merges the workers' multiprocess metrics, reads GPUs through NVML, and asks TorchServe
for queue depths, all at scrape time. Further collectors (the control service's job
metrics) are registered on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.metrics.gpu import GpuCollector

log = logging.getLogger(__name__)


class QueueDepthCollector(Collector):
    """``modelctl_queue_depth``: requests waiting in TorchServe's queue per model version.

    With in-flight requests this is the signal to autoscale on: a growing queue means the
    instance is full.
    """

    def __init__(self, management_fn):
        self._management_fn = management_fn  # returns a ManagementClient, or None

    def collect(self):
        depth = GaugeMetricFamily(
            "modelctl_queue_depth", "Requests waiting in TorchServe's job queue.",
            labels=["model", "version"])
        mgmt = self._management_fn()
        if mgmt is not None:
            try:
                for model in mgmt.list_models():
                    name = model.get("modelName")
                    for entry in mgmt.describe(name, "all"):
                        queue = entry.get("jobQueueStatus") or {}
                        depth.add_metric([name, str(entry.get("modelVersion", ""))],
                                         float(queue.get("pendingRequests", 0)))
            except Exception as exc:  # TorchServe down: the scrape still answers
                log.debug("queue depth unavailable: %s", exc)
        yield depth


class MetricsExporter:
    """``http://host:port/metrics`` over the workers' metric files and the collectors."""

    def __init__(self, host: str, port: int, multiproc_dir: Path | None, collectors=()):
        """``multiproc_dir``: the TorchServe workers' metric files (None: the metrics live in
        this process, on :attr:`registry`, as the native engine's do)."""
        self.host, self.port = host, port
        self.registry = CollectorRegistry()
        if multiproc_dir is not None:
            MultiProcessCollector(self.registry, path=str(multiproc_dir))
        self.registry.register(GpuCollector())
        for collector in collectors:
            self.registry.register(collector)
        self._server = None

    def start(self) -> int:
        self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
