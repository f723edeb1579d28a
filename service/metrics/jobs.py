"""Fine-tune job metrics, read from the job store at scrape time.

- ``modelctl_finetune_jobs{state}``: jobs in each state;
- ``modelctl_finetune_job_duration_seconds``: histogram of finished jobs' run time;
- ``modelctl_finetune_epoch_loss{job_id,model}`` and ``..._epoch_metric``: the latest
  epoch's train loss and validation metric of each running job (from its events.jsonl).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from service.rundir import latest_epoch

log = logging.getLogger(__name__)

DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)


class JobMetricsCollector(Collector):
    """``jobs_fn`` returns every job (objects with id, state, output_model, run_dir,
    started_at, finished_at); ``states`` lists every state, so zero counts show too."""

    def __init__(self, jobs_fn: Callable[[], Iterable], states: Iterable[str], running: str = "RUNNING"):
        self._jobs_fn = jobs_fn
        self._states = tuple(states)
        self._running = running

    def collect(self):
        counts = GaugeMetricFamily("modelctl_finetune_jobs", "Fine-tune jobs by state.", labels=["state"])
        loss = GaugeMetricFamily("modelctl_finetune_epoch_loss",
                                 "Latest epoch's training loss of each running job.",
                                 labels=["job_id", "model"])
        metric = GaugeMetricFamily("modelctl_finetune_epoch_metric",
                                   "Latest epoch's validation metric of each running job.",
                                   labels=["job_id", "model"])
        try:
            jobs = list(self._jobs_fn())
        except Exception as exc:  # the store is closing: the scrape still answers
            log.debug("job metrics unavailable: %s", exc)
            jobs = []
        by_state = dict.fromkeys(self._states, 0)
        durations = []
        for job in jobs:
            by_state[job.state] = by_state.get(job.state, 0) + 1
            if job.finished_at and job.started_at:
                durations.append(max(0.0, job.finished_at - job.started_at))
            if job.state == self._running and job.run_dir:
                epoch = latest_epoch(job.run_dir)
                if epoch is not None:
                    if epoch.get("train_loss") is not None:
                        loss.add_metric([job.id, job.output_model], float(epoch["train_loss"]))
                    if epoch.get("val_metric") is not None:
                        metric.add_metric([job.id, job.output_model], float(epoch["val_metric"]))
        for state, n in by_state.items():
            counts.add_metric([state], n)
        buckets = [(str(b), float(sum(d <= b for d in durations))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(durations))))
        duration = HistogramMetricFamily("modelctl_finetune_job_duration_seconds",
                                         "Run time of finished fine-tune jobs.",
                                         buckets=buckets, sum_value=sum(durations))
        yield from (counts, duration, loss, metric)
