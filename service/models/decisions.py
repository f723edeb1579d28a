"""How a model's outputs become decisions: one rule for the trainer's metrics and the served answer.

The trainer's validation metric (service/training/tasks.py) and the serving predictor
(service/inference) both import these, so a mask the service returns is decided exactly as
the mask the metric scored. The module needs torch alone: a serving worker imports it
without the training package (its datasets, its optimisers).
"""

from __future__ import annotations

import torch

#: Multilabel and binary-mask decision threshold on the sigmoid, applied with ``torch.ge``.
MULTILABEL_THRESHOLD = 0.5
#: A served mask holds one 8-bit class id per pixel (an 8-bit grayscale PNG, an OIP UINT8
#: tensor): a segmentation model of more classes cannot be served.
MAX_MASK_CLASSES = 256


def segmentation_prediction(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) class ids: argmax over classes; for a binary mask
    (C == 1), ``torch.ge(sigmoid, MULTILABEL_THRESHOLD)`` (1 = the class, 0 = background)."""
    if logits.shape[1] == 1:
        return torch.ge(torch.sigmoid(logits[:, 0].float()), MULTILABEL_THRESHOLD).long()
    return logits.argmax(dim=1)
