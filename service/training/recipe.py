"""The classic fine-tuning recipe: DataLoader, optimizer, ReduceLROnPlateau, early stopping,
a checkpoint every epoch, resume, DDP, and a new archive version at the end.

``train_one_epoch`` and ``evaluate`` are plain functions that receive what they use
(torchvision's references/classification/train.py). :class:`FineTuneRecipe` wires them
(torchtune's setup / train / save_checkpoint / cleanup); :func:`run_finetune` runs it.

The run directory holds ``run.json`` (the validated spec and the run id: the config
beside the weights), ``checkpoint.pt`` (every epoch), ``events.jsonl``, TensorBoard's
event files in ``tensorboard/`` (service/training/curves.py) and, once the
archive is written, ``result.json`` (``run.json`` and ``result.json`` are fsynced, then
renamed into place: service/atomic.py). Started again on the same directory, a run resumes
from its checkpoint; a finished run is not trained nor archived again, and a run that
wrote its archive but not its result.json finds that archive by its run id (the lineage
is published before the archive) instead of writing another version.

The data comes in three splits (datasets.make_splits). The validation split picks the
weights: the best epoch by the monitored value (``hyperparameters.keep: last`` for the
last ones), early stopping and the plateau scheduler follow it, and deploy-if-better
compares the parent on it. The test split is evaluated once, at the end, with the kept
weights: its ``test_metric`` is the honest figure, since nothing chose anything on it.
Evaluation runs in fp32 through the shared eval transform, as serving does, whatever the
training precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import signal
import subprocess
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

import service
from service import atomic, faultpoints, signals
from service.errors import AlreadyExists, FailedPrecondition, InvalidSpec
from service.models import FAMILIES, ImageInput, ModelSpec, build_model, load_model
from service.modelstore import ArchiveInfo, ModelBundle, ModelStore
from service.rundir import CHECKPOINT_FILE, EVENTS_FILE, RESULT_FILE, RUN_FILE, EventLog, now, result_record, write_result
from service.training import checkpoint as ckpt
from service.training import distill, distributed
from service.training.curves import IMAGES_TAG, SEGMENTATION_IMAGES, TENSORBOARD_DIR, Curves, segmentation_panels
from service.training.datasets import LoadContext, PreparedData, load_raw, prepare
from service.training.ema import WeightAverage
from service.training.optim import OPTIMIZERS
from service.training.run_spec import Policy, RunSpec
from service.training.tasks import TASKS, Task, better, segmentation_prediction

logger = logging.getLogger("service.training")

PROGRESS_INTERVAL_S = 2.0
#: per-class figures of a task's evaluate() details that an epoch record, the best epoch and
#: the archive's metrics carry beside the metric (segmentation: IoU per class, None where a
#: class is in neither truth nor prediction)
DETAILS = ("per_class_iou",)


# ---- stopping ----------------------------------------------------------------------
class StopRequest:
    """Set by SIGTERM / SIGINT; the loop stops at the next safe point (after the current
    batch) and no archive is written. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> StopRequest:
        """Record SIGTERM and SIGINT from now on (main thread only: service/signals.py)."""
        self._previous.update(signals.install(self._handle))
        return self

    def restore(self) -> None:
        signals.restore(self._previous)


# ---- the two plain functions -------------------------------------------------------
def _to(args: tuple, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> tuple:
    # lengths of packed sequences stay on the CPU (pack_padded_sequence wants them there)
    first = args[0].to(device, non_blocking=True)
    if first.dim() == 4 and memory_format is not torch.preserve_format:
        first = first.contiguous(memory_format=memory_format)
    return (first, *args[1:])


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader,
                    device: torch.device, *, autocast: Callable[[], contextlib.AbstractContextManager],
                    scaler: torch.amp.GradScaler | None = None, clip_grad_norm: float | None = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    progress: Callable[[int, int, float, int, float], None] | None = None,
                    memory_format: torch.memory_format = torch.preserve_format,
                    teacher: Callable[..., torch.Tensor] | None = None,
                    after_step: Callable[[], None] | None = None) -> dict:
    """One pass over ``loader``. Returns loss_sum, count (examples), seconds and stopped
    (``should_stop()`` became true after a batch: the epoch is incomplete). Image batches
    are laid out in ``memory_format``. ``teacher`` (distill runs): its logits of the same
    batch go to ``criterion`` as a third argument (service/training/distill.py).
    ``after_step`` runs after every optimizer step (the weight average's update)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count, start, batches = 0, time.perf_counter(), len(loader)
    for i, (args, target) in enumerate(loader):
        args, target = _to(args, device, memory_format), target.to(device, non_blocking=True)
        with autocast():
            output = model(*args)
        loss = criterion(output.float(), target) if teacher is None else criterion(output.float(), target,
                                                                                  teacher(*args))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
        if after_step is not None:
            after_step()
        n = len(target)
        loss_sum += loss.detach().double() * n
        count += n
        if progress is not None:
            progress(i + 1, batches, float(loss_sum) / count, count, time.perf_counter() - start)
        if should_stop():
            return {"loss_sum": float(loss_sum), "count": count, "seconds": time.perf_counter() - start,
                    "stopped": True}
    return {"loss_sum": float(loss_sum), "count": count, "seconds": time.perf_counter() - start, "stopped": False}


@torch.inference_mode()
def evaluate(model: nn.Module, criterion: nn.Module, loader, device: torch.device, task: Task,
             reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             memory_format: torch.memory_format = torch.preserve_format) -> dict:
    """Loss, metric and example count over ``loader`` in fp32, summed over processes by
    ``reduce`` (an all_reduce of sums and counts: each process passes its own shard)."""
    model.eval()
    sums = None
    for args, target in loader:
        args, target = _to(args, device, memory_format), target.to(device, non_blocking=True)
        output = model(*args).float()
        n = len(target)
        batch = torch.cat([torch.tensor([float(criterion(output, target)) * n, float(n)], dtype=torch.float64),
                           task.stats(output, target).cpu()])
        sums = batch if sums is None else sums + batch
    if sums is None:  # an empty shard (fewer validation examples than processes)
        sums = torch.zeros(2 + task.num_stats, dtype=torch.float64)
    sums = reduce(sums)
    count = int(sums[1])
    out = {"loss": float(sums[0] / sums[1]) if count else math.nan, "metric": task.metric(sums[2:]), "count": count}
    if task.details is not None:  # per-class figures (segmentation: IoU per class)
        out["details"] = task.details(sums[2:])
    return out


# ---- helpers -----------------------------------------------------------------------
def head_prefix(model: nn.Module) -> str:
    """The state_dict prefix of the model's head: its last nn.Linear (every classifier family
    ends in one), or for a fully convolutional network (unet) its last 1x1 nn.Conv2d."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if not names:
        raise FailedPrecondition(f"{type(model).__name__} has no linear head")
    return names[-1] + "."


def freeze_backbone(model: nn.Module) -> list[str]:
    """requires_grad=False on everything but the head; returns the frozen parameter names."""
    head = head_prefix(model)
    frozen = []
    for name, param in model.named_parameters():
        if not name.startswith(head):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_train_mode(model: nn.Module) -> None:
    """Train mode, except frozen batch-norm layers, which keep their running statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 / AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32", "bf16" or "fp16" for ``device``; InvalidSpec where the device cannot.

    "auto" is fp16 AMP on CUDA and fp32 on CPU: bf16 autocast on CPU is opt-in, because
    it halves the mantissa of every conv/linear output and its speed-up depends on the
    CPU; use it after checking the accuracy target with it (see BENCHMARKS.md)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise InvalidSpec("hyperparameters.precision", "fp16 autocast needs CUDA", allowed=["auto", "fp32", "bf16"])
    if precision == "bf16":
        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16()
        if not ok:
            raise InvalidSpec("hyperparameters.precision", f"this {device.type} has no native bf16",
                              allowed=["auto", "fp32"])
    return precision


def git_commit() -> str | None:
    """The commit of the source tree the package runs from, when it is a git checkout."""
    root = Path(service.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_archive(info: ArchiveInfo) -> ModelBundle:
    """The bundle inside a .mar archive (unzipped to a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="modelctl-base-") as tmp:
        with zipfile.ZipFile(info.path) as archive:
            archive.extractall(tmp)
        return ModelBundle.load(Path(tmp))


@dataclass
class Outcome:
    """How a run ended: status "finished", "stopped" or "already_finished"."""

    status: str
    run_dir: Path
    epochs: int = 0
    archive: ArchiveInfo | None = None
    metrics: dict = field(default_factory=dict)
    signum: int | None = None


# ---- the recipe --------------------------------------------------------------------
class FineTuneRecipe:
    """One run: :meth:`setup`, :meth:`train`, :meth:`save_checkpoint`, :meth:`cleanup`."""

    def __init__(self, spec: RunSpec, run_dir: Path | str, store: ModelStore, policy: Policy,
                 stop: StopRequest | None = None):
        self.spec, self.hp, self.policy = spec, spec.hyperparameters, policy
        self.run_dir = Path(run_dir).resolve()
        self.store = store
        self.stop = stop or StopRequest()
        self.task: Task = TASKS["multiclass"]
        self.dist = distributed.DistContext()
        self.events = EventLog(self.run_dir / EVENTS_FILE)
        self.finished: dict | None = None
        self.distiller: distill.Distiller | None = None
        self.start_epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.ema: WeightAverage | None = None
        self.bad_epochs = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.curves = Curves(self.run_dir / TENSORBOARD_DIR, enabled=False)

    # ---- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        hp = self.hp
        self.dist = distributed.init(hp.device)
        if hp.nproc > 1 and not self.dist.initialized:
            raise FailedPrecondition(f"hyperparameters.nproc is {hp.nproc}: start the run with "
                                     "`python -m service.training run` (it starts torchrun), not in-process")
        self.device = self.dist.device
        self.precision = resolve_precision(hp.precision, self.device)
        self._setup_run_dir()
        if self.finished is not None:
            return
        # the model's spec, base weights and vocabulary
        base_bundle, self.parent = None, None
        if self.spec.base is not None:
            name, version = self.spec.base_ref
            info = self.store.get(name, version)
            base_bundle, self.parent = read_archive(info), f"{info.name}:{info.version}"
            model_field = "base"
        else:
            model_field = "model"
        self._check_output_version()
        # data
        raw = load_raw(self.spec.dataset_kind, self.spec.builtin_name,
                       LoadContext(self.spec.dataset_path, self._task_name(base_bundle), self.policy.data_roots,
                                   self.policy.max_examples, self.policy.max_elements))
        self.model_spec, self.head = self._final_spec(base_bundle, raw.labels)
        self.task = TASKS[self.model_spec.task].sized(self.model_spec.num_classes)
        self.data: PreparedData = prepare(
            raw, name=self.spec.dataset.source, spec=self.model_spec, task=self.model_spec.task, hp=hp,
            train_size=self.spec.dataset.train_size, val_size=self.spec.dataset.val_size,
            test_size=self.spec.dataset.test_size, base_vocab=base_bundle.vocab if base_bundle is not None else None, model_field=model_field)
        del raw
        if self.spec.distill is not None:  # the teacher, checked before anything trains
            self.distiller = distill.load_teacher(self.spec, self.store, self.model_spec, self.data, self.device)
        # model
        torch.manual_seed(hp.seed)
        self.model = self._build_model(base_bundle).to(self.device)
        self.memory_format = torch.preserve_format
        if hp.channels_last:
            if not isinstance(self.model_spec.input, ImageInput):
                raise InvalidSpec("hyperparameters.channels_last", "is for image models only")
            self.memory_format = torch.channels_last
            self.model = self.model.to(memory_format=torch.channels_last)
        self.frozen = freeze_backbone(self.model) if hp.freeze_backbone else []
        if hp.ema_decay is not None:
            self.ema = WeightAverage(self.model, hp.ema_decay)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp = self.model
        if self.dist.initialized:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.criterion = self.task.criterion(hp.label_smoothing)
        if self.distiller is not None:
            self.criterion = self.distiller.loss(self.criterion)
        self.optimizer = OPTIMIZERS[hp.optimizer](trainable, hp)
        self.mode = self.task.mode if hp.monitor == "metric" else "min"
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=self.mode, factor=hp.lr_factor, patience=hp.lr_patience)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        torch.manual_seed(hp.seed + self.dist.rank)
        self._resume()
        self._open_curves()
        self._setup_loaders()
        self.parent_eval = self._evaluate_parent(base_bundle)
        if self.distiller is not None:
            self.distiller.evaluate(evaluate, self.criterion, self.val_loader, self.device, self.task,
                                    self.dist.all_reduce_sum, self.dist.is_main)

    def _evaluate_parent(self, base: ModelBundle | None) -> dict | None:
        """The parent's loss and metric on this run's validation set, with the same
        evaluate(); what deploy-if-better compares against. None when the head was
        replaced (other labels or task): the parent cannot answer this dataset."""
        if base is None or self.head != "kept" or self.finished is not None:
            return None
        parent = load_model(self.model_spec, base.state_dict).to(self.device)
        val = evaluate(parent, self.criterion, self.val_loader, self.device, self.task, self.dist.all_reduce_sum)
        if self.dist.is_main:
            logger.info("parent %s on this validation set: %s %.4f (%d examples)", self.parent,
                        self.task.metric_name, val["metric"], val["count"])
        return val

    def _setup_run_dir(self) -> None:
        run_file = self.run_dir / RUN_FILE
        spec_dict = self.spec.to_dict()
        record = None
        if self.dist.is_main:
            record = json.loads(run_file.read_text()) if run_file.is_file() else None
            if record is not None and record.get("spec") != spec_dict:
                started = (self.run_dir / CHECKPOINT_FILE).exists() or (self.run_dir / RESULT_FILE).exists()
                if started:
                    raise FailedPrecondition(f"run dir {self.run_dir} holds another run spec; "
                                             "use a new --run-dir for a new run")
                record = None  # an attempt that never finished an epoch: this spec takes the dir over
                self.events.path.unlink(missing_ok=True)
            if record is None:
                record = {"run_id": uuid.uuid4().hex, "created_at": now(), "spec": spec_dict}
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic.write_text(run_file, json.dumps(record, indent=2) + "\n")
        record = self.dist.gather(record)[0]  # every rank takes rank 0's record
        self.run_id, self.created_at = record["run_id"], record["created_at"]
        result = self.run_dir / RESULT_FILE
        if result.is_file():
            self.finished = json.loads(result.read_text())

    def _check_output_version(self) -> None:
        out = self.spec.output
        if out.version is not None and out.version in self.store.versions(out.name):
            owner = self.store.lineage(out.name, out.version).get("run_id")
            if owner != self.run_id:
                raise AlreadyExists(f"output.version: model {out.name!r} version {out.version} exists; "
                                    "versions are immutable")

    def _task_name(self, base: ModelBundle | None) -> str:
        if self.spec.model_task is not None:
            return self.spec.model_task
        return base.spec.task if base is not None else self.spec.model_spec().task

    def _final_spec(self, base: ModelBundle | None, labels: list[str]) -> tuple[ModelSpec, str]:
        """The spec of the model to train, and what happens to the head: "new" (a fresh
        model), "kept" (base with the dataset's labels), "replaced" (base, other labels)."""
        task = self._task_name(base)
        if base is None:
            given = self.spec.model.get("num_classes")
            if given is not None and given != len(labels):
                raise InvalidSpec("model.num_classes", f"the dataset has {len(labels)} labels, the spec says {given}",
                                  allowed=[len(labels)])
            return self.spec.model_spec(len(labels)), "new"
        same = list(base.labels) == list(labels) and base.spec.task == task
        spec = dataclasses.replace(base.spec, num_classes=len(labels), task=task)
        return spec, "kept" if same else "replaced"

    def _build_model(self, base: ModelBundle | None) -> nn.Module:
        if base is None:
            return build_model(self.model_spec)  # reads config.pretrained where set
        if self.head == "kept":
            return load_model(self.model_spec, base.state_dict).train()
        model = FAMILIES[self.model_spec.family].build(self.model_spec)
        head = head_prefix(model)
        backbone = {k: v for k, v in base.state_dict.items() if not k.startswith(head)}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith(head) for k in missing):
            raise FailedPrecondition(f"base weights do not fit: missing {missing}, unexpected {unexpected}")
        return model

    def _resume(self) -> None:
        state = ckpt.load(self.run_dir / CHECKPOINT_FILE)
        if state is None:
            if self.dist.is_main:
                self.events.append("start", run_id=self.run_id, epochs=self.hp.epochs, world_size=self.dist.world_size,
                                   device=str(self.device), precision=self.precision, dataset=self.data.info,
                                   parent=self.parent)
            return
        if state["model_spec"] != self.model_spec.to_dict() or state["dataset_sha256"] != self.data.sha256:
            raise FailedPrecondition(f"the checkpoint in {self.run_dir} was made with another model spec or other "
                                     "data; use a new --run-dir")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:  # a checkpoint without one (ema_decay added): start it from the model
            self.ema.load_state_dict(state.get("ema") or {"module": state["model"], "updates": 0})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = state["epoch"]
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.best_state = state["best_model"]
        if self.best_state is None and self.best is not None:  # the best weights were the last ones
            self.best_state = self._evaluated_state()
        self.history = list(state["history"])
        self.train_seconds, self.samples_seen = state["train_seconds"], state["samples_seen"]
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(rngs[self.dist.rank])
        if self.dist.is_main:
            self.events.reconcile(self.history)
            self.events.append("resume", run_id=self.run_id, from_epoch=self.start_epoch, epochs=self.hp.epochs)
            logger.info("resuming %s from epoch %d of %d", self.run_dir, self.start_epoch, self.hp.epochs)

    def _setup_loaders(self) -> None:
        hp, d = self.hp, self.dist
        self.sampler = DistributedSampler(self.data.train, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                          seed=hp.seed)
        self.generator = torch.Generator()
        per_rank = len(self.sampler)
        common = {"num_workers": hp.workers, "collate_fn": self.data.collate,
                  "pin_memory": self.device.type == "cuda", "persistent_workers": False}
        self.train_loader = DataLoader(self.data.train, batch_size=hp.batch_size, sampler=self.sampler,
                                       drop_last=per_rank > 1 and per_rank % hp.batch_size == 1,
                                       generator=self.generator, **common)
        # Validation: each rank evaluates its own slice, no padding; sums are all-reduced.
        shard = Subset(self.data.val, range(d.rank, len(self.data.val), d.world_size))
        self.val_loader = DataLoader(shard, batch_size=hp.batch_size, shuffle=False, **common)
        # Test: the same, once at the end (see _finish).
        shard = Subset(self.data.test, range(d.rank, len(self.data.test), d.world_size))
        self.test_loader = DataLoader(shard, batch_size=hp.batch_size, shuffle=False, **common)

    # ---- curves ------------------------------------------------------------------------
    def _open_curves(self) -> None:
        """TensorBoard event files in the run dir (main rank). A resumed run purges what the
        event files hold from the checkpoint's epoch on and writes that epoch again from the
        checkpoint, so the curves match the checkpoint's history (service/training/curves.py)."""
        self.curves = Curves(self.run_dir / TENSORBOARD_DIR, enabled=self.dist.is_main,
                             purge_step=self.start_epoch or None)
        if self.start_epoch and self.history:
            self.curves.epoch(self.history[-1])

    @torch.inference_mode()
    def _segmentation_images(self, epoch: int) -> None:
        """A few fixed validation images of a segmentation model with their true and
        predicted masks, as TensorBoard images (main rank; fp32, eval mode)."""
        if not self.curves.active or self.model_spec.task != "segmentation" or not len(self.data.val):
            return
        n = len(self.data.val)
        picks = sorted({round(i * (n - 1) / max(SEGMENTATION_IMAGES - 1, 1)) for i in range(SEGMENTATION_IMAGES)})
        args, target = self.data.collate([self.data.val[i] for i in picks])
        model = self.evaluated
        model.eval()
        logits = model(*_to(args, self.device, self.memory_format)).float()
        if logits.dim() != 4:
            return
        panels = segmentation_panels(args[0].cpu(), target.cpu(), segmentation_prediction(logits).cpu())
        self.curves.image(IMAGES_TAG, panels, epoch)

    # ---- training ----------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _progress(self, epoch: int) -> Callable | None:
        if not self.dist.is_main:
            return None
        last = [time.perf_counter()]

        def report(batch: int, batches: int, loss: float, count: int, seconds: float) -> None:
            t = time.perf_counter()
            if t - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = t
                logger.info("epoch %d/%d  batch %d/%d  loss %.4f  %.0f samples/s", epoch, self.hp.epochs, batch,
                            batches, loss, count * self.dist.world_size / max(seconds, 1e-9))
        return report

    def train(self) -> Outcome:
        if self.finished is not None:
            logger.info("run %s already finished: %s version %s", self.run_dir, self.finished["name"],
                        self.finished["version"])
            return Outcome("already_finished", self.run_dir, self.finished.get("epochs", 0), metrics=self.finished)
        hp, d = self.hp, self.dist
        epoch = self.start_epoch
        while epoch < hp.epochs and not self._should_stop_early() and not self._out_of_time():
            epoch += 1
            epoch_start = time.perf_counter()
            self.sampler.set_epoch(epoch)
            self.generator.manual_seed(hp.seed * 1_000_003 + epoch * 1009 + d.rank)
            set_train_mode(self.ddp)
            stats = train_one_epoch(
                self.ddp, self.criterion, self.optimizer, self.train_loader, self.device, autocast=self._autocast,
                scaler=self.scaler, clip_grad_norm=hp.clip_grad_norm,
                should_stop=lambda: d.any(self.stop.requested), progress=self._progress(epoch),
                memory_format=self.memory_format,
                teacher=self.distiller.teacher if self.distiller is not None else None,
                after_step=(lambda: self.ema.update(self.model)) if self.ema is not None else None)
            if stats["stopped"]:
                return self._stopped(epoch, "during")
            d.broadcast_buffers(self.model)
            if self.ema is not None:
                d.broadcast_buffers(self.ema.module)
            val = evaluate(self.evaluated, self.criterion, self.val_loader, self.device, self.task, d.all_reduce_sum,
                           memory_format=self.memory_format)
            train_sums = d.all_reduce_sum(torch.tensor([stats["loss_sum"], stats["count"]], dtype=torch.float64))
            seconds = max(d.gather(stats["seconds"]))
            samples = int(train_sums[1])
            self.train_seconds += seconds
            self.samples_seen += samples
            lr = self.optimizer.param_groups[0]["lr"]
            monitored = val["metric"] if hp.monitor == "metric" else val["loss"]
            self.scheduler.step(monitored)
            improved = better(self.mode, monitored, None if self.best is None else self.best["monitored"])
            if improved:
                self.best = {"epoch": epoch, "monitored": monitored, "val_metric": val["metric"],
                             "val_loss": val["loss"], **val.get("details", {})}
                self.best_state = self._evaluated_state()
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            record = {"epoch": epoch, "epochs": hp.epochs, "train_loss": float(train_sums[0] / train_sums[1]),
                      "val_loss": val["loss"], "val_metric": val["metric"], "metric": self.task.metric_name,
                      "val_count": val["count"], "lr": lr, "samples_per_s": samples / max(seconds, 1e-9),
                      "epoch_seconds": seconds, **val.get("details", {}),
                      "wall_seconds": max(d.gather(time.perf_counter() - epoch_start)), "time": now()}
            self.history.append(record)
            self.save_checkpoint(epoch)
            if d.is_main:
                self.events.append("epoch", **{k: v for k, v in record.items() if k != "time"})
                self.curves.epoch(record)
                self._segmentation_images(epoch)
                logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_%s %.4f  lr %.2g  %.0f samples/s%s",
                            epoch, hp.epochs, record["train_loss"], val["loss"], self.task.metric_name,
                            val["metric"], lr, record["samples_per_s"], "  (best)" if improved else "")
            if d.any(self.stop.requested):
                return self._stopped(epoch, "after")
        return self._finish(epoch, self._should_stop_early() or self._out_of_time())

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, tested and archived: the average, when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _evaluated_state(self) -> dict:
        """A CPU copy of :attr:`evaluated`'s weights (the best epoch's, when it is this one)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.evaluated.state_dict().items()}

    def _should_stop_early(self) -> bool:
        patience = self.hp.early_stopping_patience
        return patience is not None and self.bad_epochs >= patience

    def _out_of_time(self) -> bool:
        """``max_time_s`` (Lightning's max_time, by whole epochs): whether one more epoch,
        as long as the longest so far, would end past the budget. Time is each epoch's wall
        time (training and validation, the slowest rank's), summed over resumes; the first
        epoch always runs. Every rank decides from the same history, so all stop together."""
        if self.hp.max_time_s is None or not self.history:
            return False
        walls = [r.get("wall_seconds", r["epoch_seconds"]) for r in self.history]
        out = sum(walls) + max(walls) > self.hp.max_time_s
        if out and self.dist.is_main and not getattr(self, "_told_out_of_time", False):
            self._told_out_of_time = True
            logger.info("stopping after epoch %d: another epoch (~%.0f s) would pass max_time_s %.0f (%.0f s used)",
                        len(self.history), max(walls), self.hp.max_time_s, sum(walls))
        return out

    def save_checkpoint(self, epoch: int) -> None:
        """Write the fixed-key checkpoint (from the unwrapped model) into the run dir.
        Called on every rank (it gathers each rank's RNG state); rank 0 writes."""
        rngs = self.dist.gather(ckpt.rng_state())
        if not self.dist.is_main:
            return
        state = {
            "format": ckpt.FORMAT,
            "model": self.model.state_dict(),
            "best_model": None if self.best is not None and self.best["epoch"] == epoch else self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "rng": rngs,
            "model_spec": self.model_spec.to_dict(),
            "labels": list(self.data.labels),
            "vocab": self.data.vocab.to_list() if self.data.vocab is not None else None,
            "dataset_sha256": self.data.sha256,
            "run_id": self.run_id,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "samples_seen": self.samples_seen,
        }
        ckpt.save(self.run_dir / CHECKPOINT_FILE, state)

    def _stopped(self, epoch: int, when: str) -> Outcome:
        signum = self.stop.signum
        name = signal.Signals(signum).name if signum else "stop request"
        done = epoch if when == "after" else epoch - 1
        if self.dist.is_main:
            self.events.append("stopped", signal=name, epoch=done)
            held = f"the checkpoint holds epoch {done}" if done else "no epoch completed yet"
            logger.warning("stopped by %s %s epoch %d: no archive written; %s; start the run again with "
                           "--run-dir %s to resume", name, when, epoch, held, self.run_dir)
        return Outcome("stopped", self.run_dir, done, signum=signum)

    # ---- output ------------------------------------------------------------------------
    def _finish(self, epoch: int, stopped_early: bool) -> Outcome:
        hp, d = self.hp, self.dist
        keep_best = hp.keep == "best" and self.best is not None
        weights = self.best_state if keep_best else self.evaluated.state_dict()
        chosen = self.best if keep_best else {**self.history[-1], "epoch": epoch}
        details = {k: chosen[k] for k in DETAILS if k in chosen}  # segmentation: per_class_iou
        metrics = {
            "metric": self.task.metric_name,
            "val_metric": chosen["val_metric"],
            "val_loss": chosen["val_loss"],
            "val_count": self.history[-1]["val_count"] if self.history else 0,
            "weights": "best" if keep_best else "last",
            "weights_epoch": chosen["epoch"],
            "epochs_run": epoch,
            "stopped_early": stopped_early,
            "parent_val_metric": self.parent_eval["metric"] if self.parent_eval else None,
            "parent_val_loss": self.parent_eval["loss"] if self.parent_eval else None,
            "parent_val_count": self.parent_eval["count"] if self.parent_eval else None,
            **details,
            "history": [{k: r[k] for k in ("epoch", "train_loss", "val_loss", "val_metric", "lr")}
                        for r in self.history],
        }
        test = self._evaluate_test(weights if keep_best or self.ema is not None else None)
        metrics.update(test_metric=test["metric"], test_loss=test["loss"], test_count=test["count"])
        if "details" in test:
            metrics["test_details"] = test["details"]
        info = None
        if d.is_main:
            info = self._write_archive(weights, metrics)
            faultpoints.point("train.archive_written")
            write_result(self.run_dir, result_record(name=info.name, version=info.version, path=info.path,
                                                     epochs=epoch, run_id=self.run_id, lineage=info.lineage))
            self.events.append("done", name=info.name, version=info.version, epochs=epoch,
                               val_metric=metrics["val_metric"], test_metric=metrics["test_metric"],
                               test_count=metrics["test_count"], metric=metrics["metric"])
            logger.info("wrote %s version %d (%s weights of epoch %d): test %s %.4f on %d examples; validation "
                        "%.4f on %d: %s", info.name, info.version, metrics["weights"], metrics["weights_epoch"],
                        metrics["metric"], metrics["test_metric"], metrics["test_count"], metrics["val_metric"],
                        metrics["val_count"], info.path)
        d.barrier()
        return Outcome("finished", self.run_dir, epoch, info, metrics)

    def _evaluate_test(self, kept: dict | None) -> dict:
        """The kept weights (``kept``; None: the model's own, the last) on the test split,
        once, in fp32 through the same evaluate() as validation: each rank its shard, the
        sums all-reduced. Nothing before this saw the test split."""
        if kept is not None:
            self.model.load_state_dict(kept)
        test = evaluate(self.model, self.criterion, self.test_loader, self.device, self.task,
                        self.dist.all_reduce_sum, memory_format=self.memory_format)
        return test

    def _write_archive(self, weights: dict, metrics: dict) -> ArchiveInfo:
        out = self.spec.output
        for version in self.store.versions(out.name):  # written before a crash? then it is ours
            if self.store.lineage(out.name, version).get("run_id") == self.run_id:
                return self.store.get(out.name, version)
        finished = now()
        started = self.created_at
        duration = (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds()
        lineage = {
            "source": "finetune",
            "parent": self.parent,
            "run_id": self.run_id,
            "dataset": dict(self.data.info),
            "spec": self.spec.to_dict(),
            "hyperparameters": self.hp.to_dict(),
            "head": self.head,
            **({"distill": self.distiller.lineage(self.model, self.task.metric_name)} if self.distiller else {}),
            "frozen_parameters": len(self.frozen),
            "metrics": metrics,
            "timings": {"started_at": started, "finished_at": finished, "duration_s": duration,
                        "train_seconds": self.train_seconds,
                        "samples_per_s": self.samples_seen / max(self.train_seconds, 1e-9)},
            "code": {"version": service.__version__, "git_commit": git_commit()},
            "world_size": self.dist.world_size,
            "device": self.device.type,
            "precision": self.precision,
        }
        bundle = ModelBundle(self.model_spec, {k: v.detach().cpu().contiguous() for k, v in weights.items()},
                             list(self.data.labels), self.data.vocab, lineage)
        return self.store.write(out.name, bundle, version=out.version, keep_default=True)

    def cleanup(self) -> None:
        self.curves.close()
        self.dist.close()


def run_finetune(spec: RunSpec, run_dir: Path | str, store: ModelStore | Path | str, policy: Policy,
                 stop: StopRequest | None = None) -> Outcome:
    """Run ``spec`` in this process (one process, or one torchrun worker)."""
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    recipe = FineTuneRecipe(spec, run_dir, store, policy, stop)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
