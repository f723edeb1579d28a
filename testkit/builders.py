"""Builders shared by the tests and the benchmarks: model specs, bundles, images, free ports.

Test support, not product: imported as ``testkit.builders`` (pytest finds the repo root
through pyproject's ``pythonpath``; ``python -m benchmarks.<name>`` runs from it).
"""

from __future__ import annotations

import socket

import torch
from torchvision.io import encode_jpeg, encode_png

from service.models import ModelSpec, Vocabulary, build_model
from service.modelstore import ModelBundle

SPECS = {
    "resnet": {
        "family": "resnet", "num_classes": 4,
        "config": {"arch": "resnet18", "pretrained": None},
        "input": {"type": "image", "channels": 3, "size": 64, "resize": 72},
    },
    "mobilenet": {  # the real ImageNet features that install offline
        "family": "mobilenet_v2", "num_classes": 3,
        "config": {"pretrained": "imagenet"},
        "input": {"type": "image", "channels": 3, "size": 64, "resize": 72},
    },
    "cnn": {
        "family": "cnn", "num_classes": 10,
        "config": {"channels": [8, 16], "batch_norm": True, "activation": "leaky_relu", "pool": "max"},
        "input": {"type": "image", "channels": 1, "size": 16, "resize": None, "mean": [0.5], "std": [0.5]},
    },
    "lstm": {
        "family": "rnn", "num_classes": 3,
        "config": {"cell": "lstm", "input_size": 8, "hidden_size": 16, "num_layers": 2, "pooling": "last"},
        "input": {"type": "sequence", "max_length": 64},
    },
    "gru-text": {
        "family": "rnn", "num_classes": 2,
        "config": {"cell": "gru", "vocab_size": 32, "embedding_dim": 8, "hidden_size": 12,
                   "bidirectional": True, "pooling": "mean"},
        "input": {"type": "sequence", "max_length": 64},
    },
}

TEXTS = ["a great and moving film", "dull , slow and far too long", "great cast but a dull plot"]


def make_bundle(kind: str, seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict(SPECS[kind])
    model = build_model(spec)
    # Non-trivial batch-norm statistics, so eval mode really differs from train mode.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    labels = [f"{kind}-class-{i}" for i in range(spec.num_classes)]
    vocab = Vocabulary.build(TEXTS, max_size=32) if kind == "gru-text" else None
    return ModelBundle(spec, model.state_dict(), labels, vocab)


def random_image(channels: int, height: int, width: int, fmt: str = "png", seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=g)
    encoded = encode_png(pixels) if fmt == "png" else encode_jpeg(pixels, quality=90)
    return encoded.numpy().tobytes()


#: Ports free_port has handed out in this process: never handed out twice. A closed
#: socket's port goes back to the kernel's pool at once, so two calls in a row can return the
#: same one (a clean-clone run got inference_port == ts_inference_port, and ServeSettings
#: refused them).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no earlier call in this process returned."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
