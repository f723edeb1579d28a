"""A small declarative schema for the spec dataclasses: typed fields, bounds, enums.

Every spec dataclass derives from :class:`Schema`. Its fields carry their checks as
metadata (see :func:`field`); :meth:`Schema.validate` checks types and those bounds,
then the class's own cross-field :meth:`Schema.check`. Failures raise ``InvalidSpec``
with the dotted path of the field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from service.errors import InvalidSpec, shown


def field(default: Any = None, *, choices: tuple | None = None, ge: float | None = None,
          gt: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with checks: ``choices`` (enum) and ``ge``/``gt``/``lt`` bounds.

    Bounds apply to each element of a tuple field, and are skipped for ``None``.
    """
    checks = {"choices": choices, "ge": ge, "gt": gt, "lt": lt}
    return dataclasses.field(default=default, metadata={k: v for k, v in checks.items() if v is not None})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return None


def _normalize(value: Any, tp: Any) -> Any:
    """JSON shapes to field shapes: lists to tuples, ints to floats where floats are meant."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _normalize(value, inner)
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)):
        return tuple(_normalize(v, typing.get_args(tp)[0]) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _check_value(value: Any, tp: Any, meta: Mapping, path: str) -> None:
    inner = _optional_inner(tp)
    if inner is not None:
        if value is not None:
            _check_value(value, inner, meta, path)
        return
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, tuple):
            raise InvalidSpec(path, f"must be a list, got {shown(value)}")
        for i, item in enumerate(value):
            _check_value(item, typing.get_args(tp)[0], meta, f"{path}[{i}]")
        return
    ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise InvalidSpec(path, f"must be {_TYPE_NAMES[tp]}, got {shown(value)}")
    if "choices" in meta and value not in meta["choices"]:
        raise InvalidSpec(path, f"unknown value {shown(value)}", allowed=meta["choices"])
    if "ge" in meta and value < meta["ge"]:
        raise InvalidSpec(path, f"must be >= {meta['ge']}, got {shown(value)}")
    if "gt" in meta and value <= meta["gt"]:
        raise InvalidSpec(path, f"must be > {meta['gt']}, got {shown(value)}")
    if "lt" in meta and value >= meta["lt"]:
        raise InvalidSpec(path, f"must be < {meta['lt']}, got {shown(value)}")


def check_keys(data: Any, allowed: list[str], path: str) -> Mapping:
    """``data`` as a mapping whose keys are all in ``allowed``; else InvalidSpec."""
    if not isinstance(data, Mapping):
        raise InvalidSpec(path, f"must be an object, got {shown(data)}")
    for key in data:
        if key not in allowed:
            name = key if isinstance(key, str) and len(key) <= 64 and key.isprintable() else shown(key, 64)
            raise InvalidSpec(f"{path}.{name}" if path else name, "unknown key", allowed=allowed)
    return data


@dataclasses.dataclass(frozen=True)
class Schema:
    """Base of the spec dataclasses: JSON round-trip and validation by field metadata."""

    #: Keys accepted by :meth:`from_dict` that are not fields (and are ignored).
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name, tp in _hints(type(self)).items():
            object.__setattr__(self, name, _normalize(getattr(self, name), tp))

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Schema:
        """Parse and validate ``data`` (a JSON object) found at ``path`` of a spec."""
        names = list(_hints(cls))
        check_keys(data, [*names, *cls.extra_keys], path)
        obj = cls(**{k: v for k, v in data.items() if k in names})
        obj.validate(path)
        return obj

    def validate(self, path: str) -> None:
        """Check every field's type and bounds, then :meth:`check`; raise InvalidSpec."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name, tp in _hints(type(self)).items():
            _check_value(getattr(self, name), tp, fields[name].metadata, f"{path}.{name}")
        self.check(path)

    def check(self, path: str) -> None:
        """Cross-field checks of a subclass, run after the per-field ones."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (tuples become lists)."""
        return {name: list(v) if isinstance(v, tuple) else v
                for name, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))}
