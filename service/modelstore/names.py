"""The model store's names, torch-free: what a model may be called, and the files of a bundle.

A run spec names models (``base``, ``teacher``, ``output.name``) and the control service
reads an archive's spec and labels to check a distill run's teacher: both without torch,
which :mod:`service.models.bundle` (the weights) and :mod:`service.modelstore.store`
import.
"""

from __future__ import annotations

import re

from service.errors import InvalidSpec, shown
# The files of a bundle are defined by service/models/bundle.py (torch-free at import).
from service.models.bundle import LABELS_FILE, LINEAGE_FILE, SPEC_FILE, VOCAB_FILE, WEIGHTS_FILE  # noqa: F401

#: A model name, matched in full (``fullmatch``: ``$`` would also take a trailing newline).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")



def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSpec(
            "name",
            f"{shown(name, 80)} is not a valid model name: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit",
        )
    return name
