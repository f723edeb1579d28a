"""The record of a model's desired serving state, ``deployment.json`` (service/deploy/desired.py).

The store's use of it (set_desired, default_version, keep_default) is tested in
tests/test_converge_unit.py; the replicas converging on it in tests/test_converge.py.
"""

from __future__ import annotations

import json

import pytest

from service.deploy.desired import DEPLOYMENT_FILE, DesiredState, read_desired, write_desired
from service.errors import InvalidSpec

pytestmark = pytest.mark.unit

NAME = "m"


def test_the_record_is_the_json_replicas_read(tmp_path):
    # service.deploy.desired owns deployment.json: the fields and format that stores written
    # before it hold, read back as they were written.
    state = DesiredState(NAME, 2, 1, "2026-01-01T00:00:00+00:00", "deploy job-1")
    write_desired(tmp_path, state)
    assert json.loads((tmp_path / DEPLOYMENT_FILE).read_text()) == {
        "version": 2, "workers": 1, "updated_at": "2026-01-01T00:00:00+00:00", "reason": "deploy job-1"}
    assert read_desired(tmp_path, NAME) == state
    (tmp_path / DEPLOYMENT_FILE).write_text('{"version": 3}')  # written by hand: workers 0, no reason
    assert read_desired(tmp_path, NAME) == DesiredState(NAME, 3, 0)
    assert read_desired(tmp_path / "none", NAME) is None
    for bad in ('{"version": 0}', '{"version": 1, "workers": -1}', "[1]", "{"):
        (tmp_path / DEPLOYMENT_FILE).write_text(bad)
        with pytest.raises(InvalidSpec, match="deployment.json"):
            read_desired(tmp_path, NAME)
