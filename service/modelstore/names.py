"""The model store's names, torch-free: what a model may be called, and the files of a bundle.

A run spec names models (``base``, ``teacher``, ``output.name``) and the control service
reads an archive's spec and labels to check a distill run's teacher: both without torch,
which :mod:`service.modelstore.bundle` (the weights) and :mod:`service.modelstore.store`
import.
"""

from __future__ import annotations

import re

from service.errors import InvalidSpec, shown

#: A model name, matched in full (``fullmatch``: ``$`` would also take a trailing newline).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

# The files of a bundle, at the top of its directory and of its archive.
SPEC_FILE = "spec.json"
LABELS_FILE = "labels.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"
LINEAGE_FILE = "lineage.json"


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSpec(
            "name",
            f"{shown(name, 80)} is not a valid model name: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit",
        )
    return name
