"""GPU utilisation and memory per GPU, read through NVML at scrape time.

On a machine without a GPU (or without the NVIDIA driver) it reports zero GPUs and
never fails a scrape.
"""

from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """``modelctl_gpu_*`` metrics from NVML (package nvidia-ml-py, module pynvml)."""

    def __init__(self):
        self._nvml = None
        self._init_error: str | None = None

    def _ensure_nvml(self):
        if self._nvml is None and self._init_error is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library, no GPU: report zero GPUs
                self._init_error = str(exc) or type(exc).__name__
                log.info("NVML unavailable (%s): reporting 0 GPUs", self._init_error)
        return self._nvml

    def collect(self):
        count = GaugeMetricFamily("modelctl_gpu_count", "GPUs visible through NVML.")
        util = GaugeMetricFamily(
            "modelctl_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy (0-1).", labels=["gpu", "name"])
        used = GaugeMetricFamily("modelctl_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("modelctl_gpu_memory_total_bytes", "GPU memory in total.",
                                  labels=["gpu", "name"])
        nvml = self._ensure_nvml()
        n = 0
        if nvml is not None:
            try:
                n = nvml.nvmlDeviceGetCount()
                for i in range(n):
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                    name = nvml.nvmlDeviceGetName(handle)
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                    util.add_metric([str(i), name], rates.gpu / 100.0)
                    used.add_metric([str(i), name], float(mem.used))
                    total.add_metric([str(i), name], float(mem.total))
            except Exception as exc:  # a failing GPU must not fail the scrape
                log.warning("NVML query failed: %s", exc)
        count.add_metric([], n)
        yield from (count, util, used, total)
