"""Finding, reading and applying pretrained backbone weights.

The only place in ``service.models`` that touches files. Nothing is ever downloaded:
weights must already be on this machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from service.errors import InvalidSpec

FIELD = "config.pretrained"


def hub_checkpoints(prefix: str) -> tuple[list[Path], Path]:
    """torchvision's cached files ``{prefix}-*.pth`` (sorted) and the pattern searched.

    The directory is ``torch.hub.get_dir()/checkpoints``, which follows ``$TORCH_HOME``.
    """
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    return sorted(directory.glob(f"{prefix}-*.pth")), directory / f"{prefix}-*.pth"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a bare state_dict, or one under "model" / "state_dict"."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects refused by weights_only, ...
        raise InvalidSpec(FIELD, f"cannot read weights file {path}: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InvalidSpec(FIELD, f"{path} does not hold a state_dict of tensors")
    return dict(data)


def _some(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], *, head: str,
                  first_conv: str, source: str) -> None:
    """Load every non-head tensor of ``state`` into ``model``; the head keeps its fresh init.

    Keys starting with ``head`` are dropped. When the model takes 1 channel and the file's
    ``first_conv`` weight takes 3, the RGB kernels are summed over the channel dim.
    Every other key must match in name and shape both ways (a missing
    ``num_batches_tracked`` is tolerated: older torchvision files lack it), else
    InvalidSpec naming the keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    kernel = state.get(first_conv)
    if kernel is not None and kernel.dim() == 4 and kernel.shape[1] == 3 and own[first_conv].shape[1] == 1:
        state[first_conv] = kernel.sum(dim=1, keepdim=True)
    problems = []
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if mismatched:
        problems.append(f"shape mismatch {_some(mismatched)}")
    if problems:
        raise InvalidSpec(FIELD, f"weights from {source} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
