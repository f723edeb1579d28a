"""Small builders shared by the tests: specs, bundles, images, free ports."""

from __future__ import annotations

import io
import json
import os
import socket
import time
import zipfile
from pathlib import Path

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


def broken_archive_copy(good: Path, target: Path, weights: bytes | None = None, **manifest_model) -> None:
    """Copy an archive with weights that no longer fit its spec: its worker cannot load.

    ``weights``: the bytes of the copy's weights.pt (default: a state_dict of parameters
    the spec does not have). ``manifest_model`` overrides MANIFEST's model fields (modelName, modelVersion). The
    copy appears at once (written beside, then renamed), as the model store's writes do:
    serving replicas watch the store.
    """
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(target).with_name(f".{Path(target).name}.partial")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(partial, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "weights.pt" and weights is not None:
                data = weights
            elif item.filename == "weights.pt":
                buf = io.BytesIO()
                torch.save({"nonsense": torch.zeros(1)}, buf)
                data = buf.getvalue()
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"].update(manifest_model)
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    os.replace(partial, target)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    """``predicate()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class HeldWatches:
    """``n`` gRPC health ``Watch`` streams on ``target``, opened without a token and never
    read (what froze the control API in issue 12), over ``channels`` connections."""

    def __init__(self, target: str, n: int, *, channels: int = 4):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                          for _ in range(channels)]
        self.calls = [health_pb2_grpc.HealthStub(self._channels[i % channels]).Watch(health_pb2.HealthCheckRequest())
                      for i in range(n)]

    def refused(self) -> list:
        return [c for c in self.calls if c.done()]

    def settle(self, open_streams: int, timeout_s: float = 20.0) -> list:
        """Wait until all but ``open_streams`` have ended, and the open ones have their
        answer's headers; returns the ended calls (each RESOURCE_EXHAUSTED, asserted)."""
        import grpc

        wait_for(lambda: len(self.refused()) >= len(self.calls) - open_streams, timeout_s,
                 f"{len(self.calls) - open_streams} refused Watch streams")
        for call in self.calls:
            call.initial_metadata()  # the headers: an accepted stream has its first answer sent
        time.sleep(0.2)
        refused = self.refused()
        assert len(refused) == len(self.calls) - open_streams, (len(refused), open_streams)
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (call.code(), call.details())
            assert "MODELCTL_MAX_OPEN_STREAMS" in call.details()
            assert dict(call.trailing_metadata() or ()).get("retry-after"), call.trailing_metadata()
        return refused

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "HeldWatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
