"""The fixture of tests/test_legacy_archives.py is what stores written by commit 0b5d150 hold:
its models, its commit, and the handler shim inside the archives, which imports
service.handlers.torchserve (that module must stay). Serving it is tests/test_legacy_archives.py."""

from __future__ import annotations

import zipfile

import pytest

from tests.test_legacy_archives import FIXTURE, _fixture

pytestmark = pytest.mark.unit


def test_the_fixture_is_what_old_stores_hold():
    fixture = _fixture()
    assert fixture["commit"].startswith("0b5d150")
    assert sorted(p.parent.name for p in (FIXTURE / "store").glob("*/1.mar")) == sorted(fixture["models"])
    # The shim inside these archives imports service.handlers.torchserve: that module must stay.
    with zipfile.ZipFile(FIXTURE / "store" / "cnn" / "1.mar") as mar:
        shim = next(mar.read(n).decode() for n in mar.namelist() if n.endswith("_handler.py"))
    assert "service.handlers.torchserve" in shim
