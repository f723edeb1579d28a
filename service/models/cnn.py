"""CNN family: a configurable stack of conv blocks and a linear head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from service.models.configs import CNNConfig

if TYPE_CHECKING:
    from service.models.spec import ModelSpec


def build_cnn(spec: ModelSpec) -> nn.Module:
    """The conv stack for ``spec.input``; pooling stops once it would shrink the map below 1x1."""
    cfg: CNNConfig = spec.config
    layers: list[nn.Module] = []
    in_channels, size, k = spec.input.channels, spec.input.size, cfg.kernel_size
    for out_channels in cfg.channels:
        layers.append(nn.Conv2d(in_channels, out_channels, k, padding=k // 2))
        size = size + 2 * (k // 2) - k + 1
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU() if cfg.activation == "relu" else nn.LeakyReLU(cfg.negative_slope))
        if size // 2 >= 1:
            layers.append(nn.MaxPool2d(2) if cfg.pool == "max" else nn.AvgPool2d(2))
            size //= 2
        in_channels = out_channels
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(in_channels, spec.num_classes),
    )
