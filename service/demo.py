"""``make demo``: build one ResNet-18, one CNN and one LSTM archive, serve them, and ask
each for a top-k answer over REST and over gRPC, on real held-out digits."""

from __future__ import annotations

import json
import logging

import torch
from torchvision.io import encode_png

from service.client import PredictionClient, read_token
from service.errors import PretrainedWeightsNotFound
from service.models import ModelSpec, build_model
from service.modelstore import ModelBundle, ModelStore

logger = logging.getLogger(__name__)

DIGIT_LABELS = [str(i) for i in range(10)]

DEMO_SPECS = {
    "demo-resnet18": {
        "family": "resnet", "num_classes": 10,
        "config": {"arch": "resnet18", "pretrained": "imagenet"},
        "input": {"type": "image", "channels": 3, "size": 224, "resize": 256},
    },
    "demo-cnn": {
        "family": "cnn", "num_classes": 10,
        "config": {"channels": [16, 32], "batch_norm": True, "activation": "relu", "pool": "max", "dropout": 0.1},
        "input": {"type": "image", "channels": 1, "size": 32, "resize": None, "mean": [0.5], "std": [0.5]},
    },
    "demo-lstm": {
        "family": "rnn", "num_classes": 10,
        "config": {"cell": "lstm", "input_size": 8, "hidden_size": 32, "num_layers": 1, "pooling": "last"},
        "input": {"type": "sequence", "max_length": 64},
    },
}


def digits_samples(n: int = 3):
    """The last ``n`` scikit-learn digits (8x8, 0..16) with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[-n:], digits.target[-n:]


def digit_png(image) -> bytes:
    """An 8x8 digit as a 32x32 grayscale PNG."""
    pixels = torch.tensor(image * (255.0 / 16.0)).round().to(torch.uint8)
    big = pixels.repeat_interleave(4, 0).repeat_interleave(4, 1).unsqueeze(0)
    return encode_png(big).numpy().tobytes()


def ensure_archives(store: ModelStore) -> None:
    """Write version 1 of each demo model unless the store already has one."""
    for name, raw in DEMO_SPECS.items():
        if store.versions(name):
            continue
        spec = ModelSpec.from_dict(raw)
        try:
            model = build_model(spec)
            note = "pretrained backbone"
        except PretrainedWeightsNotFound as exc:
            logger.info("%s: %s; using random weights", name, exc.message)
            spec = ModelSpec.from_dict({**raw, "config": {**raw["config"], "pretrained": None}})
            model = build_model(spec)
            note = "random weights"
        if raw["family"] != "resnet":
            note = "random weights (fine-tuning trains them)"
        info = store.write(name, ModelBundle(spec, model.state_dict(), DIGIT_LABELS, lineage={"note": note}))
        logger.info("archived %s version %d (%s)", info.name, info.version, note)


def _summary(answer: dict) -> str:
    first = answer["predictions"][0]["top_k"]
    return ", ".join(f"{p['label']} ({p['probability']:.3f})" for p in first)


def run_demo(settings) -> int:
    from service.serving.supervisor import Serving

    store = ModelStore(settings.model_store)
    ensure_archives(store)
    images, targets = digits_samples(1)
    png = digit_png(images[0])
    sequence = json.dumps({"inputs": (images[0] / 16.0).tolist(), "k": 3}).encode()
    with Serving(settings) as serving:
        report = serving.report  # start() waited for every worker
        not_ready = [f"{m.name}:{m.version}" for m in report if not m.ready]
        if not_ready:
            logger.error("models not ready: %s", ", ".join(not_ready))
            return 1
        client = PredictionClient(
            rest_url=f"http://{settings.host}:{settings.inference_port}",
            grpc_target=f"{settings.host}:{settings.grpc_inference_port}",
            token=read_token(settings.state_dir),
        )
        print(f"\nheld-out digit: true label {targets[0]}")
        for name in DEMO_SPECS:
            inputs = {"body": sequence} if name == "demo-lstm" else {"digit.png": png}
            k = None if name == "demo-lstm" else 3
            rest = client.rest(name, inputs, k=k)
            grpc_answer = client.grpc(name, inputs, k=k)
            print(f"{name:15} REST top-3: {_summary(rest)}")
            print(f"{'':15} gRPC top-3: {_summary(grpc_answer)}")
        print("\n(the CNN and LSTM are untrained here: `modelctl finetune` makes them useful)")
    return 0
