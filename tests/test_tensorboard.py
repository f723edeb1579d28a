"""The trainer's TensorBoard curves (service/training/curves.py), read back with TensorBoard's
own reader: one scalar per tag and epoch equal to events.jsonl's epoch records, steps that
stay right across a resume, segmentation images, and a writer that fails without costing the run.

Runs are tiny (a small CNN, a few hundred digits, 1-2 epochs)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_png
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from service.modelstore import ModelStore
from service.training import datasets as ds
from service.training.curves import (
    IMAGES_TAG,
    SEGMENTATION_IMAGES,
    TENSORBOARD_DIR,
    Curves,
    colour_mask,
    palette,
)
from service.rundir import EVENTS_FILE
from service.training.recipe import StopRequest, run_finetune
from service.training.run_spec import Policy, RunSpec

pytestmark = pytest.mark.unit

CNN = {"family": "cnn", "config": {"channels": [8, 16]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}
DIGITS = {"source": "builtin:digits", "train_size": 120, "val_size": 40, "test_size": 40}
TAGS = {"train/loss": "train_loss", "val/loss": "val_loss", "val/accuracy": "val_metric", "lr": "lr",
        "samples_per_s": "samples_per_s"}


def spec(epochs: int = 2, **extra) -> dict:
    return {"model": CNN, "dataset": DIGITS, "output": {"name": "tb"},
            "hyperparameters": {"epochs": epochs, "batch_size": 32, "lr": 0.003, **extra}}


def run(spec_dict: dict, tmp_path: Path, policy: Policy, stop: StopRequest | None = None):
    return run_finetune(RunSpec.from_dict(spec_dict, policy), tmp_path / "run", tmp_path / "store", policy, stop)


def epoch_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / EVENTS_FILE).read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "epoch"]


def curves(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def assert_scalars_match(acc: EventAccumulator, records: list[dict]) -> None:
    assert set(TAGS) <= set(acc.Tags()["scalars"]), acc.Tags()
    for tag, key in TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["epoch"] for r in records], tag
        for event, record in zip(events, records, strict=True):  # TensorBoard keeps float32
            assert event.value == pytest.approx(record[key], rel=1e-6, abs=1e-12), (tag, record["epoch"])


def test_a_run_writes_one_point_per_epoch_and_tag_equal_to_its_epoch_records(tmp_path, policy):
    out = run(spec(), tmp_path, policy)
    assert out.status == "finished"
    records = epoch_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    files = list((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 1
    assert_scalars_match(curves(tmp_path / "run"), records)


class StopAfterFirstEpoch(StopRequest):
    """Asks to stop once events.jsonl holds an epoch line: the recipe stops after epoch 1,
    at its safe point, with the checkpoint of epoch 1 written."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    @property
    def requested(self) -> bool:
        return self.signum is not None or bool(
            (self.run_dir / EVENTS_FILE).is_file() and epoch_records(self.run_dir))


def test_a_resumed_run_appends_to_the_same_directory_at_the_right_steps(tmp_path, policy):
    first = run(spec(), tmp_path, policy, StopAfterFirstEpoch(tmp_path / "run"))
    assert first.status == "stopped" and first.epochs == 1
    assert [e.step for e in curves(tmp_path / "run").Scalars("train/loss")] == [1]

    second = run(spec(), tmp_path, policy)
    assert second.status == "finished" and second.metrics["epochs_run"] == 2
    records = epoch_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    files = list((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 2  # appended: the first attempt's file is kept
    assert_scalars_match(curves(tmp_path / "run"), records)


class FillTheDiskAfterTheFirstBatch(StopRequest):
    """Never asks to stop; after the first training batch it swaps the run's event file for
    a link to /dev/full, so the writer's next write fails with a real ENOSPC."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir
        self.swapped: list[Path] = []

    @property
    def requested(self) -> bool:
        if not self.swapped:
            for path in (self.run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
                path.unlink()
                path.symlink_to("/dev/full")
                self.swapped.append(path)
        return False


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_the_curves_is_one_warning_and_the_run_goes_on(tmp_path, policy, caplog):
    stop = FillTheDiskAfterTheFirstBatch(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="service.training"):
        out = run(spec(), tmp_path, policy, stop)
    assert stop.swapped, "the event file was never swapped"
    assert out.status == "finished" and out.archive is not None
    assert ModelStore(tmp_path / "store").versions("tb") == [1]
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1, 2]
    warnings = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, [r.getMessage() for r in warnings]
    assert "No space left on device" in warnings[0].getMessage()


def test_a_writer_that_cannot_open_its_directory_is_one_warning(tmp_path, caplog):
    blocked = tmp_path / "tensorboard"
    blocked.write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="service.training"):
        c = Curves(blocked)
        assert not c.active
        assert c.epoch({"epoch": 1, "train_loss": 1.0, "metric": "accuracy"}) is False
        c.close()
    assert len([r for r in caplog.records if "TensorBoard" in r.getMessage()]) == 1


def test_the_palette_keeps_class_ids_apart():
    colours = palette(12)
    assert colours[0].tolist() == [0, 0, 0]  # background
    assert len({tuple(c) for c in colours.tolist()}) == 12


def test_a_segmentation_run_shows_fixed_validation_images_with_true_and_predicted_masks(tmp_path, policy):
    if "fashion-scenes" not in ds.BUILTINS:
        pytest.skip("builtin:fashion-scenes is not there yet")
    size, val_size = 64, 8
    unet = {"family": "unet", "config": {"depth": 2, "base_channels": 4},
            "input": {"type": "image", "channels": 1, "size": size, "resize": None}}
    spec_dict = {"model": unet, "task": "segmentation", "output": {"name": "seg"},
                 "dataset": {"source": "builtin:fashion-scenes", "train_size": 32, "val_size": val_size,
                             "test_size": 8},
                 "hyperparameters": {"epochs": 2, "batch_size": 8, "lr": 0.01}}
    out = run(spec_dict, tmp_path, policy)
    assert out.status == "finished"
    acc = curves(tmp_path / "run")
    assert {"train/loss", "val/loss", "val/mean_iou", "lr", "samples_per_s"} <= set(acc.Tags()["scalars"])
    images = acc.Images(IMAGES_TAG)
    assert [e.step for e in images] == [1, 2]  # one picture per epoch
    rows = min(SEGMENTATION_IMAGES, val_size)
    assert all((e.width, e.height) == (3 * size, rows * size) for e in images)  # a row: [image | truth | prediction]

    # the middle third of each row is the true mask of a fixed validation example, colour-mapped
    rs = RunSpec.from_dict(spec_dict, policy)
    raw = ds.load_raw("builtin", "fashion-scenes", ds.LoadContext(None, "segmentation"))
    data = ds.prepare(raw, name=rs.dataset.source, spec=rs.model_spec(len(raw.labels)),
                      task="segmentation", hp=rs.hp, train_size=32, val_size=val_size, test_size=8)
    picks = [0, 2, 5, 7]  # spread evenly over the 8 validation examples
    for event in images:
        picture = decode_png(torch.frombuffer(bytearray(event.encoded_image_string), dtype=torch.uint8))
        for row, index in enumerate(picks):
            truth = colour_mask(data.val[index][1]) * 255
            shown = picture[:3, row * size:(row + 1) * size, size:2 * size].float()
            assert (shown - truth).abs().max() <= 1, (event.step, row)
    assert len(out.metrics["test_details"]["per_class_iou"]) == len(raw.labels)
