"""The agreement check that admits a reduced precision for one model.

Run at archive time on held-out inputs::

    check = check_precision(bundle, held_out, "bf16")
    store.write(name, bundle, options=ServingOptions(precision="bf16", precision_check=check.to_dict()))

The store records the check in the archive's lineage (``serving.precision_check``), and a
worker runs the reduced precision only when that record says it passed: top-1 agreement
with fp32 of at least 99 % (``MIN_AGREEMENT``), on these weights, on the same kind of
device. A failed check is recorded too; the worker then runs fp32.

For a segmentation model the decisions compared are its pixels' (at the model's input
size, by :func:`service.models.decisions.segmentation_prediction`, the served rule): the
agreement is the fraction of pixels whose class is the same in both precisions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from service.errors import InvalidArgument
from service.inference.fastpath import RuntimeOptions, native_precisions
from service.inference.predictor import Predictor
from service.models.decisions import segmentation_prediction
from service.models.bundle import ModelBundle, state_dict_sha256
from service.inference.options import MIN_AGREEMENT

#: Fewest held-out inputs a check accepts: below 100, 99 % cannot be told from 98 %.
MIN_SAMPLES = 100


@dataclass(frozen=True)
class PrecisionCheck:
    """One agreement check: ``agreed`` of ``samples`` held-out inputs got the fp32 top-1."""

    precision: str
    device_type: str
    samples: int
    agreed: int
    agreement: float
    threshold: float
    passed: bool
    native: bool
    channels_last: bool
    max_abs_prob_diff: float
    weights_sha256: str
    checked_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_precision(
    bundle: ModelBundle,
    inputs: Sequence[Any],
    precision: str = "bf16",
    device: str | torch.device = "cpu",
    *,
    threshold: float = MIN_AGREEMENT,
    channels_last: bool = False,
    batch_size: int = 32,
) -> PrecisionCheck:
    """Top-1 agreement of ``precision`` with fp32 for ``bundle`` on held-out ``inputs``.

    ``inputs``: what a request carries for one input (image bytes, a sequence as JSON or
    a list, text for a model with a vocabulary), or already parsed items (decoded uint8
    images, sequences as tensors). Both runs see the same preprocessed batches; only the
    forward differs. ``threshold`` may be stricter than 99 %, never looser.
    """
    if precision not in ("bf16", "fp16"):
        raise InvalidArgument(f"precision must be bf16 or fp16, got {precision!r}")
    if threshold < MIN_AGREEMENT or threshold > 1:
        raise InvalidArgument(f"threshold must be in [{MIN_AGREEMENT}, 1], got {threshold}")
    device = torch.device(device)
    image = bundle.spec.modality == "image"
    cl = channels_last and image
    reference = Predictor(bundle, device, runtime=RuntimeOptions("fp32", cl), max_batch=batch_size)
    reduced = Predictor(bundle, device, runtime=RuntimeOptions(precision, cl), max_batch=batch_size)
    items = _items(reference, inputs)
    if len(items) < MIN_SAMPLES:
        raise InvalidArgument(f"the agreement check needs at least {MIN_SAMPLES} held-out inputs, got {len(items)}")
    agreed, decisions, max_diff = 0, 0, 0.0
    segmentation = bundle.spec.task == "segmentation"
    for start in range(0, len(items), batch_size):
        args = reference.collate(items[start : start + batch_size])
        l32, llow = reference._forward(args), reduced._forward(args)
        p32, plow = reference.scores(l32), reduced.scores(llow)
        if segmentation:  # every pixel's class, as served
            d32, dlow = segmentation_prediction(l32.float()), segmentation_prediction(llow.float())
        else:
            d32, dlow = p32.argmax(dim=1), plow.argmax(dim=1)
        agreed += int((d32 == dlow).sum())
        decisions += d32.numel()
        max_diff = max(max_diff, float((p32 - plow).abs().max()))
    agreement = agreed / decisions
    return PrecisionCheck(
        precision=precision,
        device_type=device.type,
        samples=len(items),
        agreed=agreed,
        agreement=agreement,
        threshold=threshold,
        passed=agreement >= threshold,
        native=precision in native_precisions(device),
        channels_last=cl,
        max_abs_prob_diff=max_diff,
        weights_sha256=state_dict_sha256(bundle.state_dict),
        checked_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _items(predictor: Predictor, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Parsed items for held-out inputs (raw payload values or parsed tensors)."""
    items: list[torch.Tensor] = []
    for i, value in enumerate(inputs):
        if isinstance(value, torch.Tensor):
            items.append(value)
        else:
            items.extend(predictor.parse({f"held_out_{i}": value}).items)
    return items
