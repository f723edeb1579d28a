"""Semantic segmentation, the training side: the unet family from specs, IoU (by hand, and
all-reduced over two real processes), builtin:fashion-scenes, images/ + masks/ folders,
joint augmentation, and short runs that write real archives.

Small on purpose (tiny unets, a few hundred scenes, one epoch): the module runs in well
under a minute on 2 CPU cores. Serving segmentation models is tests/test_segmentation_serving.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.io import encode_png

from service.errors import InvalidSpec
from service.models import ModelSpec, build_model, image_eval_transform, load_model
from service.models.presets import mask_eval_transform
from service.modelstore import ModelStore
from service.training import datasets as ds
from service.training.distributed import DistContext
from service.training.recipe import evaluate, head_prefix, read_archive, run_finetune
from service.training.run_spec import Policy, RunSpec
from service.training.tasks import TASKS
from tests.helpers import free_port

pytestmark = pytest.mark.unit

SEG = TASKS["segmentation"]


def unet_spec(num_classes=3, size=32, in_channels=1, **config) -> dict:
    return {"family": "unet", "num_classes": num_classes,
            "config": {"depth": 2, "base_channels": 4, **config},
            "input": {"type": "image", "channels": in_channels, "size": size, "resize": None}}


# ---- the family ----------------------------------------------------------------------
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_unet_from_a_spec_answers_per_pixel_at_the_input_size(upsample):
    spec = ModelSpec.from_dict(unet_spec(num_classes=4, size=32, in_channels=3, depth=3, upsample=upsample))
    assert spec.task == "segmentation"  # the family's own task
    model = build_model(spec).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 4, 32, 32)
    again = load_model(ModelSpec.from_dict(spec.to_dict()), model.state_dict())
    with torch.inference_mode():
        assert torch.equal(again(x), out)
    # explicit channels per level, and a binary mask: one channel
    binary = ModelSpec.from_dict(unet_spec(num_classes=1, size=24, depth=2, channels=[3, 5], upsample=upsample))
    assert build_model(binary).eval()(torch.randn(1, 1, 24, 24)).shape == (1, 1, 24, 24)
    # a new head for other labels: the final 1x1 convolution, not a skip's
    assert head_prefix(build_model(spec)) == "head."


@pytest.mark.parametrize("change, field, words", [
    ({"config": {"depth": 3, "channels": [4, 8]}}, "config.channels", "needs 3 entries"),
    ({"config": {"depth": 3}, "input": {"type": "image", "channels": 1, "size": 30, "resize": None}},
     "input.size", "multiple of 4"),
    ({"config": {"depth": 4}, "input": {"type": "image", "channels": 1, "size": 20, "resize": None}},
     "input.size", "multiple of 8"),
    ({"task": "multiclass"}, "task", "is for segmentation"),
    ({"family": "cnn", "config": {}, "task": "segmentation"}, "task", "is for multiclass"),
    ({"config": {"upsample": "nearest"}}, "config.upsample", "nearest"),
])
def test_invalid_unet_specs_name_the_field(change, field, words, policy):
    data = {**unet_spec(), **change}
    with pytest.raises(InvalidSpec) as err:
        ModelSpec.from_dict(data)
    assert err.value.field == field and words in err.value.message
    # the same through a run spec, under "model."
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict({"model": data, "dataset": "builtin:fashion-scenes", "output": {"name": "m"}}, policy)
    assert err.value.field == f"model.{field}"


# ---- IoU -----------------------------------------------------------------------------
def logits_of(pred: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits whose argmax is ``pred`` (N, H, W)."""
    return torch.nn.functional.one_hot(pred, classes).permute(0, 3, 1, 2).float() * 5


def test_iou_by_hand_with_an_empty_class():
    truth = torch.tensor([[[0, 0, 1], [0, 1, 1], [3, 3, 0]]])
    pred = torch.tensor([[[0, 1, 1], [0, 1, 0], [3, 0, 0]]])
    task = SEG.sized(4)
    sums = task.stats(logits_of(pred, 4), truth)
    assert task.num_stats == 8 and sums.tolist() == [3, 2, 0, 1, 6, 4, 0, 2]  # intersections, then unions
    iou = task.details(sums)["per_class_iou"]
    assert iou[:2] == [0.5, 0.5] and iou[3] == 0.5
    assert iou[2] is None  # class 2 is in neither truth nor prediction: no IoU...
    assert task.metric(sums) == pytest.approx(0.5)  # ...and it does not drag the mean down
    # sums add over batches: two halves give the whole
    halves = task.stats(logits_of(pred[:, :2], 4), truth[:, :2]) + task.stats(logits_of(pred[:, 2:], 4), truth[:, 2:])
    assert torch.equal(halves, sums)
    # a class predicted but absent from the truth counts (IoU 0)
    sums = task.stats(logits_of(torch.full((1, 2, 2), 2), 4), torch.zeros(1, 2, 2, dtype=torch.long))
    assert task.details(sums)["per_class_iou"] == [0.0, None, 0.0, None] and task.metric(sums) == 0.0
    # the loss is per-pixel cross-entropy
    loss = task.criterion(0.0)(logits_of(pred, 4), truth)
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits_of(pred, 4), truth)))


def test_binary_mask_iou_thresholds_the_sigmoid_with_torch_ge():
    task = SEG.sized(1)
    truth = torch.tensor([[[1, 1, 0, 0]]])
    logits = torch.tensor([[[[0.0, 3.0, -0.1, 2.0]]]])  # sigmoid(0) == 0.5: foreground (torch.ge)
    sums = task.stats(logits, truth)
    assert sums.tolist() == [2, 3]  # pixels 0, 1 right; pixel 3 a false positive
    assert task.details(sums)["per_class_iou"] == [pytest.approx(2 / 3)] and task.metric(sums) == pytest.approx(2 / 3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], truth.float())
    assert float(task.criterion(0.0)(logits, truth)) == pytest.approx(float(bce))


def _ddp_set() -> tuple[torch.nn.Module, list]:
    """The same model and validation set in every process (seeded)."""
    torch.manual_seed(0)
    spec = ModelSpec.from_dict(unet_spec(num_classes=3, size=16))
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(11, 1, 16, 16, generator=g)
    masks = torch.randint(0, 3, (11, 16, 16), generator=g)
    return model, [((images[i],), masks[i]) for i in range(len(masks))]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world, rank, torch.device("cpu"), True)
        model, data = _ddp_set()
        shard = Subset(data, range(rank, len(data), world))  # as the recipe shards validation
        task = SEG.sized(3)
        val = evaluate(model, task.criterion(0.0), DataLoader(shard, batch_size=2, collate_fn=ds.image_collate),
                       torch.device("cpu"), task, ctx.all_reduce_sum)
        Path(out_dir, f"{rank}.json").write_text(json.dumps({**val, "shard": len(shard)}))
    finally:
        torch.distributed.destroy_process_group()


def test_iou_all_reduced_over_two_processes_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    model, data = _ddp_set()
    task = SEG.sized(3)
    whole = evaluate(model, task.criterion(0.0), DataLoader(data, batch_size=4, collate_fn=ds.image_collate),
                     torch.device("cpu"), task)
    assert [r["shard"] for r in results] == [6, 5]
    for r in results:  # every rank holds the whole set's figures
        assert r["count"] == whole["count"] == 11
        assert r["metric"] == whole["metric"]  # from integer pixel counts: exactly
        assert r["details"] == whole["details"]
        assert r["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert 0 < whole["metric"] < 1 and len(whole["details"]["per_class_iou"]) == 3


# ---- builtin:fashion-scenes ---------------------------------------------------------
def test_scene_pixels_later_items_cover_earlier_ones_and_faint_pixels_stay_background():
    items = np.zeros((2, 4, 4), np.uint8)
    items[0] = 200
    items[0, 0, 0] = 25  # not above the threshold: not the item's
    items[0, 0, 1] = 26  # just above it
    items[1, :2, :2] = 100  # item 1 shows only its top-left 2x2 block
    classes = np.array([3, 7])
    count = np.array([2, 1])
    pick = np.array([[0, 1], [1, 0]])
    top = np.array([[0, 2], [4, 0]])
    left = np.array([[0, 2], [1, 0]])
    images, masks = ds.paste_scenes(items, classes, count, pick, top, left, size=8, threshold=25)
    want_img = np.zeros((8, 8), np.uint8)
    want_img[:4, :4] = 200
    want_img[0, 0] = 0
    want_img[0, 1] = 26
    want_img[2:4, 2:4] = 100  # the later item's visible pixels overwrite the earlier one's
    want_mask = np.where(want_img > 0, 4, 0)
    want_mask[2:4, 2:4] = 8  # class + 1
    assert np.array_equal(images[0], want_img) and np.array_equal(masks[0], want_mask)
    # scene 1 has one item (slot 1 is not pasted): item 1 at (4, 1)
    want = np.zeros((8, 8), np.uint8)
    want[4:6, 1:3] = 100
    assert np.array_equal(images[1], want) and np.array_equal(masks[1], np.where(want > 0, 8, 0))


def test_fashion_scenes_are_deterministic_fast_and_labelled_where_the_items_show():
    start = time.perf_counter()
    raw = ds.load_raw("builtin", "fashion-scenes", ds.LoadContext(None, "segmentation"))
    assert time.perf_counter() - start < 20  # about 1 s, reading Fashion-MNIST included
    again = ds.load_raw("builtin", "fashion-scenes", ds.LoadContext(None, "segmentation"))
    splits = {"train": (raw.x, raw.y), "test": (raw.x_val, raw.y_val)}
    assert ds.digest(raw.kind, raw.labels, splits) == ds.digest(again.kind, again.labels,
                                                                {"train": (again.x, again.y), "test": (again.x_val, again.y_val)})
    assert raw.x.shape == (20_000, 1, 64, 64) and raw.y.shape == (20_000, 64, 64) and raw.y.dtype == np.uint8
    assert raw.x_val.shape == (2_000, 1, 64, 64) and raw.tasks == ("segmentation",)
    assert raw.labels == ["background", *ds.FASHION_MNIST_LABELS] and len(raw.labels) == 11
    for x, y in splits.values():
        image = x[:, 0].numpy()
        assert np.array_equal(image > ds.SCENE_THRESHOLD, y > 0)  # a labelled pixel is an item's visible pixel
        assert not image[y == 0].any()
        assert int(y.max()) == 10
    # 1 to 3 items a scene: at least one labelled pixel in each
    assert (raw.y.reshape(len(raw.y), -1).max(axis=1) > 0).all()
    # the generation is vectorised: 22,000 scenes well within a few seconds
    fashion = ds.load_fashion_mnist(None)
    start = time.perf_counter()
    ds.compose_scenes(fashion.x[:, 0].numpy(), fashion.y, 22_000, [ds.SCENE_SEED, 0])
    assert time.perf_counter() - start < 10
    assert raw.info["generator"]["seed"] == ds.SCENE_SEED


def test_fashion_scenes_train_from_the_train_split_test_from_the_test_split(monkeypatch):
    """With stand-in Fashion-MNIST splits told apart by intensity and class, every train
    scene holds train items only, every test scene test items only."""
    train = torch.full((50, 1, 28, 28), 100, dtype=torch.uint8)
    test = torch.full((20, 1, 28, 28), 200, dtype=torch.uint8)
    fake = ds.RawData(ds.IMAGES, train, np.zeros(50, np.int64), list(ds.FASHION_MNIST_LABELS),
                      x_val=test, y_val=np.full(20, 9, np.int64))
    monkeypatch.setattr(ds, "load_fashion_mnist", lambda ctx: fake)
    monkeypatch.setattr(ds, "SCENE_COUNTS", {"train": 300, "test": 40})
    raw = ds.load_fashion_scenes(ds.LoadContext(None, "segmentation"))
    assert set(np.unique(raw.x.numpy())) == {0, 100} and set(np.unique(raw.y)) == {0, 1}
    assert set(np.unique(raw.x_val.numpy())) == {0, 200} and set(np.unique(raw.y_val)) == {0, 10}
    assert len(raw.y) == 300 and len(raw.y_val) == 40


# ---- transforms and joint augmentation ---------------------------------------------
def test_joint_augmentation_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (1, 24, 20), generator=g, dtype=torch.uint8)
    image = torch.cat([mask * 50 + 5, mask * 10 + 1])  # two channels, both nonzero everywhere
    augment = ds.AUGMENTS["crop_flip"]
    torch.manual_seed(0)
    moved = 0
    for _ in range(40):
        img, msk = augment.joint(image, mask)
        assert img.shape == image.shape and msk.shape == mask.shape
        padding = img[0] == 0  # the shift's zero padding: background in the mask
        assert torch.equal(msk[0][padding], torch.zeros_like(msk[0][padding]))
        assert torch.equal(img[0][~padding], msk[0][~padding] * 50 + 5)
        assert torch.equal(img[1][~padding], msk[0][~padding] * 10 + 1)
        moved += bool(padding.any())
    assert moved > 20
    # the plain call keeps its draws: an image alone gets what joint() gives the pair
    torch.manual_seed(5)
    alone = augment(image)
    torch.manual_seed(5)
    assert torch.equal(alone, augment.joint(image, mask)[0])


@pytest.mark.parametrize("size, resize", [(32, None), (24, 32)])
def test_the_mask_takes_the_image_geometry_with_nearest_neighbours(size, resize):
    inp = ModelSpec.from_dict({**unet_spec(size=size), "input": {"type": "image", "channels": 1, "size": size,
                                                                 "resize": resize, "mean": [0.0], "std": [1.0]}}).input
    blocks = torch.randint(0, 5, (1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    mask = blocks.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 64x64 of 8x8 blocks
    out_mask = mask_eval_transform(inp)(mask)
    assert out_mask.shape == (1, size, size) and out_mask.dtype == torch.uint8
    # halved by nearest neighbours at pixel centres (NEAREST_EXACT), then center-cropped
    crop = (32 - size) // 2
    assert torch.equal(out_mask, mask[:, 1::2, 1::2][:, crop:crop + size, crop:crop + size])
    # the image's bilinear resize puts the same block on the same pixels: inside each block
    # (away from its edges, where bilinear blends neighbours, some cropped away) the image
    # shows its label
    out_image = image_eval_transform(inp)(mask * 40)
    window = torch.nn.functional.max_pool2d(out_mask.float(), 3, 1, 1) == -torch.nn.functional.max_pool2d(
        -out_mask.float(), 3, 1, 1)
    window[:, [0, -1], :] = window[:, :, [0, -1]] = False
    assert window.float().mean() > 0.3
    assert torch.allclose((out_image * 255)[window], out_mask.float()[window] * 40, atol=1e-3)


def test_a_training_item_is_the_augmented_image_with_its_mask():
    g = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 3, (4, 16, 16), generator=g, dtype=torch.uint8)
    images = (masks * 80 + 10).unsqueeze(1)
    inp = ModelSpec.from_dict(unet_spec(size=16)).input
    data = ds.SegmentationDataset(images, masks, 1, image_eval_transform(inp), mask_eval_transform(inp),
                                  ds.AUGMENTS["crop_flip"])
    torch.manual_seed(0)
    batch = ds.image_collate([data[i] for i in range(4)])
    (x,), y = batch
    assert x.shape == (4, 1, 16, 16) and y.shape == (4, 16, 16) and y.dtype == torch.long
    pixels = torch.round((x[:, 0] * 0.5 + 0.5) * 255)
    assert torch.equal(pixels[y > 0], (y[y > 0] * 80 + 10).float())
    assert set(pixels[y == 0].unique().tolist()) <= {0.0, 10.0}  # padding or class 0


# ---- images/ + masks/ folders -------------------------------------------------------
def png(array: np.ndarray) -> bytes:
    t = torch.from_numpy(np.ascontiguousarray(array))
    return encode_png(t if t.dim() == 3 else t.unsqueeze(0)).numpy().tobytes()


def write_masks_folder(folder: Path, n: int = 12, size: int = 16, labels=None, seed: int = 0,
                       classes: int = 2) -> None:
    """``n`` gray images of squares (class ids 1..classes) on a dark background, with masks."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for cls in range(1, classes + 1):
            top, left = rng.integers(0, size - 6, 2)
            mask[top:top + 6, left:left + 6] = cls
        image = np.where(mask > 0, 150 + 40 * mask, 20).astype(np.uint8) + rng.integers(0, 10, mask.shape, np.uint8)
        (folder / "images" / f"s{i:02d}.png").write_bytes(png(image))
        (folder / "masks" / f"s{i:02d}.png").write_bytes(png(mask))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))


def load_folder(folder: Path, roots: Path) -> ds.RawData:
    return ds.load_raw("masks", None, ds.LoadContext(folder, "segmentation", (roots.resolve(),)))


def test_masks_folder_layouts_labels_and_palette_masks(roots, policy):
    # flat, without labels.json: background, class_1, ... up to the largest id
    write_masks_folder(roots / "flat", n=3)
    raw = load_folder(roots / "flat", roots)
    assert raw.kind == ds.IMAGE_FILES and raw.tasks == ("segmentation",) and raw.x_val is None
    assert raw.labels == ["background", "class_1", "class_2"] and [p.name for p in raw.y] == ["s00.png", "s01.png",
                                                                                               "s02.png"]
    assert RunSpec.from_dict({"model": unet_spec(size=16), "dataset": "flat", "output": {"name": "m"}},
                             policy).dataset_kind == "masks"
    (roots / "classes" / "cat").mkdir(parents=True)  # an ImageFolder stays classification
    assert RunSpec.from_dict({"model": unet_spec(size=16), "dataset": "classes", "output": {"name": "m"}},
                             policy).dataset_kind == "imagefolder"
    # train/ + val/ with labels.json at the root, a palette mask, a JPEG image
    write_masks_folder(roots / "split" / "train", n=4, seed=1)
    write_masks_folder(roots / "split" / "val", n=2, seed=2)
    (roots / "split" / "labels.json").write_text(json.dumps(["background", "a", "b", "c"]))
    palette = Image.fromarray(np.array([[0, 3] * 8] * 16, np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(roots / "split" / "val" / "masks" / "s01.png")
    Image.open(roots / "split" / "val" / "images" / "s01.png").save(roots / "split" / "val" / "images" / "s01.jpg")
    (roots / "split" / "val" / "images" / "s01.png").unlink()
    raw = load_folder(roots / "split", roots)
    assert raw.labels == ["background", "a", "b", "c"] and len(raw.y) == 4 and len(raw.y_val) == 2
    assert raw.x_val[1].name == "s01.jpg"
    assert ds.read_mask(raw.y_val[1])[0, :4].tolist() == [0, 3, 0, 3]  # palette indices are the ids


@pytest.mark.parametrize("breakage, words", [
    ("id", "has class id 3, but"),
    ("missing", "has no mask"),
    ("size", "is 16x12, its image"),
    ("rgb", "colour type 2"),
    ("not-png", "not a PNG"),
    ("corrupt", "CRC mismatch"),
    ("outside", "outside the data roots"),
    ("labels", "list of distinct label names"),
    ("labels-size", "over 1048576 bytes"),
    ("binary", "binary mask of 0 and 1"),
])
def test_bad_masks_folders_are_clear_errors(breakage, words, tmp_path, roots):
    folder = roots / "bad"
    write_masks_folder(folder, n=3, labels=["background", "a", "b"])
    masks = folder / "masks"
    if breakage == "id":
        mask = np.zeros((16, 16), np.uint8)
        mask[5, 5] = 3
        (masks / "s01.png").write_bytes(png(mask))
    elif breakage == "missing":
        (masks / "s02.png").unlink()
    elif breakage == "size":
        (masks / "s00.png").write_bytes(png(np.zeros((12, 16), np.uint8)))
    elif breakage == "rgb":
        (masks / "s00.png").write_bytes(png(np.zeros((3, 16, 16), np.uint8)))
    elif breakage == "not-png":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / "s00.png", format="JPEG")
    elif breakage == "corrupt":
        data = bytearray((masks / "s00.png").read_bytes())
        data[-20] ^= 0xFF  # inside the image data: its chunk's CRC no longer fits
        (masks / "s00.png").write_bytes(bytes(data))
    elif breakage == "outside":
        outside = tmp_path / "outside.png"
        outside.write_bytes((masks / "s00.png").read_bytes())
        (masks / "s00.png").unlink()
        (masks / "s00.png").symlink_to(outside)
    elif breakage == "labels":
        (folder / "labels.json").write_text(json.dumps(["background", "a", "a"]))
    elif breakage == "labels-size":
        (folder / "labels.json").write_text(json.dumps(["background", "a" * ds.MAX_LABELS_FILE_BYTES]))
    elif breakage == "binary":
        (folder / "labels.json").write_text(json.dumps(["thing"]))  # one label: ids 0 and 1 only
    with pytest.raises(InvalidSpec) as err:
        load_folder(folder, roots)
    assert err.value.field == "dataset.source" and words in err.value.message
    if breakage in ("id", "size", "rgb", "not-png", "corrupt", "outside"):
        assert "s00.png" in err.value.message or "s01.png" in err.value.message  # names the file


def test_classification_data_and_segmentation_models_do_not_mix(roots, policy, tmp_path):
    (roots / "classes" / "cat").mkdir(parents=True)
    (roots / "classes" / "cat" / "a.png").write_bytes(png(np.zeros((16, 16), np.uint8)))
    (roots / "classes" / "dog").mkdir(parents=True)
    (roots / "classes" / "dog" / "a.png").write_bytes(png(np.zeros((16, 16), np.uint8)))
    unet = {k: v for k, v in unet_spec(size=16).items() if k != "num_classes"}  # from the data
    spec = {"model": unet, "dataset": "classes", "output": {"name": "m"}, "hyperparameters": {"epochs": 1}}
    with pytest.raises(InvalidSpec, match="needs a mask per image") as err:
        run_finetune(RunSpec.from_dict(spec, policy), tmp_path / "r1", tmp_path / "store", policy)
    assert err.value.field == "model"
    write_masks_folder(roots / "seg", n=4)
    cnn = {"family": "cnn", "config": {"channels": [4]},
           "input": {"type": "image", "channels": 1, "size": 16, "resize": None}}
    for source in ("seg", "builtin:fashion-scenes"):
        spec = {"model": cnn, "dataset": source, "output": {"name": "m"}, "hyperparameters": {"epochs": 1}}
        with pytest.raises(InvalidSpec, match="use a segmentation family") as err:
            run_finetune(RunSpec.from_dict(spec, policy), tmp_path / f"r-{source[-5:]}", tmp_path / "store", policy)
        assert err.value.field == "model"


# ---- short runs that write archives -------------------------------------------------
def prepared_again(spec: dict, policy: Policy, model_spec: ModelSpec) -> ds.PreparedData:
    rs = RunSpec.from_dict(spec, policy)
    raw = ds.load_raw(rs.dataset_kind, rs.builtin_name, ds.LoadContext(rs.dataset_path, "segmentation",
                                                                        policy.data_roots))
    return ds.prepare(raw, name=rs.dataset.source, spec=model_spec, task="segmentation", hp=rs.hp,
                      train_size=rs.dataset.train_size, val_size=rs.dataset.val_size,
                      test_size=rs.dataset.test_size)


def check_archive(outcome, spec: dict, policy: Policy, labels: list[str], num_classes: int) -> None:
    assert outcome.status == "finished"
    store = ModelStore(outcome.archive.path.parent.parent)
    info = store.get(spec["output"]["name"], outcome.archive.version)
    bundle = read_archive(info)
    assert bundle.spec.family == "unet" and bundle.spec.task == "segmentation"
    assert bundle.spec.num_classes == num_classes and bundle.labels == labels
    lineage = store.lineage(info.name, info.version)
    prepared = prepared_again(spec, policy, bundle.spec)
    assert lineage["dataset"]["sha256"] == prepared.sha256  # the digest covers images and masks
    metrics = lineage["metrics"]
    assert metrics["metric"] == "mean_iou" and 0.0 <= metrics["val_metric"] <= 1.0
    per_class = metrics["per_class_iou"]
    assert len(per_class) == num_classes and all(v is None or 0.0 <= v <= 1.0 for v in per_class)
    present = [v for v in per_class if v is not None]
    assert metrics["val_metric"] == pytest.approx(sum(present) / len(present))
    events = [json.loads(line) for line in (outcome.run_dir / "events.jsonl").read_text().splitlines()]
    assert [len(e["per_class_iou"]) for e in events if e["event"] == "epoch"] == [num_classes] * outcome.epochs
    # the archived weights answer the validation set as the metrics say
    model = load_model(bundle.spec, bundle.state_dict)
    task = SEG.sized(num_classes)
    val = evaluate(model, task.criterion(0.0), DataLoader(prepared.val, batch_size=16, collate_fn=prepared.collate),
                   torch.device("cpu"), task)
    assert val["metric"] == pytest.approx(metrics["val_metric"], abs=1e-9)


def test_short_run_on_fashion_scenes_writes_an_archive_with_iou(tmp_path, policy):
    spec = {"model": {"family": "unet", "config": {"depth": 2, "base_channels": 8},
                      "input": {"type": "image", "channels": 1, "size": 32, "resize": None}},
            "dataset": {"source": "builtin:fashion-scenes", "train_size": 200, "val_size": 60, "test_size": 60},
            "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 0.01}, "output": {"name": "scenes"}}
    outcome = run_finetune(RunSpec.from_dict(spec, policy), tmp_path / "run", tmp_path / "store", policy)
    check_archive(outcome, spec, policy, ["background", *ds.FASHION_MNIST_LABELS], 11)
    dataset = outcome.archive.lineage["dataset"]
    assert dataset["train_size"] == 200 and dataset["val_size"] == 60 and dataset["generator"]["seed"] == ds.SCENE_SEED


def test_short_run_on_a_binary_masks_folder_trains_one_channel(tmp_path, roots, policy):
    write_masks_folder(roots / "spots", n=12, labels=["spot"], classes=1)
    spec = {"model": {"family": "unet", "config": {"depth": 2, "base_channels": 8, "upsample": "bilinear"},
                      "input": {"type": "image", "channels": 1, "size": 16, "resize": None}},
            "dataset": "spots", "hyperparameters": {"epochs": 2, "batch_size": 4, "lr": 0.01},
            "output": {"name": "spots"}}
    outcome = run_finetune(RunSpec.from_dict(spec, policy), tmp_path / "run", tmp_path / "store", policy)
    check_archive(outcome, spec, policy, ["spot"], 1)
    assert outcome.archive.lineage["dataset"]["kind"] == ds.IMAGE_FILES
    # the digest reads the mask files: another mask, another digest
    before = outcome.archive.lineage["dataset"]["sha256"]
    mask = np.asarray(Image.open(roots / "spots" / "masks" / "s00.png")).copy()
    mask[0, 0] = 1 - mask[0, 0]
    (roots / "spots" / "masks" / "s00.png").write_bytes(png(mask))
    assert prepared_again(spec, policy, read_archive(outcome.archive).spec).sha256 != before
    assert not math.isnan(outcome.metrics["val_metric"]) and os.path.exists(outcome.archive.path)
