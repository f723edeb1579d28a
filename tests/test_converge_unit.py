"""The desired state in the model store without replicas: written atomically and read back, an
unreadable record named, a fine-tuned version not made default by itself. Three real
TorchServes converging on it are tests/test_converge.py."""

from __future__ import annotations

import pytest

from service.errors import InvalidSpec, NotFound
from service.modelstore import ModelStore
from tests.helpers import make_bundle
from tests.test_converge import NAME

pytestmark = pytest.mark.unit


def test_desired_state_is_written_atomically_and_read_back(tmp_path):
    store = ModelStore(tmp_path)
    store.write(NAME, make_bundle("cnn", seed=1))
    store.write(NAME, make_bundle("cnn", seed=2))
    assert store.desired(NAME) is None and store.default_version(NAME) == 2  # latest by default
    state = store.set_desired(NAME, 1, 3, "deploy")
    assert (state.version, state.workers, state.reason) == (1, 3, "deploy")
    assert store.desired(NAME) == state and store.default_version(NAME) == 1
    assert store.models() == {NAME: [1, 2]}, "the record is not taken for an archive"
    assert not list((tmp_path / NAME).glob(".deployment.json.*")), "no temp file is left"
    with pytest.raises(NotFound, match="no version 7"):
        store.set_desired(NAME, 7, 1)
    assert store.desired(NAME).version == 1, "a refused record leaves the old one"


def test_an_unreadable_record_is_an_error_naming_the_file(tmp_path):
    store = ModelStore(tmp_path)
    store.write(NAME, make_bundle("cnn"))
    (tmp_path / NAME / "deployment.json").write_text('{"version": "two"}')
    with pytest.raises(InvalidSpec, match="deployment.json"):
        store.desired(NAME)


def test_a_fine_tuned_version_does_not_become_default_by_itself(tmp_path):
    store = ModelStore(tmp_path)
    store.write(NAME, make_bundle("cnn", seed=1))
    store.write(NAME, make_bundle("cnn", seed=2), keep_default=True)
    assert store.default_version(NAME) == 1
    assert "kept when version 2 was written" in store.desired(NAME).reason
    store.write("fresh", make_bundle("cnn"), keep_default=True)  # a model's first version is its default
    assert store.desired("fresh") is None and store.default_version("fresh") == 1
