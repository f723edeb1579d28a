"""Translation between the control plane's Python values and ``modelctl.v1`` messages.

Plain functions, one per message; no decisions (those are the plane's), except that a
request value the proto cannot constrain (an enum number out of range, an empty oneof)
is refused with InvalidSpec naming the field.
"""

from __future__ import annotations

import datetime as dt
import math

from google.protobuf import struct_pb2, timestamp_pb2

from service._gen.modelctl.v1 import control_pb2 as pb
from service import spectext
from service.control.jobs import intake as specs
from service.errors import InvalidSpec

STATES = {"QUEUED": pb.JOB_STATE_QUEUED, "RUNNING": pb.JOB_STATE_RUNNING,
          "SUCCEEDED": pb.JOB_STATE_SUCCEEDED, "FAILED": pb.JOB_STATE_FAILED,
          "CANCELLED": pb.JOB_STATE_CANCELLED}
STATE_NAMES = {v: k for k, v in STATES.items()}
POLICIES = {"none": pb.DEPLOY_POLICY_NONE, "deploy": pb.DEPLOY_POLICY_DEPLOY,
            "deploy-if-better": pb.DEPLOY_POLICY_DEPLOY_IF_BETTER,
            "deploy-if-faster": pb.DEPLOY_POLICY_DEPLOY_IF_FASTER}
POLICY_NAMES = {**{v: k for k, v in POLICIES.items()}, pb.DEPLOY_POLICY_UNSPECIFIED: "none"}
OUTCOMES = {"NOT_REQUESTED": pb.DEPLOY_OUTCOME_NOT_REQUESTED, "DEPLOYED": pb.DEPLOY_OUTCOME_DEPLOYED,
            "KEPT_PARENT": pb.DEPLOY_OUTCOME_KEPT_PARENT, "FAILED": pb.DEPLOY_OUTCOME_FAILED,
            "NOT_FASTER": pb.DEPLOY_OUTCOME_NOT_FASTER, "OUTSIDE_TOLERANCE": pb.DEPLOY_OUTCOME_OUTSIDE_TOLERANCE,
            "NO_COMPARABLE_METRIC": pb.DEPLOY_OUTCOME_NO_COMPARABLE_METRIC}


# ---- scalars -----------------------------------------------------------------------------
def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def iso_timestamp(text) -> timestamp_pb2.Timestamp | None:
    try:
        value = dt.datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return timestamp(value.timestamp())


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def struct(data: dict | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if data:
        out.update(_json_safe(data))
    return out


def struct_to_dict(value: struct_pb2.Struct) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(value)


# ---- requests ------------------------------------------------------------------------------
def spec_of(request: pb.CreateFineTuneJobRequest):
    """The run spec of a create request, as a Python value (validated by the plane)."""
    which = request.WhichOneof("spec")
    if which == "spec_text":
        return specs.parse_text(request.spec_text)
    if which == "spec_struct":
        return specs.whole_numbers(spectext.check_shape(struct_to_dict(request.spec_struct)))
    raise InvalidSpec("spec", "is required: give spec_text (JSON or YAML) or spec_struct")


def policy_of(value: int) -> str:
    if value not in POLICY_NAMES:
        raise InvalidSpec("deploy_policy", f"unknown value {value}", allowed=list(POLICIES))
    return POLICY_NAMES[value]


def tolerance_of(request: pb.CreateFineTuneJobRequest) -> float | None:
    """The request's deploy_tolerance; None when unset (the plane validates it)."""
    return request.deploy_tolerance if request.HasField("deploy_tolerance") else None


def states_of(values) -> list[str]:
    out = []
    for value in values:
        if value not in STATE_NAMES:
            raise InvalidSpec("states", f"unknown value {value}", allowed=list(STATES))
        out.append(STATE_NAMES[value])
    return out


# ---- replies -------------------------------------------------------------------------------
def job_message(job) -> pb.FineTuneJob:
    msg = pb.FineTuneJob(
        id=job.id, state=STATES[job.state], spec=struct(job.spec), output_model=job.output_model,
        base=job.base or "", runner=job.runner, run_dir=job.run_dir, log_path=job.log_path,
        pid=job.pid or 0, attempts=job.attempts, deploy_policy=POLICIES[job.deploy_policy],
        deploy_workers=job.deploy_workers, error=job.error or "",
        cancel_requested=bool(job.cancel_requested), epoch=job.epoch, epochs=job.epochs,
        result_version=job.result_version or 0, parent=job.parent or "", metric=job.metric or "",
        deploy_outcome=OUTCOMES.get(job.deploy_outcome or "", pb.DEPLOY_OUTCOME_UNSPECIFIED),
        deploy_reason=job.deploy_reason or "",
    )
    for name in ("created_at", "started_at", "finished_at", "updated_at"):
        ts = timestamp(getattr(job, name))
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    if job.exit_code is not None:
        msg.exit_code = job.exit_code
    if job.val_metric is not None:
        msg.val_metric = job.val_metric
    if job.parent_val_metric is not None:
        msg.parent_val_metric = job.parent_val_metric
    if job.deploy_tolerance is not None:
        msg.deploy_tolerance = job.deploy_tolerance
    if job.deploy_check:
        msg.deploy_check.CopyFrom(deploy_check_message(job.deploy_check))
    return msg


def deploy_check_message(check: dict) -> pb.DeployCheck:
    """A deploy check as the plane records it (service/control/jobs/plane.py, ``_record_check``)."""
    msg = pb.DeployCheck(serving_version=int(check.get("serving_version") or 0),
                         within_tolerance=bool(check.get("within_tolerance")))
    if isinstance(check.get("serving_val_metric"), (int, float)):
        msg.serving_val_metric = float(check["serving_val_metric"])
    speed = check.get("speed")
    if isinstance(speed, dict):
        msg.speed.CopyFrom(pb.SpeedCheck(
            device=str(speed.get("device") or ""), unit=str(speed.get("unit") or ""),
            rounds=int(speed.get("rounds") or 0), faster=bool(speed.get("faster")),
            error=str(speed.get("error") or ""),
            **{k: _number(speed, k) for k in ("new_p50_ms_b1", "serving_p50_ms_b1", "new_throughput_b8",
                                                  "serving_throughput_b8", "margin", "seconds")}))
    return msg


def _number(event: dict, key: str) -> float:
    value = event.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def epoch_message(event: dict) -> pb.EpochEvent:
    msg = pb.EpochEvent(
        epoch=int(event.get("epoch") or 0), epochs=int(event.get("epochs") or 0),
        train_loss=_number(event, "train_loss"), val_loss=_number(event, "val_loss"),
        val_metric=_number(event, "val_metric"), metric=str(event.get("metric") or ""),
        val_count=int(event.get("val_count") or 0), lr=_number(event, "lr"),
        samples_per_s=_number(event, "samples_per_s"), epoch_seconds=_number(event, "epoch_seconds"),
    )
    ts = iso_timestamp(event.get("time"))
    if ts is not None:
        msg.time.CopyFrom(ts)
    return msg


def trainer_event_message(event: dict) -> pb.TrainerEvent:
    msg = pb.TrainerEvent(event=str(event.get("event") or ""), fields=struct(event))
    ts = iso_timestamp(event.get("time"))
    if ts is not None:
        msg.time.CopyFrom(ts)
    return msg


def update_message(update) -> pb.JobUpdate:
    msg = pb.JobUpdate(job=job_message(update.job))
    if update.kind == "state":
        msg.state = STATES[update.job.state]
    elif update.kind == "epoch":
        msg.epoch.CopyFrom(epoch_message(update.event))
    else:
        msg.event.CopyFrom(trainer_event_message(update.event))
    return msg


def model_version_message(view) -> pb.ModelVersion:
    info, lineage = view.archive, view.archive.lineage or {}
    metrics = lineage.get("metrics") or {}
    msg = pb.ModelVersion(
        name=info.name, version=info.version, path=str(info.path), lineage=struct(lineage),
        source=str(lineage.get("source") or ""), parent=str(lineage.get("parent") or ""),
        created_at=str(lineage.get("created_at") or ""), metric=str(metrics.get("metric") or ""),
        dataset_sha256=str((lineage.get("dataset") or {}).get("sha256") or ""),
    )
    if isinstance(metrics.get("val_metric"), (int, float)):
        msg.val_metric = float(metrics["val_metric"])
    serving = view.serving
    if serving is not None:
        msg.registered = True
        msg.is_default = serving.is_default
        msg.workers = serving.workers
        msg.ready_workers = serving.ready_workers
        msg.serving_status = serving.reason
    elif getattr(view, "refused", ""):
        msg.serving_status = f"refused: {view.refused}"
    if getattr(view, "deploy_decision", None):
        msg.deploy_decision.CopyFrom(struct(view.deploy_decision))
    return msg


def deployment_message(dep) -> pb.Deployment:
    msg = pb.Deployment(id=dep.id, name=dep.model, version=dep.version,
                        previous_version=dep.previous_version or 0, workers=dep.workers,
                        ready_workers=dep.ready_workers, action=dep.action, job_id=dep.job_id or "")
    msg.created_at.CopyFrom(timestamp(dep.created_at))
    return msg
