"""The family registry, and building / loading models from a spec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.models.cnn import CNNConfig, build_cnn
from service.models.mobilenet import MobileNetV2Config, build_mobilenet_v2, load_mobilenet_v2_pretrained
from service.models.resnet import ResNetConfig, build_resnet, load_resnet_pretrained
from service.models.rnn import RNNConfig, build_rnn
from service.models.unet import UNetConfig, build_unet, check_unet

if TYPE_CHECKING:
    from service.models.spec import ModelSpec


#: What a network with one output vector per example is trained for.
CLASSIFIER_TASKS = ("multiclass", "multilabel", "regression")


@dataclass(frozen=True)
class Family:
    """One architecture family.

    ``config``: its config dataclass. ``build``: spec -> fresh module (no pretrained
    weights). ``modality``: "image" or "sequence". ``load_pretrained``: loads
    ``config.pretrained`` (when set) into a freshly built module; None if unsupported.
    ``tasks``: the tasks it can be trained for. ``check``: cross-field checks of a whole
    spec (config against input), raising InvalidSpec; None if there are none.
    """

    config: type
    build: Callable[[ModelSpec], nn.Module]
    modality: str
    load_pretrained: Callable[[nn.Module, ModelSpec], None] | None = None
    tasks: tuple[str, ...] = CLASSIFIER_TASKS
    check: Callable[[ModelSpec], None] | None = None


FAMILIES: dict[str, Family] = {
    "resnet": Family(ResNetConfig, build_resnet, "image", load_resnet_pretrained),
    "mobilenet_v2": Family(MobileNetV2Config, build_mobilenet_v2, "image", load_mobilenet_v2_pretrained),
    "cnn": Family(CNNConfig, build_cnn, "image"),
    "rnn": Family(RNNConfig, build_rnn, "sequence"),
    "unet": Family(UNetConfig, build_unet, "image", tasks=("segmentation",), check=check_unet),
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
