"""Knowledge distillation (``task: distill``): a student trained on a stored teacher's soft
targets as well as on the labels.

The loss (:class:`DistillLoss`) is Hinton et al.'s::

    alpha * T^2 * KLDivLoss(log_softmax(student / T), softmax(teacher / T), reduction="batchmean")
    + (1 - alpha) * CE(student, labels)

The T^2 keeps the soft term's gradients at the size of the hard term's whatever T. Called
without teacher logits (validation) it is the plain CE, so a distill run's ``val_loss``
compares with the teacher's and with any other run's.

The teacher (:class:`Teacher`) is a multiclass classifier of the model store, loaded from
its archive (weights with ``weights_only=True``) on the student's device, in eval mode,
``requires_grad`` off, under ``torch.inference_mode`` in fp32 (what serving computes): it is
never trained, is not in the optimizer, and is not in the checkpoint, so a resumed run loads
it from the store again. Under DDP it is not wrapped: each rank runs it on its own batches.

What is checked, before the first epoch (:func:`check_teacher`; the control API checks what
it can without the data at job creation, :func:`check_at_creation`; both torch-free, in
:mod:`service.training.distill_checks`):

- the teacher exists (NotFound) and is a multiclass model (InvalidSpec ``teacher``);
- its labels are the dataset's, the same names in the same order (the soft targets are
  matched to the student's outputs by position);
- its input is the student's (for images: channels, size, resize, mean and std; for
  sequences: max_length, the same kind, the same features or the same vocabulary). The
  teacher is fed the student's batches; with the same input spec, the eval transform
  serving applies for the teacher (``image_eval_transform(teacher.spec.input)``) is the
  one the student's batches went through, so the teacher sees the raw image preprocessed
  as serving would, after the same augmentation as the student. A teacher with another
  input is refused with both inputs named rather than fed a second view of each image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.models import ModelSpec, load_model
from service.modelstore import ModelBundle, ModelStore
from service.training.distill_checks import check_teacher, teacher_info

logger = logging.getLogger("service.training")


# ---- the loss ------------------------------------------------------------------------------
class DistillLoss(nn.Module):
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard(student, target)``,
    where ``hard`` is the task's criterion (CE, with the run's label smoothing). Without
    ``teacher`` logits: ``hard`` alone (validation)."""

    def __init__(self, temperature: float, alpha: float, hard: nn.Module):
        super().__init__()
        self.temperature, self.alpha, self.hard = float(temperature), float(alpha), hard
        self.kl = nn.KLDivLoss(reduction="batchmean")

    def forward(self, student: torch.Tensor, target: torch.Tensor,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        hard = self.hard(student, target)
        if teacher is None:
            return hard
        t = self.temperature
        soft = self.kl(F.log_softmax(student / t, dim=1), F.softmax(teacher.float() / t, dim=1))
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard


# ---- the teacher -----------------------------------------------------------------------------
def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Teacher:
    """A frozen model of the store. Calling it returns fp32 logits as a normal tensor (made
    under inference_mode, then cloned outside it: autograd may save it for the backward of
    the KL term, which an inference tensor refuses)."""

    def __init__(self, ref: str, bundle: ModelBundle, device: torch.device):
        self.ref, self.spec, self.labels = ref, bundle.spec, list(bundle.labels)
        self.model = load_model(bundle.spec, bundle.state_dict).to(device).eval()
        self.model.requires_grad_(False)
        self.parameters = parameter_count(self.model)

    @torch.inference_mode()
    def _logits(self, *args) -> torch.Tensor:
        self.model.eval()
        return self.model(*args).float()

    def __call__(self, *args) -> torch.Tensor:
        return self._logits(*args).clone()


# ---- a run's teacher -------------------------------------------------------------------------
@dataclass
class Distiller:
    """A distill run's teacher, T and alpha, and the teacher's validation figures."""

    teacher: Teacher
    temperature: float
    alpha: float
    val: dict | None = None

    def loss(self, hard: nn.Module) -> DistillLoss:
        return DistillLoss(self.temperature, self.alpha, hard)

    def evaluate(self, evaluate, criterion: nn.Module, loader, device: torch.device, task, reduce,
                 is_main: bool) -> dict:
        """The teacher's loss and metric on the run's validation set, with the run's
        ``evaluate`` and loader (each rank its shard, reduced)."""
        self.val = evaluate(self.teacher.model, criterion, loader, device, task, reduce)
        if is_main:
            logger.info("teacher %s on this validation set: %s %.4f (%d examples)", self.teacher.ref,
                        task.metric_name, self.val["metric"], self.val["count"])
        return self.val

    def lineage(self, student: nn.Module, metric_name: str) -> dict:
        val = self.val or {}
        return {"teacher": self.teacher.ref, "temperature": self.temperature, "alpha": self.alpha,
                "metric": metric_name, "teacher_val_metric": val.get("metric"),
                "teacher_val_loss": val.get("loss"), "teacher_val_count": val.get("count"),
                "teacher_parameters": self.teacher.parameters, "student_parameters": parameter_count(student)}


def load_teacher(spec, store: ModelStore, student: ModelSpec, data, device: torch.device) -> Distiller:
    """The run's teacher from the store, checked against the student and the prepared
    ``data`` (labels, vocabulary) before anything trains."""
    name, version = spec.teacher_ref
    ref = f"{name}:{version}"
    bundle = ModelBundle.from_archive(teacher_info(store, name, version).path)
    check_teacher(ref, bundle.spec, student, teacher_labels=bundle.labels, labels=data.labels,
                  teacher_vocab=bundle.vocab, vocab=data.vocab)
    return Distiller(Teacher(ref, bundle, device), spec.distill.temperature, spec.distill.alpha)
