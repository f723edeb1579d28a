"""Run specs as the control API receives them: text or a structured value, validated up front.

The trainer's own validation (:meth:`service.training.run_spec.RunSpec.from_dict`, against the
service's data roots and bounds) decides; an error is its ``InvalidSpec`` naming the
dotted field. On top of it, the control API checks what the trainer would only find once
started: the base model must exist (NotFound) and a fixed output version must not
(AlreadyExists). A base given without a version is pinned to the version that is latest
when the job is created. A distill run's teacher must exist, be a multiclass model and take
the student's input (service/training/distill_checks.py reads that from the archive's spec,
not its weights); its labels against the dataset's are the trainer's check, before its first
epoch. Nothing here imports torch: the run spec and the teacher checks are torch-free
(tests/test_spec_no_torch.py); the trainer's modules are imported lazily all the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service import atomic, spectext
from service.errors import AlreadyExists, InvalidSpec


def parse_text(text: str) -> Any:
    """A JSON or YAML document (JSON first), bounded (:mod:`service.spectext`: its size, no
    YAML aliases, its depth and number of values); InvalidSpec("spec") if it is neither or
    out of bounds."""
    return spectext.parse(text)


def whole_numbers(value: Any) -> Any:
    """A structured value with every integral float as an int (protobuf Struct numbers are
    doubles; the spec wants ``epochs: 2``, not ``2.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def policy_for(config):
    """The trainer's Policy for this service: its data roots and the operator's bounds."""
    from service.training.run_spec import Policy

    return Policy(tuple(config.data_roots), **config.run_bounds())


def validate(data: Any, policy, model_store):
    """The validated ``RunSpec`` of ``data``; InvalidSpec / NotFound / AlreadyExists."""
    from service.training.run_spec import RunSpec

    spectext.check_shape(data)
    if not isinstance(data, dict):
        raise InvalidSpec("spec", f"must be an object with keys base|model, dataset, hyperparameters, "
                                  f"output; got {type(data).__name__}")
    spec = RunSpec.from_dict(data, policy)
    if spec.base is not None:
        name, version = spec.base_ref
        info = model_store.get(name, version)  # NotFound names the model and its versions
        if version is None:  # pin the base: the job trains on the version latest now
            spec = RunSpec.from_dict({**data, "base": f"{name}:{info.version}"}, policy)
    if spec.teacher is not None:
        from service.training.distill_checks import check_at_creation

        check_at_creation(spec, model_store)
    out = spec.output
    if out.version is not None and out.version in model_store.versions(out.name):
        raise AlreadyExists(f"output.version: model {out.name!r} version {out.version} exists; "
                            "versions are immutable")
    return spec


def write_spec(spec, run_dir: Path, filename: str) -> Path:
    """The validated spec as the trainer reads it, in the job's run directory (fsynced, then
    renamed into place: service/atomic.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(run_dir / filename, json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
