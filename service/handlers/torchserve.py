"""TorchServe adapter over the engine-independent predictor.

It reads TorchServe's context (model dir, ``gpu_id``, manifest), maps each request of a
batch to a payload, and writes each answer back with its own status, so one bad request
in a batch gets a 4xx while the others are answered. No model logic lives here, and it
imports nothing from TorchServe (no stock handlers, no captum).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from service.environ import torch_threads
from service.errors import ServiceError
from service.inference import Predictor
from service.inference.fastpath import configure_compile_cache
from service.inference.predictor import warm_up_sizes  # noqa: F401  (imported from here by older code)
from service.metrics import MULTIPROC_ENV
from service.metrics.handler import HandlerMetrics
from service.models.bundle import ModelBundle

logger = logging.getLogger(__name__)

TOP_K_HEADER = "x-top-k"


def select_device(gpu_id) -> torch.device:
    """``cuda:{gpu_id}`` when CUDA is present and TorchServe assigned a GPU, else CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def compile_cache_default() -> Path | None:
    """Where compiled graphs persist across restarts when nothing else says:
    ``<state dir>/compile-cache``. ``service.serving`` gives every worker
    ``PROMETHEUS_MULTIPROC_DIR=<state dir>/prometheus``; TORCHINDUCTOR_CACHE_DIR or
    MODELCTL_COMPILE_CACHE_DIR, when set, win (see fastpath.configure_compile_cache)."""
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    return Path(metrics_dir).parent / "compile-cache" if metrics_dir else None


def _status_phrase(message: str) -> str:
    """A reason phrase safe for an HTTP status line: one printable ASCII line."""
    line = message.splitlines()[0] if message else ""
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in line)[:200]


class TorchServeHandler:
    """Loads a modelctl archive and answers TorchServe batches."""

    def __init__(self):
        self.predictor: Predictor | None = None
        self.metrics: HandlerMetrics | None = None

    @property
    def initialized(self) -> bool:
        return self.predictor is not None

    def initialize(self, context) -> None:
        threads = torch_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        props = context.system_properties
        device = select_device(props.get("gpu_id"))
        model = (context.manifest or {}).get("model", {})
        bundle = ModelBundle.load(Path(props["model_dir"]))
        if (bundle.lineage.get("serving") or {}).get("compile"):
            configure_compile_cache(compile_cache_default())
        self.predictor = Predictor(
            bundle,
            device,
            name=model.get("modelName", context.model_name),
            version=model.get("modelVersion", ""),
        )
        p = self.predictor
        for note in p.runtime_notes:
            logger.info("%s version %s: %s", p.name, p.version, note)
        # Pay for compilation and kernel selection now, not on the first requests.
        batch_size = int(props.get("batch_size") or 1)
        took = p.warm_up(warm_up_sizes(batch_size, p.runtime.compile))
        self.metrics = HandlerMetrics.create()
        logger.info(
            "loaded %s version %s (%s) on %s with %d torch threads; %s; warm-up %s",
            p.name, p.version, p.spec.family, device, torch.get_num_threads(),
            p.runtime.to_dict(), {n: round(s, 3) for n, s in took.items()},
        )

    def handle(self, data: list[dict], context) -> list[str]:
        start = time.perf_counter()
        p, m = self.predictor, self.metrics
        in_flight = m.in_flight.labels(p.name, p.version, m.engine)
        in_flight.inc(len(data))
        try:
            answers, statuses, timings = self._answer(data, context)
        finally:
            in_flight.dec(len(data))
        m.observe_batch(p.name, p.version, timings, time.perf_counter() - start, statuses)
        return answers

    def _answer(self, data: list[dict], context) -> tuple[list[str], list[int], dict]:
        ks = []
        for i in range(len(data)):
            headers = context.get_all_request_header(i) or {}
            ks.append(next((v for h, v in headers.items() if str(h).lower() == TOP_K_HEADER), None))
        result = self.predictor.predict(data, ks)
        answers, statuses = [], []
        for i, output in enumerate(result.outputs):
            context.set_response_content_type(i, "application/json")
            if isinstance(output, ServiceError):
                context.set_response_status(output.http_status, _status_phrase(output.message), idx=i)
                answers.append(json.dumps(output.to_dict()))
                statuses.append(output.http_status)
            else:
                answers.append(json.dumps(output))
                statuses.append(200)
        return answers, statuses, result.timings


_handler = TorchServeHandler()


def handle(data, context):
    """TorchServe's function entry point: ``data`` is None on the load call."""
    if not _handler.initialized:
        _handler.initialize(context)
    if data is None:
        return None
    return _handler.handle(data, context)
