"""Training tasks: loss, validation metric and how the metric is accumulated.

A task's metric is computed from sums (``stats``) that add up over batches and over
processes, so a validation metric reduced with one ``all_reduce`` over the whole
validation set is exactly the metric a single process would compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: Multilabel decision threshold on the sigmoid, applied with ``torch.ge`` (as serving does).
MULTILABEL_THRESHOLD = 0.5


@dataclass(frozen=True)
class Task:
    """``criterion(label_smoothing)`` builds the loss; ``stats(logits, target)`` returns a
    float64 vector of sums; ``metric(sums)`` turns reduced sums into the metric, named
    ``metric_name``, where ``mode`` ("max" or "min") says which way is better."""

    criterion: Callable[[float], nn.Module]
    stats: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor], float]
    metric_name: str
    mode: str
    target_dtype: torch.dtype
    num_stats: int


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


TASKS: dict[str, Task] = {
    "multiclass": Task(
        criterion=lambda smoothing: nn.CrossEntropyLoss(label_smoothing=smoothing),
        stats=_multiclass_stats,
        metric=lambda s: float(s[0] / s[1]) if s[1] > 0 else 0.0,
        metric_name="accuracy",
        mode="max",
        target_dtype=torch.long,
        num_stats=2,
    ),
    "multilabel": Task(
        criterion=lambda smoothing: nn.BCEWithLogitsLoss(),
        stats=_multilabel_stats,
        metric=_micro_f1,
        metric_name="micro_f1",
        mode="max",
        target_dtype=torch.float32,
        num_stats=3,
    ),
    "regression": Task(
        criterion=lambda smoothing: nn.MSELoss(),
        stats=_regression_stats,
        metric=lambda s: float(s[0] / s[1]) if s[1] > 0 else 0.0,
        metric_name="mse",
        mode="min",
        target_dtype=torch.float32,
        num_stats=2,
    ),
}


def better(mode: str, value: float, best: float | None) -> bool:
    """Whether ``value`` improves on ``best`` (None: nothing yet) in direction ``mode``."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best
