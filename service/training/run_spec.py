"""The run spec of a fine-tuning run, validated up front, and the policy it is checked against.

A run spec is JSON or YAML::

    base: digits-cnn:2            # a model of the store, name[:version] (latest without)
    # model: {family: cnn, ...}   # or a service.models spec; num_classes may be left out
    dataset: builtin:digits       # or {source: ..., train_size: 500, val_size: 200}
    task: multiclass              # optional; default: the model's task
    hyperparameters: {optimizer: adam, lr: 0.001, batch_size: 64, epochs: 10}
    output: {name: digits-cnn}    # version optional (default: next free); name defaults to base's

A distillation run (``task: distill``) trains the student (``base`` or ``model``, a
multiclass classifier: distill is the run's task, not the model's) against a teacher of
the store as well as the labels::

    task: distill
    teacher: digits-big:3         # name:version, the version required (see below)
    distill: {temperature: 4, alpha: 0.7}   # optional block; these are the defaults

The loss is ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (nn.KLDivLoss,
batchmean) ``+ (1 - alpha) * CE(student, labels)`` (service/training/distill.py). ``T``
(``distill.temperature``) must be a finite number > 0, ``distill.alpha`` lie in [0, 1].
``teacher`` and ``distill`` are refused without ``task: distill``. T and alpha sit in a
block of their own, not in ``hyperparameters``, so that a spec that does not distill keeps
exactly the fields (and the run directory digest) it had. The teacher's version is
required: a student is defined by its teacher, and a run resumed after a new teacher
version appeared must not switch teachers half way.

``dataset.source`` is ``builtin:<name>`` (see ``catalog.BUILTIN_DATASETS``), an ImageFolder
directory, a segmentation directory (``images/`` + ``masks/``, see
``datasets.load_masks_folder``), or a ``.npz`` / ``.jsonl`` sequence file. A path resolves (symlinks
followed, relative paths against the first data root) and must lie inside one of the
:class:`Policy`'s data roots; a path outside is refused before anything is read.

Every error is an ``InvalidSpec`` naming the dotted field, with the allowed values where
there is a list of them. The policy (data roots and bounds) is the operator's, never
the spec's: a spec cannot widen its own limits.

Validation imports no torch (the control service validates and stores specs without it):
the names a spec chooses from are :mod:`service.training.catalog`'s, the model spec is
:mod:`service.models`' (torch-free until a model is built).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import spectext
from service.bounds import (
    MAX_BATCH_SIZE,
    MAX_DATALOADER_WORKERS,
    MAX_DATASET_ELEMENTS,
    MAX_EPOCHS,
    MAX_EXAMPLES,
    MAX_NPROC,
    POLICY_FIELDS,
    check_run_bound,
    run_bounds_from_env,
)
from service.errors import InvalidSpec, NotFound, shown
from service.models import ModelSpec
from service.models._schema import Schema, check_keys, field
from service.modelstore.names import validate_model_name
from service.training.catalog import BUILTIN_DATASETS, BUILTIN_PREFIX, OPTIMIZER_NAMES, TASK_METRICS, is_masks_dir

DATA_ROOTS_ENV = "MODELCTL_DATA_ROOTS"

# This service's bounds on a run spec (service/bounds.py): the defaults of Policy, and its
# ceilings. An operator's Policy may set lower ones (MODELCTL_MAX_*); a spec never can. A
# value outside is an InvalidSpec naming the field and the allowed range.
# MAX_EXAMPLES: examples a dataset, train_size, val_size and test_size may hold; MAX_DATASET_ELEMENTS:
# the elements of a .npz's arrays, all together.
#: numpy and scikit-learn take 32-bit seeds only.
MAX_SEED = 2**32 - 1
AUGMENT_CHOICES = ("auto", "none", "crop", "crop_flip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FILE_KINDS = {".npz": "npz", ".jsonl": "jsonl"}
TOP_KEYS = ["base", "model", "dataset", "task", "teacher", "distill", "hyperparameters", "output"]
#: Run tasks that are not model tasks -> the task of the model they train (a distill run
#: trains a multiclass student).
RUN_TASKS = {"distill": "multiclass"}
DISTILL = "distill"


@dataclass(frozen=True)
class Policy:
    """Where datasets may be read from, and the bounds a run spec must stay within: the
    operator's, each at most this service's ceiling (InvalidArgument otherwise)."""

    data_roots: tuple[Path, ...] = ()
    max_epochs: int = MAX_EPOCHS
    max_batch_size: int = MAX_BATCH_SIZE
    max_nproc: int = MAX_NPROC
    max_workers: int = MAX_DATALOADER_WORKERS
    max_examples: int = MAX_EXAMPLES
    max_elements: int = MAX_DATASET_ELEMENTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_roots", tuple(Path(r).resolve() for r in self.data_roots))
        for policy_field, config_field in POLICY_FIELDS.items():
            check_run_bound(config_field, getattr(self, policy_field))

    @classmethod
    def from_env(cls, data_roots=None, environ: Mapping[str, str] | None = None, **bounds) -> Policy:
        """``data_roots`` if given, else ``$MODELCTL_DATA_ROOTS`` (os.pathsep-separated), else
        the current directory; each bound from ``bounds``, else its ``MODELCTL_MAX_*``
        variable (service/bounds.py), else the ceiling."""
        environ = os.environ if environ is None else environ
        if not data_roots:
            data_roots = [p for p in environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p] or [Path.cwd()]
        return cls(tuple(Path(r) for r in data_roots), **{**run_bounds_from_env(environ), **bounds})

    def resolve(self, raw: str, where: str) -> Path:
        """``raw`` resolved and checked to lie inside a data root; InvalidSpec naming ``where``."""
        path = Path(raw).expanduser()
        if not path.is_absolute():
            if not self.data_roots:
                raise InvalidSpec(where, "a relative path needs a data root")
            path = self.data_roots[0] / path
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self.data_roots):
            raise InvalidSpec(where, f"{raw} resolves to {resolved}, outside the data roots",
                              allowed=[str(r) for r in self.data_roots])
        return resolved


@dataclass(frozen=True)
class Hyperparameters(Schema):
    """How to train. ``batch_size`` is per process. ``monitor`` picks what ReduceLROnPlateau,
    early stopping and the best checkpoint follow: the task's val metric, or the val loss.
    ``keep``: which weights become the archive. ``token_dropout``: word dropout for
    token sequences (each id becomes <unk> with that probability). ``precision``: "auto" = fp16 AMP on CUDA,
    fp32 on CPU; "bf16" = bf16 autocast (CPU with native bf16, or CUDA). ``channels_last``: image
    models train in the NHWC memory layout (faster convolutions with bf16 on CPU and on GPU).
    ``ema_decay``: keep an exponential moving average of the weights (service/training/ema.py);
    validation, the best epoch, the test split and the archive use the average."""

    optimizer: str = field("adam", choices=OPTIMIZER_NAMES)
    lr: float = field(1e-3, gt=0)
    weight_decay: float = field(0.0, ge=0)
    momentum: float = field(0.9, ge=0, lt=1)
    batch_size: int = field(64, ge=1)
    epochs: int = field(10, ge=1)
    lr_factor: float = field(0.1, gt=0, lt=1)
    lr_patience: int = field(2, ge=0)
    early_stopping_patience: int | None = field(None, ge=1)
    max_time_s: float | None = field(None, gt=0)
    monitor: str = field("metric", choices=("metric", "loss"))
    keep: str = field("best", choices=("best", "last"))
    freeze_backbone: bool = False
    val_split: float = field(0.2, gt=0, lt=1)
    seed: int = field(0, ge=0)
    nproc: int = field(1, ge=1)
    augment: str = field("auto", choices=AUGMENT_CHOICES)
    label_smoothing: float = field(0.0, ge=0, lt=1)
    token_dropout: float = field(0.0, ge=0, lt=1)
    clip_grad_norm: float | None = field(None, gt=0)
    precision: str = field("auto", choices=PRECISIONS)
    device: str = field("auto", choices=("auto", "cpu", "cuda"))
    workers: int = field(0, ge=0)
    channels_last: bool = False
    ema_decay: float | None = field(None, gt=0, lt=1)

    def check(self, path: str) -> None:
        if self.precision == "fp16" and self.device == "cpu":
            raise InvalidSpec(f"{path}.precision", "fp16 autocast needs CUDA", allowed=["auto", "fp32", "bf16"])


@dataclass(frozen=True)
class DatasetSpec(Schema):
    """``source``: builtin:<name>, an ImageFolder directory, or a .npz / .jsonl file.
    ``train_size`` / ``val_size``: use a seeded (stratified) subset of that many examples of
    the train / validation split. ``test_size``: the same of the test split, seeded apart from
    ``hyperparameters.seed`` (every run of a dataset is tested on the same examples); see
    datasets.make_splits for the three splits."""

    source: str | None = None
    train_size: int | None = field(None, ge=1)
    val_size: int | None = field(None, ge=1)
    test_size: int | None = field(None, ge=1)


@dataclass(frozen=True)
class OutputSpec(Schema):
    """The archive to write: model ``name`` and an optional ``version`` (default: next free)."""

    name: str | None = None
    version: int | None = field(None, ge=1)


@dataclass(frozen=True)
class DistillSpec(Schema):
    """How a ``task: distill`` run weighs its teacher: ``temperature`` T softens both
    distributions (the KL term is scaled by T^2, so its gradients keep their size whatever
    T: Hinton et al. 2015), ``alpha`` is the KL term's share, ``1 - alpha`` the labels'."""

    temperature: float = field(4.0, gt=0)
    alpha: float = field(0.7, ge=0)

    def check(self, path: str) -> None:
        if not math.isfinite(self.temperature):  # NaN passes "> 0" comparisons
            raise InvalidSpec(f"{path}.temperature", f"must be a finite number > 0, got {shown(self.temperature)}")
        if not 0 <= self.alpha <= 1:
            raise InvalidSpec(f"{path}.alpha", f"must be between 0 and 1, got {shown(self.alpha)}")


def _check_range(field_: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidSpec(field_, f"must be between {low} and {high} (this service's limit), got {value}")


def _reraise(exc: InvalidSpec, prefix: str) -> InvalidSpec:
    """``exc`` with its field moved under ``prefix`` (a nested spec validated on its own)."""
    message = exc.message.removeprefix(f"{exc.field}: ")
    if exc.allowed is not None:
        message = message.removesuffix(f" (allowed: {', '.join(map(str, exc.allowed))})")
    return InvalidSpec(f"{prefix}.{exc.field}", message, exc.allowed)


def parse_base(value: Any, where: str = "base") -> tuple[str, int | None]:
    """``name`` or ``name:version`` -> (name, version or None); InvalidSpec naming ``where``."""
    if not isinstance(value, str) or not value:
        raise InvalidSpec(where, f"must be 'name' or 'name:version', got {shown(value)}")
    name, _, version = value.partition(":")
    try:
        validate_model_name(name)
    except InvalidSpec as exc:
        raise InvalidSpec(where, exc.message.removeprefix("name: ")) from None
    if not version:
        return name, None
    # str.isdigit alone takes "²" and other non-ASCII digits, which int() then refuses
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        raise InvalidSpec(where, f"version must be an integer >= 1, got {shown(version)}")
    return name, int(version)


def parse_teacher(value: Any) -> tuple[str, int]:
    """``name:version`` of a distill run's teacher (parsed like ``base``; the version required)."""
    name, version = parse_base(value, "teacher")
    if version is None:
        raise InvalidSpec("teacher", f"needs its version, name:version (got {shown(value)}): a run must keep "
                                     "the teacher it started with, also when resumed")
    return name, version


@dataclass(frozen=True)
class RunSpec:
    """A validated run spec; build it with :meth:`from_dict` or :meth:`from_file`."""

    dataset: DatasetSpec
    hyperparameters: Hyperparameters
    output: OutputSpec
    base: str | None = None
    model: dict | None = None
    task: str | None = None
    #: "builtin", or a key of datasets.SOURCES ("imagefolder", "masks", "npz", "jsonl")
    dataset_kind: str = "builtin"
    #: the resolved dataset path (None for built-ins)
    dataset_path: Path | None = None
    #: task distill: the teacher (name:version) and T / alpha; None otherwise
    teacher: str | None = None
    distill: DistillSpec | None = None

    @property
    def hp(self) -> Hyperparameters:
        return self.hyperparameters

    @property
    def base_ref(self) -> tuple[str, int | None] | None:
        return parse_base(self.base) if self.base is not None else None

    @property
    def teacher_ref(self) -> tuple[str, int] | None:
        return parse_teacher(self.teacher) if self.teacher is not None else None

    @property
    def model_task(self) -> str | None:
        """The task of the model trained: ``task``, or the model task of a run task
        (distill: multiclass); None when the spec leaves it to the model."""
        return RUN_TASKS.get(self.task, self.task)

    @property
    def builtin_name(self) -> str | None:
        return self.dataset.source[len(BUILTIN_PREFIX):] if self.dataset_kind == "builtin" else None

    def model_spec(self, num_classes: int | None = None) -> ModelSpec:
        """The ``model`` family spec (``num_classes`` filled in where the spec leaves it out)."""
        data = dict(self.model)
        if "num_classes" not in data:
            data["num_classes"] = num_classes if num_classes is not None else 1
        if self.model_task is not None:
            data["task"] = self.model_task
        try:
            return ModelSpec.from_dict(data)
        except InvalidSpec as exc:
            raise _reraise(exc, "model") from None

    # ---- parsing -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Path | str, policy: Policy) -> RunSpec:
        """Read a JSON (.json) or YAML (.yaml/.yml; anything else: JSON, then YAML) spec file."""
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"run spec {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(spectext.MAX_SPEC_CHARS + 1)  # more is refused: nothing beyond is read
        try:
            data = spectext.parse(text, yaml_too=path.suffix != ".json")
        except InvalidSpec as exc:
            raise InvalidSpec("spec", f"cannot parse {path}: {exc.message.removeprefix('spec: ')}") from None
        except Exception as exc:  # noqa: BLE001 - any parse error is the spec's fault
            raise InvalidSpec("spec", f"cannot parse {path}: {str(exc).splitlines()[0][:200]}") from exc
        return cls.from_dict(data, policy)

    @classmethod
    def from_dict(cls, data: Any, policy: Policy) -> RunSpec:
        """Validate ``data`` against the schema and ``policy``; InvalidSpec names the field."""
        spectext.check_shape(data)
        check_keys(data, TOP_KEYS, "")
        if ("base" in data and data["base"] is not None) == ("model" in data and data["model"] is not None):
            raise InvalidSpec("base", "give exactly one of base (a model of the store, name[:version]) "
                              "or model (a family spec)", allowed=["base", "model"])
        task = data.get("task")
        if task is not None and task not in TASK_METRICS and task not in RUN_TASKS:
            raise InvalidSpec("task", f"unknown task {shown(task)}", allowed=[*TASK_METRICS, *RUN_TASKS])
        teacher, distill = cls._distill(data, task)
        base = data.get("base")
        if base is not None:
            parse_base(base)
        model = data.get("model")
        if model is not None:
            check_keys(model, ["family", "num_classes", "task", "config", "input"], "model")
            model = json.loads(json.dumps(model))  # a plain, JSON-shaped copy
        hp = Hyperparameters.from_dict(data.get("hyperparameters") or {}, "hyperparameters")
        for name, low, limit in (("epochs", 1, policy.max_epochs), ("batch_size", 1, policy.max_batch_size),
                                 ("nproc", 1, policy.max_nproc), ("workers", 0, policy.max_workers),
                                 ("seed", 0, MAX_SEED)):
            _check_range(f"hyperparameters.{name}", getattr(hp, name), low, limit)
        raw_dataset = data.get("dataset")
        if isinstance(raw_dataset, str):
            raw_dataset = {"source": raw_dataset}
        if raw_dataset is None:
            raise InvalidSpec("dataset", "is required")
        dataset = DatasetSpec.from_dict(raw_dataset, "dataset")
        for name in ("train_size", "val_size", "test_size"):
            if getattr(dataset, name) is not None:
                _check_range(f"dataset.{name}", getattr(dataset, name), 1, policy.max_examples)
        kind, path, dataset = cls._dataset(dataset, policy)
        output = OutputSpec.from_dict(data.get("output") or {}, "output")
        if output.name is None:
            if base is None:
                raise InvalidSpec("output.name", "is required when the run starts from a model spec")
            output = OutputSpec(parse_base(base)[0], output.version)
        try:
            validate_model_name(output.name)
        except InvalidSpec as exc:
            raise _reraise(exc, "output") from None
        spec = cls(dataset, hp, output, base, model, task, kind, path, teacher, distill)
        if model is not None:
            pretrained = getattr(spec.model_spec().config, "pretrained", None)
            if pretrained not in (None, "imagenet"):
                resolved = policy.resolve(pretrained, "model.config.pretrained")
                model["config"]["pretrained"] = str(resolved)
        return spec

    @staticmethod
    def _distill(data: Mapping, task: Any) -> tuple[str | None, DistillSpec | None]:
        """``teacher`` and the ``distill`` block: required (the block with its defaults) with
        task distill, refused without it, naming the field given."""
        teacher, block = data.get("teacher"), data.get("distill")
        if task != DISTILL:
            if teacher is not None:
                raise InvalidSpec("teacher", f"is only for task: {DISTILL} (task is {shown(task)})")
            if block is not None:
                given = next(iter(block), None) if isinstance(block, Mapping) else None
                where = f"distill.{given}" if isinstance(given, str) and given in ("temperature", "alpha") else "distill"
                raise InvalidSpec(where, f"is only for task: {DISTILL} (task is {shown(task)})")
            return None, None
        if teacher is None:
            raise InvalidSpec("teacher", f"is required with task: {DISTILL} (name:version of a multiclass "
                                         "classifier in the store)")
        parse_teacher(teacher)
        return teacher, DistillSpec.from_dict({} if block is None else block, "distill")

    @staticmethod
    def _dataset(dataset: DatasetSpec, policy: Policy) -> tuple[str, Path | None, DatasetSpec]:
        source = dataset.source
        if source is None:
            raise InvalidSpec("dataset.source", "is required")
        allowed = [f"{BUILTIN_PREFIX}{n}" for n in BUILTIN_DATASETS] + ["<ImageFolder dir>", "<images/+masks/ dir>",
                                                                "<file>.npz", "<file>.jsonl"]
        if source.startswith(BUILTIN_PREFIX):
            if source[len(BUILTIN_PREFIX):] not in BUILTIN_DATASETS:
                raise InvalidSpec("dataset.source", f"unknown built-in {shown(source)}", allowed=allowed)
            return "builtin", None, dataset
        path = policy.resolve(source, "dataset.source")
        if not path.exists():
            raise NotFound(f"dataset.source: {source} does not exist (resolved to {path})")
        if path.is_dir():
            kind = "masks" if is_masks_dir(path) else "imagefolder"
        elif path.suffix in FILE_KINDS:
            kind = FILE_KINDS[path.suffix]
        else:
            raise InvalidSpec("dataset.source", f"{source} is neither a directory nor a .npz/.jsonl file",
                              allowed=allowed)
        return kind, path, dataclasses.replace(dataset, source=str(path))

    def to_dict(self) -> dict:
        """The spec as JSON (dataset paths resolved); ``from_dict(to_dict())`` equals it."""
        out: dict[str, Any] = {}
        if self.base is not None:
            out["base"] = self.base
        if self.model is not None:
            out["model"] = json.loads(json.dumps(self.model))
        out["dataset"] = self.dataset.to_dict()
        if self.task is not None:
            out["task"] = self.task
        if self.teacher is not None:
            out["teacher"] = self.teacher
        if self.distill is not None:
            out["distill"] = self.distill.to_dict()
        out["hyperparameters"] = self.hyperparameters.to_dict()
        out["output"] = self.output.to_dict()
        return out

