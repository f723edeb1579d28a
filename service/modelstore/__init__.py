"""The model store: versioned, immutable TorchServe archives and their lineage.

Importing the package imports none of its modules: its names are imported on first use
(PEP 562), so :mod:`service.modelstore.names` (model names, a bundle's file names) is
read without torch, which ``bundle`` (the weights) needs.
"""

import importlib

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    globals()[name] = value  # imported once: later reads find it without this function
    return value
