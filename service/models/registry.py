"""The family registry, and building / loading models from a spec.

Importing it imports no torch: a family names the functions that build its network
(``"module:function"``), imported when first called, so a spec is validated (the control
service checks run specs) without torch; building and loading a model imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.models.configs import CNNConfig, MobileNetV2Config, ResNetConfig, RNNConfig, UNetConfig, check_unet

if TYPE_CHECKING:
    import torch
    from torch import nn

    from service.models.spec import ModelSpec


#: What a network with one output vector per example is trained for.
CLASSIFIER_TASKS = ("multiclass", "multilabel", "regression")


def _resolve(ref: str) -> Callable:
    """The function ``"module:function"`` names (the module imported on first use)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    """One architecture family.

    ``config``: its config dataclass. ``modality``: "image" or "sequence". ``builder``:
    ``"module:function"`` of spec -> fresh module (no pretrained weights), as :attr:`build`.
    ``pretrained_loader``: ``"module:function"`` loading ``config.pretrained`` (when set)
    into a freshly built module, as :attr:`load_pretrained`; None if unsupported.
    ``tasks``: the tasks it can be trained for. ``check``: cross-field checks of a whole
    spec (config against input), raising InvalidSpec; None if there are none.
    """

    config: type
    modality: str
    builder: str
    pretrained_loader: str | None = None
    tasks: tuple[str, ...] = CLASSIFIER_TASKS
    check: Callable[[ModelSpec], None] | None = None

    @property
    def build(self) -> Callable[[ModelSpec], nn.Module]:
        return _resolve(self.builder)

    @property
    def load_pretrained(self) -> Callable[[nn.Module, ModelSpec], None] | None:
        return None if self.pretrained_loader is None else _resolve(self.pretrained_loader)


FAMILIES: dict[str, Family] = {
    "resnet": Family(ResNetConfig, "image", "service.models.resnet:build_resnet",
                     "service.models.resnet:load_resnet_pretrained"),
    "mobilenet_v2": Family(MobileNetV2Config, "image", "service.models.mobilenet:build_mobilenet_v2",
                           "service.models.mobilenet:load_mobilenet_v2_pretrained"),
    "cnn": Family(CNNConfig, "image", "service.models.cnn:build_cnn"),
    "rnn": Family(RNNConfig, "sequence", "service.models.rnn:build_rnn"),
    "unet": Family(UNetConfig, "image", "service.models.unet:build_unet", tasks=("segmentation",),
                   check=check_unet),
}


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model for ``spec``, with ``config.pretrained`` weights applied where set."""
    family = FAMILIES[spec.family]
    model = family.build(spec)
    if family.load_pretrained is not None:
        family.load_pretrained(model, spec)
    return model


def load_model(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild ``spec``'s model without reading any pretrained file, load ``state_dict``
    strictly (RuntimeError on any mismatch), and return it in eval mode."""
    model = FAMILIES[spec.family].build(spec)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
