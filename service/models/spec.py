"""The model spec: which family, its config, its input, its outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from service.errors import InvalidSpec, shown
from service.models._schema import Schema, check_keys, field
from service.models.registry import FAMILIES

#: "segmentation": one class per pixel (service/models/unet.py); the others, one answer per example.
TASKS = ("multiclass", "multilabel", "regression", "segmentation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Normalisation used when an image input omits mean/std, by channel count.
DEFAULT_STATS = {3: (IMAGENET_MEAN, IMAGENET_STD), 1: ((0.5,), (0.5,))}


@dataclass(frozen=True)
class ImageInput(Schema):
    """Image input: ``channels`` (1 or 3), crop ``size``, shorter-side ``resize`` (None: resize
    straight to size x size), and per-channel ``mean``/``std`` (None: default for channels)."""

    type: ClassVar[str] = "image"
    extra_keys = ("type",)

    channels: int = field(3, choices=(1, 3))
    size: int = field(224, ge=1)
    resize: int | None = field(256, ge=1)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = field(None, gt=0)

    def __post_init__(self) -> None:
        stats = DEFAULT_STATS.get(self.channels) if isinstance(self.channels, int) else None
        if stats is not None:
            object.__setattr__(self, "mean", stats[0] if self.mean is None else self.mean)
            object.__setattr__(self, "std", stats[1] if self.std is None else self.std)
        super().__post_init__()

    def check(self, path: str) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None or len(values) != self.channels:
                got = "none" if values is None else len(values)
                raise InvalidSpec(f"{path}.{name}", f"needs {self.channels} values, one per channel (got {got})")
        if self.resize is not None and self.size > self.resize:
            raise InvalidSpec(f"{path}.size", f"must be <= {path}.resize ({self.resize}), got {self.size}")


@dataclass(frozen=True)
class SequenceInput(Schema):
    """Sequence input: at most ``max_length`` steps (or tokens) per example."""

    type: ClassVar[str] = "sequence"
    extra_keys = ("type",)

    max_length: int = field(512, ge=1)


#: Input classes by modality (the value of the "type" key).
INPUTS: dict[str, type[Schema]] = {"image": ImageInput, "sequence": SequenceInput}

_KEYS = ["family", "num_classes", "task", "config", "input"]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec. Construction validates; :meth:`from_dict` parses JSON.

    ``config`` defaults to the family's default config, ``input`` to the default input
    of the family's modality.
    """

    family: str
    num_classes: int
    config: Any = None
    input: ImageInput | SequenceInput | None = None
    #: None: the family's first task (multiclass; segmentation for unet)
    task: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise InvalidSpec("family", f"unknown family {shown(self.family)}", allowed=list(FAMILIES))
        if self.task is None:
            object.__setattr__(self, "task", FAMILIES[self.family].tasks[0])
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise InvalidSpec("num_classes", f"must be an integer >= 1, got {shown(self.num_classes)}")
        if self.task not in TASKS:
            raise InvalidSpec("task", f"unknown task {shown(self.task)}", allowed=TASKS)
        family = FAMILIES[self.family]
        if self.config is None:
            object.__setattr__(self, "config", family.config())
        if not isinstance(self.config, family.config):
            raise InvalidSpec("config", f"family {shown(self.family)} takes a {family.config.__name__}")
        if self.input is None:
            object.__setattr__(self, "input", INPUTS[family.modality]())
        if getattr(self.input, "type", None) != family.modality:
            raise InvalidSpec("input.type", f"family {shown(self.family)} takes {family.modality} input",
                              allowed=[family.modality])
        if self.task not in family.tasks:
            raise InvalidSpec("task", f"family {shown(self.family)} is for {'/'.join(family.tasks)}, "
                              f"got {shown(self.task)}", allowed=family.tasks)
        self.config.validate("config")
        self.input.validate("input")
        if family.check is not None:
            family.check(self)

    @property
    def modality(self) -> str:
        """"image" or "sequence", from the family registry."""
        return FAMILIES[self.family].modality

    @property
    def sequence_kind(self) -> str | None:
        """rnn: "features" (config.input_size set) or "tokens" (config.vocab_size set); else None."""
        return getattr(self.config, "sequence_kind", None)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """Parse and validate a JSON spec; InvalidSpec names the first offending field."""
        check_keys(data, _KEYS, "")
        name = data.get("family")
        if not isinstance(name, str) or name not in FAMILIES:
            raise InvalidSpec("family", f"unknown family {shown(name)}", allowed=list(FAMILIES))
        if "num_classes" not in data:
            raise InvalidSpec("num_classes", "is required")
        family = FAMILIES[name]
        config = family.config.from_dict({} if data.get("config") is None else data["config"], "config")
        raw_input = {} if data.get("input") is None else data["input"]
        kind = raw_input.get("type", family.modality) if isinstance(raw_input, Mapping) else family.modality
        if kind not in INPUTS:
            raise InvalidSpec("input.type", f"unknown input type {shown(kind)}", allowed=list(INPUTS))
        if kind != family.modality:
            raise InvalidSpec("input.type", f"family {shown(name)} takes {family.modality} input",
                              allowed=[family.modality])
        inp = INPUTS[kind].from_dict(raw_input, "input")
        return cls(name, data["num_classes"], config, inp, data.get("task"))

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict; ``from_dict(to_dict())`` equals this spec."""
        return {
            "family": self.family,
            "num_classes": self.num_classes,
            "task": self.task,
            "config": self.config.to_dict(),
            "input": {"type": self.input.type, **self.input.to_dict()},
        }
