"""An exponential moving average of a model's weights: torchvision's ``--model-ema`` (its
references/classification/train.py) and timm's ModelEmaV2, as ``hyperparameters.ema_decay``.

After every optimizer step each floating-point tensor of the state dict (parameters and
BatchNorm's running statistics) moves toward the trained model's by ``1 - decay``; integer
buffers (``num_batches_tracked``) are copied. The decay warms up as ``min(decay, (1 + n) /
(10 + n))`` after n updates, so the first steps do not leave the average stuck at the
initial weights. With it, validation, the best epoch, the test split and the archive all
use the averaged weights; the trained model goes on training as before.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._mine = self.module.state_dict()  # views of the average's tensors, updated in place

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step toward ``model`` (the unwrapped model, not its DDP wrapper)."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        for key, value in model.state_dict().items():
            avg = self._mine[key]
            if avg.is_floating_point():
                avg.lerp_(value.detach().to(avg.dtype), weight)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
