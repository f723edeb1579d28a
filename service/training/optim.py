"""Optimizers by name: the registry the run spec's ``hyperparameters.optimizer`` selects from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _adam(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _adamw(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _sgd(params: Iterable, hp) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


#: name -> (trainable parameters, Hyperparameters) -> optimizer
OPTIMIZERS: dict[str, Callable[[Iterable, object], torch.optim.Optimizer]] = {
    "adam": _adam,
    "sgd": _sgd,
    "adamw": _adamw,
}
