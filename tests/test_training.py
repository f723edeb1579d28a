"""Fine-tuning runs: specs, datasets, the recipe, checkpoints and resume, signals, DDP, archives.

Runs are tiny (small models, subsets, 1-3 epochs) so the whole file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from service.errors import FailedPrecondition, InvalidSpec, NotFound
from service.inference import Predictor
from service.models import ModelSpec, image_eval_transform, load_model
from service.modelstore import ModelBundle, ModelStore
from service.training import datasets as ds
from service.rundir import CHECKPOINT_FILE, EVENTS_FILE
from service.training.recipe import evaluate, head_prefix, native_bf16, read_archive, run_finetune
from service.training.run_spec import Policy, RunSpec
from service.training.tasks import TASKS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

CNN = {"family": "cnn", "config": {"channels": [8, 16]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}
BUILTIN_RUNS = {
    "digits": (CNN, {"train_size": 300, "val_size": 100}),
    "digits-seq": ({"family": "rnn", "config": {"cell": "lstm", "input_size": 8, "hidden_size": 16}},
                   {"train_size": 300, "val_size": 100}),
    "fashion-mnist": ({"family": "cnn", "config": {"channels": [8]},
                       "input": {"type": "image", "channels": 1, "size": 28, "resize": None}},
                      {"train_size": 300, "val_size": 100, "test_size": 200}),
    "rotten-tomatoes": ({"family": "rnn", "config": {"cell": "gru", "vocab_size": 2000, "embedding_dim": 16,
                                                     "hidden_size": 16}, "input": {"type": "sequence", "max_length": 64}},
                        {"train_size": 400, "val_size": 100}),
    "basic-motions": ({"family": "rnn", "config": {"cell": "lstm", "input_size": 6, "hidden_size": 16}}, {}),
}


def make_spec(model=None, dataset="builtin:digits", name=None, base=None, **hp) -> dict:
    """A run spec; the output name defaults to "m", or to the base's name when there is a base."""
    spec = {"dataset": dataset, "hyperparameters": {"epochs": 1, "batch_size": 32, "lr": 0.003, **hp}}
    if base is not None:
        spec["base"] = base
    else:
        spec["model"] = model or CNN
    if name is not None or base is None:
        spec["output"] = {"name": name or "m"}
    return spec


def run(spec: dict, tmp_path: Path, policy: Policy, run_name: str = "run"):
    return run_finetune(RunSpec.from_dict(spec, policy), tmp_path / run_name, tmp_path / "store", policy)


def unpack(path: Path, into: Path) -> ModelBundle:
    with zipfile.ZipFile(path) as z:
        z.extractall(into)
    return ModelBundle.load(into)


def checkpoint_model(run_dir: Path):
    """The model of the archived weights, rebuilt from the checkpoint alone."""
    state = torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    weights = state["best_model"] if state["best_model"] is not None else state["model"]
    return load_model(ModelSpec.from_dict(state["model_spec"]), weights), state


def val_data(spec: dict, policy: Policy, model_spec: ModelSpec, vocab=None) -> ds.PreparedData:
    """The run's validation set, prepared again the way the recipe prepares it."""
    rs = RunSpec.from_dict(spec, policy)
    raw = ds.load_raw(rs.dataset_kind, rs.builtin_name,
                      ds.LoadContext(rs.dataset_path, model_spec.task, policy.data_roots))
    return ds.prepare(raw, name=rs.dataset.source, spec=model_spec, task=model_spec.task, hp=rs.hp,
                      train_size=rs.dataset.train_size, val_size=rs.dataset.val_size,
                      test_size=rs.dataset.test_size, base_vocab=vocab)


def probabilities(result, num_classes: int) -> torch.Tensor:
    rows = []
    for out in result.outputs:
        assert isinstance(out, dict), out
        for pred in out["predictions"]:
            row = torch.zeros(num_classes, dtype=torch.float64)
            for entry in pred["top_k"]:
                row[entry["index"]] = entry["probability"]
            rows.append(row)
    return torch.stack(rows)


# ---- a short run on each built-in --------------------------------------------------
@pytest.mark.parametrize("name", list(BUILTIN_RUNS))
def test_short_run_on_each_builtin_writes_an_archive_that_predicts_like_the_checkpoint(name, tmp_path, policy):
    model, sizes = BUILTIN_RUNS[name]
    spec = make_spec(model, {"source": f"builtin:{name}", **sizes}, name=f"ft-{name}")
    outcome = run(spec, tmp_path, policy)
    assert outcome.status == "finished"
    store = ModelStore(tmp_path / "store")
    assert store.versions(f"ft-{name}") == [1]
    lineage = store.lineage(f"ft-{name}", 1)
    assert lineage["source"] == "finetune" and lineage["parent"] is None
    assert len(lineage["dataset"]["sha256"]) == 64
    assert lineage["metrics"]["val_count"] == lineage["dataset"]["val_size"] > 0
    assert lineage["metrics"]["test_count"] == lineage["dataset"]["test_size"] > 0
    assert lineage["dataset"]["test_split"] == ("official" if name in ("fashion-mnist", "basic-motions")
                                                else "held_out")
    assert lineage["code"]["version"] and lineage["hyperparameters"]["epochs"] == 1

    bundle = unpack(store.path(f"ft-{name}", 1), tmp_path / "unpacked")
    reference, state = checkpoint_model(tmp_path / "run")
    assert bundle.labels == state["labels"]
    for key, tensor in reference.state_dict().items():
        assert torch.equal(bundle.state_dict[key], tensor), key

    data = val_data(spec, policy, bundle.spec, bundle.vocab)
    assert data.sha256 == lineage["dataset"]["sha256"]
    predictor = Predictor(bundle)
    n = 6
    if bundle.spec.modality == "image":
        images = [data.val.raw_image(i) for i in range(n)]
        payloads = [{"img": encode_png(img).numpy().tobytes(), "k": bundle.spec.num_classes} for img in images]
        inputs = torch.stack([image_eval_transform(bundle.spec.input)(img) for img in images])
        with torch.inference_mode():
            expected = torch.softmax(reference(inputs), dim=1)
    else:
        seqs = [data.val[i][0][0] for i in range(n)]
        payloads = [{"body": json.dumps({"inputs": [s.tolist()], "k": bundle.spec.num_classes}).encode()}
                    for s in seqs]
        with torch.inference_mode():
            expected = torch.cat([torch.softmax(reference(s.unsqueeze(0)), dim=1) for s in seqs])
    got = probabilities(predictor.predict(payloads), bundle.spec.num_classes)
    torch.testing.assert_close(got, expected.double(), atol=1e-5, rtol=1e-4)
    if name == "rotten-tomatoes":
        assert bundle.vocab is not None and 2 < len(bundle.vocab) <= 2000


def test_checkpoint_and_events_have_the_fixed_shape_with_dataloader_workers(tmp_path, policy):
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 200, "val_size": 50}, epochs=2, workers=2)
    run(spec, tmp_path, policy)
    state = torch.load(tmp_path / "run" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "rng", "model_spec", "best"} <= set(state)
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)
    events = [json.loads(line) for line in (tmp_path / "run" / EVENTS_FILE).read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert {"train_loss", "val_loss", "val_metric", "lr", "samples_per_s", "time"} <= set(e)
        assert e["val_count"] == 50 and e["samples_per_s"] > 0
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["spec"]["hyperparameters"]["epochs"] == 2


def test_a_finished_run_started_again_writes_no_second_archive(tmp_path, policy):
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 100, "val_size": 50})
    assert run(spec, tmp_path, policy).status == "finished"
    again = run(spec, tmp_path, policy)
    assert again.status == "already_finished" and again.metrics["version"] == 1
    assert ModelStore(tmp_path / "store").versions("m") == [1]
    changed = make_spec(dataset={"source": "builtin:digits", "train_size": 100, "val_size": 50}, lr=0.1)
    with pytest.raises(FailedPrecondition, match="another run spec"):
        run(changed, tmp_path, policy)


def test_weight_average_moves_by_one_minus_the_warmed_up_decay_and_copies_counters():
    from service.training.ema import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(4, 3))  # moves BatchNorm's running stats and its counter
    ema.update(model)
    decay = min(0.9, 2 / 11)  # warm-up: (1 + n) / (10 + n) after n = 1 update
    for key, value in model.state_dict().items():
        got = ema.module.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(got, decay * start[key] + (1 - decay) * value)
        else:
            assert torch.equal(got, value)  # num_batches_tracked
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    ema.updates = 1000
    assert ema.current_decay() == 0.9  # past the warm-up: the set decay
    again = WeightAverage(model, decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1000 and all(torch.equal(a, b) for a, b in
                                         zip(again.module.state_dict().values(), ema.module.state_dict().values()))


def test_ema_run_validates_tests_and_archives_the_averaged_weights(tmp_path, policy):
    data = {"source": "builtin:digits", "train_size": 200, "val_size": 100}
    spec = make_spec(dataset=data, epochs=2, lr=0.01, ema_decay=0.9, keep="last")
    out = run(spec, tmp_path, policy)
    state = torch.load(tmp_path / "run" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    averaged, trained = state["ema"]["module"], state["model"]
    assert state["ema"]["updates"] == 2 * 7  # one per optimizer step: ceil(200 / 32) a epoch
    bundle = unpack(out.archive.path, tmp_path / "unpacked")
    assert all(torch.equal(bundle.state_dict[k], averaged[k]) for k in averaged)
    assert not all(torch.equal(averaged[k], trained[k]) for k in trained)
    assert out.archive.lineage["hyperparameters"]["ema_decay"] == 0.9
    # the metrics are the average's: validation and test again on the archived weights
    model_spec = ModelSpec.from_dict(state["model_spec"])
    prepared = val_data(spec, policy, model_spec)
    task = TASKS[model_spec.task].sized(model_spec.num_classes)
    loader = torch.utils.data.DataLoader(prepared.val, batch_size=64, collate_fn=prepared.collate)
    again = evaluate(load_model(model_spec, averaged), task.criterion(0.0), loader, torch.device("cpu"), task)
    assert again["metric"] == pytest.approx(out.metrics["val_metric"])
    with pytest.raises(InvalidSpec, match="hyperparameters.ema_decay"):
        RunSpec.from_dict(make_spec(ema_decay=1.0), policy)


# ---- base models from the store ------------------------------------------------------
def test_fine_tune_a_stored_model_frozen_backbone_new_version_with_parent(tmp_path, policy):
    digits = {"source": "builtin:digits", "train_size": 200, "val_size": 60}
    run(make_spec(dataset=digits, name="base-cnn"), tmp_path, policy, "run1")
    store = ModelStore(tmp_path / "store")
    parent = read_archive(store.get("base-cnn", 1))

    # same labels: the head is kept and trained, the frozen backbone is untouched
    out = run(make_spec(base="base-cnn:1", dataset=digits, freeze_backbone=True, lr=0.01), tmp_path, policy, "run2")
    assert (out.archive.name, out.archive.version) == ("base-cnn", 2)
    child = read_archive(out.archive)
    assert child.lineage["parent"] == "base-cnn:1" and child.lineage["head"] == "kept"
    prefix = head_prefix(load_model(child.spec, child.state_dict))
    head = [k for k in child.state_dict if k.startswith(prefix)]
    assert head and all(not torch.equal(child.state_dict[k], parent.state_dict[k]) for k in head)
    assert all(torch.equal(v, parent.state_dict[k]) for k, v in child.state_dict.items() if k not in head)
    # the parent was evaluated on this run's validation set, for deploy-if-better
    spec2 = make_spec(base="base-cnn:1", dataset=digits)
    val = val_data(spec2, policy, parent.spec)
    loader = torch.utils.data.DataLoader(val.val, batch_size=64, collate_fn=val.collate)
    from service.training.recipe import evaluate
    from service.training.tasks import TASKS

    expected = evaluate(load_model(parent.spec, parent.state_dict), torch.nn.CrossEntropyLoss(), loader,
                        torch.device("cpu"), TASKS["multiclass"])
    metrics = child.lineage["metrics"]
    assert metrics["parent_val_count"] == 60 == expected["count"]
    assert metrics["parent_val_metric"] == pytest.approx(expected["metric"])

    # other labels: the head is replaced (new size), the backbone carried over
    fashion = {"source": "builtin:fashion-mnist", "train_size": 100, "val_size": 50, "test_size": 100}
    out = run(make_spec(base="base-cnn", dataset=fashion, freeze_backbone=True, name="fashion-from-digits"),
              tmp_path, policy, "run3")
    moved = read_archive(out.archive)
    assert moved.lineage["parent"] == "base-cnn:2" and moved.lineage["head"] == "replaced"
    assert moved.labels[0] == "T-shirt/top"
    assert moved.lineage["metrics"]["parent_val_metric"] is None  # the parent cannot answer these labels
    assert torch.equal(moved.state_dict["0.weight"], child.state_dict["0.weight"])


def test_missing_base_model_is_not_found(tmp_path, policy):
    with pytest.raises(NotFound, match="nothing-here"):
        run(make_spec(base="nothing-here:3"), tmp_path, policy)


# ---- tasks and files -----------------------------------------------------------------
def test_jsonl_text_vocabulary_comes_from_the_train_split_only(tmp_path, roots, policy):
    lines = [{"text": f"good great film {i}", "label": "pos"} for i in range(20)]
    lines += [{"text": f"bad awful film {i}", "label": "neg"} for i in range(20)]
    lines += [{"text": "zyzzyva good", "label": "pos", "split": "val"}, {"text": "bad", "label": "neg", "split": "val"}]
    (roots / "reviews.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = {"family": "rnn", "config": {"cell": "gru", "vocab_size": 100, "embedding_dim": 8, "hidden_size": 8}}
    out = run(make_spec(model, "reviews.jsonl", name="reviews", epochs=2, token_dropout=0.1), tmp_path, policy)
    bundle = read_archive(out.archive)
    assert bundle.labels == ["neg", "pos"]
    assert "good" in bundle.vocab.ids and "zyzzyva" not in bundle.vocab.ids
    # the "val" rows are the official held-out split: the test split; validation is carved from the 40 train rows
    assert bundle.lineage["dataset"]["test_split"] == "official" and bundle.lineage["metrics"]["test_count"] == 2
    assert bundle.lineage["metrics"]["val_count"] == 8


@pytest.mark.parametrize("task,metric", [("multilabel", "micro_f1"), ("regression", "mse")])
def test_npz_multilabel_and_regression(task, metric, tmp_path, roots, policy):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5, 3)).astype(np.float32)
    y = (x.mean(axis=1) > 0).astype(np.int64) if task == "multilabel" else x.sum(axis=(1, 2)).astype(np.float32)
    np.savez(roots / "seq.npz", x=x, y=y)
    model = {"family": "rnn", "config": {"cell": "gru", "input_size": 3, "hidden_size": 8}}
    out = run({**make_spec(model, "seq.npz", name="seq", epochs=2), "task": task}, tmp_path, policy)
    lineage = out.archive.lineage
    assert lineage["task"] == task and lineage["metrics"]["metric"] == metric
    assert lineage["num_classes"] == (3 if task == "multilabel" else 1)
    assert lineage["metrics"]["test_count"] == 24  # the held-out test split: 0.2 of 120
    assert lineage["metrics"]["val_count"] == 20  # val_split 0.2 of the other 96, rounded up
    assert np.isfinite(lineage["metrics"]["test_metric"])
    assert np.isfinite(lineage["metrics"]["val_metric"])


def test_early_stopping_keeps_the_best_epoch(tmp_path, policy):
    # lr so small that nothing improves after epoch 1: patience 1 stops after epoch 2
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 100, "val_size": 50},
                     epochs=6, lr=1e-12, early_stopping_patience=1)
    out = run(spec, tmp_path, policy)
    m = out.metrics
    assert (m["epochs_run"], m["stopped_early"], m["weights_epoch"]) == (2, True, 1)


def test_max_time_stops_before_an_epoch_that_would_pass_the_budget(tmp_path, policy):
    # every epoch takes far more than 1 ms: the first runs (always), the second would pass
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 100, "val_size": 50},
                     epochs=4, max_time_s=0.001)
    out = run(spec, tmp_path, policy)
    m = out.metrics
    assert (m["epochs_run"], m["stopped_early"], len(m["history"])) == (1, True, 1)
    # a budget that holds all epochs changes nothing; the epoch records carry the wall time
    out = run({**spec, "hyperparameters": {**spec["hyperparameters"], "max_time_s": 3600, "epochs": 2},
               "output": {"name": "m2"}}, tmp_path, policy, run_name="run2")
    assert (out.metrics["epochs_run"], out.metrics["stopped_early"]) == (2, False)
    with pytest.raises(InvalidSpec, match="hyperparameters.max_time_s"):
        RunSpec.from_dict({**spec, "hyperparameters": {"max_time_s": 0}}, policy)


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")
def test_bf16_autocast_on_a_cpu_with_native_bf16(tmp_path, policy):
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 200, "val_size": 100},
                     precision="bf16", epochs=2, lr=0.01)  # 0.003 sat at chance+0.1 on the new train split
    out = run(spec, tmp_path, policy)
    assert out.archive.lineage["precision"] == "bf16"
    assert out.metrics["val_metric"] > 0.2  # trained (chance is 0.1); evaluation itself runs in fp32


def test_channels_last_training_writes_plain_weights_that_predict_like_the_checkpoint(tmp_path, policy):
    spec = make_spec(dataset={"source": "builtin:digits", "train_size": 200, "val_size": 100},
                     channels_last=True, epochs=2, lr=0.01)  # 0.003 sat at chance+0.1 on the new train split
    out = run(spec, tmp_path, policy)
    assert out.archive.lineage["hyperparameters"]["channels_last"] is True
    assert out.metrics["val_metric"] > 0.2
    bundle = unpack(out.archive.path, tmp_path / "unpacked")
    assert all(t.is_contiguous() for t in bundle.state_dict.values()), "NHWC strides leaked into the archive"
    model, _ = checkpoint_model(tmp_path / "run")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load_model(bundle.spec, bundle.state_dict)(x), model(x), atol=1e-6)


def test_channels_last_is_refused_for_a_sequence_model(tmp_path, policy):
    spec = make_spec(model={"family": "rnn", "config": {"cell": "gru", "input_size": 8, "hidden_size": 8}},
                     dataset={"source": "builtin:digits-seq", "train_size": 50, "val_size": 20}, channels_last=True)
    with pytest.raises(InvalidSpec, match="hyperparameters.channels_last"):
        run(spec, tmp_path, policy)


# ---- invalid specs, missing data, data roots ---------------------------------------------
@pytest.mark.parametrize("change,field,allowed", [
    ({"hyperparameters": {"optimizer": "rmsprop"}}, "hyperparameters.optimizer", "adamw"),
    ({"hyperparameters": {"lr": -1}}, "hyperparameters.lr", None),
    ({"hyperparameters": {"epochs": 10**6}}, "hyperparameters.epochs", None),
    ({"hyperparameters": {"nproc": 1000}}, "hyperparameters.nproc", None),
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", None),
    ({"hyperparameters": {"augment": "mixup"}}, "hyperparameters.augment", "crop_flip"),
    ({"hyperparameters": {"precision": "fp16", "device": "cpu"}}, "hyperparameters.precision", "bf16"),
    ({"hyperparameters": {"momentun": 0.9}}, "hyperparameters.momentun", "momentum"),
    ({"optimiser": "adam"}, "optimiser", "hyperparameters"),
    ({"dataset": "builtin:mnist"}, "dataset.source", "builtin:fashion-mnist"),
    ({"dataset": {"source": "builtin:digits", "train_size": 0}}, "dataset.train_size", None),
    ({"dataset": "weights.bin"}, "dataset.source", "<file>.npz"),
    ({"task": "ranking"}, "task", "multilabel"),
    ({"base": "other:1"}, "base", "model"),
    ({"output": {"name": "no/slash"}}, "output.name", None),
    ({"output": {"name": "ok", "version": 0}}, "output.version", None),
    ({"model": {**CNN, "config": {"pool": "median"}}}, "model.config.pool", "avg"),
    ({"model": {**CNN, "family": "transformer"}}, "model.family", "rnn"),
])
def test_invalid_spec_names_the_field(change, field, allowed, policy, roots):
    (roots / "weights.bin").write_bytes(b"\0")
    spec = make_spec()
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if key == "hyperparameters" else value
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict(spec, policy)
    assert err.value.field == field, err.value.message
    assert field in str(err.value)
    if allowed is not None:
        assert allowed in err.value.allowed


def test_base_and_model_checked_against_the_dataset(tmp_path, policy):
    seq_model = {"family": "rnn", "config": {"input_size": 5}}
    with pytest.raises(InvalidSpec) as err:
        run(make_spec(seq_model, "builtin:digits-seq"), tmp_path, policy)
    assert err.value.field == "model.config.input_size" and err.value.allowed == [8]
    with pytest.raises(InvalidSpec) as err:
        run(make_spec(CNN, "builtin:basic-motions"), tmp_path, policy)
    assert err.value.field == "model"
    with pytest.raises(InvalidSpec) as err:
        run({**make_spec(CNN), "task": "regression"}, tmp_path, policy)
    assert err.value.field == "task" and err.value.allowed == ["multiclass"]
    with pytest.raises(InvalidSpec) as err:
        run(make_spec(CNN, token_dropout=0.1), tmp_path, policy)
    assert err.value.field == "hyperparameters.token_dropout"
    with pytest.raises(FailedPrecondition, match="torchrun"):
        run(make_spec(CNN, nproc=2), tmp_path, policy)


def test_spec_files_json_and_yaml(tmp_path, policy):
    (tmp_path / "s.yaml").write_text("model: {family: cnn}\ndataset: builtin:digits\noutput: {name: y}\n"
                                     "hyperparameters: {optimizer: sgd, momentum: 0.5}\n")
    spec = RunSpec.from_file(tmp_path / "s.yaml", policy)
    assert spec.hp.optimizer == "sgd" and spec.hp.momentum == 0.5
    assert RunSpec.from_dict(spec.to_dict(), policy) == spec
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidSpec, match="cannot parse"):
        RunSpec.from_file(tmp_path / "bad.json", policy)


def test_missing_dataset_is_a_clear_error(tmp_path, policy, monkeypatch):
    with pytest.raises(NotFound, match="missing.npz does not exist"):
        RunSpec.from_dict(make_spec(dataset="missing.npz"), policy)
    monkeypatch.setattr(ds, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FailedPrecondition, match="dataset-fashion-mnist"):
        run(make_spec(dataset="builtin:fashion-mnist"), tmp_path, policy)


_OPENED: list[str] = []
_WATCH: list[str] = []


def _audit(event, args):
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.startswith(w) for w in _WATCH):
            _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def watch_opens():
    """Paths under the watched prefixes opened while the test runs (a Python audit hook)."""
    _OPENED.clear()
    yield _WATCH
    _WATCH.clear()


def test_dataset_outside_the_data_roots_is_refused_and_not_read(tmp_path, roots, policy, watch_opens):
    outside = tmp_path / "outside"
    (outside / "cls").mkdir(parents=True)
    np.savez(outside / "secret.npz", x=np.zeros((4, 2, 1), np.float32), y=np.zeros(4, np.int64))
    (outside / "cls" / "a.png").write_bytes(encode_png(torch.zeros(1, 4, 4, dtype=torch.uint8)).numpy().tobytes())
    watch_opens.append(str(outside))
    (roots / "link.npz").symlink_to(outside / "secret.npz")
    for source in [str(outside / "secret.npz"), "../outside/secret.npz", "link.npz", str(outside)]:
        with pytest.raises(InvalidSpec) as err:
            RunSpec.from_dict(make_spec(dataset=source), policy)
        assert err.value.field == "dataset.source" and "outside the data roots" in err.value.message
        assert err.value.allowed == [str(roots.resolve())]
    # an ImageFolder inside the roots whose image is a symlink to a file outside
    (roots / "images" / "cls").mkdir(parents=True)
    (roots / "images" / "cls" / "a.png").symlink_to(outside / "cls" / "a.png")
    with pytest.raises(InvalidSpec, match="outside the data roots"):
        run(make_spec(dataset="images"), tmp_path, policy)
    # pretrained weights are files too
    cnn_path = {"family": "resnet", "config": {"pretrained": str(outside / "w.pt")}}
    with pytest.raises(InvalidSpec) as err:
        RunSpec.from_dict(make_spec(cnn_path), policy)
    assert err.value.field == "model.config.pretrained"
    assert _OPENED == []


def test_image_folder_inside_the_roots(tmp_path, roots, policy):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for cls, level in (("dark", 40), ("light", 200)):
            folder = roots / "shapes" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = (torch.full((3, 10, 10), level) + torch.randint(-20, 20, (3, 10, 10), generator=g)).to(torch.uint8)
                (folder / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    model = {"family": "cnn", "config": {"channels": [4]}, "input": {"type": "image", "channels": 3, "size": 8,
                                                                      "resize": 10}}
    out = run(make_spec(model, "shapes", name="shapes", epochs=3, lr=0.02), tmp_path, policy)
    # val/ is the held-out set: the test split; validation is carved from train/
    assert out.archive.lineage["dataset"]["test_split"] == "official" and out.metrics["test_count"] == 8
    assert out.archive.lineage["dataset"]["train_size"] + out.metrics["val_count"] == 24
    assert read_archive(out.archive).labels == ["dark", "light"]


# ---- processes: SIGKILL and resume, SIGTERM, torchrun --------------------------------------
def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _start(args: list[str], tmp_path: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=open(tmp_path / log, "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.parametrize("ema_decay", [None, 0.9], ids=["weights", "averaged"])
def test_torchrun_two_processes_one_archive_metrics_over_the_whole_validation_set(ema_decay, tmp_path, roots,
                                                                                   policy):
    # averaged: every rank keeps and validates its own copy of the weight average; the
    # all-reduced metrics must still be those of the one archived (rank 0's) average
    dataset = {"source": "builtin:digits", "train_size": 300, "val_size": 101}  # odd: a sampler would pad
    spec_dict = make_spec(dataset=dataset, name="ddp", epochs=2, nproc=2,
                          **({"ema_decay": ema_decay} if ema_decay else {}))
    spec = _write(tmp_path, spec_dict)
    proc = _start(["-m", "service.training", "run", str(spec), "--run-dir", str(tmp_path / "run"),
                   "--store", str(tmp_path / "store"), "--data-root", str(roots)], tmp_path, "run.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    store = ModelStore(tmp_path / "store")
    assert store.versions("ddp") == [1]
    lineage = store.lineage("ddp", 1)
    assert lineage["world_size"] == 2
    events = [json.loads(line) for line in (tmp_path / "run" / EVENTS_FILE).read_text().splitlines()]
    assert [e["val_count"] for e in events if e["event"] == "epoch"] == [101, 101]
    assert lineage["metrics"]["val_count"] == 101

    # the recorded metric is the archived model's over the full validation set, in one process
    bundle = read_archive(store.get("ddp", 1))
    data = val_data(spec_dict, policy, bundle.spec)
    assert data.sha256 == lineage["dataset"]["sha256"]
    loader = torch.utils.data.DataLoader(data.val, batch_size=64, collate_fn=data.collate)
    task = TASKS["multiclass"]
    result = evaluate(load_model(bundle.spec, bundle.state_dict), task.criterion(0.0), loader,
                      torch.device("cpu"), task)
    assert result["count"] == 101
    assert result["metric"] == pytest.approx(lineage["metrics"]["val_metric"], abs=1e-9)
    assert result["loss"] == pytest.approx(lineage["metrics"]["val_loss"], rel=1e-4)
    # the test split too: each rank a shard, the sums all-reduced
    loader = torch.utils.data.DataLoader(data.test, batch_size=64, collate_fn=data.collate)
    result = evaluate(load_model(bundle.spec, bundle.state_dict), task.criterion(0.0), loader,
                      torch.device("cpu"), task)
    assert result["count"] == lineage["metrics"]["test_count"] == lineage["dataset"]["test_size"] == 360
    assert result["metric"] == pytest.approx(lineage["metrics"]["test_metric"], abs=1e-9)
