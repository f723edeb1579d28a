"""The test tiers (tests/conftest.py, pyproject.toml's markers): which markers are tiers, the
check that gives every test exactly one, and the engine params that mark each engine's half."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import registered_tiers, tier_problems
from tests.helpers import engine_params

pytestmark = pytest.mark.unit

TIERS = {"unit", "integration", "native", "torchserve", "faults", "container", "k8s"}


def _item(nodeid: str, *marks: str):
    return SimpleNamespace(nodeid=nodeid, iter_markers=lambda: [SimpleNamespace(name=m) for m in marks])


def test_the_tiers_are_the_markers_described_as_tiers(pytestconfig):
    assert registered_tiers(pytestconfig) == TIERS  # gpu is a marker, not a tier
    fake = SimpleNamespace(getini=lambda name: ["a: tier: x", "b: something else", "c:tier:y", "d"])
    assert registered_tiers(fake) == {"a", "c"}


def test_a_test_without_a_tier_or_with_two_is_named():
    items = [_item("t.py::ok", "unit", "parametrize"), _item("t.py::none", "gpu"),
             _item("t.py::two", "unit", "torchserve"), _item("t.py::same_twice", "native", "native")]
    assert tier_problems(items, TIERS) == ["t.py::none: no tier", "t.py::two: torchserve, unit"]
    assert tier_problems(items[:1], TIERS) == []


def test_engine_params_mark_each_engine_with_its_tier():
    params = engine_params("torchserve", "native")
    assert [p.values for p in params] == [("torchserve",), ("native",)]
    assert [[m.name for m in p.marks] for p in params] == [["torchserve"], ["native"]]
    assert {"torchserve", "native"} <= TIERS


def test_this_session_gives_every_test_one_tier(request):
    items = request.session.items
    assert items and tier_problems(items, registered_tiers(request.config)) == []
