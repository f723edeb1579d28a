"""Settings read from the environment: typed readers that name the variable in every error.

Two ways in, one set of conversions:

* :class:`Environ` reads single variables (``Environ(environ).int("MODELCTL_K8S_SHM_MB", 0,
  minimum=0)``): int and float with bounds, bool, str, a choice among names, a path, a
  memory size. A variable that is unset or blank gives the default; a value that does not
  parse, or lies outside the bounds, raises :class:`~service.errors.InvalidArgument` as
  ``"MODELCTL_X: must be an integer >= 1, got 'abc'"``.
* :class:`EnvSettings` is the base of a frozen settings dataclass (``ServeSettings``,
  ``ControlConfig``): its :meth:`~EnvSettings.from_env` reads every field ``f`` from
  ``MODELCTL_<F upper>`` (or the class's :attr:`~EnvSettings.env_names`), converts it to the
  field's type, lets keyword overrides (CLI flags; None = not given) win over it, and names
  the variable in a range error that the dataclass's own checks raise about a field read
  from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path

from service.errors import InvalidArgument, shown

#: The prefix of every variable of the service.
ENV_PREFIX = "MODELCTL_"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\s*")


# ---- conversions: one value, named by its source (a variable, or a setting's name) ----------------
def _bounds_text(minimum, maximum, above) -> str:
    if above is not None:
        return f" > {above}" + (f" and <= {maximum}" if maximum is not None else "")
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _check_bounds(value, raw, source: str, kind: str, minimum=None, maximum=None, above=None):
    if ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (above is not None and not value > above)):
        raise InvalidArgument(f"{source}: must be {kind}{_bounds_text(minimum, maximum, above)}, "
                              f"got {shown(raw)}")
    return value


def to_int(raw, source: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``raw`` (a str, an int, or a float without a fraction; never a bool) as an int within
    the bounds; InvalidArgument naming ``source`` otherwise."""
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(raw)
        value = int(raw) if isinstance(raw, (int, float)) else int(str(raw).strip())
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument(f"{source}: must be an integer{_bounds_text(minimum, maximum, None)}, "
                              f"got {shown(raw)}") from None
    return _check_bounds(value, raw, source, "an integer", minimum, maximum)


def to_float(raw, source: str, *, minimum: float | None = None, maximum: float | None = None,
             above: float | None = None) -> float:
    """``raw`` as a float within the bounds (``above``: an exclusive lower bound)."""
    try:
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw) if isinstance(raw, (int, float)) else float(str(raw).strip())
    except (TypeError, ValueError):
        raise InvalidArgument(f"{source}: must be a number{_bounds_text(minimum, maximum, above)}, "
                              f"got {shown(raw)}") from None
    return _check_bounds(value, raw, source, "a number", minimum, maximum, above)


def to_bool(raw, source: str) -> bool:
    """``raw`` as a bool: 1/true/yes/on or 0/false/no/off (any case)."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgument(f"{source}: must be true or false (1/0, yes/no, on/off), got {shown(raw)}")


def to_choice(raw, source: str, choices: typing.Sequence[str]) -> str:
    """``raw`` when it is one of ``choices``."""
    text = str(raw).strip()
    if text not in choices:
        raise InvalidArgument(f"{source}: must be one of {', '.join(choices)}, got {shown(raw)}")
    return text


def to_path(raw, source: str) -> Path:
    """``raw`` as a Path (not expanded or resolved); an empty one is refused."""
    if isinstance(raw, Path):
        return raw
    text = "" if raw is None else str(raw)
    if not text:
        raise InvalidArgument(f"{source}: must be a path, got {shown(raw)}")
    return Path(text)


def to_size(raw, source: str) -> int:
    """A memory size in bytes from a Kubernetes quantity: ``8Gi``, ``512Mi``, ``1G``, ``1e9``,
    ``2048`` (binary suffixes Ki..Ei, decimal k..E)."""
    m = _SIZE.fullmatch(str(raw) if raw is not None else "")
    if m is None:
        raise InvalidArgument(f"{source}: expected a memory quantity such as 8Gi or 512Mi, got {shown(raw)}")
    unit = m.group(2) or ""
    return int(float(m.group(1)) * (_BINARY.get(unit) or _DECIMAL.get(unit) or 1))


def convert(raw, typ, source: str):
    """``raw`` (an environment string, or a CLI value) as a settings field of type ``typ``:
    str, int, float, bool, Path, ``X | None`` or ``tuple[Path, ...]`` (``os.pathsep``-separated
    in a string)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typing.get_origin(typ) is tuple:
        items = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).split(os.pathsep) if p]
        return tuple(Path(p) for p in items)
    if typ is Path:
        return to_path(raw, source)
    if typ is bool:
        return to_bool(raw, source)
    if typ is int:
        return to_int(raw, source)
    if typ is float:
        return to_float(raw, source)
    if typ is str:
        return str(raw)
    raise InvalidArgument(f"{source}: unsupported setting type {typ}")


# ---- single variables ---------------------------------------------------------------------------
class Environ:
    """Typed reads of single variables of ``environ`` (default: ``os.environ``). A variable
    that is unset or blank gives the default, which is returned as given (never checked)."""

    def __init__(self, environ: typing.Mapping[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        """The variable's value without surrounding blanks; None when unset or blank."""
        value = self.environ.get(name, "").strip()
        return value or None

    def str(self, name: str, default: str = "") -> str:
        raw = self.raw(name)
        return default if raw is None else raw

    def int(self, name: str, default=None, *, minimum: int | None = None, maximum: int | None = None):
        raw = self.raw(name)
        return default if raw is None else to_int(raw, name, minimum=minimum, maximum=maximum)

    def float(self, name: str, default=None, *, minimum: float | None = None, maximum: float | None = None,
              above: float | None = None):
        raw = self.raw(name)
        return default if raw is None else to_float(raw, name, minimum=minimum, maximum=maximum, above=above)

    def bool(self, name: str, default: bool = False) -> bool:
        raw = self.raw(name)
        return default if raw is None else to_bool(raw, name)

    def choice(self, name: str, default: str, choices: typing.Sequence[str]) -> str:
        raw = self.raw(name)
        return default if raw is None else to_choice(raw, name, choices)

    def path(self, name: str, default: Path | None = None) -> Path | None:
        raw = self.raw(name)
        return default if raw is None else to_path(raw, name)

    def size(self, name: str, default: int | None = None) -> int | None:
        """A memory size in bytes (:func:`to_size`)."""
        raw = self.raw(name)
        return default if raw is None else to_size(raw, name)


# ---- settings dataclasses -------------------------------------------------------------------------
class EnvSettings:
    """Base of a frozen settings dataclass read from ``MODELCTL_*`` variables (module docstring).

    A subclass sets :attr:`settings_kind` (named in the error about an unknown override) and,
    for fields whose variable is not ``MODELCTL_<FIELD>``, :attr:`env_names`.
    """

    #: "serve", "control": what an unknown override is called ("unknown serve setting(s): x").
    settings_kind = "the"
    #: Field name -> variable, where it is not ``MODELCTL_<FIELD>``.
    env_names: typing.Mapping[str, str] = types.MappingProxyType({})

    @classmethod
    def env_var(cls, name: str) -> str:
        """The environment variable that sets field ``name``."""
        return cls.env_names.get(name, ENV_PREFIX + name.upper())

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides):
        """Defaults < ``MODELCTL_*`` environment < ``overrides`` that are not None.

        An unparseable value raises InvalidArgument naming the variable (or the override);
        so does a range check of the dataclass about a field set by the environment.
        """
        environ = os.environ if environ is None else environ
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = set(overrides) - set(fields)
        if unknown:
            raise InvalidArgument(f"unknown {cls.settings_kind} setting(s): {', '.join(sorted(unknown))}")
        hints = typing.get_type_hints(cls)
        values, from_environment = {}, set()
        for name in fields:
            var = cls.env_var(name)
            if overrides.get(name) is not None:
                raw, source = overrides[name], name
            elif environ.get(var, "").strip() != "":
                raw, source = environ[var].strip(), var
                from_environment.add(name)
            else:
                continue
            values[name] = convert(raw, hints[name], source)
        try:
            return cls(**values)
        except InvalidArgument as exc:
            first = exc.message.split(" ", 1)[0]
            if first in from_environment:  # "frontend_heap_mb must be >= 64, ..." from the environment
                raise InvalidArgument(f"{cls.env_var(first)}: {exc.message}") from None
            raise


#: torch's intra-op threads in a process that runs models (a worker, the native engine, the
#: speed check); ``modelctl serve`` sets it for TorchServe's workers from the cores they share.
TORCH_THREADS_ENV = "MODELCTL_TORCH_THREADS"


def torch_threads(default: int | None = None, environ: typing.Mapping[str, str] | None = None) -> int | None:
    """``MODELCTL_TORCH_THREADS`` (at least 1), else ``default``; a non-integer names the variable."""
    threads = Environ(environ).int(TORCH_THREADS_ENV)
    return default if threads is None else max(1, threads)
