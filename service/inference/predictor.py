"""The engine-independent predictor: payloads in, answers out (top-k; masks for segmentation).

It knows nothing about TorchServe. A handler for any engine (TorchServe today, Triton's
Python backend or a KServe model tomorrow) maps its requests to ``Mapping[str, value]``
payloads, calls :meth:`Predictor.predict`, and writes the answers back.

A payload is what one request carried: a mapping of input names to values. Values are
raw bytes (an image, or a JSON/text body), text, or JSON already decoded by the engine.
The name ``k`` is reserved for the number of labels to return (ignored by segmentation
models, whose answer is a mask per image: :mod:`service.inference.segmentation`).

How a batch's outputs become each request's answer depends on the model's task:
:data:`TASK_ANSWERS` holds one :class:`TaskAnswer` per task.

The fast path: images are decoded one by one with ``torchvision.io`` and then resized,
cropped and normalised as one batch per image size (the shared eval transform applied to
a stacked batch: the same tensors as one image at a time); the batch is built once, in the
model's memory format; the forward runs in the precision, memory format and compilation
that :func:`service.inference.fastpath.resolve_runtime` allows for the archive; and the
answers cross from the device in one transfer per batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.errors import Internal, InvalidInput, InvalidSpec, PayloadTooLarge, ServiceError
from service.inference import decode, segmentation
from service.inference.fastpath import RuntimeOptions, configure_compile_cache, resolve_runtime
from service.models import image_eval_transform, load_model
from service.models.decisions import MAX_MASK_CLASSES
from service.models.bundle import ModelBundle

log = logging.getLogger(__name__)

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


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_k(value: Any, num_classes: int) -> int:
    """The caller's k: an integer in [1, MAX_K], capped at the number of classes.

    As text (a header, a form field, a gRPC input), k is ASCII digits with an optional
    leading minus sign, between optional ASCII blanks; nothing else counts as an integer."""
    if value is None:
        return min(DEFAULT_K, num_classes)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip(" \t\r\n")
        digits = text[1:] if text.startswith("-") else text
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidInput(f"k must be an integer, got {_shown(value)}")
        if len(digits.lstrip("0")) > len(str(MAX_K)):  # far out of range: not converted
            raise InvalidInput(f"k must be between 1 and {MAX_K}, got a {len(digits)}-digit number")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"k must be an integer, got {_shown(value)}")
    if not 1 <= value <= MAX_K:
        shown = value if abs(value) < 10**12 else f"an integer of {value.bit_length()} bits"
        raise InvalidInput(f"k must be between 1 and {MAX_K}, got {shown}")
    return min(value, num_classes)


def warm_up_sizes(batch_size: int, compiled: bool) -> list[int]:
    """Batch sizes to run at load. A compiled model gets one static graph per size, cached
    on disk: powers of two up to the batch size, and the batch size (the predictor pads a
    batch to the next of them). An eager one: the smallest and the largest."""
    if not compiled:
        return sorted({1, batch_size})
    sizes, n = {batch_size}, 1
    while n < batch_size:
        sizes.add(n)
        n *= 2
    return sorted(sizes)


class Predictor:
    """Decode, preprocess, batch, forward on one device, and answer top-k with labels.

    ``runtime`` None (what a worker passes) takes the archive's options from the bundle's
    lineage, with a reduced precision only where its agreement check passed
    (:func:`~service.inference.fastpath.resolve_runtime`; ``runtime_notes`` say what was
    refused). An explicit ``runtime`` is used as given: the agreement check and the
    benchmarks use that to run a precision before any check admitted it.
    """

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
        runtime: RuntimeOptions | None = None,
    ):
        self.spec = bundle.spec
        if self.spec.task not in TASK_ANSWERS:
            raise InvalidSpec("task", f"no served answer for task {self.spec.task!r}", allowed=list(TASK_ANSWERS))
        if self.spec.task == "segmentation" and self.spec.num_classes > MAX_MASK_CLASSES:
            raise InvalidSpec("num_classes", f"a served mask holds 8-bit class ids: at most {MAX_MASK_CLASSES} "
                              f"classes, got {self.spec.num_classes}")
        self._task_answer = TASK_ANSWERS[self.spec.task]
        self.labels = list(bundle.labels)
        self.vocab = bundle.vocab
        self.device = torch.device(device)
        self.name = name
        self.version = str(version)
        self.max_items_per_request = max_items_per_request
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        image = self.spec.modality == "image"
        if runtime is None:
            runtime, self.runtime_notes = resolve_runtime(bundle.lineage, bundle.state_dict, self.device,
                                                          self.spec.modality)
        else:
            self.runtime_notes = []
            if not image and (runtime.channels_last or runtime.compile):
                raise ValueError("channels_last and compile apply to image models only")
        self.runtime = runtime
        self._autocast = runtime.autocast_dtype
        self._memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.model = load_model(self.spec, bundle.state_dict).to(self.device).eval()
        if runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._transform = image_eval_transform(self.spec.input) if image else None
        self._run = self._compile() if runtime.compile else self.model
        self._compiled_sizes: set[int] = set()

    @classmethod
    def from_dir(cls, directory: Path | str, device: str | torch.device = "cpu", **kwargs) -> "Predictor":
        """Build from an unpacked archive or a saved bundle directory."""
        return cls(ModelBundle.load(Path(directory)), device, **kwargs)

    def _compile(self):
        configure_compile_cache()
        # Static shapes, one graph per batch size (warm_up compiles those the engine sends);
        # freezing folds the weights (and their bf16 casts) into constants.
        return torch.compile(self.model, dynamic=False, options={"freezing": True})

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> dict[int, float]:
        """Run a forward per batch size, so that compilation (and oneDNN's kernel choice)
        happens at load, not on the first requests. Returns seconds per batch size."""
        took = {}
        for n in sorted({max(1, min(int(b), self.max_batch)) for b in batch_sizes}):
            start = time.perf_counter()
            self._forward(self._dummy(n))
            took[n] = time.perf_counter() - start
            if self.runtime.compile:
                self._compiled_sizes.add(n)
        return took

    def _dummy(self, n: int) -> tuple[torch.Tensor, ...]:
        if self.spec.modality == "image":
            inp = self.spec.input
            x = torch.zeros((n, inp.channels, inp.size, inp.size), dtype=torch.float32)
            return (x.contiguous(memory_format=self._memory_format),)
        if self.spec.sequence_kind == "features":
            x = torch.zeros((n, 4, self.spec.config.input_size), dtype=torch.float32)
        else:
            x = torch.zeros((n, 4), dtype=torch.long)
        return x, torch.full((n,), 4, dtype=torch.long)

    # ---- parsing -------------------------------------------------------------------
    def parse(self, payload: Mapping[str, Any], k: Any = None) -> ParsedRequest:
        """Turn one request's payload into model inputs; InvalidInput if it does not fit."""
        if not isinstance(payload, Mapping) or not payload:
            raise InvalidInput("empty request: send an image or a JSON body")
        k_value = payload.get(TOP_K_KEY, k)
        if self.spec.modality == "image":
            self._check_images(payload)
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
        k = parse_k(k_value, self.spec.num_classes) if self._task_answer.uses_k else 0
        return ParsedRequest(items, names, k)

    def _check_images(self, payload: Mapping[str, Any]) -> None:
        """Before any decoding: the request's image count, each image's declared size, and
        the pixels of all of them together (one limit per request, so that many small
        bombs cannot add up), and, where the spec resizes the shorter side, the size after
        that resize (a 1,000,000 x 1 image is few pixels, but not once resized)."""
        images = [(key, value) for key, value in payload.items() if key != TOP_K_KEY]
        if len(images) > self.max_items_per_request:
            raise PayloadTooLarge(f"request holds {len(images)} images; the limit is "
                                  f"{self.max_items_per_request} per request")
        resize = self.spec.input.resize
        total = 0
        for key, value in images:
            if not isinstance(value, (bytes, bytearray)):
                raise InvalidInput(f"input {key!r}: expected JPEG or PNG bytes, got {type(value).__name__}")
            if not value:
                raise InvalidInput(f"input {key!r}: empty image")
            try:
                width, height = decode.image_size(value)
            except InvalidInput as exc:
                raise InvalidInput(f"input {key!r}: {exc.message}") from exc
            total += width * height
            if resize is not None and min(width, height) > 0:
                resized = resize * math.ceil(resize * max(width, height) / min(width, height))
                if resized > self.max_pixels:
                    raise PayloadTooLarge(
                        f"input {key!r}: a {width}x{height} image resized to {resize} pixels on its "
                        f"shorter side would have {resized} pixels; the limit is {self.max_pixels}")
        if total > self.max_pixels:
            raise PayloadTooLarge(f"the request's images have {total} pixels together; the limit is "
                                  f"{self.max_pixels} per request")

    def _image(self, key: str, value: Any) -> torch.Tensor:
        """Decoded uint8 (C, H, W); the transform runs per batch in :meth:`preprocess`."""
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidInput(
                f"input {key!r}: expected JPEG or PNG bytes, got {type(value).__name__}"
            )
        try:
            return decode.decode_image_bytes(value, self.spec.input.channels, self.max_pixels)
        except InvalidInput as exc:
            raise type(exc)(f"input {key!r}: {exc.message}") from exc

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
            seqs = decode.feature_sequences(value, spec.config.input_size, spec.input.max_length,
                                            self.max_items_per_request)
        else:
            encode = self.vocab.encode if self.vocab is not None else None
            seqs = decode.token_sequences(value, spec.config.vocab_size, spec.input.max_length, encode,
                                          self.max_items_per_request)
        return seqs, body_k

    # ---- running -------------------------------------------------------------------
    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded uint8 images -> one normalised float batch (N, C, size, size).

        Images that share a size are transformed as one batch by the shared eval
        transform; a size seen once is transformed alone. The batch comes out in the
        model's memory format.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(i)
        if len(groups) == 1:
            stacked = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(list(images))
            return self._transform(stacked).contiguous(memory_format=self._memory_format)
        inp = self.spec.input
        out = torch.empty((len(images), inp.channels, inp.size, inp.size), dtype=torch.float32)
        out = out.contiguous(memory_format=self._memory_format)
        for indices in groups.values():
            if len(indices) == 1:
                out[indices[0]] = self._transform(images[indices[0]])
            else:
                out[indices] = self._transform(torch.stack([images[i] for i in indices]))
        return out

    def collate(self, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Model arguments for a list of parsed items (images preprocessed, sequences padded)."""
        if self.spec.modality == "image":
            return (self.preprocess(items),)
        lengths = torch.tensor([len(x) for x in items], dtype=torch.long)
        padded = torch.nn.utils.rnn.pad_sequence(list(items), batch_first=True, padding_value=0)
        return padded, lengths

    @torch.inference_mode()
    def _forward(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = args[0].to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=self._autocast) if self._autocast is not None
                    else contextlib.nullcontext())
        with autocast:
            return self._run(x, *args[1:]) if len(args) > 1 else self._run(x)

    def run(self, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        """Logits (N, num_classes), or (N, num_classes, size, size) for segmentation, for
        parsed items, in chunks of ``max_batch``; also the seconds spent preprocessing
        (collating) and in the forward."""
        outs, prep, infer = [], 0.0, 0.0
        # A compiled model runs only the batch sizes compiled at warm-up, so that no request
        # waits for a compilation: larger inputs go in chunks of the largest, and a chunk
        # of another size is padded with zeros up to the next compiled size.
        chunk = max(self._compiled_sizes) if self._compiled_sizes else self.max_batch
        for start in range(0, len(items), chunk):
            t0 = time.perf_counter()
            args = self.collate(items[start : start + chunk])
            n = len(args[0])
            if self._compiled_sizes and n not in self._compiled_sizes:
                args = (self._pad(args[0], min(s for s in self._compiled_sizes if s > n)),)
            t1 = time.perf_counter()
            out = self._forward(args)
            outs.append(out if len(out) == n else out[:n])
            prep, infer = prep + t1 - t0, infer + time.perf_counter() - t1
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), prep, infer

    def _pad(self, x: torch.Tensor, size: int) -> torch.Tensor:
        padded = torch.zeros((size, *x.shape[1:]), dtype=x.dtype).contiguous(memory_format=self._memory_format)
        padded[: len(x)] = x
        return padded

    def forward(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Logits (N, num_classes) for parsed items (decoded images or sequences)."""
        return self.run(items)[0]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities per task: softmax (multiclass), sigmoid (multilabel), raw (regression);
        segmentation, per pixel: softmax over the classes, sigmoid for a binary mask."""
        if self.spec.task == "segmentation":
            return torch.softmax(logits.float(), dim=1) if logits.shape[1] > 1 else torch.sigmoid(logits.float())
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
            except Exception as exc:  # a bug, not the caller's fault: this request alone fails
                log.exception("request %d of %d: unexpected error while reading it", i + 1, len(payloads))
                outputs[i] = Internal(f"internal error while reading the request ({type(exc).__name__})")
        items = [item for _, req in parsed for item in req.items]
        timings = {"preprocess": time.perf_counter() - t0, "inference": 0.0, "postprocess": 0.0}
        if items:
            logits, prep, infer = self.run(items)
            t2 = time.perf_counter()
            self._task_answer.answer(self, parsed, logits, outputs)
            timings["preprocess"] += prep
            timings["inference"] = infer
            timings["postprocess"] = time.perf_counter() - t2
        return BatchResult(outputs, timings, len(items))

    def _answer(self, parsed, scores: torch.Tensor, outputs: list) -> None:
        # One transfer from the device, and one tolist, per batch: top-k values and
        # indices (exact in float32 below 2**24 classes) and multilabel flags travel together.
        if self.spec.task == "regression":
            rows, top, positive = scores.cpu().tolist(), None, None
        else:
            k_max = max(req.k for _, req in parsed)
            values, indices = torch.topk(scores, k_max, dim=1)
            parts = [values, indices.to(values.dtype)]
            if self.spec.task == "multilabel":
                parts.append(torch.ge(scores, 0.5).to(values.dtype))
            packed = torch.cat(parts, dim=1).cpu().tolist()
            rows = None
            top = [(r[:k_max], [int(j) for j in r[k_max : 2 * k_max]]) for r in packed]
            positive = [r[2 * k_max :] for r in packed] if self.spec.task == "multilabel" else None
        row = 0
        for i, req in parsed:
            predictions = []
            for key, index in req.names:
                entry: dict[str, Any] = {"input": key, "item": index}
                if top is None:
                    entry["values"] = rows[row]
                else:
                    vals, idxs = top[row][0][: req.k], top[row][1][: req.k]
                    entry["top_k"] = [
                        {"label": self.labels[j], "index": j, "probability": p} for p, j in zip(vals, idxs)
                    ]
                    if positive is not None:
                        entry["positive"] = [self.labels[j] for j, on in enumerate(positive[row]) if on]
                predictions.append(entry)
                row += 1
            outputs[i] = {"model": self.name, "version": self.version, "predictions": predictions}


@dataclass(frozen=True)
class TaskAnswer:
    """How one task's batch of model outputs becomes each request's answer:
    ``answer(predictor, parsed, outputs_of_the_batch, answers)`` fills ``answers`` (one per
    parsed request, by its index); ``uses_k``: whether the request's ``k`` (top-k) applies,
    else it is ignored and not checked."""

    answer: Callable[[Predictor, list, torch.Tensor, list], None]
    uses_k: bool = True


def _top_k_answer(predictor: Predictor, parsed, logits: torch.Tensor, outputs: list) -> None:
    predictor._answer(parsed, predictor.scores(logits), outputs)


#: The answer of each task (a segmentation model answers masks: service/inference/segmentation.py).
TASK_ANSWERS: dict[str, TaskAnswer] = {
    "multiclass": TaskAnswer(_top_k_answer),
    "multilabel": TaskAnswer(_top_k_answer),
    "regression": TaskAnswer(_top_k_answer),
    "segmentation": TaskAnswer(segmentation.answer, uses_k=False),
}
