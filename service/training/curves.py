"""TensorBoard curves of a run: event files in ``<run dir>/tensorboard/``.

``events.jsonl`` stays the machine-readable log of a run; these files are for looking at
it (``tensorboard --logdir <runs dir>``: one run per directory). Per epoch, at global step =
the epoch number: ``train/loss``, ``val/loss``, ``val/<metric>``, ``lr`` and
``samples_per_s``, the values of the epoch's record in events.jsonl; for a segmentation
model, also ``val/segmentation``: one picture of a few fixed validation images, one per
row as [image | true mask | predicted mask], class ids colour-mapped.

Only the main rank writes, and every epoch is flushed before the next one starts. A
resumed run appends a new event file to the same directory with ``purge_step`` = the
checkpoint's epoch: TensorBoard then drops what earlier files hold from that step on, and
the recipe writes that epoch again from the checkpoint's history, so a kill between the
checkpoint and the flush loses no point and none is doubled.

A writer that fails (a full disk, a read-only directory) must not cost the run: the
first error is logged as one warning, and the run goes on without curves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger("service.training")

TENSORBOARD_DIR = "tensorboard"
#: validation images shown for a segmentation model, spread evenly over the validation split
SEGMENTATION_IMAGES = 4
#: an epoch record's key -> its scalar tag ("{metric}": the task's metric name)
SCALARS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_metric": "val/{metric}", "lr": "lr",
           "samples_per_s": "samples_per_s"}
IMAGES_TAG = "val/segmentation"


def palette(num_colours: int = 256) -> torch.Tensor:
    """(num_colours, 3) uint8 colours of class ids: the PASCAL VOC palette (0 is black, the
    background; neighbouring ids get clearly different colours)."""
    ids = torch.arange(num_colours)
    out = torch.zeros(num_colours, 3, dtype=torch.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            out[:, channel] |= ((ids >> (3 * (7 - shift) + channel)) & 1) << shift
    return out.to(torch.uint8)


_PALETTE = palette()


def colour_mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) class ids -> (3, H, W) float colours in [0, 1]."""
    return _PALETTE[mask.long().clamp(0, len(_PALETTE) - 1)].permute(2, 0, 1).float() / 255.0


def _displayable(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A model input (C, H, W) as a (3, h, w) picture in [0, 1]: the first three channels (one
    repeated), stretched to its own range (the inputs are normalised), at the mask's size."""
    image = image.float()
    image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    if tuple(image.shape[-2:]) != tuple(size):
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def segmentation_panels(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """One (3, N*H, 3W) picture in [0, 1]: a row per example, [image | true mask | predicted
    mask], from model inputs (N, C, H', W') and class-id masks (N, H, W)."""
    rows = []
    for image, t, p in zip(images, truth, predicted, strict=True):
        size = tuple(t.shape[-2:])
        rows.append(torch.cat([_displayable(image, size), colour_mask(t), colour_mask(p)], dim=2))
    return torch.cat(rows, dim=1)


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread keeps its error for the writer's next call (where
    :class:`Curves` reports it as its one warning), then re-raises it, and Python would print
    that traceback too. Drop exactly those threads' reports; any other thread's go on to the
    hook that was there."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard: its report stays
        return
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard_writers", False):
        return

    def hook(args) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.quiet_tensorboard_writers = True
    threading.excepthook = hook


class Curves:
    """The run's TensorBoard writer, or nothing: every call is a no-op once a write failed
    (or when ``enabled`` is false: the ranks that are not the main one)."""

    def __init__(self, log_dir: Path, *, enabled: bool = True, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self._writer = None
        self._failed = False
        if enabled:
            self._call("open", lambda: self._open(purge_step))

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported on use: no cost to the rest

        _quiet_writer_threads()
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step or None)

    @property
    def active(self) -> bool:
        return self._writer is not None and not self._failed

    def _call(self, what: str, write: Callable[[], None]) -> bool:
        if self._failed:
            return False
        try:
            write()
            return True
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the run
            self._failed = True
            logger.warning("TensorBoard curves in %s stopped (%s: %s: %s); the run goes on without them, "
                           "events.jsonl keeps every epoch", self.log_dir, what, type(exc).__name__, exc)
            self._close_quietly()
            return False

    def epoch(self, record: dict) -> bool:
        """The scalars of one epoch record (events.jsonl's), at step = its epoch; flushed."""
        if not self.active:
            return False
        step = int(record["epoch"])

        def write() -> None:
            for key, tag in SCALARS.items():
                value = record.get(key)
                if value is not None:
                    self._writer.add_scalar(tag.format(metric=record.get("metric") or "metric"), float(value), step)
            self._writer.flush()

        return self._call(f"epoch {step}", write)

    def image(self, tag: str, picture: torch.Tensor, step: int) -> bool:
        """A (3, H, W) picture in [0, 1] under ``tag`` at ``step``; flushed."""
        if not self.active:
            return False

        def write() -> None:
            self._writer.add_image(tag, picture.clamp(0, 1), step, dataformats="CHW")
            self._writer.flush()

        return self._call(f"images of epoch {step}", write)

    def _close_quietly(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001, S110 - the failure was already reported
                pass

    def close(self) -> None:
        if self._writer is not None and not self._failed:
            self._call("close", self._writer.close)
        self._writer = None
