"""Limits (issue 7, point 6): bounded run specs and datasets, data roots, weights without code.

In process and fast. The limits that need a real server are in tests/test_fuzz.py: a body
over ``max_request_size`` (413 over REST, RESOURCE_EXHAUSTED over gRPC, the server still
up) and an archive whose weights need pickled code (refused by the real TorchServe worker).
The data-roots escapes through files, ``..`` and symlinked files are also in
tests/test_training.py (test_dataset_outside_the_data_roots_is_refused_and_not_read).
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from service.cli import main
from service.errors import InvalidSpec
from service.modelstore import ModelBundle, ModelStore
from service.models.bundle import WEIGHTS_FILE, read_weights
from service.training import datasets as ds
from service.training.run_spec import (
    MAX_BATCH_SIZE,
    MAX_DATALOADER_WORKERS,
    MAX_EPOCHS,
    MAX_EXAMPLES,
    MAX_NPROC,
    MAX_SEED,
    Policy,
    RunSpec,
)
from tests.helpers import SPECS, make_bundle

pytestmark = pytest.mark.unit

CNN = {"family": "cnn", "config": {"channels": [4]}, "input": {"type": "image", "channels": 1, "size": 8,
                                                                 "resize": None}}


def spec(dataset="builtin:digits", **hp) -> dict:
    return {"model": CNN, "dataset": dataset, "output": {"name": "m"},
            "hyperparameters": {"epochs": 1, "batch_size": 8, **hp}}


# ---- run specs ------------------------------------------------------------------------------
def test_the_bounds_are_named_constants_and_the_policy_defaults():
    policy = Policy(())
    assert (policy.max_epochs, policy.max_batch_size, policy.max_nproc, policy.max_workers,
            policy.max_examples) == (MAX_EPOCHS, MAX_BATCH_SIZE, MAX_NPROC, MAX_DATALOADER_WORKERS, MAX_EXAMPLES)
    assert ds.LoadContext(None, "multiclass").max_examples == MAX_EXAMPLES


@pytest.mark.parametrize("name, low, high", [
    ("epochs", 1, MAX_EPOCHS), ("batch_size", 1, MAX_BATCH_SIZE), ("nproc", 1, MAX_NPROC),
    ("workers", 0, MAX_DATALOADER_WORKERS), ("seed", 0, MAX_SEED),
])
def test_hyperparameters_over_a_bound_name_the_field_and_the_range(name, low, high, roots):
    policy = Policy((roots,))
    assert getattr(RunSpec.from_dict(spec(**{name: high}), policy).hp, name) == high  # the bound itself
    for value in (high + 1, 10**12):
        with pytest.raises(InvalidSpec) as err:
            RunSpec.from_dict(spec(**{name: value}), policy)
        assert err.value.field == f"hyperparameters.{name}"
        assert f"between {low} and {high}" in err.value.message and str(value) in err.value.message


def test_an_operators_policy_sets_its_own_bounds(roots):
    policy = Policy((roots,), max_epochs=5, max_batch_size=64, max_nproc=2, max_workers=1, max_examples=100)
    for name, value, field in (("epochs", 6, "hyperparameters.epochs"),
                               ("batch_size", 65, "hyperparameters.batch_size"),
                               ("nproc", 3, "hyperparameters.nproc"), ("workers", 2, "hyperparameters.workers")):
        with pytest.raises(InvalidSpec) as err:
            RunSpec.from_dict(spec(**{name: value}), policy)
        assert err.value.field == field and "this service's limit" in err.value.message
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict(spec({"source": "builtin:digits", "train_size": 101}), policy)
    assert err.value.field == "dataset.train_size" and "between 1 and 100" in err.value.message
    # a spec cannot widen its policy: the keys are not part of a spec
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict({**spec(), "max_epochs": 10**6}, policy)
    assert err.value.field == "max_epochs"


@pytest.mark.parametrize("name", ["train_size", "val_size"])
def test_subset_sizes_are_bounded(name, roots):
    policy = Policy((roots,))
    RunSpec.from_dict(spec({"source": "builtin:digits", name: MAX_EXAMPLES}), policy)
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict(spec({"source": "builtin:digits", name: MAX_EXAMPLES + 1}), policy)
    assert err.value.field == f"dataset.{name}" and f"between 1 and {MAX_EXAMPLES}" in err.value.message


# ---- dataset sizes --------------------------------------------------------------------------
def _load(kind, path, roots, limit):
    return ds.load_raw(kind, None, ds.LoadContext(path, "multiclass", (roots,), limit))


def test_datasets_over_the_example_limit_are_refused(roots):
    np.savez(roots / "seq.npz", x=np.zeros((12, 3, 2), np.float32), y=np.zeros(12, np.int64))
    assert len(_load("npz", roots / "seq.npz", roots, 12).x) == 12
    with pytest.raises(InvalidSpec, match="x has 12 rows; at most 10 examples") as err:
        _load("npz", roots / "seq.npz", roots, 10)
    assert err.value.field == "dataset.source"
    lines = [json.dumps({"sequence": [[0.5, 0.5]], "label": i % 2}) for i in range(12)]
    (roots / "seq.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidSpec, match="at most 10 are allowed"):
        _load("jsonl", roots / "seq.jsonl", roots, 10)
    for cls in ("a", "b"):
        (roots / "images" / cls).mkdir(parents=True)
        for i in range(3):
            png = encode_png(torch.zeros(1, 4, 4, dtype=torch.uint8)).numpy().tobytes()
            (roots / "images" / cls / f"{i}.png").write_bytes(png)
    assert len(_load("imagefolder", roots / "images", roots, 6).x) == 6
    with pytest.raises(InvalidSpec, match="at most 5 are allowed"):
        _load("imagefolder", roots / "images", roots, 5)


def test_an_npz_is_measured_by_its_header_before_its_arrays_are_read(roots):
    """A compressed member can declare far more rows than the file holds bytes: refused
    from the .npy header, without reading the array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10**9, 4, 2)})
    y = io.BytesIO()
    np.save(y, np.zeros(3, np.int64))
    with zipfile.ZipFile(roots / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))
        z.writestr("y.npy", y.getvalue())
    with pytest.raises(InvalidSpec, match="x has 1000000000 rows"):
        _load("npz", roots / "bomb.npz", roots, MAX_EXAMPLES)


# ---- data roots -----------------------------------------------------------------------------
def test_a_symlinked_directory_cannot_lead_out_of_the_data_roots(tmp_path, roots):
    outside = tmp_path / "outside"
    outside.mkdir()
    np.savez(outside / "x.npz", x=np.zeros((4, 2, 1), np.float32), y=np.zeros(4, np.int64))
    (roots / "linked").symlink_to(outside, target_is_directory=True)
    policy = Policy((roots,))
    for source in ("linked/x.npz", str(roots / "linked" / "x.npz"), "linked/../../outside/x.npz"):
        with pytest.raises(InvalidSpec) as err:
            RunSpec.from_dict(spec(source), policy)
        assert err.value.field == "dataset.source" and "outside the data roots" in err.value.message
    # a symlink that stays inside the roots is followed
    (roots / "real").mkdir()
    np.savez(roots / "real" / "x.npz", x=np.zeros((4, 2, 1), np.float32), y=np.zeros(4, np.int64))
    (roots / "alias").symlink_to(roots / "real", target_is_directory=True)
    assert RunSpec.from_dict(spec("alias/x.npz"), policy).dataset_path == (roots / "real" / "x.npz").resolve()


# ---- weights: tensors only, never code --------------------------------------------------------
class _Payload:
    """Unpickles as a call to os.system that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_weights_that_need_pickled_code_are_refused_at_load(tmp_path):
    bundle = make_bundle("lstm")
    marker = tmp_path / "pickled-code-ran"
    cases = {
        "a pickled nn.Module": (_saved(torch.nn.Linear(2, 2)), "needs pickled code to load (torch.nn.modules"),
        "a state_dict holding an object": (_saved({**bundle.state_dict, "x": _Payload(marker)}),
                                           "needs pickled code to load (posix.system)"),
        "a list of tensors": (_saved([torch.zeros(2)]), "holds a list, not a state_dict"),
        "a state_dict with a number": (_saved({**bundle.state_dict, "step": 3}), "not a state_dict"),
        "not a torch file": (b"PK\x03\x04 not really", "cannot read weights.pt"),
    }
    for what, (data, needle) in cases.items():
        directory = tmp_path / what.replace(" ", "-")
        bundle.save(directory)
        (directory / WEIGHTS_FILE).write_bytes(data)
        with pytest.raises(InvalidSpec) as err:
            ModelBundle.load(directory)
        assert err.value.field == "weights" and needle in err.value.message, (what, err.value.message)
    assert not marker.exists()
    good = tmp_path / "good"
    bundle.save(good)
    assert ModelBundle.load(good).state_dict.keys() == bundle.state_dict.keys()
    assert read_weights(good / WEIGHTS_FILE).keys() == bundle.state_dict.keys()


def test_archive_command_refuses_weights_that_need_pickled_code(tmp_path, capsys):
    marker = tmp_path / "pickled-code-ran"
    (tmp_path / "spec.json").write_text(json.dumps(SPECS["lstm"]))
    (tmp_path / "evil.pt").write_bytes(_saved({**make_bundle("lstm").state_dict, "x": _Payload(marker)}))
    store = tmp_path / "store"
    code = main(["models", "archive", "--name", "evil", "--spec", str(tmp_path / "spec.json"),
                 "--weights", str(tmp_path / "evil.pt"), "--store", str(store)])
    assert code == 2
    assert "weights: evil.pt needs pickled code to load (posix.system)" in capsys.readouterr().err
    assert not marker.exists()
    assert ModelStore(store).models() == {}


# ---- issue 12, point 4: bounds set by the operator ------------------------------------------------
def test_the_operator_lowers_the_run_bounds_by_environment_never_raises_them(roots):
    from service import bounds
    from service.control.jobs import intake as specs
    from service.control.settings import ControlConfig
    from service.control.runners.local import local_runner
    from service.errors import InvalidArgument

    env = {"MODELCTL_MAX_EPOCHS": "5", "MODELCTL_MAX_BATCH_SIZE": "64", "MODELCTL_MAX_NPROC": "2",
           "MODELCTL_MAX_DATALOADER_WORKERS": "0", "MODELCTL_MAX_EXAMPLES": "100",
           "MODELCTL_MAX_DATASET_ELEMENTS": "1000"}
    policy = Policy.from_env([roots], environ=env)  # the trainer's
    assert (policy.max_epochs, policy.max_batch_size, policy.max_nproc, policy.max_workers, policy.max_examples,
            policy.max_elements) == (5, 64, 2, 0, 100, 1000)
    config = ControlConfig.from_env(environ=env, data_roots=[roots], model_store=roots)  # the control API's
    assert specs.policy_for(config) == policy
    with pytest.raises(InvalidSpec, match="between 0 and 0"):
        RunSpec.from_dict(spec(workers=1), policy)
    # the trainers it starts get the same bounds, whatever their environment
    assert local_runner(config).extra_env == env
    assert Policy.from_env([roots], environ={}) == Policy((roots,))  # unset: the ceilings
    for name, ceiling in (("MODELCTL_MAX_EPOCHS", MAX_EPOCHS), ("MODELCTL_MAX_NPROC", MAX_NPROC),
                          ("MODELCTL_MAX_DATASET_ELEMENTS", bounds.MAX_DATASET_ELEMENTS)):
        for value in (str(ceiling + 1), "0", "-1", "many"):
            for make in (lambda e: Policy.from_env([roots], environ=e), lambda e: ControlConfig.from_env(environ=e)):
                with pytest.raises(InvalidArgument, match=name):
                    make({name: value})
    with pytest.raises(InvalidArgument, match=f"MODELCTL_MAX_EPOCHS must be an integer from 1 to {MAX_EPOCHS}"):
        Policy((roots,), max_epochs=MAX_EPOCHS + 1)


def _npz_declaring(path, shape, dtype="<f4", version=(1, 0)):
    """A .npz whose x.npy header declares ``shape`` over 64 bytes of data."""
    header = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    y = io.BytesIO()
    np.save(y, np.zeros(shape[0] if shape else 1, np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))
        z.writestr("y.npy", y.getvalue())


def test_an_npz_declaring_a_billion_elements_is_refused_before_any_allocation(roots, monkeypatch):
    import tracemalloc

    _npz_declaring(roots / "wide.npz", (10, 10**9, 1))  # 10 rows: within the example bound
    read = []
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: read.append(a) or pytest.fail("read"))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidSpec) as err:
            _load("npz", roots / "wide.npz", roots, MAX_EXAMPLES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.field == "dataset.source"
    assert ("wide.npz: its arrays declare 10000000000 elements (through x, shape (10, 1000000000, 1)); at most "
            f"{2**28} are allowed (this service's limit, MODELCTL_MAX_DATASET_ELEMENTS); nothing was loaded"
            in err.value.message), err.value.message
    assert read == [] and peak < 2**20, peak  # no array was read, nothing large was allocated
    # the operator's lower bound counts every array the loader reads, all together
    np.savez(roots / "small.npz", x=np.zeros((4, 5, 2), np.float32), y=np.zeros(4, np.int64),
             lengths=np.full(4, 5))
    monkeypatch.undo()
    ctx = ds.LoadContext(roots / "small.npz", "multiclass", (roots,), MAX_EXAMPLES, 48)
    assert len(ds.load_raw("npz", None, ctx).x) == 4  # 40 + 4 + 4 elements
    with pytest.raises(InvalidSpec, match="declare 48 elements .through lengths.*at most 47"):
        ds.load_raw("npz", None, ds.LoadContext(roots / "small.npz", "multiclass", (roots,), MAX_EXAMPLES, 47))


@pytest.mark.parametrize("what, dtype, needle", [
    ("a structured dtype", [("a", "<f4"), ("b", "<f4")], "x holds"),
    ("a sub-array dtype", ("<f4", (10**6,)), "x holds"),
    ("objects", "|O", "x holds object"),
    ("long strings", "<U100000", "x holds <U100000"),
])
def test_an_npz_array_of_anything_but_numbers_is_refused_from_its_header(roots, what, dtype, needle):
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": (3,)})
    with zipfile.ZipFile(roots / "odd.npz", "w") as z:
        z.writestr("x.npy", header.getvalue())
        z.writestr("y.npy", b"")
    with pytest.raises(InvalidSpec, match=needle):
        _load("npz", roots / "odd.npz", roots, MAX_EXAMPLES)


def test_a_bare_npy_named_npz_is_refused_unread(roots):
    np.save(roots / "bare.npy", np.zeros((3, 2, 2), np.float32))
    (roots / "bare.npy").rename(roots / "bare.npz")
    with pytest.raises(InvalidSpec, match="cannot read .*bare.npz as .npz: not a zip archive"):
        _load("npz", roots / "bare.npz", roots, MAX_EXAMPLES)


def test_a_spec_value_is_bounded_in_size_and_depth_whatever_its_source(roots, tmp_path):
    import time

    from service import spectext
    from service.control.jobs import intake as specs

    # a value that shares its parts, as YAML aliases would make it, given as a Python value
    bomb = ["x"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    start = time.perf_counter()
    for data in ({**spec(), "hyperparameters": {"epochs": bomb}}, {**spec(), "model": {**CNN, "config": bomb}}):
        with pytest.raises(InvalidSpec, match=f"more than {spectext.MAX_SPEC_NODES} values"):
            RunSpec.from_dict(data, Policy((roots,)))
    assert time.perf_counter() - start < 0.5
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidSpec, match="nests deeper than 32 levels"):
        RunSpec.from_dict({**spec(), "hyperparameters": {"lr": deep}}, Policy((roots,)))
    # YAML aliases, in a spec file the trainer or `modelctl finetune run` reads
    (tmp_path / "bomb.yaml").write_text("model: &m {family: cnn}\ndataset: builtin:digits\nother: *m\n")
    with pytest.raises(InvalidSpec, match=r"cannot parse .*bomb.yaml: YAML aliases are not accepted \(\*m at line 3\)"):
        RunSpec.from_file(tmp_path / "bomb.yaml", Policy((roots,)))
    with pytest.raises(InvalidSpec, match="YAML aliases"):
        specs.parse_text("a: &x 1\nb: {<<: *x}\n")  # merge keys are aliases too
    big = tmp_path / "big.yaml"
    big.write_text("a: 1\n" * 100_000)
    with pytest.raises(InvalidSpec, match="longer than 65536 characters"):
        RunSpec.from_file(big, Policy((roots,)))
    assert specs.parse_text("a: &x 1\n") == {"a": 1}  # an anchor alone is harmless


def test_names_and_versions_are_matched_in_full_in_process(tmp_path):
    from service.modelstore import validate_model_name
    from service.training.run_spec import parse_base

    for bad in ("m\n", "m\r\n", "\nm", "m/x", "", "a" * 65, "m²"):
        with pytest.raises(InvalidSpec, match="not a valid model name"):
            validate_model_name(bad)
    for bad in ("m:²", "m:١٢", "m:1\n", "m: 1", "m:0", "m:" + "9" * 40):
        with pytest.raises(InvalidSpec) as err:
            parse_base(bad)
        assert err.value.field == "base" and len(err.value.message) < 300
    assert parse_base("m:12") == ("m", 12) and parse_base("m") == ("m", None)
    store = ModelStore(tmp_path)
    (tmp_path / "m").mkdir()
    for name in ("².mar", "١.mar", "01.mar", "0.mar"):
        (tmp_path / "m" / name).write_bytes(b"")
    (tmp_path / "m\n").mkdir()
    (tmp_path / "m\n" / "1.mar").write_bytes(b"")
    assert store.versions("m") == [] and store.models() == {}
