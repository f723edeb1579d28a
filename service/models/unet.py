"""U-Net family: a segmentation network built from the classic blocks.

The encoder has ``depth`` levels of two Conv2d→[BatchNorm2d]→ReLU blocks, with a
MaxPool2d between levels. The decoder goes back up one level at a time: it up-samples
(``ConvTranspose2d`` with kernel 2 and stride 2, or a fixed bilinear ×2 followed by a 1×1
Conv2d to halve the channels), concatenates the encoder's output at that level (the skip
connection) and runs two conv blocks. A final 1×1 Conv2d gives one channel per class
(one channel for a binary mask). The output has the input's height and width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from service.models.configs import UNetConfig

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

def _block(in_ch: int, out_ch: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        layers.append(nn.Conv2d(c_in, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """Up one level: ×2 up-sampling to ``out_ch`` channels, concatenate the skip, two blocks."""

    def __init__(self, in_ch: int, out_ch: int, mode: str, batch_norm: bool):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(in_ch, out_ch, kernel_size=1))
        self.conv = _block(2 * out_ch, out_ch, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        chans = cfg.level_channels
        self.down = nn.ModuleList()
        c_in = in_channels
        for c in chans:
            self.down.append(_block(c_in, c, cfg.batch_norm))
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(_Up(chans[i + 1], chans[i], cfg.upsample, cfg.batch_norm)
                                for i in reversed(range(len(chans) - 1)))
        self.head = nn.Conv2d(chans[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottom level is x itself
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


def build_unet(spec: ModelSpec) -> nn.Module:
    """One logit channel per class (a binary mask, one class: one channel)."""
    return UNet(spec.input.channels, spec.num_classes, spec.config)
