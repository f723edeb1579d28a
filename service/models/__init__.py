"""The architecture registry: model specs, families, and building / loading models.

Importing the package imports no torch (a spec is parsed and validated without it: the
control service checks run specs). ``image_eval_transform`` (torchvision) is imported
from :mod:`service.models.presets` when first asked for; building a model imports torch.
"""

from service.models.registry import FAMILIES, Family, build_model, load_model
from service.models.spec import ImageInput, ModelSpec, SequenceInput
from service.models.text import Vocabulary

__all__ = [
    "FAMILIES",
    "Family",
    "ImageInput",
    "ModelSpec",
    "SequenceInput",
    "Vocabulary",
    "build_model",
    "image_eval_transform",
    "load_model",
]


def __getattr__(name: str):
    """``image_eval_transform``, imported on first use (PEP 562): presets imports torchvision."""
    if name == "image_eval_transform":
        from service.models.presets import image_eval_transform

        return image_eval_transform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
