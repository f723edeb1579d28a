"""Text for the ``modelctl finetune`` and ``modelctl models`` commands (control API replies)."""

from __future__ import annotations

import json
from typing import TextIO

from google.protobuf import json_format

from service._gen.modelctl.v1 import control_pb2 as pb
from service.control.api.messages import POLICY_NAMES, STATE_NAMES

_OUTCOMES = {v: k for k, v in pb.DeployOutcome.items()}


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def as_json(message) -> str:
    return json.dumps(as_dict(message), indent=2)


def state(job: pb.FineTuneJob) -> str:
    return STATE_NAMES.get(job.state, "?")


def _metric(name: str, value: float) -> str:
    return f"{name or 'metric'} {value:.4f}"


def job_line(job: pb.FineTuneJob) -> str:
    """``job-… RUNNING digits-cnn epoch 3/10 (deploy-if-better)`` plus the result, if any."""
    parts = [job.id, f"{state(job):9}", job.output_model]
    if job.epochs:
        parts.append(f"epoch {job.epoch}/{job.epochs}")
    parts.append(f"({POLICY_NAMES.get(job.deploy_policy, '?')})")
    if job.result_version:
        parts.append(f"-> {job.output_model}:{job.result_version}")
    if job.HasField("val_metric"):  # the validation metric: what deploy-if-better compares
        text = "val_" + _metric(job.metric, job.val_metric)
        if job.HasField("parent_val_metric"):
            text += f" (parent {job.parent} {job.parent_val_metric:.4f})"
        parts.append(text)
    if job.deploy_outcome:
        parts.append(_OUTCOMES[job.deploy_outcome].removeprefix("DEPLOY_OUTCOME_").lower().replace("_", " "))
    if job.error:
        parts.append(f"error: {job.error}")
    return "  ".join(parts)


def deploy_check_lines(job: pb.FineTuneJob) -> list[str]:
    """deploy-if-faster's comparison, in words: the serving version, both speeds, both metrics."""
    if not job.HasField("deploy_check"):
        return []
    c = job.deploy_check
    if not c.serving_version:
        return [f"  compared with: no other version serving (tolerance {job.deploy_tolerance:g})"]
    lines = [f"  compared with: {job.output_model}:{c.serving_version}, the serving version"]
    s = c.speed
    if s.error:
        lines.append(f"  speed: not measured: {s.error}")
    elif s.rounds:
        lines.append(f"  speed on {s.device}: p50 at batch 1 {s.new_p50_ms_b1:.2f} ms vs {s.serving_p50_ms_b1:.2f} ms, "
                     f"batch 8 {s.new_throughput_b8:.0f} vs {s.serving_throughput_b8:.0f} {s.unit} "
                     f"({s.rounds} rounds, margin {s.margin:.0%}, {s.seconds:.1f} s): "
                     f"{'faster' if s.faster else 'not faster'}")
    new = f"{job.val_metric:.4f}" if job.HasField("val_metric") else "unknown"
    old = f"{c.serving_val_metric:.4f}" if c.HasField("serving_val_metric") else "unknown"
    verdict = "within" if c.within_tolerance else "not within"
    lines.append(f"  {job.metric or 'metric'}: {new} vs {old}, {verdict} the tolerance {job.deploy_tolerance:g}")
    return lines


def job_text(job: pb.FineTuneJob) -> str:
    """The job's line, then why the deploy policy did what it did (and what it measured)."""
    lines = [job_line(job)]
    if job.deploy_reason:
        lines.append(f"  deploy: {job.deploy_reason}")
    return "\n".join(lines + deploy_check_lines(job))


def jobs_table(jobs) -> str:
    if not jobs:
        return "no fine-tuning jobs"
    return "\n".join(job_line(j) for j in jobs)


def update_line(update: pb.JobUpdate) -> str:
    kind = update.WhichOneof("update")
    if kind == "epoch":
        e = update.epoch
        return (f"epoch {e.epoch}/{e.epochs}  train_loss {e.train_loss:.4f}  val_loss {e.val_loss:.4f}  "
                f"val_{e.metric or 'metric'} {e.val_metric:.4f}  lr {e.lr:.3g}  {e.samples_per_s:.0f} samples/s")
    if kind == "event":
        fields = as_dict(update.event.fields) if update.event.HasField("fields") else {}
        name = update.event.event
        if name == "resume":
            return f"resumed from epoch {int(fields.get('from_epoch', 0))}"
        if name == "start":
            return f"started: {int(fields.get('epochs', 0))} epoch(s) on {fields.get('device', '?')}"
        if name == "stopped":
            return f"stopped by {fields.get('signal', '?')} after epoch {int(fields.get('epoch', 0))}"
        if name == "done":
            text = f"wrote {fields.get('name')} version {int(fields.get('version', 0))}"
            if isinstance(fields.get("test_metric"), (int, float)):  # the held-out figure (trainer's done event)
                text += (f": test {_metric(str(fields.get('metric') or ''), fields['test_metric'])} on "
                         f"{int(fields.get('test_count') or 0)} examples")
            return text
        return name
    job = update.job
    text = f"state {state(job)}"
    if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        text += f": {job_text(job)}"
    return text


def follow(updates, out: TextIO) -> int:
    """Print each update as it arrives; 0 if the job SUCCEEDED, 1 otherwise."""
    last = None
    for update in updates:
        print(update_line(update), file=out, flush=True)
        last = update.job
    return 0 if last is not None and last.state == pb.JOB_STATE_SUCCEEDED else 1


def deployment_line(dep: pb.Deployment) -> str:
    before = f"version {dep.previous_version}" if dep.previous_version else "none"
    return (f"{dep.action}: {dep.name} version {dep.version} is the default "
            f"({dep.ready_workers}/{dep.workers} workers READY; before: {before})")
