"""The family configs: what each architecture family is configured with, and the checks on it.

Torch-free, like :mod:`service.models.spec` and :mod:`service.models.registry`: a model
spec is parsed and validated (the control service checks a run spec) without importing
torch. The modules that build the networks (``cnn``, ``resnet``, ``mobilenet``, ``rnn``,
``unet``) import their config from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.errors import InvalidSpec
from service.models._schema import Schema, field

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

#: torchvision ResNets the resnet family builds.
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
#: Recurrent cells of the rnn family (torch.nn.RNN, GRU, LSTM: service/models/rnn.py).
RNN_CELLS = ("rnn", "gru", "lstm")
#: How a unet's decoder goes up a level.
UNET_UPSAMPLES = ("transpose", "bilinear")
UNET_MAX_DEPTH = 6


@dataclass(frozen=True)
class CNNConfig(Schema):
    """One Conv→[BatchNorm]→activation→pool block per entry of ``channels``."""

    channels: tuple[int, ...] = field((32, 64), ge=1)
    kernel_size: int = field(3, ge=1)
    batch_norm: bool = True
    activation: str = field("relu", choices=("relu", "leaky_relu"))
    negative_slope: float = field(0.01, ge=0)
    pool: str = field("max", choices=("max", "avg"))
    dropout: float = field(0.25, ge=0, lt=1)

    def check(self, path: str) -> None:
        if not self.channels:
            raise InvalidSpec(f"{path}.channels", "must list at least one block")


@dataclass(frozen=True)
class ResNetConfig(Schema):
    """``arch``: one of RESNET_ARCHS. ``pretrained``: None, "imagenet" or a path to a weights file."""

    arch: str = field("resnet18", choices=RESNET_ARCHS)
    pretrained: str | None = None

    def check(self, path: str) -> None:
        if self.pretrained == "":
            raise InvalidSpec(f"{path}.pretrained", 'must be null, "imagenet" or a file path')


@dataclass(frozen=True)
class MobileNetV2Config(Schema):
    """``pretrained``: None, "imagenet" (width_mult 1.0 only) or a weights file path."""

    pretrained: str | None = None
    width_mult: float = field(1.0, gt=0)
    dropout: float = field(0.2, ge=0, lt=1)

    def check(self, path: str) -> None:
        if self.pretrained == "":
            raise InvalidSpec(f"{path}.pretrained", 'must be null, "imagenet" or a file path')
        if self.pretrained == "imagenet" and self.width_mult != 1.0:
            raise InvalidSpec(f"{path}.width_mult", "imagenet weights exist only for width 1.0", allowed=[1.0])


@dataclass(frozen=True)
class RNNConfig(Schema):
    """Exactly one of ``input_size`` (float features) or ``vocab_size`` (token ids) is set."""

    cell: str = field("lstm", choices=RNN_CELLS)
    input_size: int | None = field(None, ge=1)
    vocab_size: int | None = field(None, ge=2)
    embedding_dim: int = field(64, ge=1)
    hidden_size: int = field(64, ge=1)
    num_layers: int = field(1, ge=1)
    bidirectional: bool = False
    dropout: float = field(0.0, ge=0, lt=1)
    pooling: str = field("last", choices=("last", "mean", "max"))

    def check(self, path: str) -> None:
        if (self.input_size is None) == (self.vocab_size is None):
            raise InvalidSpec(f"{path}.input_size", f"set exactly one of {path}.input_size (float features) "
                              f"or {path}.vocab_size (token ids)")

    @property
    def sequence_kind(self) -> str:
        """"features" or "tokens"."""
        return "features" if self.input_size is not None else "tokens"


@dataclass(frozen=True)
class UNetConfig(Schema):
    """``depth`` levels (``depth - 1`` down-samplings; default: one per entry of ``channels``,
    else 3). Level i has ``channels[i]`` channels; without ``channels``, ``base_channels``
    doubled at each level. ``upsample``: how the decoder goes up a level (``transpose``: a
    learned ConvTranspose2d; ``bilinear``: fixed)."""

    depth: int | None = field(None, ge=2)
    base_channels: int = field(32, ge=1)
    channels: tuple[int, ...] | None = field(None, ge=1)
    upsample: str = field("transpose", choices=UNET_UPSAMPLES)
    batch_norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth is None:
            object.__setattr__(self, "depth", len(self.channels) if isinstance(self.channels, tuple) else 3)

    def check(self, path: str) -> None:
        if self.depth > UNET_MAX_DEPTH:
            raise InvalidSpec(f"{path}.depth", f"must be <= {UNET_MAX_DEPTH}, got {self.depth}")
        if self.channels is not None and len(self.channels) != self.depth:
            raise InvalidSpec(f"{path}.channels", f"needs {self.depth} entries, one per level (depth), "
                              f"got {len(self.channels)}")
        if self.channels is None and self.base_channels * 2 ** (self.depth - 1) > 4096:
            raise InvalidSpec(f"{path}.base_channels", "base_channels * 2**(depth-1) must be <= 4096")

    @property
    def level_channels(self) -> tuple[int, ...]:
        if self.channels is not None:
            return self.channels
        return tuple(self.base_channels * 2 ** i for i in range(self.depth))


def check_unet(spec: ModelSpec) -> None:
    """Cross-field check against the input: a size that halves cleanly at every
    down-sampling (so the skip connections line up)."""
    cfg: UNetConfig = spec.config
    step = 2 ** (cfg.depth - 1)
    if spec.input.size % step:
        raise InvalidSpec("input.size", f"must be a multiple of {step} (2**(depth-1)) for a unet of depth "
                          f"{cfg.depth}, got {spec.input.size}")
