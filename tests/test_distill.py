"""Distillation runs (``task: distill``): the loss, the frozen teacher, the spec, real runs on
builtin:digits against teachers written straight into a real model store, and resume. A
distill job through the real control API is tests/test_distill_job.py.

Teachers have random weights and the digits labels: a run needs a teacher that answers, not
a good one. The "sharp" teacher's head is scaled up so that it is confident and nearly
always says the same digit, whatever the image: a student that follows it is told apart
from one that follows the labels at once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from service.errors import InvalidSpec, NotFound
from service.models import ModelSpec, build_model, load_model
from service.modelstore import ModelBundle, ModelStore
from service.training import datasets as ds
from service.training.distill import DistillLoss, Teacher
from service.rundir import CHECKPOINT_FILE, EVENTS_FILE
from service.training.recipe import StopRequest, evaluate, read_archive, run_finetune
from service.training.run_spec import Policy, RunSpec
from service.training.tasks import TASKS

pytestmark = pytest.mark.unit

IMAGE = {"type": "image", "channels": 1, "size": 8, "resize": None}
TEACHER = {"family": "cnn", "num_classes": 10, "config": {"channels": [8, 16]}, "input": IMAGE}
STUDENT = {"family": "cnn", "config": {"channels": [8]}, "input": IMAGE}
DIGITS = {"source": "builtin:digits", "train_size": 300, "val_size": 100}
DIGIT_LABELS = [str(i) for i in range(10)]


def write_teacher(store: ModelStore, name: str, spec: dict = TEACHER, labels=DIGIT_LABELS, scale: float = 1.0,
                  seed: int = 0) -> str:
    """A random-weight model written into ``store``; ``scale`` multiplies its head. Returns name:version."""
    torch.manual_seed(seed)
    model_spec = ModelSpec.from_dict(spec)
    model = build_model(model_spec)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    info = store.write(name, ModelBundle(model_spec, model.state_dict(), list(labels)))
    return f"{info.name}:{info.version}"


def distill_spec(teacher: str, name: str = "student", distill: dict | None = None, **hp) -> dict:
    spec = {"model": STUDENT, "dataset": DIGITS, "task": "distill", "teacher": teacher,
            "hyperparameters": {"epochs": 2, "batch_size": 16, "lr": 0.01, **hp}, "output": {"name": name}}
    if distill is not None:
        spec["distill"] = distill
    return spec


def val_batches(spec: dict, policy: Policy, model_spec: ModelSpec):
    """The run's validation set, prepared as the recipe prepares it, and a loader over it."""
    rs = RunSpec.from_dict(spec, policy)
    raw = ds.load_raw(rs.dataset_kind, rs.builtin_name, ds.LoadContext(None, "multiclass", policy.data_roots))
    data = ds.prepare(raw, name=rs.dataset.source, spec=model_spec, task="multiclass", hp=rs.hp,
                      train_size=rs.dataset.train_size, val_size=rs.dataset.val_size)
    return torch.utils.data.DataLoader(data.val, batch_size=1000, collate_fn=data.collate)


def predictions(model: nn.Module, loader) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(*args).argmax(1) for args, _ in loader])


def events(run_dir: Path) -> list[dict]:
    path = run_dir / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class StopAfterFirstCheckpoint(StopRequest):
    """A stop request that turns true once the run has written its checkpoint: the run stops
    after its first epoch, at the same safe point SIGTERM uses."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    @property
    def requested(self) -> bool:
        return (self.run_dir / CHECKPOINT_FILE).exists()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A store with the teachers; two students of the sharp teacher: alpha = 1 (stopped
    after epoch 1, then resumed) and alpha = 0 (the labels alone)."""
    root = tmp_path_factory.mktemp("distill")
    policy = Policy((root,))
    store = ModelStore(root / "store")
    sharp = write_teacher(store, "sharp", scale=30.0)
    spec = distill_spec(sharp, "follower", {"alpha": 1.0})
    run_dir = root / "follower-run"
    first = run_finetune(RunSpec.from_dict(spec, policy), run_dir, store, policy, StopAfterFirstCheckpoint(run_dir))
    resumed = run_finetune(RunSpec.from_dict(spec, policy), run_dir, store, policy)
    labels_only = distill_spec(sharp, "labelled", {"alpha": 0.0})
    control = run_finetune(RunSpec.from_dict(labels_only, policy), root / "labelled-run", store, policy)
    return SimpleNamespace(root=root, policy=policy, store=store, sharp=sharp, spec=spec, run_dir=run_dir,
                           first=first, resumed=resumed, control=control)


# ---- the loss and the teacher ------------------------------------------------------------------------
def test_the_loss_is_the_hand_computed_kl_and_ce_mix():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g, requires_grad=True)
    teacher = torch.randn(6, 5, generator=g) * 3
    target = torch.randint(0, 5, (6,), generator=g)
    t, alpha = 2.5, 0.3
    p_teacher = torch.softmax(teacher / t, 1)
    log_p_student = torch.log_softmax(student / t, 1)
    # KLDivLoss(input=log q, target=p), batchmean: sum p * (log p - log q) / batch size
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum() / 6
    ce = -torch.log_softmax(student, 1)[torch.arange(6), target].mean()
    expected = alpha * t * t * kl + (1 - alpha) * ce
    loss = DistillLoss(t, alpha, nn.CrossEntropyLoss())
    got = loss(student, target, teacher)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert isinstance(loss.kl, nn.KLDivLoss) and loss.kl.reduction == "batchmean"
    # the ends: alpha 0 is CE alone, alpha 1 the soft term alone; no teacher (validation) is CE
    assert DistillLoss(t, 0.0, nn.CrossEntropyLoss())(student, target, teacher).item() == pytest.approx(ce.item())
    assert DistillLoss(t, 1.0, nn.CrossEntropyLoss())(student, target, teacher).item() == pytest.approx(
        (t * t * kl).item(), rel=1e-6)
    assert loss(student, target).item() == pytest.approx(ce.item())
    # a student equal to its teacher has no soft loss, and its gradient vanishes with alpha 1
    same = teacher.clone().requires_grad_(True)
    soft = DistillLoss(t, 1.0, nn.CrossEntropyLoss())(same, target, teacher)
    soft.backward()
    assert abs(soft.item()) < 1e-5 and same.grad.abs().max().item() < 1e-6


def test_the_teacher_is_frozen_in_eval_mode_and_gives_plain_tensors(tmp_path):
    store = ModelStore(tmp_path / "store")
    ref = write_teacher(store, "t")
    bundle = read_archive(store.get("t", 1))
    teacher = Teacher(ref, bundle, torch.device("cpu"))
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert teacher.parameters == sum(p.numel() for p in teacher.model.parameters()) > 0
    x = torch.randn(4, 1, 8, 8)
    logits = teacher(x)
    assert logits.dtype == torch.float32 and not logits.requires_grad and not logits.is_inference()
    assert torch.equal(logits, load_model(bundle.spec, bundle.state_dict).eval()(x).detach())
    # usable in a loss whose backward saves it (an inference tensor would be refused)
    student = torch.randn(4, 10, requires_grad=True)
    DistillLoss(4.0, 0.7, nn.CrossEntropyLoss())(student, torch.zeros(4, dtype=torch.long), logits).backward()
    assert student.grad is not None


# ---- the spec ----------------------------------------------------------------------------------------
def test_spec_defaults_round_trip_and_the_student_is_multiclass(tmp_path):
    policy = Policy((tmp_path,))
    spec = RunSpec.from_dict(distill_spec("t:3"), policy)
    assert (spec.task, spec.model_task, spec.teacher, spec.teacher_ref) == ("distill", "multiclass", "t:3", ("t", 3))
    assert (spec.distill.temperature, spec.distill.alpha) == (4.0, 0.7)
    assert spec.model_spec(10).task == "multiclass"
    assert RunSpec.from_dict(spec.to_dict(), policy) == spec
    assert spec.to_dict()["distill"] == {"temperature": 4.0, "alpha": 0.7}
    given = RunSpec.from_dict(distill_spec("t:3", distill={"temperature": 2, "alpha": 0}), policy)
    assert (given.distill.temperature, given.distill.alpha) == (2.0, 0.0)
    # a spec that does not distill keeps exactly its fields
    plain = {"model": STUDENT, "dataset": DIGITS, "output": {"name": "m"}}
    assert not {"teacher", "distill"} & set(RunSpec.from_dict(plain, policy).to_dict())


@pytest.mark.parametrize("change, field, words", [
    ({"distill": {"temperature": 0}}, "distill.temperature", "> 0"),
    ({"distill": {"temperature": -1.5}}, "distill.temperature", "> 0"),
    ({"distill": {"temperature": math.nan}}, "distill.temperature", "finite"),
    ({"distill": {"temperature": math.inf}}, "distill.temperature", "finite"),
    ({"distill": {"temperature": "hot"}}, "distill.temperature", "a number"),
    ({"distill": {"alpha": 1.5}}, "distill.alpha", "between 0 and 1"),
    ({"distill": {"alpha": -0.1}}, "distill.alpha", ">= 0"),
    ({"distill": {"alpha": math.nan}}, "distill.alpha", "between 0 and 1"),
    ({"distill": {"beta": 1}}, "distill.beta", "unknown key"),
    ({"teacher": None}, "teacher", "is required with task: distill"),
    ({"teacher": "t"}, "teacher", "needs its version"),
    ({"teacher": "t:0"}, "teacher", "version must be an integer >= 1"),
    ({"teacher": "../t:1"}, "teacher", ""),
    ({"task": "multiclass"}, "teacher", "only for task: distill"),
    ({"task": None, "teacher": None, "distill": {"temperature": 2}}, "distill.temperature", "only for task: distill"),
    ({"task": "multiclass", "teacher": None, "distill": {"alpha": 0.5}}, "distill.alpha", "only for task: distill"),
    ({"task": "distil"}, "task", "distill"),
])
def test_invalid_distill_specs_name_the_field(change, field, words, tmp_path):
    spec = distill_spec("t:1")
    for key, value in change.items():  # None: the key left out
        spec.pop(key) if value is None else spec.__setitem__(key, value)
    with pytest.raises(InvalidSpec) as info:
        RunSpec.from_dict(spec, Policy((tmp_path,)))
    assert info.value.field == field, info.value.message
    assert words in info.value.message


# ---- refused before training -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "other-labels", "reordered-labels", "multilabel", "other-input"])
def test_a_teacher_that_cannot_teach_fails_before_the_first_epoch(kind, tmp_path):
    policy = Policy((tmp_path,))
    store = ModelStore(tmp_path / "store")
    if kind == "missing":
        ref, error, words = "nobody:1", NotFound, ["teacher", "'nobody'"]
    elif kind == "other-labels":
        ref = write_teacher(store, "letters", labels=list("abcdefghij"))
        error, words = InvalidSpec, ["letters:1's labels", "not the dataset's", "same order", "index 0"]
    elif kind == "reordered-labels":
        ref = write_teacher(store, "reordered", labels=DIGIT_LABELS[:5] + DIGIT_LABELS[5:][::-1])
        error, words = InvalidSpec, ["reordered:1's labels", "same names in the same order", "index 5"]
    elif kind == "multilabel":
        ref = write_teacher(store, "tags", spec={**TEACHER, "task": "multilabel"})
        error, words = InvalidSpec, ["tags:1 is a multilabel model", "multiclass"]
    else:
        ref = write_teacher(store, "big", spec={**TEACHER, "input": {**IMAGE, "size": 16, "resize": None}})
        error, words = InvalidSpec, ["big:1 takes input", '"size": 16', '"size": 8', "same input"]
    run_dir = tmp_path / "run"
    with pytest.raises(error) as info:
        run_finetune(RunSpec.from_dict(distill_spec(ref), policy), run_dir, store, policy)
    if error is InvalidSpec:
        assert info.value.field == "teacher"
    for word in words:
        assert word in info.value.message, info.value.message
    assert not (run_dir / CHECKPOINT_FILE).exists()
    assert [e for e in events(run_dir) if e["event"] in ("start", "epoch")] == []
    assert store.versions("student") == []


# ---- real runs -----------------------------------------------------------------------------------------
def test_lineage_names_the_teacher_t_alpha_its_metric_and_both_sizes(lab):
    assert lab.resumed.status == "finished"
    bundle = read_archive(lab.resumed.archive)
    lineage = lab.store.lineage("follower", 1)
    d = lineage["distill"]
    assert (d["teacher"], d["temperature"], d["alpha"], d["metric"]) == (lab.sharp, 4.0, 1.0, "accuracy")
    assert lineage["spec"]["task"] == "distill" and lineage["spec"]["teacher"] == lab.sharp
    assert lineage["task"] == "multiclass" and bundle.spec.task == "multiclass"
    assert lineage["metrics"]["metric"] == "accuracy" and bundle.lineage["distill"] == d
    # the teacher's figures are evaluate() over the same validation set
    teacher = read_archive(lab.store.get("sharp", 1))
    loader = val_batches(lab.spec, lab.policy, bundle.spec)
    expected = evaluate(load_model(teacher.spec, teacher.state_dict), nn.CrossEntropyLoss(), loader,
                        torch.device("cpu"), TASKS["multiclass"])
    assert d["teacher_val_count"] == expected["count"] == lineage["metrics"]["val_count"] == 100
    assert d["teacher_val_metric"] == pytest.approx(expected["metric"])
    assert d["teacher_val_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    teacher_model = load_model(teacher.spec, teacher.state_dict)
    assert d["teacher_parameters"] == sum(p.numel() for p in teacher_model.parameters())
    student = load_model(bundle.spec, bundle.state_dict)
    assert d["student_parameters"] == sum(p.numel() for p in student.parameters())
    assert 0 < d["student_parameters"] < d["teacher_parameters"]


def test_with_alpha_one_the_student_follows_the_teacher_not_the_labels(lab):
    bundle = read_archive(lab.resumed.archive)
    teacher = read_archive(lab.store.get("sharp", 1))
    loader = val_batches(lab.spec, lab.policy, bundle.spec)
    said = predictions(load_model(teacher.spec, teacher.state_dict), loader)
    labels = torch.cat([target for _, target in loader])
    assert (said == labels).float().mean() < 0.3  # the teacher is no digit reader
    follower = predictions(load_model(bundle.spec, bundle.state_dict), loader)
    other = read_archive(lab.control.archive)
    labelled = predictions(load_model(other.spec, other.state_dict), loader)
    follows = (follower == said).float().mean().item()
    assert follows > 0.8, follows
    assert follows > (labelled == said).float().mean().item() + 0.4
    assert other.lineage["distill"]["alpha"] == 0.0


def test_a_stopped_distill_run_resumes_with_its_teacher_from_the_store_and_never_checkpoints_it(lab):
    assert lab.first.status == "stopped" and lab.first.epochs == 1
    log = events(lab.run_dir)
    assert [e["from_epoch"] for e in log if e["event"] == "resume"] == [1]
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2]
    assert lab.store.lineage("follower", 1)["metrics"]["epochs_run"] == 2
    state = torch.load(lab.run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    student = load_model(ModelSpec.from_dict(state["model_spec"]), state["model"])
    assert {k: tuple(v.shape) for k, v in state["model"].items()} == {
        k: tuple(v.shape) for k, v in student.state_dict().items()}
    trainable = len(list(student.parameters()))
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == trainable
    assert not any("teacher" in str(k) for k in state)
