"""Honest evaluation: train, validation and test splits (datasets.make_splits / prepare), and
the test metric the archive reports (recipe._finish).

The validation split picks the weights; the test split is the official one where a dataset
has one, else a fixed held-out one that no hyperparameter moves; nothing but the final
evaluation touches it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.errors import InvalidSpec
from service.models import ModelSpec, load_model
from service.modelstore import ModelStore
from service.training import datasets as ds
from service.rundir import EVENTS_FILE
from service.training.recipe import evaluate, read_archive, run_finetune
from service.training.run_spec import Hyperparameters, Policy, RunSpec
from service.training.tasks import TASKS

pytestmark = pytest.mark.unit

CNN = {"family": "cnn", "config": {"channels": [8, 16]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}


@pytest.fixture(scope="module")
def digits() -> ds.RawData:
    return ds.load_raw("builtin", "digits", ds.LoadContext(None, "multiclass"))


def ids_of(raw: ds.RawData) -> ds.RawData:
    """``raw`` with its inputs replaced by their positions: a split's inputs say which examples it took."""
    return ds.RawData(raw.kind, np.arange(len(raw.y)), raw.y, raw.labels)


def prepare_digits(raw: ds.RawData, **kw) -> ds.PreparedData:
    spec = ModelSpec.from_dict({**CNN, "num_classes": 10})
    sizes = {k: kw.pop(k, None) for k in ("train_size", "val_size", "test_size")}
    return ds.prepare(raw, name="builtin:digits", spec=spec, task="multiclass", hp=Hyperparameters(**kw), **sizes)


def test_the_three_splits_are_disjoint_and_add_up(digits):
    raw = ids_of(digits)
    parts, how = ds.make_splits(raw, name="digits", task="multiclass", hp=Hyperparameters(seed=3))
    taken = {name: set(x.tolist()) for name, (x, _) in parts.items()}
    assert not taken["train"] & taken["val"] and not taken["train"] & taken["test"] and not taken["val"] & taken["test"]
    assert taken["train"] | taken["val"] | taken["test"] == set(range(len(digits.y)))
    n = len(digits.y)
    assert len(taken["test"]) == int(np.ceil(n * ds.TEST_FRACTION))  # carved first, from all
    assert len(taken["val"]) == int(np.ceil((n - len(taken["test"])) * 0.2))  # then val_split of the rest
    assert how["test_split"] == "held_out"
    for name, (x, y) in parts.items():  # inputs and targets stay together
        assert np.array_equal(y, digits.y[x]), name
    # stratified: every class keeps its share in the test split (within one example)
    test_counts = np.bincount(parts["test"][1], minlength=10)
    expected = np.bincount(digits.y, minlength=10) * ds.TEST_FRACTION
    assert np.all(np.abs(test_counts - expected) <= 1)

    data = prepare_digits(digits)
    info = data.info
    assert info["train_size"] + info["val_size"] + info["test_size"] == n
    assert (len(data.train), len(data.val), len(data.test)) == (info["train_size"], info["val_size"], info["test_size"])


def test_the_test_split_stays_the_same_whatever_the_seed_and_subsets_the_validation_split_moves(digits):
    raw = ids_of(digits)
    runs = [ds.make_splits(raw, name="digits", task="multiclass", hp=Hyperparameters(seed=seed, val_split=split),
                           train_size=size)[0]
            for seed, split, size in ((0, 0.2, None), (1, 0.2, None), (7, 0.3, 500))]
    tests = [x.tolist() for x, _ in (r["test"] for r in runs)]
    assert tests[0] == tests[1] == tests[2]
    vals = [set(r["val"][0].tolist()) for r in runs]
    assert vals[0] != vals[1]
    # a test_size subset is seeded apart from hyperparameters.seed too
    small = [ds.make_splits(raw, name="digits", task="multiclass", hp=Hyperparameters(seed=seed), test_size=50)[0]
             for seed in (0, 1)]
    assert small[0]["test"][0].tolist() == small[1]["test"][0].tolist()
    assert len(small[0]["test"][0]) == 50 and set(small[0]["test"][0].tolist()) <= set(tests[0])
    # the digests say the same: the test split's is shared, the validation split's is not
    a, b = prepare_digits(digits, seed=0).info, prepare_digits(digits, seed=1).info
    assert a["split_sha256"]["test"] == b["split_sha256"]["test"]
    assert a["split_sha256"]["val"] != b["split_sha256"]["val"]
    assert a["sha256"] != b["sha256"]
    # and the demo's held-out digits are that split
    _, held_out = ds.held_out_test_indices(digits.y, "multiclass")
    assert held_out.tolist() == tests[0]


def test_an_official_split_becomes_the_test_split_and_validation_comes_from_the_training_data():
    raw = ds.load_raw("builtin", "basic-motions", ds.LoadContext(None, "multiclass"))
    assert raw.x_val is not None
    spec = ModelSpec.from_dict({"family": "rnn", "num_classes": 4, "config": {"cell": "lstm", "input_size": 6,
                                                                          "hidden_size": 8}})
    data = ds.prepare(raw, name="builtin:basic-motions", spec=spec, task="multiclass", hp=Hyperparameters(),
                      train_size=None, val_size=None)
    info = data.info
    assert info["test_split"] == "official" and info["split"].startswith("test: the official split")
    assert info["test_size"] == len(raw.y_val) == 40
    assert info["train_size"] + info["val_size"] == len(raw.y) == 40 and info["val_size"] == 8
    official = ds.digest(raw.kind, raw.labels, {"test": (raw.x_val, raw.y_val)})
    assert info["split_sha256"]["test"] == official
    assert [data.test[i][1].item() for i in range(len(data.test))] == raw.y_val.tolist()
    for i in range(len(data.test)):
        torch.testing.assert_close(data.test[i][0][0], torch.as_tensor(raw.x_val[i]))


def test_too_few_examples_to_hold_out_three_splits_is_a_clear_error():
    raw = ds.RawData(ds.FEATURES, [np.zeros((2, 3), np.float32)] * 2, np.array([0, 1]), ["a", "b"])
    spec = ModelSpec.from_dict({"family": "rnn", "num_classes": 2, "config": {"cell": "gru", "input_size": 3,
                                                                          "hidden_size": 4}})
    with pytest.raises(InvalidSpec) as err:
        ds.prepare(raw, name="tiny.npz", spec=spec, task="multiclass", hp=Hyperparameters(), train_size=None,
                   val_size=None)
    assert err.value.field == "dataset.source" and "too few" in err.value.message


@pytest.mark.parametrize("size,message", [(0, ">= 1"), (101, "between 1 and 100")])
def test_dataset_test_size_is_checked(size, message, tmp_path):
    policy = Policy((tmp_path,), max_examples=100)
    spec = {"model": CNN, "dataset": {"source": "builtin:digits", "test_size": size}, "output": {"name": "m"}}
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict(spec, policy)
    assert err.value.field == "dataset.test_size" and message in err.value.message


def test_the_archive_reports_the_kept_weights_on_the_test_split(tmp_path, policy, digits):
    dataset = {"source": "builtin:digits", "train_size": 200, "val_size": 60, "test_size": 90}
    spec = {"model": CNN, "dataset": dataset, "output": {"name": "honest"},
            "hyperparameters": {"epochs": 3, "batch_size": 32, "lr": 0.003}}
    out = run_finetune(RunSpec.from_dict(spec, policy), tmp_path / "run", tmp_path / "store", policy)
    lineage = ModelStore(tmp_path / "store").lineage("honest", 1)
    metrics, info = lineage["metrics"], lineage["dataset"]
    assert {"test_metric", "test_loss", "test_count"} <= set(metrics)
    assert metrics["test_count"] == info["test_size"] == 90
    assert (info["train_size"], info["val_size"]) == (200, 60) and metrics["val_count"] == 60
    assert set(info["split_sha256"]) == {"train", "val", "test"}
    assert all(len(v) == 64 for v in info["split_sha256"].values()) and len(set(info["split_sha256"].values())) == 3
    assert info["test_split"] == "held_out"

    # the figure is the archived weights' (best by validation) on exactly the recorded test split
    bundle = read_archive(out.archive)
    data = prepare_digits(digits, batch_size=32, lr=0.003, epochs=3, train_size=200, val_size=60, test_size=90)
    assert data.sha256 == info["sha256"] and data.info["split_sha256"] == info["split_sha256"]
    loader = torch.utils.data.DataLoader(data.test, batch_size=64, collate_fn=data.collate)
    task = TASKS["multiclass"]
    again = evaluate(load_model(bundle.spec, bundle.state_dict), task.criterion(0.0), loader,
                     torch.device("cpu"), task)
    assert again["count"] == 90
    assert again["metric"] == pytest.approx(metrics["test_metric"], abs=1e-9)
    assert again["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    # the validation figure is the best epoch's, as before, and the test split chose nothing
    best = max(metrics["history"], key=lambda h: h["val_metric"])
    assert metrics["weights_epoch"] == best["epoch"] and metrics["val_metric"] == best["val_metric"]

    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["test_metric"] == pytest.approx(metrics["test_metric"]) and result["test_count"] == 90
    done = [json.loads(line) for line in (tmp_path / "run" / EVENTS_FILE).read_text().splitlines()][-1]
    assert done["event"] == "done" and done["test_metric"] == pytest.approx(metrics["test_metric"])
    assert out.metrics["test_metric"] == metrics["test_metric"]
