"""``make demo``: the whole job on the embedded default.

It builds one ResNet-18, one CNN and one LSTM archive, serves them with the control service
beside TorchServe, and asks each for a top-k answer over REST and gRPC. Then, through the
gRPC control API, it fine-tunes the CNN on ``builtin:digits`` and the LSTM on
``builtin:digits-seq``, showing the events, and deploys each new version only if it is
better. Last, it predicts held-out digits over REST and gRPC and prints the served
version's held-out accuracy next to the parent's.

Then the same store is served by the native engine (``modelctl serve --engine native``, a
child process on the same ports), and every deployed version answers the Open Inference
Protocol v2 through NVIDIA's ``tritonclient``, over REST (binary tensors) and gRPC.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from torchvision.io import encode_png

from service.predict_client import PredictionClient, read_token
from service.errors import PretrainedWeightsNotFound
from service.models import ModelSpec, build_model
from service.modelstore import ModelBundle, ModelStore

logger = logging.getLogger(__name__)

DIGIT_LABELS = [str(i) for i in range(10)]
VAL_SPLIT, SEED = 0.2, 0

DEMO_SPECS = {
    "demo-resnet18": {
        "family": "resnet", "num_classes": 10,
        "config": {"arch": "resnet18", "pretrained": "imagenet"},
        "input": {"type": "image", "channels": 3, "size": 224, "resize": 256},
    },
    "demo-cnn": {
        "family": "cnn", "num_classes": 10,
        "config": {"channels": [16, 32], "batch_norm": True, "activation": "relu", "pool": "max", "dropout": 0.1},
        "input": {"type": "image", "channels": 1, "size": 16, "resize": None, "mean": [0.5], "std": [0.5]},
    },
    "demo-lstm": {
        "family": "rnn", "num_classes": 10,
        "config": {"cell": "lstm", "input_size": 8, "hidden_size": 32, "num_layers": 1, "pooling": "last"},
        "input": {"type": "sequence", "max_length": 64},
    },
}


def digits_samples(n: int | None = 3):
    """The last ``n`` scikit-learn digits (8x8, 0..16) with their labels; all for None."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n is None:
        return digits.images, digits.target
    return digits.images[-n:], digits.target[-n:]


def digit_png(image) -> bytes:
    """An 8x8 digit as the 8x8 grayscale PNG a client would send: the model's own spec
    resizes it, exactly as the trainer's evaluation did."""
    pixels = torch.tensor(image * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(0)
    return encode_png(pixels).numpy().tobytes()


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


#: The two fine-tunes of the demo, through the control API, on the built-in digits.
FINETUNES = {
    "demo-cnn": {"dataset": "builtin:digits",
                 "hyperparameters": {"epochs": 15, "lr": 0.01, "batch_size": 32, "val_split": VAL_SPLIT,
                                     "seed": SEED}},
    "demo-lstm": {"dataset": "builtin:digits-seq",
                  "hyperparameters": {"epochs": 25, "lr": 0.01, "batch_size": 32, "val_split": VAL_SPLIT,
                                      "seed": SEED}},
}


def held_out_digits():
    """The digits the fine-tunes never saw: the trainer's fixed held-out test split (neither
    trained on nor used to pick the weights)."""
    from service.training.datasets import held_out_test_indices

    images, targets = digits_samples(None)
    _, test_idx = held_out_test_indices(targets, "multiclass")
    return images[test_idx], targets[test_idx]


def _inputs(name: str, images) -> dict[str, bytes]:
    if name == "demo-lstm":
        return {"body": json.dumps({"inputs": [(img / 16.0).tolist() for img in images], "k": 1}).encode()}
    return {f"d{i}": digit_png(img) for i, img in enumerate(images)}


def served_accuracy(predict, name: str, version, images, targets, chunk: int = 32) -> float:
    """Top-1 accuracy of a served version over REST, ``chunk`` digits per request."""
    correct = 0
    for start in range(0, len(targets), chunk):
        batch = images[start : start + chunk]
        answer = predict.rest(name, _inputs(name, batch), version=version, k=1)
        preds = answer["predictions"]
        if name != "demo-lstm":
            preds = sorted(preds, key=lambda p: int(p["input"][1:]))
        labels = [int(p["top_k"][0]["label"]) for p in preds]
        correct += sum(int(a == b) for a, b in zip(labels, targets[start : start + chunk]))
    return correct / len(targets)


def run_demo(settings, control) -> int:
    from service.control.api import display
    from service.control.api.client import ControlClient
    from service.app import ServingWithControl

    store = ModelStore(settings.model_store)
    ensure_archives(store)
    parents = {name: store.versions(name)[-1] for name in FINETUNES}
    with ServingWithControl(settings, control) as serving:
        not_ready = [f"{m.name}:{m.version}" for m in serving.report if not m.ready]
        if not_ready:
            logger.error("models not ready: %s", ", ".join(not_ready))
            return 1
        predict = PredictionClient(
            rest_url=f"http://{settings.host}:{settings.inference_port}",
            grpc_target=f"{settings.host}:{settings.grpc_inference_port}",
            token=read_token(settings.state_dir),
        )
        images, targets = digits_samples(1)
        png = digit_png(images[0])
        print(f"\n== the served base models, on a digit whose label is {targets[0]} ==")
        for name in DEMO_SPECS:
            inputs = _inputs(name, images) if name == "demo-lstm" else {"digit.png": png}
            print(f"{name:15} REST top-3: {_summary(predict.rest(name, inputs, k=3))}")
            print(f"{'':15} gRPC top-3: {_summary(predict.grpc(name, inputs, k=3))}")

        with ControlClient(serving.control.target, token=serving.api_token) as client:
            jobs = {
                name: client.create_job({"base": f"{name}:{parents[name]}", **ft, "output": {"name": name}},
                                        deploy="deploy-if-better")
                for name, ft in FINETUNES.items()
            }
            for name, job in jobs.items():
                print(f"\n== fine-tuning {name} version {parents[name]} on {FINETUNES[name]['dataset']} "
                      f"(job {job.id}, over gRPC) ==", flush=True)
                failed = display.follow(client.watch(job.id), sys.stdout)
                print(display.job_line(client.get_job(job.id)))
                if failed:
                    return 1

        x_val, y_val = held_out_digits()
        print(f"\n== held-out digits ({len(y_val)} the fine-tunes never trained on), over REST ==")
        for name in FINETUNES:
            default = predict.rest(name, _inputs(name, x_val[:1]), k=1)["version"]
            acc = served_accuracy(predict, name, None, x_val, y_val)
            parent_acc = served_accuracy(predict, name, parents[name], x_val, y_val)
            print(f"{name:15} served version {default}: accuracy {acc:.3f}   "
                  f"(parent version {parents[name]}: {parent_acc:.3f})")
            answer = predict.grpc(name, _inputs(name, x_val[:1]), k=3)
            print(f"{'':15} gRPC, a held-out {y_val[0]}: {_summary(answer)}")
    return native_round(settings, x_val[:1], y_val[0])


def _native_child(settings):
    """``modelctl serve --engine native --no-control`` on the demo's store, state and ports."""
    import os
    import subprocess

    env = dict(os.environ)
    for field in ("model_store", "state_dir", "host", "inference_port", "grpc_inference_port", "exporter_port"):
        env[settings.env_var(field)] = str(getattr(settings, field))
    env[settings.env_var("engine")] = "native"
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-control"], env=env)


def native_round(settings, images, label) -> int:
    """The same store on the native engine; top-3 of each model through tritonclient."""
    import time

    import numpy as np
    import requests
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    token = read_token(settings.state_dir)
    headers = {"authorization": f"Bearer {token}"}
    print("\n== the same archives on the native engine (modelctl serve --engine native), "
          "through tritonclient (OIP v2) ==", flush=True)
    started = time.monotonic()
    child = _native_child(settings)
    try:
        ready_url = f"http://{settings.host}:{settings.inference_port}/v2/health/ready"
        while True:
            if child.poll() is not None:
                logger.error("the native engine exited with %s before it was ready", child.returncode)
                return 1
            try:
                if requests.get(ready_url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - started > settings.startup_timeout_s:
                logger.error("the native engine was not ready within %.0fs", settings.startup_timeout_s)
                return 1
            time.sleep(0.2)
        print(f"every model READY in {time.monotonic() - started:.1f}s (process start included)")
        clients = {"REST": (httpclient, httpclient.InferenceServerClient(f"{settings.host}:{settings.inference_port}")),
                   "gRPC": (grpcclient, grpcclient.InferenceServerClient(f"{settings.host}:{settings.grpc_inference_port}"))}
        png = digit_png(images[0])
        for name in DEMO_SPECS:
            for proto, (module, client) in clients.items():
                if name == "demo-lstm":
                    data = (np.asarray(images, dtype=np.float32) / 16.0)
                    tensor = module.InferInput("sequences", list(data.shape), "FP32")
                else:
                    data = np.array([png], dtype=np.object_)
                    tensor = module.InferInput("images", [1], "BYTES")
                tensor.set_data_from_numpy(data, **({"binary_data": True} if module is httpclient else {}))
                # A fresh dict each call: tritonclient.http adds its own headers to the one given.
                result = client.infer(name, [tensor], headers=dict(headers), parameters={"top_k": 3})
                labels = [b.decode() for b in result.as_numpy("labels")[0]]
                probs = result.as_numpy("probabilities")[0]
                version = result.get_response()["model_version"] if module is httpclient else \
                    result.get_response().model_version
                shown = ", ".join(f"{lab} ({p:.3f})" for lab, p in zip(labels, probs))
                print(f"{name if proto == 'REST' else '':15} {proto:4} v{version}, a held-out {label}: {shown}")
        return 0
    finally:
        child.terminate()
        try:
            child.wait(30)
        except Exception:
            child.kill()
