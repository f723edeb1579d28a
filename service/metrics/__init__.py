"""Prometheus metrics: definitions, the NVML GPU collector, and the exporter.

Handler metrics live in TorchServe's worker processes. They use prometheus-client's
multiprocess mode: each worker writes to files in ``PROMETHEUS_MULTIPROC_DIR``, and the
exporter merges them into one endpoint (``modelctl serve``: 127.0.0.1:8083/metrics).
"""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
