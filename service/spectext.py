"""Spec documents from callers: JSON or YAML text, parsed within fixed bounds.

A run spec is a few hundred bytes of a handful of levels. What a caller sends is bounded
before it is parsed and after:

* the text: at most :data:`MAX_SPEC_CHARS` characters;
* YAML aliases (``*name``, and ``<<: *name`` merges) are refused while parsing, at the
  first one: nine aliases of nine aliases of ... of a short list is a 300-byte document
  that grows ×9 a level once anything walks it (an "alias bomb");
* the parsed value (also a structured one, as a protobuf Struct brings it): at most
  :data:`MAX_SPEC_DEPTH` levels and :data:`MAX_SPEC_NODES` values, counted by a walk
  that stops at the bound.

Each is an :class:`~service.errors.InvalidSpec` of the field ``spec``, found in
milliseconds. This module needs neither torch nor the trainer (the control API imports it).
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import InvalidSpec

#: Characters of a spec's text.
MAX_SPEC_CHARS = 64 * 1024
#: Levels of nesting of a parsed spec (a run spec has about five).
MAX_SPEC_DEPTH = 32
#: Values (objects, lists and scalars together) of a parsed spec.
MAX_SPEC_NODES = 10_000

_loader_class = None


def _no_alias_loader():
    """yaml.SafeLoader that raises InvalidSpec at the first alias, and past MAX_SPEC_DEPTH
    levels (made once, lazily)."""
    global _loader_class
    if _loader_class is None:
        import yaml

        class NoAliasLoader(yaml.SafeLoader):
            depth = 0

            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    event = self.peek_event()
                    raise InvalidSpec("spec", f"YAML aliases are not accepted (*{str(event.anchor)[:40]} at line "
                                              f"{event.start_mark.line + 1}); write the value out")
                if self.depth >= MAX_SPEC_DEPTH:  # refused on the way down, before Python's recursion limit
                    raise InvalidSpec("spec", f"nests deeper than {MAX_SPEC_DEPTH} levels")
                self.depth += 1
                try:
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= 1

        _loader_class = NoAliasLoader
    return _loader_class


def load_yaml(text: str) -> Any:
    """One YAML document, as ``yaml.safe_load`` reads it but refusing aliases (InvalidSpec).
    Other YAML errors propagate as ``yaml.YAMLError``."""
    import yaml

    return yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass


def check_size(text: str, field: str = "spec") -> str:
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidSpec(field, f"is longer than {MAX_SPEC_CHARS} characters, the most accepted")
    return text


def check_shape(value: Any, field: str = "spec") -> Any:
    """``value`` if it nests at most MAX_SPEC_DEPTH levels and holds at most MAX_SPEC_NODES
    values; else InvalidSpec. The walk stops at the first bound passed, so a value that
    shares its parts (as YAML aliases make) costs no more than the bound to check."""
    stack = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SPEC_NODES:
            raise InvalidSpec(field, f"holds more than {MAX_SPEC_NODES} values; a run spec needs far fewer")
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= MAX_SPEC_DEPTH and children:
            raise InvalidSpec(field, f"nests deeper than {MAX_SPEC_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return value


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text``, quotes ignored (an upper bound of a
    YAML document's flow nesting, give or take brackets inside strings)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}" and depth:
            depth -= 1
    return deepest


def parse(text: str, *, field: str = "spec", yaml_too: bool = True) -> Any:
    """A JSON document, else (``yaml_too``) a YAML one, within the bounds above;
    InvalidSpec naming ``field`` when it is neither or is out of bounds."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidSpec(field, "is empty: give the run spec as JSON or YAML text, or as a struct")
    check_size(text, field)
    try:
        return check_shape(json.loads(text), field)
    except json.JSONDecodeError as json_error:
        if not yaml_too:
            raise InvalidSpec(field, f"not JSON: {json_error.msg} at line {json_error.lineno}") from None
        failure = json_error
    except RecursionError:
        raise InvalidSpec(field, f"nests deeper than {MAX_SPEC_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidSpec(field, f"not a JSON value this service reads: {str(exc)[:120]}") from None
    import yaml

    if _flow_depth(text) > 4 * MAX_SPEC_DEPTH:  # PyYAML's scanner takes seconds on thousands of "["
        raise InvalidSpec(field, f"nests deeper than {MAX_SPEC_DEPTH} levels")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidSpec(field, f"neither JSON ({failure.msg}) nor YAML ({first[:120]})") from None
    except RecursionError:
        raise InvalidSpec(field, f"nests deeper than {MAX_SPEC_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidSpec(field, f"not a YAML value this service reads: {str(exc)[:120]}") from None
    if isinstance(data, str):  # a bare YAML scalar: surely meant as JSON
        raise InvalidSpec(field, f"not a JSON object: {failure.msg} at line {failure.lineno}")
    return check_shape(data, field)
