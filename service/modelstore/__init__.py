"""The model store: versioned, immutable TorchServe archives and their lineage."""

from service.modelstore.bundle import ModelBundle
from service.modelstore.store import ArchiveInfo, DesiredState, ModelStore, validate_model_name

__all__ = ["ArchiveInfo", "DesiredState", "ModelBundle", "ModelStore", "validate_model_name"]
