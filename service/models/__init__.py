"""The architecture registry: model specs, families, and building / loading models."""

from service.models.presets import image_eval_transform
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
