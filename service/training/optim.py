"""Optimizers by name: the registry the run spec's ``hyperparameters.optimizer`` selects from
(its names, torch-free, are catalog.OPTIMIZER_NAMES: the spec is validated without torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from service.training.catalog import OPTIMIZER_NAMES


def _adam(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _adamw(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _sgd(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


_BUILDERS = {"adam": _adam, "sgd": _sgd, "adamw": _adamw}
#: name -> (trainable parameters, Hyperparameters) -> optimizer, one per OPTIMIZER_NAMES entry
OPTIMIZERS: dict[str, Callable[[Iterable, object], torch.optim.Optimizer]] = {
    name: _BUILDERS[name] for name in OPTIMIZER_NAMES}
