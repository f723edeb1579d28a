"""The model store: versioned, immutable TorchServe archives and their lineage."""

from service.modelstore.bundle import ModelBundle
from service.modelstore.check import check_archive, known_refusal, require_archive, verify_archive
from service.modelstore.store import ArchiveInfo, DesiredState, ModelStore, validate_model_name

__all__ = ["ArchiveInfo", "DesiredState", "ModelBundle", "ModelStore", "check_archive", "known_refusal",
           "require_archive", "validate_model_name", "verify_archive"]
