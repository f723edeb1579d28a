"""The segmentation answer: per image, a mask at the image's own size, as a PNG, with the
fraction of its pixels in each class.

The model sees every image at its input size (the shared eval transform); its logits
(N, C, size, size) are up-sampled back to each image's ORIGINAL height and width with
bilinear interpolation (``align_corners=False``), in fp32 whatever precision the forward
ran in, and decided by :func:`service.models.decisions.segmentation_prediction`, the rule
the trainer's IoU metric uses: argmax over the classes, or ``torch.ge(sigmoid, 0.5)`` for a
binary model (one class; pixel 1 is that class, 0 the background).

Where the spec's input has ``resize: null`` the transform resizes the image straight to
size x size, and the mask is ``interpolate(logits, (H, W))``, exactly. Where it resizes the
shorter side to ``resize`` and center-crops ``size`` (the default input), the model saw only
that crop: stretching its logits over the whole image would move every object. So the
logits are sampled back where the crop came from (``grid_sample``, bilinear, the inverse of
the resize and the crop, pixel centres as torchvision's resize maps them), and the pixels
the crop cut off (along the longer side) take the logits of the crop's nearest edge.

Up-sampled logits take ``C x H x W`` floats: 11 classes over a 12-megapixel photo are half a
gigabyte. So images of one size are up-sampled together only while that stays within
:data:`CHUNK_ELEMENTS`; beyond, one image at a time, and an image whose classes alone pass
it is decided over chunks of classes with a running maximum (ties go to the lower class id,
as ``argmax`` does), or, when sampled back through a crop, in bands of rows: the mask is the
same, the memory bounded by the pixels.

The answer of one image (one entry of the request's ``predictions``)::

    {"input": "img1", "item": 0, "width": W, "height": H,
     "mask": "<base64 of an 8-bit grayscale PNG, pixel = class id>",
     "class_fraction": {"background": 0.61, "cat": 0.39},
     "labels": ["background", "cat"]}

``class_fraction`` and ``labels`` follow the model's labels: for a binary model, the one
label and the fraction of its (foreground) pixels; otherwise every class, summing to 1.
Top-k (``k``) does not apply and is ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from service.inference import maskpng
from service.models.decisions import segmentation_prediction
from service.models.spec import ImageInput

#: The most up-sampled logits held at once (floats; 64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def _up(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def predict_masks(logits: torch.Tensor, size: tuple[int, int], chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(n, C, h, w) logits of images of one original ``size`` (H, W) -> (n, H, W) class ids.

    The same as ``segmentation_prediction(interpolate(logits, size))``; where ``n x C x H x W``
    passes ``chunk_elements``, computed in pieces (see the module docstring)."""
    logits = logits.float().contiguous()  # fp32, and the contiguous layout of the reference
    n, classes = logits.shape[:2]
    pixels = size[0] * size[1]
    if n * classes * pixels <= chunk_elements or (n == 1 and classes == 1):
        return segmentation_prediction(_up(logits, size))
    if n > 1:
        per = max(1, chunk_elements // (classes * pixels))
        return torch.cat([predict_masks(logits[i:i + per], size, chunk_elements) for i in range(0, n, per)])
    per = max(1, chunk_elements // pixels)
    best = ids = None
    for start in range(0, classes, per):
        values, index = _up(logits[:, start:start + per], size).max(dim=1)  # the first maximum, as argmax
        if best is None:
            best, ids = values, index
        else:
            better = values > best  # strictly: a tie keeps the lower class id
            best = torch.where(better, values, best)
            ids = torch.where(better, index + start, ids)
    return ids


def crop_box(inp: ImageInput, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Where the eval transform's crop lies: (resized height, resized width, crop top, crop
    left), as torchvision's ``resize([resize])`` and ``center_crop`` compute them; None when
    the input resizes straight to size x size (``resize`` None)."""
    if inp.resize is None:
        return None
    if width <= height:
        new_w, new_h = inp.resize, int(inp.resize * height / width)
    else:
        new_h, new_w = inp.resize, int(inp.resize * width / height)
    return new_h, new_w, int(round((new_h - inp.size) / 2.0)), int(round((new_w - inp.size) / 2.0))


def predict_masks_through_crop(logits: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int],
                               chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """(n, C, s, s) logits of center crops (see :func:`crop_box`) -> (n, H, W) class ids of the
    whole images: each original pixel centre mapped through the resize and the crop, sampled
    bilinearly, clamped to the crop's edge outside it. Output pixels are independent, so the
    rows go in bands of at most ``chunk_elements`` logits."""
    logits = logits.float().contiguous()
    n, classes, s = logits.shape[0], logits.shape[1], logits.shape[-1]
    (height, width), (new_h, new_w, top, left) = size, box
    dtype = torch.float64
    # grid_sample's normalised coordinates (align_corners=False): -1 and 1 are the crop's outer edges
    ys = ((torch.arange(height, dtype=dtype) + 0.5) * (new_h / height) - top) / s * 2 - 1
    xs = ((torch.arange(width, dtype=dtype) + 0.5) * (new_w / width) - left) / s * 2 - 1
    ids = torch.empty((n, height, width), dtype=torch.long, device=logits.device)
    band = max(1, chunk_elements // max(1, classes * width))
    for i in range(n):
        for y0 in range(0, height, band):
            rows = ys[y0:y0 + band]
            grid = torch.stack(torch.broadcast_tensors(xs[None, :], rows[:, None]), dim=-1)
            grid = grid.to(device=logits.device, dtype=logits.dtype)[None]
            sampled = F.grid_sample(logits[i:i + 1], grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)
            ids[i, y0:y0 + len(rows)] = segmentation_prediction(sampled)[0]
    return ids


def masks_and_counts(logits: torch.Tensor, sizes: Sequence[tuple[int, int]], num_classes: int,
                     inp: ImageInput | None = None,
                     chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[torch.Tensor, list[int]]]:
    """Per image (logits row i, original size ``sizes[i]``): its (H, W) uint8 mask on the CPU
    and the pixel count of each class id (``max(num_classes, 2)`` counts: a binary mask has 0 and 1).
    ``inp``: the spec's image input (None: resized straight to the model's size).

    Images of one size are decided together; masks cross from the device as uint8."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    out: list = [None] * len(sizes)
    bins = max(num_classes, 2)
    for size, indices in groups.items():
        index = torch.tensor(indices, device=logits.device)
        box = crop_box(inp, *size) if inp is not None else None
        if box is None:
            ids = predict_masks(logits.index_select(0, index), size, chunk_elements)
        else:
            ids = predict_masks_through_crop(logits.index_select(0, index), size, box, chunk_elements)
        counts = torch.stack([torch.bincount(m.reshape(-1), minlength=bins) for m in ids]).cpu().tolist()
        masks = ids.to(torch.uint8).cpu()
        for j, i in enumerate(indices):
            out[i] = (masks[j], counts[j])
    return out


def answer(predictor, parsed, logits: torch.Tensor, outputs: list) -> None:
    """Fill ``outputs`` (one dict per parsed request) with the masks of its images."""
    labels = predictor.labels
    sizes = [tuple(item.shape[-2:]) for _, req in parsed for item in req.items]
    decided = masks_and_counts(logits, sizes, predictor.spec.num_classes, predictor.spec.input)
    binary = predictor.spec.num_classes == 1
    row = 0
    for i, req in parsed:
        predictions = []
        for key, index in req.names:
            mask, counts = decided[row]
            height, width = mask.shape
            total = height * width
            fractions = [counts[1] / total] if binary else [c / total for c in counts]
            predictions.append({
                "input": key, "item": index, "width": width, "height": height,
                "mask": base64.b64encode(maskpng.encode(mask.numpy())).decode("ascii"),
                "class_fraction": dict(zip(labels, fractions)),
                "labels": list(labels),
            })
            row += 1
        outputs[i] = {"model": predictor.name, "version": predictor.version, "predictions": predictions}
