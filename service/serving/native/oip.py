"""Open Inference Protocol v2 tensors, shared by the REST and gRPC protocols.

The contract (model metadata says the same for each model):

* inputs
  - image models: ``images``, ``BYTES`` ``[N]``, one encoded JPEG or PNG per element (over
    REST JSON, base64 text);
  - sequence models of features: ``sequences``, ``FP32`` ``[N, T, F]``;
  - sequence models of tokens: ``sequences``, ``INT64`` ``[N, T]``; or, for a model with a
    vocabulary, ``texts``, ``BYTES`` ``[N]`` (UTF-8);
  - with ``sequences``, optionally ``lengths``, ``INT64`` ``[N]``: each sequence's true
    length (the rest is padding); without it, every sequence is ``T`` long;
* request parameter ``top_k`` (an integer, 1 to 1000; default 5, capped at the classes;
  ignored by segmentation models);
* outputs (all by default; a request may name some)
  - ``labels``, ``BYTES`` ``[N, k]``: label names, best first;
  - ``probabilities``, ``FP32`` ``[N, k]``: their probabilities (softmax; sigmoid for
    multilabel models);
  - ``classes``, ``INT64`` ``[N, k]``: their class indices;
  - multilabel models also ``positive``, ``BOOL`` ``[N, C]``: probability >= 0.5, per class;
  - regression models: ``values``, ``FP32`` ``[N, C]`` instead;
  - segmentation models instead: ``mask``, ``UINT8`` ``[N, H, W]``, each pixel's class id at
    the images' own height and width (a binary model: 1 for its class, 0 background), and
    ``class_fraction``, ``FP32`` ``[N, C]``, the fraction of each image's pixels in each
    class, in the order of the labels (a binary model, C = 1: its class's fraction). One
    mask tensor has one H and W, so the images of one request must share their size: a
    request of images of different sizes is refused (InvalidInput) before any is run.

Everything a client can get wrong is checked here and raised as InvalidInput: an unknown
input or datatype, a shape that disagrees with the data, a binary size over or under the
declared one, ``BYTES`` elements cut short. A shape that declares more elements than the
model takes in one request (:attr:`ModelIO.max_elements`) is PayloadTooLarge, before any
element is decoded.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from service.errors import Internal, InvalidInput, PayloadTooLarge
from service.inference import maskpng
from service.inference.decode import image_size

IMAGES, SEQUENCES, LENGTHS, TEXTS = "images", "sequences", "lengths", "texts"
LABELS, PROBABILITIES, CLASSES, POSITIVE, VALUES = "labels", "probabilities", "classes", "positive", "values"
MASK, CLASS_FRACTION = "mask", "class_fraction"
TOP_K = "top_k"

#: OIP datatypes with a fixed element size (BYTES has none).
NUMPY = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY, "BYTES")
#: Largest number of elements one input may declare (a shape is checked before any data).
MAX_ELEMENTS = 1 << 28


@dataclass
class Tensor:
    """A decoded tensor: ``data`` is a numpy array (fixed-size types) or a list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelIO:
    """The inputs and outputs one model takes and gives: [(name, datatype, shape)]."""

    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    modality: str
    task: str
    #: The most elements one input tensor of a request may declare: what the model takes in
    #: one request (images or texts: its items per request; sequences: items x max_length
    #: x features). Checked on the shape, before the elements are decoded one by one.
    max_elements: int = 0

    def metadata(self) -> dict:
        return {"inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in self.inputs],
                "outputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in self.outputs]}


def model_io(predictor) -> ModelIO:
    """The OIP contract of a loaded predictor (see the module docstring)."""
    spec = predictor.spec
    c = spec.num_classes
    if spec.modality == "image":
        inputs = ((IMAGES, "BYTES", (-1,)),)
    elif spec.sequence_kind == "features":
        inputs = ((SEQUENCES, "FP32", (-1, -1, spec.config.input_size)), (LENGTHS, "INT64", (-1,)))
    else:
        inputs = ((SEQUENCES, "INT64", (-1, -1)), (LENGTHS, "INT64", (-1,)))
        if predictor.vocab is not None:
            inputs += ((TEXTS, "BYTES", (-1,)),)
    outputs = TASK_OUTPUTS[spec.task].declared(c)
    items = predictor.max_items_per_request
    if spec.modality == "image":
        max_elements = items
    else:
        features = spec.config.input_size if spec.sequence_kind == "features" else 1
        max_elements = items * spec.input.max_length * features
    return ModelIO(inputs, outputs, spec.modality, spec.task, min(max_elements, MAX_ELEMENTS))


# ---- decoding inputs -----------------------------------------------------------------

def check_shape(name: str, datatype: str, shape: Sequence[Any], max_elements: int = 0) -> int:
    """The element count of a declared shape; InvalidInput for a bad one, PayloadTooLarge
    over ``max_elements`` (0: :data:`MAX_ELEMENTS`)."""
    limit = max_elements or MAX_ELEMENTS
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {_short(datatype)} (allowed: {', '.join(DATATYPES)})")
    if not isinstance(shape, (list, tuple)) or not shape or len(shape) > 8:
        raise InvalidInput(f"input {name!r}: shape must be a list of 1 to 8 dimensions, got {_short(shape)}")
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidInput(f"input {name!r}: shape {_short(shape)} holds {_short(dim)}, not a size >= 0")
        count *= dim
        if count > limit:
            raise PayloadTooLarge(f"input {name!r}: shape {_short(shape)} declares more than {limit} elements"
                                  + ("" if limit == MAX_ELEMENTS else ", the most this model takes in one request"))
    return count


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview,
             max_elements: int = 0) -> Tensor:
    """A tensor from its binary form (REST's binary extension, gRPC's raw_input_contents)."""
    count = check_shape(name, datatype, shape, max_elements)
    if datatype == "BYTES":
        return Tensor(name, datatype, list(shape), split_bytes(name, raw, count))
    dtype = NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(raw)} bytes of data where shape {list(shape)} of {datatype} "
                           f"needs {count * dtype.itemsize}")
    return Tensor(name, datatype, list(shape), np.frombuffer(raw, dtype=dtype).reshape(shape))


def split_bytes(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """BYTES elements, each a 4-byte little-endian length and the bytes."""
    view = memoryview(raw)
    out, pos = [], 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {len(out)} is cut short in its length prefix")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {len(out)} declares {size} bytes, "
                               f"{len(view) - pos} are left")
        out.append(bytes(view[pos:pos + size]))
        pos += size
        if len(out) > count:
            break
    if len(out) != count:
        raise InvalidInput(f"input {name!r}: {len(out)} BYTES elements where the shape declares {count}")
    return out


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any, max_elements: int = 0) -> Tensor:
    """A tensor from REST's JSON ``data`` (flat, or nested in row-major order)."""
    count = check_shape(name, datatype, shape, max_elements)
    flat = _flatten(name, data, count)
    if len(flat) != count:
        raise InvalidInput(f"input {name!r}: {len(flat)} elements of data where shape {list(shape)} declares {count}")
    if datatype == "BYTES":
        values = []
        for i, v in enumerate(flat):
            if not isinstance(v, str):
                raise InvalidInput(f"input {name!r}: BYTES element {i} is {type(v).__name__}, not a string")
            values.append(v)
        return Tensor(name, datatype, list(shape), values)
    dtype = NUMPY[datatype]
    for i, v in enumerate(flat):
        ok = isinstance(v, bool) if datatype == "BOOL" else (
            isinstance(v, (int, float)) and not isinstance(v, bool) if dtype.kind == "f" else
            isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise InvalidInput(f"input {name!r}: element {i} ({_short(v)}) is not {datatype}")
        if dtype.kind == "f" and isinstance(v, float) and not math.isfinite(v):
            raise InvalidInput(f"input {name!r}: element {i} is not a finite number")
    try:
        # a finite JSON number past the type's range (1e300 as FP32) is refused, not made inf
        with np.errstate(over="raise", invalid="raise"):
            array = np.array(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError, FloatingPointError) as exc:
        raise InvalidInput(f"input {name!r}: data out of range for {datatype} ({exc})") from None
    return Tensor(name, datatype, list(shape), array)


def _flatten(name: str, data: Any, limit: int) -> list:
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be a list, got {type(data).__name__}")
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 8:
                    raise InvalidInput(f"input {name!r}: data nested deeper than 8 levels")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > limit:
                raise InvalidInput(f"input {name!r}: more elements of data than the shape declares ({limit})")
        else:
            stack.pop()
    return out


def check_input(io: ModelIO, name: str, datatype: str) -> None:
    """InvalidInput unless the model takes an input ``name`` of ``datatype`` (checked before
    its data is decoded, and again by :func:`to_payload`)."""
    allowed = {n: d for n, d, _ in io.inputs}
    if name not in allowed:
        raise InvalidInput(f"unknown input {name!r}; this model takes {', '.join(allowed)}")
    if datatype != allowed[name]:
        raise InvalidInput(f"input {name!r} must be {allowed[name]}, got {_short(datatype)}")


def to_payload(io: ModelIO, inputs: Sequence[Tensor], *, json_bytes: bool = False) -> dict[str, Any]:
    """The predictor's payload for one request's input tensors.

    ``json_bytes``: BYTES images came as JSON text, base64-encoded."""
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        check_input(io, t.name, t.datatype)
        if t.name in by_name:
            raise InvalidInput(f"input {t.name!r} is given twice")
        by_name[t.name] = t
    if io.modality == "image":
        images = by_name.get(IMAGES)
        if images is None:
            raise InvalidInput(f"input {IMAGES!r} is missing")
        if len(images.shape) != 1:
            raise InvalidInput(f"input {IMAGES!r}: shape must be [N], got {images.shape}")
        payload = ({str(i): _b64(i, v) for i, v in enumerate(images.data)} if json_bytes
                   else {str(i): v for i, v in enumerate(images.data)})
        if io.task == "segmentation":
            _same_size(payload)
        return payload
    if TEXTS in by_name:
        if SEQUENCES in by_name or LENGTHS in by_name:
            raise InvalidInput(f"send either {TEXTS!r} or {SEQUENCES!r}, not both")
        texts = by_name[TEXTS]
        if len(texts.shape) != 1:
            raise InvalidInput(f"input {TEXTS!r}: shape must be [N], got {texts.shape}")
        try:
            return {TEXTS: [v if isinstance(v, str) else v.decode("utf-8") for v in texts.data]}
        except UnicodeDecodeError:
            raise InvalidInput(f"input {TEXTS!r}: an element is not UTF-8 text") from None
    seqs = by_name.get(SEQUENCES)
    if seqs is None:
        raise InvalidInput(f"input {SEQUENCES!r} is missing")
    rank = 3 if seqs.datatype == "FP32" else 2
    if len(seqs.shape) != rank:
        raise InvalidInput(f"input {SEQUENCES!r}: shape must have {rank} dimensions, got {seqs.shape}")
    rows = seqs.data.tolist()
    lengths = by_name.get(LENGTHS)
    if lengths is not None:
        if lengths.shape != [seqs.shape[0]]:
            raise InvalidInput(f"input {LENGTHS!r}: shape must be [{seqs.shape[0]}], got {lengths.shape}")
        cut = []
        for i, (row, n) in enumerate(zip(rows, lengths.data.tolist())):
            if not 1 <= n <= seqs.shape[1]:
                raise InvalidInput(f"input {LENGTHS!r}: element {i} is {n}, not between 1 and {seqs.shape[1]}")
            cut.append(row[:n])
        rows = cut
    if not rows:
        raise InvalidInput(f"input {SEQUENCES!r} holds no sequence")
    return {SEQUENCES: rows}


def _same_size(payload: Mapping[str, Any]) -> None:
    """The images of a segmentation request share one size: their masks share one
    ``[N, H, W]`` tensor. Read from the headers; an element that is not an image is left to
    the predictor, which names what is wrong with it."""
    sizes = {}
    for key, value in payload.items():
        try:
            sizes.setdefault(image_size(value), key)
        except InvalidInput:
            continue
    if len(sizes) > 1:
        shown = ", ".join(f"element {key} is {w}x{h}" for (w, h), key in sizes.items())
        raise InvalidInput(f"input {IMAGES!r}: the masks of one request share one tensor [N, H, W], so its "
                           f"images must have one size ({shown}); send images of different sizes in "
                           "separate requests")


def _b64(i: int, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {IMAGES!r}: element {i} is not base64 (JSON BYTES images are base64 text; "
                           "or send them with the binary tensor extension)") from None


def parse_top_k(parameters: Mapping[str, Any] | None) -> Any:
    """The ``top_k`` request parameter (checked by the predictor), or None."""
    if not parameters:
        return None
    return parameters.get(TOP_K)


# ---- encoding outputs ----------------------------------------------------------------

def to_outputs(io: ModelIO, answer: Mapping[str, Any], labels: Sequence[str],
               wanted: Sequence[str] | None = None) -> list[Tensor]:
    """Output tensors for one predictor answer; ``wanted`` names some (all by default)."""
    names = [n for n, _, _ in io.outputs]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise InvalidInput(f"unknown output {unknown[0]!r}; this model gives {', '.join(names)}")
        names = list(dict.fromkeys(wanted))  # in the order asked for
    return TASK_OUTPUTS[io.task].encode(answer["predictions"], labels, names)


def _regression_outputs(preds: list, labels: Sequence[str], names: Sequence[str]) -> list[Tensor]:
    values = np.array([p["values"] for p in preds], dtype=np.float32).reshape(len(preds), -1)
    return [Tensor(VALUES, "FP32", list(values.shape), values)] if VALUES in names else []


def _top_k_outputs(preds: list, labels: Sequence[str], names: Sequence[str]) -> list[Tensor]:
    n = len(preds)
    out: list[Tensor] = []
    k = len(preds[0]["top_k"]) if preds else 0
    for name in names:
        if name == LABELS:
            out.append(Tensor(name, "BYTES", [n, k],
                              [e["label"].encode("utf-8") for p in preds for e in p["top_k"]]))
        elif name == PROBABILITIES:
            out.append(Tensor(name, "FP32", [n, k], np.array(
                [[e["probability"] for e in p["top_k"]] for p in preds], dtype=np.float32).reshape(n, k)))
        elif name == CLASSES:
            out.append(Tensor(name, "INT64", [n, k], np.array(
                [[e["index"] for e in p["top_k"]] for p in preds], dtype=np.int64).reshape(n, k)))
        elif name == POSITIVE:
            index = {label: i for i, label in enumerate(labels)}
            mask = np.zeros((n, len(labels)), dtype=np.bool_)
            for row, p in enumerate(preds):
                for label in p.get("positive", ()):
                    mask[row, index[label]] = True
            out.append(Tensor(name, "BOOL", [n, len(labels)], mask))
    return out


def _segmentation_outputs(preds: list, labels: Sequence[str], names: Sequence[str]) -> list[Tensor]:
    """``mask`` from each answer's PNG (written by service/inference/maskpng.py: one inflate,
    no torch) and ``class_fraction`` in the labels' order."""
    out: list[Tensor] = []
    if MASK in names:
        sizes = {(p["height"], p["width"]) for p in preds}
        if len(sizes) > 1:  # to_payload refused such a request; the predictor's answer disagrees
            raise Internal(f"masks of {len(sizes)} sizes for one [N, H, W] tensor")
        masks = [maskpng.decode(base64.b64decode(p["mask"])) for p in preds]
        if any(m.shape != (p["height"], p["width"]) for m, p in zip(masks, preds)):
            raise Internal("a mask's PNG disagrees with its answer's width and height")
        array = np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=np.uint8)
        out.append(Tensor(MASK, "UINT8", list(array.shape), array))
    if CLASS_FRACTION in names:
        fractions = np.array([[p["class_fraction"][label] for label in labels] for p in preds],
                             dtype=np.float32).reshape(len(preds), len(labels))
        out.append(Tensor(CLASS_FRACTION, "FP32", list(fractions.shape), fractions))
    return [t for name in names for t in out if t.name == name]  # in the order asked for


@dataclass(frozen=True)
class TaskOutputs:
    """One task's OIP outputs: ``declared(num_classes)`` gives (name, datatype, shape) for the
    model metadata; ``encode(predictions, labels, names)`` the tensors named of an answer."""

    declared: Callable[[int], tuple[tuple[str, str, tuple[int, ...]], ...]]
    encode: Callable[[list, Sequence[str], Sequence[str]], list[Tensor]]


_TOP_K = ((LABELS, "BYTES", (-1, -1)), (PROBABILITIES, "FP32", (-1, -1)), (CLASSES, "INT64", (-1, -1)))

#: The outputs of each model task (to_outputs and model_io read it).
TASK_OUTPUTS: dict[str, TaskOutputs] = {
    "multiclass": TaskOutputs(lambda c: _TOP_K, _top_k_outputs),
    "multilabel": TaskOutputs(lambda c: (*_TOP_K, (POSITIVE, "BOOL", (-1, c))), _top_k_outputs),
    "regression": TaskOutputs(lambda c: ((VALUES, "FP32", (-1, c)),), _regression_outputs),
    "segmentation": TaskOutputs(lambda c: ((MASK, "UINT8", (-1, -1, -1)), (CLASS_FRACTION, "FP32", (-1, c))),
                                _segmentation_outputs),
}


def to_raw(t: Tensor) -> bytes:
    """The binary form of an output tensor (row-major; BYTES length-prefixed)."""
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in t.data)
    return np.ascontiguousarray(t.data, dtype=NUMPY[t.datatype]).tobytes()


def to_json_data(t: Tensor) -> list:
    """The flat JSON ``data`` of an output tensor (BYTES as UTF-8 text)."""
    if t.datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in t.data]
    return np.asarray(t.data).reshape(-1).tolist()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
