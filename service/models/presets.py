"""Evaluation-time preprocessing shared by the trainer and the serving predictor."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from service.models.spec import ImageInput


def _eval_transform(img: torch.Tensor, inp: ImageInput) -> torch.Tensor:
    if img.shape[-3] != inp.channels:
        raise ValueError(f"image has {img.shape[-3]} channels, the model takes {inp.channels}")
    if inp.resize is None:
        img = F.resize(img, [inp.size, inp.size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    else:
        img = F.resize(img, [inp.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        img = F.center_crop(img, [inp.size, inp.size])
    img = F.to_dtype(img, torch.float32, scale=True)
    return F.normalize(img, mean=list(inp.mean), std=list(inp.std))


def image_eval_transform(inp: ImageInput) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (C, H, W) with C == inp.channels -> normalised float32 (C, size, size).

    Resizes the shorter side to ``inp.resize`` then center-crops ``inp.size`` (or, with
    ``resize`` None, resizes straight to size x size), scales to [0, 1], normalises.
    The returned callable pickles (a partial), so DataLoader workers can use it.
    """
    return functools.partial(_eval_transform, inp=inp)


def _mask_transform(mask: torch.Tensor, inp: ImageInput) -> torch.Tensor:
    if inp.resize is None:
        return F.resize(mask, [inp.size, inp.size], interpolation=InterpolationMode.NEAREST_EXACT)
    mask = F.resize(mask, [inp.resize], interpolation=InterpolationMode.NEAREST_EXACT)
    return F.center_crop(mask, [inp.size, inp.size])


def mask_eval_transform(inp: ImageInput) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (1, H, W) class ids -> uint8 (1, size, size): the geometry of
    :func:`image_eval_transform` (resize, center crop) with nearest-neighbour sampling
    (``NEAREST_EXACT``: pixel centres, as the image's bilinear resize), so each pixel of a
    segmentation mask keeps a class id and stays on the image pixel it labels."""
    return functools.partial(_mask_transform, inp=inp)
