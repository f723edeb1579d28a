"""The run checkpoint: one file, fixed keys, tensors and plain containers only.

Keys: ``model`` (written from the unwrapped model, never the DDP wrapper), ``best_model``
(None while the best weights are the current ones), ``optimizer``, ``lr_scheduler``,
``scaler``, ``ema`` (the weight average and its update count, or None), ``epoch`` (the
last completed, 1-based), ``best``, ``bad_epochs``, ``rng``
(one entry per rank), ``model_spec``, ``labels``, ``vocab``, ``dataset_sha256``,
``run_id``, ``history``, ``train_seconds``. Nothing is pickled: it is read back with
``weights_only=True``. Writes are atomic and durable (service/atomic.py), so a run killed
while writing keeps its previous checkpoint. The file's name in the run directory is
:data:`service.rundir.CHECKPOINT_FILE`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from service.atomic import atomic_write

FORMAT = 1


def save(path: Path, state: dict) -> None:
    atomic_write(path, lambda fh: torch.save(state, fh))


def load(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """This process's random states (torch CPU and CUDA, Python, NumPy) as tensors and lists."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
