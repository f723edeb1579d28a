"""The serving engines by name (``ServeSettings.engine``, ``MODELCTL_ENGINE``): a registry.

Each engine's class has the same lifecycle (``start``, ``stop``, ``run_forever``,
``readiness``, ``endpoints``) and hands out a management interface (``_require_mgmt``)
that the converger, readiness and the control API's deployer drive.
"""

from __future__ import annotations

import importlib

from service.errors import InvalidArgument
from service.serving.settings import ENGINES

_CLASSES = {
    "torchserve": ("service.serving.torchserve.supervisor", "Serving"),
    "native": ("service.serving.native.engine", "NativeServing"),
}
assert set(_CLASSES) == set(ENGINES)


def serving_class(engine: str) -> type:
    """The serving class of ``engine`` (imported on demand: each engine's imports are its own)."""
    try:
        module, name = _CLASSES[engine]
    except KeyError:
        raise InvalidArgument(f"unknown engine {engine!r} (allowed: {', '.join(ENGINES)})") from None
    return getattr(importlib.import_module(module), name)
