"""ResNet family: torchvision resnet18/34/50 with a new head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torchvision
from torch import nn

from service.errors import PretrainedWeightsNotFound
from service.models.configs import ResNetConfig
from service.models.pretrained import hub_checkpoints, load_backbone, read_state_dict

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

def build_resnet(spec: ModelSpec) -> nn.Module:
    """A fresh ResNet with ``fc`` sized to ``num_classes`` and conv1 to the input channels."""
    cfg: ResNetConfig = spec.config
    model = getattr(torchvision.models, cfg.arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, spec.num_classes)
    if spec.input.channels == 1:
        old = model.conv1
        model.conv1 = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    return model


def load_resnet_pretrained(model: nn.Module, spec: ModelSpec) -> None:
    """Load ``config.pretrained`` (if set) into the backbone of a model from build_resnet."""
    cfg: ResNetConfig = spec.config
    if cfg.pretrained is None:
        return
    if cfg.pretrained == "imagenet":
        found, pattern = hub_checkpoints(cfg.arch)
        if not found:
            raise PretrainedWeightsNotFound(f"{cfg.arch} imagenet", [pattern])
        path = found[0]
    else:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise PretrainedWeightsNotFound(f"{cfg.arch} ({cfg.pretrained})", [path])
    load_backbone(model, read_state_dict(path), head="fc.", first_conv="conv1.weight", source=str(path))
