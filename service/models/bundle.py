"""A model bundle: everything needed to rebuild a model anywhere.

A bundle is a directory (and, inside an archive, a set of top-level files) holding the
JSON spec, the ``state_dict`` and the label names, plus the vocabulary for text models.
Nothing in it is pickled code: weights are read back with ``weights_only=True``
(:func:`read_weights`), and a weights file that needs code to load is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from service.errors import InvalidSpec
from service.models import FAMILIES, ModelSpec, Vocabulary, load_model

# The files of a bundle, at the top of its directory and of its archive.
SPEC_FILE = "spec.json"
LABELS_FILE = "labels.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"
LINEAGE_FILE = "lineage.json"

if TYPE_CHECKING:  # torch is imported where weights are read or written: the store's names and
    import torch  # listings are read without it (the control service: tests/test_spec_no_torch.py)


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A digest of the weights themselves (names, dtypes, shapes, values), independent of
    how they were serialised: a precision check names the weights it was run on with it."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_weights(path: Path | BinaryIO, map_location: str | torch.device = "cpu", *,
                 name: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict (parameter name -> tensor) in the file ``path`` (or an open binary
    file, named ``name`` in messages).

    Read with ``torch.load(weights_only=True)``: a file that needs pickled code to load (a
    pickled ``nn.Module``, an object of any class in the dict) is refused, and nothing of
    it runs. Raises InvalidSpec("weights") naming the file and what it needed.
    """
    import torch

    if isinstance(path, (str, Path)):
        path = Path(path)
        name = name or path.name
    name = name or WEIGHTS_FILE
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({needs.group(1)})" if needs else ""
        raise InvalidSpec("weights", f"{name} needs pickled code to load{what}; only a state_dict "
                          "of tensors is accepted (read with torch.load(weights_only=True))") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # not a torch.save file, truncated
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidSpec("weights", f"cannot read {name}: {first}") from exc
    if not isinstance(data, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise InvalidSpec("weights", f"{name} holds a {type(data).__name__}, not a state_dict "
                          "(parameter name -> tensor)")
    return dict(data)


def weights_misfit(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state_dict`` from loading strictly into ``spec``'s model (missing and
    unexpected names, wrong shapes), or None when it fits. The model is built on the meta
    device: no memory is allocated and nothing is initialised."""
    import torch

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FAMILIES[spec.family].build(spec).state_dict().items()}
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} is {tuple(state_dict[k].shape)}, the spec needs {expected[k]}"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            problems.append(f"{label}: {shown}")
    return "; ".join(problems) or None


@dataclass
class ModelBundle:
    """Spec, weights, label names and (for text models) vocabulary of one model."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    vocab: Vocabulary | None = None
    lineage: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Check that the parts fit together; raise InvalidSpec naming the part."""
        self.validate_parts()
        try:
            load_model(self.spec, self.state_dict)
        except RuntimeError as exc:  # strict load_state_dict: missing/unexpected/shape
            first = str(exc).strip().splitlines()
            raise InvalidSpec("weights", f"do not fit the spec: {' '.join(first[:3])}") from exc

    def validate_parts(self) -> None:
        """Labels and vocabulary against the spec (everything :meth:`validate` checks but
        the weights); raise InvalidSpec naming the part."""
        if len(self.labels) != self.spec.num_classes:
            raise InvalidSpec(
                "labels",
                f"{len(self.labels)} label names for a model with {self.spec.num_classes} outputs",
            )
        if len(set(self.labels)) != len(self.labels):
            raise InvalidSpec("labels", "label names must be unique")
        vocab_size = getattr(self.spec.config, "vocab_size", None)
        if self.vocab is not None:
            if vocab_size is None:
                raise InvalidSpec("vocab", "a vocabulary is only used by a token-input rnn")
            if len(self.vocab) > vocab_size:
                raise InvalidSpec(
                    "vocab", f"{len(self.vocab)} tokens exceed config.vocab_size={vocab_size}"
                )

    def save(self, directory: Path) -> list[Path]:
        """Write the bundle files into ``directory``; return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            SPEC_FILE: json.dumps(self.spec.to_dict(), indent=2),
            LABELS_FILE: json.dumps(self.labels, indent=2),
            LINEAGE_FILE: json.dumps(self.lineage, indent=2, sort_keys=True),
        }
        if self.vocab is not None:
            files[VOCAB_FILE] = json.dumps(self.vocab.to_list())
        paths = []
        for name, text in files.items():
            (directory / name).write_text(text + "\n")
            paths.append(directory / name)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()}
        # Serialized in memory and written by Python: torch.save onto a full disk fails with a
        # RuntimeError ("unexpected pos"), this write with the OSError (ENOSPC) it is.
        import torch

        buffer = io.BytesIO()
        torch.save(weights, buffer)
        (directory / WEIGHTS_FILE).write_bytes(buffer.getbuffer())
        return [directory / WEIGHTS_FILE, *paths]

    @classmethod
    def from_archive(cls, path: Path | str, map_location: str | torch.device = "cpu") -> "ModelBundle":
        """Read the bundle of a ``.mar`` archive without unpacking it (the native engine;
        TorchServe unpacks archives itself and a worker calls :meth:`load`)."""
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())

            def text(member: str) -> str:
                return archive.read(member).decode("utf-8")

            spec = ModelSpec.from_dict(json.loads(text(SPEC_FILE)))
            labels = json.loads(text(LABELS_FILE))
            vocab = Vocabulary.from_list(json.loads(text(VOCAB_FILE))) if VOCAB_FILE in names else None
            lineage = json.loads(text(LINEAGE_FILE)) if LINEAGE_FILE in names else {}
            with archive.open(WEIGHTS_FILE) as member:
                state_dict = read_weights(io.BytesIO(member.read()), map_location, name=WEIGHTS_FILE)
        return cls(spec=spec, state_dict=state_dict, labels=labels, vocab=vocab, lineage=lineage)

    @classmethod
    def load(cls, directory: Path, map_location: str | torch.device = "cpu") -> "ModelBundle":
        """Read a bundle written by :meth:`save` (or unpacked from an archive)."""
        directory = Path(directory)
        spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
        labels = json.loads((directory / LABELS_FILE).read_text())
        vocab_path = directory / VOCAB_FILE
        vocab = Vocabulary.from_list(json.loads(vocab_path.read_text())) if vocab_path.exists() else None
        lineage_path = directory / LINEAGE_FILE
        lineage = json.loads(lineage_path.read_text()) if lineage_path.exists() else {}
        state_dict = read_weights(directory / WEIGHTS_FILE, map_location)
        return cls(spec=spec, state_dict=state_dict, labels=labels, vocab=vocab, lineage=lineage)
