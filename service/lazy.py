"""Package names imported on first use (PEP 562), so that importing a package imports none of
its modules: the control service reads specs and store names without torch
(tests/test_spec_no_torch.py)."""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def exports(package: str, table: dict[str, str]) -> Callable[[str], object]:
    """The ``__getattr__`` of ``package``: ``table`` maps each name to the module defining it,
    relative to the package (``"store"``) or absolute (``"service.models.bundle"``). A name is
    imported once; later reads find it in the package without this function."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
