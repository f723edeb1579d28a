"""Model quality of the fine-tuning recipe (issue 3, point 6): ``make eval``.

``python -m service.training.bench [--only NAME ...] [--out BENCHMARKS.md]`` runs each
benchmark below with the real recipe (``run_finetune``) into a scratch store, checks its
target and time budget, and writes the table between the markers of BENCHMARKS.md
(other content of the file is kept). The metric judged against the target is the test
metric: the archived weights (the best epoch by validation accuracy) evaluated once on
the test split, which nothing chose anything on. The best epoch's validation metric and
the last epoch's are shown beside it: picking the best epoch on the validation set
flatters the validation figure a little, never the test one.

Test sets: fashion-mnist and basic-motions their official test split; digits, digits-seq
and rotten-tomatoes a fixed stratified 20% held out (datasets.TEST_FRACTION, TEST_SEED:
the same examples for every run). Validation sets: a stratified 20% of the rest (seed 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from service.modelstore import ModelStore
from service.training.recipe import run_finetune
from service.report import replace_section
from service.training.spec import Policy, RunSpec

START, END = "<!-- finetune-eval:start -->", "<!-- finetune-eval:end -->"

DIGITS_CNN = {"family": "cnn", "config": {"channels": [32, 64, 128], "dropout": 0.25},
              "input": {"type": "image", "channels": 1, "size": 16, "resize": None}}
FASHION_CNN = {"family": "cnn", "config": {"channels": [32, 64, 128, 256], "dropout": 0.1},
               "input": {"type": "image", "channels": 1, "size": 28, "resize": None}}
MOBILENET = {"family": "mobilenet_v2", "config": {"pretrained": "imagenet"},
             "input": {"type": "image", "channels": 3, "size": 96, "resize": None}}
ADAMW = {"optimizer": "adamw", "weight_decay": 5e-4, "lr_factor": 0.3}


@dataclass(frozen=True)
class Bench:
    """One benchmark run: its spec, its target (None: a comparison only) and time budget."""

    title: str
    spec: dict
    target: float | None
    budget_s: float
    group: str


def _spec(model: dict | None, dataset, name: str, base: str | None = None, **hp) -> dict:
    spec = {"dataset": dataset, "hyperparameters": hp, "output": {"name": name}}
    if base is not None:
        spec["base"] = base
    else:
        spec["model"] = model
    return spec


FASHION_3000 = {"source": "builtin:fashion-mnist", "train_size": 3000, "val_size": 2000}
DIGITS_10 = {"source": "builtin:digits", "train_size": 144}  # 8% of the 1797 digits, 12.5% of the 1149 train split

BENCHES: dict[str, Bench] = {
    "digits-cnn": Bench(
        "CNN on builtin:digits", _spec(DIGITS_CNN, "builtin:digits", "eval-digits-cnn", epochs=25, batch_size=32,
                                       lr=2e-3, lr_patience=3, **ADAMW), 0.99, 180, "quality"),
    "digits-lstm": Bench(
        "LSTM on builtin:digits-seq",
        _spec({"family": "rnn", "config": {"cell": "lstm", "input_size": 8, "hidden_size": 128, "num_layers": 2,
                                           "dropout": 0.2, "bidirectional": True}},
              "builtin:digits-seq", "eval-digits-lstm", epochs=30, batch_size=32, lr=3e-3, lr_patience=3,
              clip_grad_norm=1.0, **ADAMW), 0.97, 180, "quality"),
    "digits-resnet18": Bench(
        "ResNet-18 on builtin:digits",
        _spec({"family": "resnet", "config": {"arch": "resnet18"},
               "input": {"type": "image", "channels": 1, "size": 32, "resize": None}},
              "builtin:digits", "eval-digits-resnet18", epochs=20, batch_size=64, lr=2e-3, lr_patience=2, **ADAMW),
        0.98, 180, "quality"),
    "fashion-cnn": Bench(
        "CNN on builtin:fashion-mnist (official test set)",
        _spec(FASHION_CNN, "builtin:fashion-mnist", "eval-fashion-cnn", epochs=14, batch_size=128, lr=3e-3,
              lr_patience=1, label_smoothing=0.05, augment="crop", precision="bf16", channels_last=True, **ADAMW),
        0.93, 600, "quality"),
    "rotten-tomatoes-gru": Bench(
        "word-level GRU on builtin:rotten-tomatoes",
        _spec({"family": "rnn", "config": {"cell": "gru", "vocab_size": 10000, "embedding_dim": 128,
                                           "hidden_size": 128, "bidirectional": True, "pooling": "max"},
               "input": {"type": "sequence", "max_length": 80}},
              "builtin:rotten-tomatoes", "eval-rotten-tomatoes-gru", epochs=12, batch_size=64, lr=2e-3,
              lr_patience=1, optimizer="adamw", weight_decay=0.1, lr_factor=0.3, token_dropout=0.4,
              label_smoothing=0.1), 0.78, 600, "quality"),
    "basic-motions-lstm": Bench(
        "LSTM on builtin:basic-motions (official test set)",
        _spec({"family": "rnn", "config": {"cell": "lstm", "input_size": 6, "hidden_size": 64, "num_layers": 2}},
              "builtin:basic-motions", "eval-basic-motions-lstm", epochs=40, batch_size=8, lr=3e-3, lr_patience=10,
              clip_grad_norm=1.0, **ADAMW), 0.95, 300, "quality"),
    "fashion3000-mobilenet-imagenet": Bench(
        "MobileNetV2, ImageNet weights, fine-tuned on 3000 Fashion-MNIST images",
        _spec(MOBILENET, FASHION_3000, "eval-fashion3000-mobilenet", epochs=6, batch_size=64, lr=1e-3,
              lr_patience=1, **ADAMW), None, 600, "transfer: MobileNetV2 on 3000 Fashion-MNIST images"),
    "fashion3000-mobilenet-random": Bench(
        "MobileNetV2, random weights, same images",
        _spec({**MOBILENET, "config": {"pretrained": None}}, FASHION_3000, "eval-fashion3000-mobilenet-random",
              epochs=6, batch_size=64, lr=1e-3, lr_patience=1, **ADAMW), None, 600,
        "transfer: MobileNetV2 on 3000 Fashion-MNIST images"),
    "fashion3000-mobilenet-probe": Bench(
        "MobileNetV2, ImageNet weights frozen: linear probe",
        _spec(MOBILENET, FASHION_3000, "eval-fashion3000-mobilenet-probe", epochs=6, batch_size=64, lr=3e-3,
              lr_patience=1, freeze_backbone=True, **ADAMW), None, 600,
        "transfer: MobileNetV2 on 3000 Fashion-MNIST images"),
    "digits10-from-fashion": Bench(
        "Fashion-MNIST CNN, backbone frozen, on 10% of digits",
        _spec(None, DIGITS_10, "eval-digits10-from-fashion", base="eval-fashion-cnn", epochs=30, batch_size=16,
              lr=3e-3, lr_patience=3, freeze_backbone=True, **ADAMW), None, 180,
        "transfer: a Fashion-MNIST CNN on 10% of digits"),
    "digits10-scratch": Bench(
        "same CNN from scratch on the same 10% of digits",
        _spec(FASHION_CNN, DIGITS_10, "eval-digits10-scratch", epochs=30, batch_size=16, lr=3e-3, lr_patience=3,
              **ADAMW), None, 180, "transfer: a Fashion-MNIST CNN on 10% of digits"),
}


def run_bench(name: str, bench: Bench, work: Path, store: ModelStore, policy: Policy) -> dict:
    spec = RunSpec.from_dict(bench.spec, policy)
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    outcome = run_finetune(spec, run_dir, store, policy)
    seconds = time.perf_counter() - start
    m = outcome.metrics
    lineage = outcome.archive.lineage
    passed = None if bench.target is None else (m["test_metric"] >= bench.target and seconds <= bench.budget_s)
    return {"name": name, "title": bench.title, "group": bench.group, "target": bench.target,
            "budget_s": bench.budget_s, "metric": m["metric"], "test_metric": m["test_metric"],
            "test_count": m["test_count"], "val_metric": m["val_metric"],
            "last_metric": m["history"][-1]["val_metric"], "best_epoch": m["weights_epoch"],
            "epochs": m["epochs_run"], "val_count": m["val_count"], "seconds": seconds,
            "samples_per_s": lineage["timings"]["samples_per_s"], "train_size": lineage["dataset"]["train_size"],
            "archive": f"{outcome.archive.name}:{outcome.archive.version}", "passed": passed,
            "precision": lineage.get("precision", "fp32"),
            "channels_last": bool(lineage.get("hyperparameters", {}).get("channels_last"))}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def render(results: list[dict]) -> str:
    lines = [START, "## Fine-tuning quality (`make eval`)", "",
             f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Training precision fp32 unless the "
             "run names another; evaluation always fp32.", "",
             "Test: the task's metric (accuracy for the classifiers) of the archived (best-epoch) weights, "
             "evaluated once on the test split (the official test set, else a fixed held-out 20%), against the "
             "target. Beside it, on the validation split that chose those weights: the best epoch's metric and "
             "the last epoch's. "
             "Time: the whole run in-process (data loading, training, evaluation every epoch, the test "
             "evaluation, archive).", ""]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        lines += [f"### {group}", "",
                  "| run | target | test | val (best epoch) | val (last epoch) | epochs | test n | val n "
                  "| train n | time | samples/s | |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            target = f"≥ {r['target']:.2f} in {r['budget_s'] / 60:.0f} min" if r["target"] is not None else "-"
            verdict = {True: "pass", False: "**miss**", None: ""}[r["passed"]]
            how = ", ".join(([r["precision"]] if r.get("precision", "fp32") != "fp32" else [])
                            + (["channels_last"] if r.get("channels_last") else []))
            title = f"{r['title']} ({how})" if how else r["title"]
            lines.append(f"| {title} | {target} | {r['test_metric']:.4f} | {r['val_metric']:.4f} (epoch "
                         f"{r['best_epoch']}) | {r['last_metric']:.4f} | {r['epochs']} | {r['test_count']} | "
                         f"{r['val_count']} | {r['train_size']} | {r['seconds']:.0f} s | {r['samples_per_s']:.0f} | "
                         f"{verdict} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.training.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--work-dir", type=Path, default=Path(".modelctl/eval"))
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.only or list(BENCHES)
    store = ModelStore(args.work_dir / "store")
    if not args.only:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    policy = Policy((args.work_dir,))
    results = []
    for name in names:
        logging.getLogger("service.training").info("benchmark %s", name)
        results.append(run_bench(name, BENCHES[name], args.work_dir, store, policy))
        print(json.dumps(results[-1]), flush=True)
    section = render(results)
    replace_section(args.out, START, END, section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(section)
    return 0 if all(r["passed"] is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
