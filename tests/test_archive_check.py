"""A corrupt archive in the model store is refused before registration (issue 7, point 4d).

The archives are real: written by the model store, then damaged the ways a store gets
damaged (a truncated copy, a flipped byte, a lost or garbled MANIFEST, weights that need
pickled code, weights of another shape). Nothing is faked. A real TorchServe with the control
API beside it (``modelctl serve``'s composition) on such a store is
tests/test_archive_check_serving.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from service.deploy.deployer import Deployer
from service.control.jobs.jobstore import JobStore
from service.errors import ArchiveRefused
from service.modelstore import ModelStore, check_archive, known_refusal, verify_archive
from service.modelstore.check import ALLOW_FOREIGN_ENV
from service.serving.settings import ServeSettings
from tests.helpers import make_bundle

pytestmark = pytest.mark.unit

CHECK_LOGGER = "service.modelstore.check"


class _Payload:
    """Pickled code: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- damaged copies of a real archive -------------------------------------------------------------
def _rewrite(good: Path, target: Path, change, stored: str | None = None) -> None:
    """Copy ``good`` member by member; ``change(name, data)`` gives the new bytes, or None to
    leave the member out. ``stored``: a member written uncompressed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = change(item.filename, src.read(item))
            if data is not None:
                dst.writestr(item.filename, data,
                             compress_type=zipfile.ZIP_STORED if item.filename == stored else zipfile.ZIP_DEFLATED)


def _manifest_named(name: str, version: int):
    def change(member: str, data: bytes) -> bytes:
        if member == "MAR-INF/MANIFEST.json":
            manifest = json.loads(data)
            manifest["model"].update(modelName=name, modelVersion=str(version))
            return json.dumps(manifest).encode()
        return data
    return change


def _with(name: str, version: int, member: str, new: bytes | None):
    rename = _manifest_named(name, version)
    return lambda m, data: (new if m == member else rename(m, data))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def truncated(good: Path, target: Path, name: str, version: int) -> None:
    _rewrite(good, target, _manifest_named(name, version))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) * 2 // 3])  # a copy cut short: no central directory


def bad_crc(good: Path, target: Path, name: str, version: int) -> None:
    _rewrite(good, target, _manifest_named(name, version), stored="weights.pt")
    with zipfile.ZipFile(target) as z:
        info = z.getinfo("weights.pt")
    raw = bytearray(target.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0xFF  # one flipped bit pattern in the stored weights
    target.write_bytes(bytes(raw))


def no_manifest(good: Path, target: Path, name: str, version: int) -> None:
    _rewrite(good, target, _with(name, version, "MAR-INF/MANIFEST.json", None))


def garbage_manifest(good: Path, target: Path, name: str, version: int) -> None:
    _rewrite(good, target, _with(name, version, "MAR-INF/MANIFEST.json", b'{"model": {"modelName": '))


def other_handler(good: Path, target: Path, name: str, version: int) -> None:
    def change(member: str, data: bytes) -> bytes:
        if member == "MAR-INF/MANIFEST.json":
            manifest = json.loads(data)
            manifest["model"].update(modelName=name, modelVersion=str(version), handler="image_classifier")
            return json.dumps(manifest).encode()
        return data
    _rewrite(good, target, change)


def pickled_code(good: Path, target: Path, name: str, version: int, marker: Path) -> None:
    weights = _torch_bytes({"features.0.weight": torch.zeros(1), "payload": _Payload(marker)})
    _rewrite(good, target, _with(name, version, "weights.pt", weights))


def wrong_shape(good: Path, target: Path, name: str, version: int) -> str:
    """Weights of the right names, one of them of another shape; returns that name."""
    with zipfile.ZipFile(good) as z:
        state = torch.load(io.BytesIO(z.read("weights.pt")), weights_only=True)
    key = next(k for k in reversed(state) if state[k].dim() == 2)
    rows, cols = state[key].shape
    state[key] = torch.zeros(rows + 1, cols)
    _rewrite(good, target, _with(name, version, "weights.pt", _torch_bytes(state)))
    return key


#: kind -> (builder, what the refusal says)
DAMAGE = {
    "truncated": (truncated, "not a readable zip archive"),
    "bad-crc": (bad_crc, "bad CRC-32 for weights.pt"),
    "no-manifest": (no_manifest, "has no MAR-INF/MANIFEST.json: not a TorchServe model archive"),
    "garbage-manifest": (garbage_manifest, "MAR-INF/MANIFEST.json is not valid JSON"),
    "other-handler": (other_handler, "names the handler 'image_classifier', not modelctl's modelctl_handler.py"),
    "pickled-code": (pickled_code, "weights.pt needs pickled code to load (posix.system)"),
    "wrong-shape": (wrong_shape, "weights.pt does not fit spec.json (cnn): wrong shape: "),
}


def damage(kind: str, good: Path, target: Path, name: str, version: int, marker: Path) -> None:
    build = DAMAGE[kind][0]
    if kind == "pickled-code":
        build(good, target, name, version, marker)
    else:
        build(good, target, name, version)


@pytest.fixture(autouse=True)
def only_modelctl_archives(monkeypatch):
    """What production runs with: tests/conftest.py lets the other test modules serve
    stand-in archives with their own handlers."""
    monkeypatch.delenv(ALLOW_FOREIGN_ENV, raising=False)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("check") / "store")
    for kind in ("cnn", "gru-text", "resnet"):
        store.write(kind, make_bundle(kind))
    return store


# ---- the check itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cnn", "gru-text", "resnet"])
def test_archives_the_store_writes_pass(good_store, kind):
    path = good_store.path(kind, 1)
    verify_archive(path, name=kind, version=1)
    assert check_archive(path, name=kind, version=1) is None


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_damage_is_refused_naming_the_file_and_the_problem(good_store, tmp_path, kind):
    target = tmp_path / "broken" / "1.mar"
    marker = tmp_path / "pickled-code-ran"
    damage(kind, good_store.path("cnn", 1), target, "broken", 1, marker)
    with pytest.raises(ArchiveRefused) as info:
        verify_archive(target, name="broken", version=1)
    assert info.value.grpc_code == "FAILED_PRECONDITION"
    assert info.value.message.startswith(f"archive {target} is refused: "), info.value.message
    assert DAMAGE[kind][1] in info.value.problem, info.value.problem
    assert not marker.exists(), "nothing pickled ran"


def test_a_wrong_shape_names_the_tensor_and_both_shapes(good_store, tmp_path):
    target = tmp_path / "shape" / "1.mar"
    key = wrong_shape(good_store.path("cnn", 1), target, "shape", 1)
    with pytest.raises(ArchiveRefused) as info:
        verify_archive(target, name="shape", version=1)
    assert f"{key} is (11, " in info.value.problem and "the spec needs (10, " in info.value.problem, info.value.problem


def test_an_archive_stored_under_another_name_or_version_is_refused(good_store, tmp_path):
    target = tmp_path / "copy" / "2.mar"
    _rewrite(good_store.path("cnn", 1), target, lambda m, d: d)  # MANIFEST still says cnn, 1
    with pytest.raises(ArchiveRefused, match="names the model 'cnn'; it is stored as 'copy'"):
        verify_archive(target, name="copy", version=2)
    with pytest.raises(ArchiveRefused, match="names version '1'; it is stored as version 2"):
        verify_archive(target, name="cnn", version=2)


def test_stand_in_archives_of_tests_get_the_zip_and_manifest_checks_only_when_allowed(good_store, tmp_path,
                                                                                    monkeypatch):
    target = tmp_path / "stand-in" / "1.mar"
    other_handler(good_store.path("cnn", 1), target, "stand-in", 1)
    monkeypatch.setenv(ALLOW_FOREIGN_ENV, "1")
    verify_archive(target, name="stand-in", version=1)
    with pytest.raises(ArchiveRefused, match="names the model 'stand-in'; it is stored as 'other'"):
        verify_archive(target, name="other", version=1)
    broken = tmp_path / "stand-in" / "2.mar"
    bad_crc(target, broken, "stand-in", 2)
    with pytest.raises(ArchiveRefused, match="bad CRC-32 for weights.pt"):
        verify_archive(broken, name="stand-in", version=2)
    monkeypatch.delenv(ALLOW_FOREIGN_ENV)
    with pytest.raises(ArchiveRefused, match="names the handler 'image_classifier'"):
        verify_archive(target, name="stand-in", version=1)


def test_the_result_is_cached_per_file_and_a_refusal_logged_once(good_store, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger=CHECK_LOGGER)
    target = tmp_path / "cached" / "1.mar"
    bad_crc(good_store.path("cnn", 1), target, "cached", 1)
    assert known_refusal(target, name="cached", version=1) is None, "nothing is known before a check"
    first = check_archive(target, name="cached", version=1)
    assert first is not None and "bad CRC-32" in first.problem
    for _ in range(5):
        assert check_archive(target, name="cached", version=1) is first, "the cached refusal, not a new check"
    assert known_refusal(target, name="cached", version=1) is first
    lines = [r.getMessage() for r in caplog.records if str(target) in r.getMessage()]
    assert len(lines) == 1 and "bad CRC-32 for weights.pt" in lines[0] and "not registered" in lines[0], lines
    # Fixed in place (a new file under the same name): checked again, and it passes.
    fixed = target.with_name(".fixed")
    _rewrite(good_store.path("cnn", 1), fixed, _manifest_named("cached", 1))
    os.replace(fixed, target)
    assert check_archive(target, name="cached", version=1) is None
    assert known_refusal(target, name="cached", version=1) is None


def test_a_deploy_of_a_refused_archive_fails_its_precondition_and_changes_nothing(good_store, tmp_path):
    store = ModelStore(tmp_path / "store")
    store.write("m", make_bundle("cnn", seed=1))
    garbage_manifest(good_store.path("cnn", 1), store.path("m", 2), "m", 2)
    jobs = JobStore(tmp_path / "control.db")
    try:
        # The control service on Kubernetes: it only writes the store, which replicas follow.
        settings = ServeSettings(model_store=store.root, state_dir=tmp_path / "state")
        deployer = Deployer(settings, mgmt=None, history=jobs.history, model_store=store, target="store", default_workers=1)
        with pytest.raises(ArchiveRefused) as info:
            deployer.deploy("m", 2)
        assert info.value.grpc_code == "FAILED_PRECONDITION"
        assert str(store.path("m", 2)) in info.value.message and "MANIFEST.json is not valid JSON" in info.value.message
        assert store.desired("m") is None and jobs.history.top_deployment("m") is None
        with pytest.raises(ArchiveRefused):
            deployer.rollback("m", 2)
        assert deployer.deploy("m", 1).version == 1, "the good version deploys"
        assert store.desired("m").version == 1
    finally:
        jobs.close()


