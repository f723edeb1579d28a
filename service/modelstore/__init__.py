"""The model store: versioned, immutable TorchServe archives and their lineage.

Importing the package imports none of its modules: its names are imported on first use
(PEP 562), so :mod:`service.modelstore.names` (model names, a bundle's file names) is
read without torch, which ``bundle`` (the weights) needs.
"""

from service import lazy

#: Each name of the package -> the module that defines it.
_EXPORTS = {
    "ModelBundle": "service.models.bundle",  # re-exported: archives are written from bundles
    "check_archive": "check",
    "known_refusal": "check",
    "require_archive": "check",
    "verify_archive": "check",
    "ArchiveInfo": "store",
    "ModelStore": "store",
    "validate_model_name": "names",
}

__all__ = ["ArchiveInfo", "ModelBundle", "ModelStore", "check_archive", "known_refusal", "require_archive",
           "validate_model_name", "verify_archive"]


__getattr__ = lazy.exports(__name__, _EXPORTS)
