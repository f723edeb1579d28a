"""The names a run spec chooses from, torch-free: tasks and their metrics, optimizers,
built-in datasets, and how a dataset directory's kind is told.

The run spec (:mod:`service.training.run_spec`) validates against these, so the control
service checks a spec without importing torch. The torch objects stay where training
runs, keyed by the same names: :data:`service.training.tasks.TASKS` (loss and metric
code, one per :data:`TASK_METRICS` entry), :data:`service.training.optim.OPTIMIZERS`
(one per :data:`OPTIMIZER_NAMES` entry), :data:`service.training.datasets.BUILTINS`
(a loader per :data:`BUILTIN_DATASETS` entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskMetric:
    """A task's validation metric: its ``name`` and ``mode``, which way is better ("max" or "min")."""

    name: str
    mode: str


#: The training tasks (the model tasks of service.models.spec.TASKS), in the order errors list them.
TASK_METRICS: dict[str, TaskMetric] = {
    "multiclass": TaskMetric("accuracy", "max"),
    "multilabel": TaskMetric("micro_f1", "max"),
    "regression": TaskMetric("mse", "min"),
    "segmentation": TaskMetric("mean_iou", "max"),
}

#: ``hyperparameters.optimizer``'s values, in the order errors list them.
OPTIMIZER_NAMES = ("adam", "sgd", "adamw")

BUILTIN_PREFIX = "builtin:"
#: ``builtin:<name>`` datasets -> what each is.
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "scikit-learn 8x8 digits as 1x8x8 images, 10 classes",
    "digits-seq": "the digits with rows as 8 steps of 8 features",
    "fashion-mnist": "Fashion-MNIST 28x28, 60k train / 10k official test",
    "fashion-scenes": "64x64 scenes of 1-3 Fashion-MNIST items, per-pixel classes (segmentation), "
                      "20k train / 2k test",
    "rotten-tomatoes": "12.8k short movie reviews, fresh vs rotten",
    "basic-motions": "UEA BasicMotions, 6 x 100 series, 40/40 official split",
}

# a segmentation directory: images/ + masks/
IMAGES_DIR, MASKS_DIR = "images", "masks"


def is_masks_dir(path: Path) -> bool:
    """Whether a directory source is a segmentation dataset: ``images/`` and ``masks/`` side
    by side at its top or under ``train/`` (any other directory is an ImageFolder)."""
    return any((path / sub / IMAGES_DIR).is_dir() and (path / sub / MASKS_DIR).is_dir() for sub in (".", "train"))
