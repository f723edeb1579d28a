"""What makes a stored model a distill run's teacher, checked without torch.

:func:`check_teacher` is the rule (a multiclass model with the student's input and, once
the data is read, the dataset's labels and vocabulary: see :mod:`service.training.distill`).
The trainer applies it to the loaded teacher before its first epoch; the control API
applies what it can at job creation (:func:`check_at_creation`), reading only the
archive's spec and labels, so the control service checks a spec without importing torch.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from service.errors import InvalidSpec, NotFound
from service.models import ModelSpec, Vocabulary
from service.modelstore.names import LABELS_FILE, SPEC_FILE

if TYPE_CHECKING:
    from service.modelstore import ModelStore

#: The model task a teacher must have (and the student trains for).
TEACHER_TASK = "multiclass"


def _few(labels: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(str(x)[:40]) for x in labels[:n])
    return f"[{shown}{', ...' if len(labels) > n else ''}] ({len(labels)})"


def _input_text(spec: ModelSpec) -> str:
    text = json.dumps({"type": spec.input.type, **spec.input.to_dict()}, sort_keys=True)
    kind = spec.sequence_kind
    return f"{text} ({kind})" if kind else text


def check_teacher(ref: str, teacher: ModelSpec, student: ModelSpec, *, teacher_labels: Sequence[str] | None = None,
                  labels: Sequence[str] | None = None, teacher_vocab: Vocabulary | None = None,
                  vocab: Vocabulary | None = None) -> None:
    """InvalidSpec("teacher") unless ``teacher`` (at ``ref``) can teach ``student``: a
    multiclass model with the student's input and, where given, the dataset's ``labels``
    (same names, same order) and vocabulary. See the module doc."""
    if teacher.task != TEACHER_TASK:
        raise InvalidSpec("teacher", f"{ref} is a {teacher.task} model; a teacher must be a {TEACHER_TASK} "
                                     "classifier")
    same_input = teacher.input == student.input and teacher.sequence_kind == student.sequence_kind
    if same_input and teacher.sequence_kind == "features":
        same_input = teacher.config.input_size == student.config.input_size
    if not same_input:
        raise InvalidSpec("teacher", f"{ref} takes input {_input_text(teacher)}, the student "
                                     f"{_input_text(student)}: the teacher is fed the student's batches, so both "
                                     "must take the same input")
    if labels is not None and teacher_labels is not None and list(teacher_labels) != list(labels):
        at = next((i for i, (a, b) in enumerate(zip(teacher_labels, labels)) if a != b),
                  min(len(teacher_labels), len(labels)))
        raise InvalidSpec("teacher", f"{ref}'s labels {_few(teacher_labels)} are not the dataset's {_few(labels)}: "
                                     f"they must be the same names in the same order (first difference at "
                                     f"index {at})")
    if teacher.sequence_kind == "tokens":
        theirs = teacher_vocab.to_list() if teacher_vocab is not None else None
        ours = vocab.to_list() if vocab is not None else None
        if theirs != ours:
            raise InvalidSpec("teacher", f"{ref}'s vocabulary is not the one this run encodes its texts with: "
                                         "a token-input teacher must share the student's vocabulary")



def teacher_info(store: ModelStore, name: str, version: int):
    """The teacher's ArchiveInfo; NotFound names the ``teacher`` field."""
    try:
        return store.get(name, version)
    except NotFound as exc:
        raise NotFound(f"teacher: {exc.message}") from None


def archive_parts(path) -> tuple[ModelSpec, list[str]]:
    """The spec and labels of an archive, read without its weights (the control API's check)."""
    with zipfile.ZipFile(path) as archive:
        return (ModelSpec.from_dict(json.loads(archive.read(SPEC_FILE))),
                list(json.loads(archive.read(LABELS_FILE))))


def check_at_creation(spec, store: ModelStore) -> None:
    """What the control API can check of a distill spec before the data is read: the teacher
    exists (NotFound), is multiclass, and takes the student's input (InvalidSpec). The
    dataset's labels are checked by the trainer, before its first epoch."""
    name, version = spec.teacher_ref
    info = teacher_info(store, name, version)
    teacher, _ = archive_parts(info.path)
    if spec.base is not None:  # a student keeps its base's input and config; only head and task change
        base_name, base_version = spec.base_ref
        student = archive_parts(store.get(base_name, base_version).path)[0]
    else:
        student = spec.model_spec()
    check_teacher(f"{name}:{version}", teacher, student)
