"""Training tasks: loss, validation metric and how the metric is accumulated.

A task's metric is computed from sums (``stats``) that add up over batches and over
processes, so a validation metric reduced with one ``all_reduce`` over the whole
validation set is exactly the metric a single process would compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# The decision rules (multilabel threshold, a mask from logits) are shared with the serving
# predictor, which imports them from service.models.decisions without the training package.
from service.models.decisions import MULTILABEL_THRESHOLD, segmentation_prediction  # noqa: F401
from service.training.catalog import TASK_METRICS


@dataclass(frozen=True)
class Task:
    """``criterion(label_smoothing)`` builds the loss; ``stats(logits, target)`` returns a
    float64 vector of sums; ``metric(sums)`` turns reduced sums into the metric, named
    ``metric_name``, where ``mode`` ("max" or "min") says which way is better (both from
    the task's name in catalog.TASK_METRICS, torch-free). A task whose
    sums grow with the classes (``per_class``) is :meth:`sized` for a model first;
    ``details(sums)`` gives the per-class figures it reports beside the metric."""

    criterion: Callable[[float], nn.Module]
    stats: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor], float]
    metric_name: str
    mode: str
    target_dtype: torch.dtype
    num_stats: int
    per_class: bool = False
    details: Callable[[torch.Tensor], dict] | None = None

    def sized(self, num_classes: int) -> Task:
        """This task for a model with ``num_classes`` outputs (per pixel, for segmentation)."""
        if not self.per_class:
            return self
        return dataclasses.replace(self, num_stats=2 * num_classes)


def _multiclass_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    correct = (logits.argmax(dim=1) == target).sum()
    return torch.stack([correct.double(), torch.tensor(float(target.numel()), dtype=torch.float64)])


def _multilabel_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    predicted = torch.ge(torch.sigmoid(logits.float()), MULTILABEL_THRESHOLD)
    truth = target >= 0.5
    tp = (predicted & truth).sum()
    fp = (predicted & ~truth).sum()
    fn = (~predicted & truth).sum()
    return torch.stack([tp, fp, fn]).double()


def _micro_f1(s: torch.Tensor) -> float:
    tp, fp, fn = (float(x) for x in s)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0


def _regression_stats(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    sse = ((output.float() - target.float()) ** 2).sum()
    return torch.stack([sse.double(), torch.tensor(float(target.numel()), dtype=torch.float64)])


class SegmentationLoss(nn.Module):
    """Per-pixel loss of (N, C, H, W) logits against (N, H, W) class ids: cross-entropy for
    C > 1; for a binary mask (C == 1), BCE-with-logits of the one channel against the 0/1 mask."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return self.bce(logits[:, 0], target.to(logits.dtype))
        return self.ce(logits, target)


def _iou_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per class, the pixels of intersection then of union (sums: they add over batches and
    over processes). A binary mask's one class is its foreground (1)."""
    pred = segmentation_prediction(logits)
    target = target.long()
    classes = logits.shape[1]
    ids = torch.arange(classes, device=pred.device) + (1 if classes == 1 else 0)
    p = pred.reshape(1, -1) == ids.view(-1, 1)
    t = target.reshape(1, -1) == ids.view(-1, 1)
    inter = (p & t).sum(dim=1)
    union = (p | t).sum(dim=1)
    return torch.cat([inter, union]).double()


def per_class_iou(sums: torch.Tensor) -> list[float]:
    """IoU of each class from the reduced sums; NaN for a class in neither truth nor prediction."""
    k = len(sums) // 2
    inter, union = sums[:k], sums[k:]
    return [float(i / u) if u > 0 else math.nan for i, u in zip(inter.tolist(), union.tolist(), strict=True)]


def mean_iou(sums: torch.Tensor) -> float:
    """Mean IoU over the classes present in truth or prediction (empty classes do not count);
    1.0 when no class is present at all."""
    present = [v for v in per_class_iou(sums) if not math.isnan(v)]
    return sum(present) / len(present) if present else 1.0


TASKS: dict[str, Task] = {
    "multiclass": Task(
        criterion=lambda smoothing: nn.CrossEntropyLoss(label_smoothing=smoothing),
        stats=_multiclass_stats,
        metric=lambda s: float(s[0] / s[1]) if s[1] > 0 else 0.0,
        metric_name=TASK_METRICS["multiclass"].name,
        mode=TASK_METRICS["multiclass"].mode,
        target_dtype=torch.long,
        num_stats=2,
    ),
    "multilabel": Task(
        criterion=lambda smoothing: nn.BCEWithLogitsLoss(),
        stats=_multilabel_stats,
        metric=_micro_f1,
        metric_name=TASK_METRICS["multilabel"].name,
        mode=TASK_METRICS["multilabel"].mode,
        target_dtype=torch.float32,
        num_stats=3,
    ),
    "regression": Task(
        criterion=lambda smoothing: nn.MSELoss(),
        stats=_regression_stats,
        metric=lambda s: float(s[0] / s[1]) if s[1] > 0 else 0.0,
        metric_name=TASK_METRICS["regression"].name,
        mode=TASK_METRICS["regression"].mode,
        target_dtype=torch.float32,
        num_stats=2,
    ),
    "segmentation": Task(
        criterion=SegmentationLoss,
        stats=_iou_stats,
        metric=mean_iou,
        metric_name=TASK_METRICS["segmentation"].name,
        mode=TASK_METRICS["segmentation"].mode,
        target_dtype=torch.long,
        num_stats=0,  # 2 per class: sized()
        per_class=True,
        details=lambda s: {"per_class_iou": [None if math.isnan(v) else v for v in per_class_iou(s)]},
    ),
}


def better(mode: str, value: float, best: float | None) -> bool:
    """Whether ``value`` improves on ``best`` (None: nothing yet) in direction ``mode``."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best
