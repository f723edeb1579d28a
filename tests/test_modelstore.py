"""The model store: versions, immutability, atomic writes, archive contents."""

from __future__ import annotations

import json
import threading
import zipfile

import pytest
import torch

from service.errors import AlreadyExists, InvalidSpec, NotFound
from service.modelstore import ModelBundle, ModelStore
from service.models.bundle import LABELS_FILE, LINEAGE_FILE, SPEC_FILE, WEIGHTS_FILE
from tests.helpers import make_bundle

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "store")


def test_write_assigns_versions_and_lists_lineage(store):
    a = store.write("digits", make_bundle("cnn", seed=1))
    b = store.write("digits", make_bundle("cnn", seed=2))
    assert (a.version, b.version) == (1, 2)
    assert store.models() == {"digits": [1, 2]}
    assert a.path == store.root / "digits" / "1.mar"
    listed = store.list()
    assert [(x.name, x.version) for x in listed] == [("digits", 1), ("digits", 2)]
    assert listed[1].lineage["family"] == "cnn"
    assert listed[1].lineage["version"] == 2
    assert len(listed[1].lineage["weights_sha256"]) == 64
    assert store.get("digits").version == 2


def test_archive_holds_bundle_and_only_our_handler(store):
    info = store.write("seq", make_bundle("gru-text"))
    with zipfile.ZipFile(info.path) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        shim = z.read("modelctl_handler.py").decode()
        labels = json.loads(z.read(LABELS_FILE))
    assert {SPEC_FILE, LABELS_FILE, WEIGHTS_FILE, LINEAGE_FILE, "vocab.json", "model-config.yaml"} <= names
    assert [n for n in names if n.endswith(".py")] == ["modelctl_handler.py"]
    assert "from service.handlers.torchserve import handle" in shim
    assert manifest["model"]["modelName"] == "seq"
    assert manifest["model"]["modelVersion"] == "1"
    assert manifest["model"]["handler"] == "modelctl_handler.py"
    assert labels == ["gru-text-class-0", "gru-text-class-1"]


def test_existing_version_is_refused_and_kept(store):
    first = store.write("m", make_bundle("cnn", seed=1), version=3)
    before = first.path.read_bytes()
    with pytest.raises(AlreadyExists, match="version 3"):
        store.write("m", make_bundle("cnn", seed=2), version=3)
    assert first.path.read_bytes() == before
    assert store.versions("m") == [3]
    assert store.write("m", make_bundle("cnn")).version == 4
    assert not [p for p in (store.root / "m").iterdir() if p.name.startswith(".staging")]


def test_concurrent_writers_get_distinct_versions(store):
    bundle = make_bundle("lstm")
    versions, errors = [], []

    def write():
        try:
            versions.append(store.write("race", bundle).version)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == [1, 2, 3, 4]
    for v in versions:
        with zipfile.ZipFile(store.path("race", v)) as z:
            assert z.testzip() is None


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "x" * 65, "-lead", "sp ace"])
def test_invalid_names_are_refused(store, name):
    with pytest.raises(InvalidSpec, match="name"):
        store.write(name, make_bundle("cnn"))


def test_bundle_parts_must_fit(store):
    bundle = make_bundle("cnn")
    with pytest.raises(InvalidSpec, match="labels"):
        store.write("m", ModelBundle(bundle.spec, bundle.state_dict, ["only-one"]))
    broken = dict(bundle.state_dict)
    broken.pop(next(iter(broken)))
    with pytest.raises(InvalidSpec, match="weights"):
        store.write("m", ModelBundle(bundle.spec, broken, bundle.labels))
    assert store.versions("m") == []


def test_bundle_round_trip_uses_weights_only(tmp_path):
    bundle = make_bundle("gru-text")
    bundle.save(tmp_path / "b")
    loaded = ModelBundle.load(tmp_path / "b")
    assert loaded.spec == bundle.spec
    assert loaded.labels == bundle.labels
    assert loaded.vocab.to_list() == bundle.vocab.to_list()
    for key, value in bundle.state_dict.items():
        assert torch.equal(loaded.state_dict[key], value)


def test_get_unknown_is_not_found(store):
    with pytest.raises(NotFound):
        store.get("nothing")
    store.write("m", make_bundle("cnn"))
    with pytest.raises(NotFound, match="version 7"):
        store.get("m", 7)
