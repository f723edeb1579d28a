"""TorchServe's batch delay at concurrency 1, side by side in one TorchServe.

    .venv/bin/python -m benchmarks.batch_delay [--requests 40]

Three archives of the same ResNet-18 (64x64 input, random weights): batch 8 with
``maxBatchDelay`` 0 ms, batch 8 with 2 ms, and batch 1. Requests go one at a time over REST,
round-robin over the three, so any drift hits all three alike. It prints the p50 and mean
latency of each. TorchServe 0.12 waits about 100 ms per batch with a 0 ms delay and a batch
above 1, which is why ServingOptions refuses that combination.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import requests
import torch
from torchvision.io import encode_png

from service.predict_client import read_token
from service.models import ModelSpec, build_model
from service.modelstore import ModelBundle, ModelStore
from service.inference.options import ServingOptions
from service.serving.settings import ServeSettings
from service.serving.torchserve.supervisor import Serving

SPEC = {"family": "resnet", "num_classes": 4, "config": {"arch": "resnet18", "pretrained": None},
        "input": {"type": "image", "channels": 3, "size": 64, "resize": 72}}
#: name -> (batch size, max batch delay ms); the 0 ms one is written around the check.
LAYOUTS = {"batch8-delay0": (8, 0), "batch8-delay2": (8, 2), "batch1": (1, 0)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="per archive (the first 5 are warm-up)")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = ModelSpec.from_dict(SPEC)
    bundle = ModelBundle(spec, build_model(spec).state_dict(), [f"c{i}" for i in range(4)])
    root = Path(tempfile.mkdtemp(prefix="modelctl-batch-delay-"))
    store = ModelStore(root / "store")
    for name, (batch, delay) in LAYOUTS.items():
        options = ServingOptions(batch_size=batch, max_batch_delay_ms=max(delay, 1))
        object.__setattr__(options, "max_batch_delay_ms", delay)  # the stalling setting, on purpose
        store.write(name, bundle, options=options)
    settings = ServeSettings(
        model_store=root / "store", state_dir=root / "state", inference_port=_free_port(),
        management_port=_free_port(), metrics_port=_free_port(), grpc_inference_port=_free_port(),
        grpc_management_port=_free_port(), ts_grpc_inference_port=_free_port(), exporter_port=_free_port(),
        worker_port_base=random.randint(20000, 40000))
    image = encode_png(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)).numpy().tobytes()
    with Serving(settings) as serving:
        token = read_token(settings.state_dir)
        session = requests.Session()
        took: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.requests):
            for name in LAYOUTS:
                start = time.perf_counter()
                answer = session.post(f"{serving.torchserve.inference_url}/predictions/{name}", data=image,
                                      headers={"Authorization": f"Bearer {token}"}, timeout=60)
                answer.raise_for_status()
                took[name].append((time.perf_counter() - start) * 1000)
    print("| archive | batch | delay ms | c=1 p50 ms | c=1 mean ms |\n|---|---|---|---|---|")
    for name, values in took.items():
        batch, delay = LAYOUTS[name]
        values = values[5:]
        print(f"| {name} | {batch} | {delay} | {statistics.median(values):.1f} | {statistics.mean(values):.1f} |")


if __name__ == "__main__":
    main()
