"""The engine-independent predictor: payloads in, top-k answers out.

It knows nothing about TorchServe. A handler for any engine (TorchServe today, Triton's
Python backend or a KServe model tomorrow) maps its requests to ``Mapping[str, value]``
payloads, calls :meth:`Predictor.predict`, and writes the answers back.

A payload is what one request carried: a mapping of input names to values. Values are
raw bytes (an image, or a JSON/text body), text, or JSON already decoded by the engine.
The name ``k`` is reserved for the number of labels to return.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.errors import InvalidInput, PayloadTooLarge, ServiceError
from service.inference import decode
from service.models import image_eval_transform, load_model
from service.modelstore.bundle import ModelBundle

DEFAULT_K = 5
MAX_K = 1000
TOP_K_KEY = "k"
JSON_KEYS = ("inputs", TOP_K_KEY)


@dataclass
class ParsedRequest:
    """One request's model inputs, ready to batch, and its options."""

    items: list[torch.Tensor]
    names: list[tuple[str, int]]  # (input name, index within that input) per item
    k: int


@dataclass
class BatchResult:
    """Per-request answers (a dict, or the error for that request) and stage timings."""

    outputs: list[dict | ServiceError]
    timings: dict[str, float] = field(default_factory=dict)
    items: int = 0


def parse_k(value: Any, num_classes: int) -> int:
    """The caller's k: an integer in [1, MAX_K], capped at the number of classes."""
    if value is None:
        return min(DEFAULT_K, num_classes)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise InvalidInput(f"k must be an integer, got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"k must be an integer, got {value!r}")
    if not 1 <= value <= MAX_K:
        raise InvalidInput(f"k must be between 1 and {MAX_K}, got {value}")
    return min(value, num_classes)


class Predictor:
    """Decode, preprocess, batch, forward on one device, and answer top-k with labels."""

    def __init__(
        self,
        bundle: ModelBundle,
        device: str | torch.device = "cpu",
        *,
        name: str = "",
        version: str = "",
        max_items_per_request: int = 64,
        max_batch: int = 64,
        max_pixels: int = decode.DEFAULT_MAX_PIXELS,
    ):
        self.spec = bundle.spec
        self.labels = list(bundle.labels)
        self.vocab = bundle.vocab
        self.device = torch.device(device)
        self.name = name
        self.version = str(version)
        self.max_items_per_request = max_items_per_request
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.model = load_model(self.spec, bundle.state_dict).to(self.device).eval()
        self._transform = image_eval_transform(self.spec.input) if self.spec.modality == "image" else None

    @classmethod
    def from_dir(cls, directory: Path | str, device: str | torch.device = "cpu", **kwargs) -> "Predictor":
        """Build from an unpacked archive or a saved bundle directory."""
        return cls(ModelBundle.load(Path(directory)), device, **kwargs)

    # ---- parsing -------------------------------------------------------------------
    def parse(self, payload: Mapping[str, Any], k: Any = None) -> ParsedRequest:
        """Turn one request's payload into model inputs; InvalidInput if it does not fit."""
        if not isinstance(payload, Mapping) or not payload:
            raise InvalidInput("empty request: send an image or a JSON body")
        k_value = payload.get(TOP_K_KEY, k)
        items: list[torch.Tensor] = []
        names: list[tuple[str, int]] = []
        for key, value in payload.items():
            if key == TOP_K_KEY:
                continue
            if self.spec.modality == "image":
                new = [self._image(key, value)]
            else:
                new, body_k = self._sequences(key, value)
                if body_k is not None:
                    k_value = body_k
            names.extend((key, i) for i in range(len(new)))
            items.extend(new)
            if len(items) > self.max_items_per_request:
                raise PayloadTooLarge(
                    f"request holds more than {self.max_items_per_request} inputs"
                )
        if not items:
            raise InvalidInput("request holds no input besides 'k'")
        return ParsedRequest(items, names, parse_k(k_value, self.spec.num_classes))

    def _image(self, key: str, value: Any) -> torch.Tensor:
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidInput(
                f"input {key!r}: expected JPEG or PNG bytes, got {type(value).__name__}"
            )
        image = decode.decode_image_bytes(value, self.spec.input.channels, self.max_pixels)
        return self._transform(image)

    def _sequences(self, key: str, value: Any) -> tuple[list[torch.Tensor], Any]:
        body_k = None
        if isinstance(value, (bytes, bytearray, str)):
            text = bytes(value).decode("utf-8", "replace") if not isinstance(value, str) else value
            try:
                value = decode.parse_json(text)
            except InvalidInput:
                if self.vocab is None:
                    raise
                value = text  # a raw text body for a model with a vocabulary
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(JSON_KEYS))
            if unknown or "inputs" not in value:
                raise InvalidInput(
                    f"input {key!r}: JSON object needs 'inputs' (and optionally 'k'); "
                    f"unexpected keys: {unknown}"
                )
            body_k = value.get(TOP_K_KEY)
            value = value["inputs"]
        spec = self.spec
        if spec.sequence_kind == "features":
            seqs = decode.feature_sequences(value, spec.config.input_size, spec.input.max_length)
        else:
            encode = self.vocab.encode if self.vocab is not None else None
            seqs = decode.token_sequences(value, spec.config.vocab_size, spec.input.max_length, encode)
        return seqs, body_k

    # ---- running -------------------------------------------------------------------
    def collate(self, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Model arguments for a list of preprocessed items (padding sequences)."""
        if self.spec.modality == "image":
            return (torch.stack(list(items)),)
        lengths = torch.tensor([len(x) for x in items], dtype=torch.long)
        padded = torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True, padding_value=0)
        return padded, lengths

    @torch.inference_mode()
    def forward(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes) for preprocessed items, in chunks of ``max_batch``."""
        outs = []
        for start in range(0, len(items), self.max_batch):
            args = self.collate(items[start : start + self.max_batch])
            x = args[0].to(self.device, non_blocking=True)
            outs.append(self.model(x, *args[1:]) if len(args) > 1 else self.model(x))
        return torch.cat(outs)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities per task: softmax (multiclass), sigmoid (multilabel), raw (regression)."""
        if self.spec.task == "multiclass":
            return torch.softmax(logits.float(), dim=1)
        if self.spec.task == "multilabel":
            return torch.sigmoid(logits.float())
        return logits.float()

    def predict(self, payloads: Sequence[Mapping[str, Any]], ks: Sequence[Any] | None = None) -> BatchResult:
        """Answer a batch of requests; a bad request gets its error, the others answers."""
        t0 = time.perf_counter()
        outputs: list[dict | ServiceError | None] = [None] * len(payloads)
        parsed: list[tuple[int, ParsedRequest]] = []
        for i, payload in enumerate(payloads):
            try:
                parsed.append((i, self.parse(payload, ks[i] if ks else None)))
            except ServiceError as exc:
                outputs[i] = exc
        items = [item for _, req in parsed for item in req.items]
        t1 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "inference": 0.0, "postprocess": 0.0}
        if items:
            logits = self.forward(items)
            t2 = time.perf_counter()
            self._answer(parsed, self.scores(logits), outputs)
            timings["inference"] = t2 - t1
            timings["postprocess"] = time.perf_counter() - t2
        return BatchResult(outputs, timings, len(items))

    def _answer(self, parsed, scores: torch.Tensor, outputs: list) -> None:
        if self.spec.task == "regression":
            rows = scores.cpu().tolist()
            top = None
        else:
            k_max = max(req.k for _, req in parsed)
            values, indices = torch.topk(scores, k_max, dim=1)
            rows = None
            top = (values.cpu().tolist(), indices.cpu().tolist())
            positive = torch.ge(scores, 0.5).cpu().tolist() if self.spec.task == "multilabel" else None
        row = 0
        for i, req in parsed:
            predictions = []
            for key, index in req.names:
                entry: dict[str, Any] = {"input": key, "item": index}
                if top is None:
                    entry["values"] = rows[row]
                else:
                    vals, idxs = top[0][row][: req.k], top[1][row][: req.k]
                    entry["top_k"] = [
                        {"label": self.labels[j], "index": j, "probability": p} for p, j in zip(vals, idxs)
                    ]
                    if positive is not None:
                        entry["positive"] = [self.labels[j] for j, on in enumerate(positive[row]) if on]
                predictions.append(entry)
                row += 1
            outputs[i] = {"model": self.name, "version": self.version, "predictions": predictions}
