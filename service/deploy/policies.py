"""Deploy policies: what happens to the version a finished fine-tuning run wrote.

Deploy policies are plain functions of a finished run's facts, in :data:`DEPLOY_POLICIES`.
Those in :data:`SERVING_POLICIES` compare with the model's serving version: the control
plane (:mod:`service.control.jobs.plane`) first gathers that version, its metric on the
run's validation set, and a speed check of both (:mod:`service.deploy.speed`) into the facts.

**deploy-if-faster** deploys the new version only when it is faster *and* its metric is
within the tolerance of the serving version's:

* the serving version is the model's default when the run finished (:meth:`service.deploy.deployer.Deployer.current_default`);
  a model with no other version serving gets the new one deployed, with nothing to compare;
* its metric on this run's validation set is the one the trainer measured for the run's
  parent, when the serving version *is* the parent; or for the run's teacher, when it is the
  teacher of a distillation run (a student); otherwise its own lineage metric when it was
  trained on the same data (same dataset sha256, same metric). With none of these (a serving
  version that is neither parent nor teacher and was trained on other data, a replaced
  head) nothing is comparable: NO_COMPARABLE_METRIC, not deployed;
* within tolerance: ``new >= serving - tolerance`` for a metric where larger is better,
  ``new <= serving + tolerance`` where smaller is (mse: absolute on the loss side);
* faster: :attr:`service.deploy.speed.SpeedCheck.faster` (batch-1 p50 and batch-8
  throughput, each better by more than the noise margin). A check that failed or timed out
  is not faster.

When several conditions fail, the outcome names the metric's first (NO_COMPARABLE_METRIC,
OUTSIDE_TOLERANCE), and the reason says every part.

A policy only decides (a :class:`Decision`); the control plane records it and has the
deployer (:mod:`service.deploy.deployer`) carry a deployment out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from service.deploy.speed import SpeedCheck

# Deploy outcomes (the proto's DeployOutcome without its prefix).
NOT_REQUESTED, DEPLOYED, KEPT_PARENT, DEPLOY_FAILED = "NOT_REQUESTED", "DEPLOYED", "KEPT_PARENT", "FAILED"
NOT_FASTER, OUTSIDE_TOLERANCE, NO_COMPARABLE_METRIC = "NOT_FASTER", "OUTSIDE_TOLERANCE", "NO_COMPARABLE_METRIC"

#: deploy-if-faster's metric tolerance unless a job sets one: one point of accuracy.
DEFAULT_TOLERANCE = 0.01


@dataclass(frozen=True)
class RunFacts:
    """What a deploy policy knows about a finished run's new version."""

    name: str
    version: int
    metric: str | None
    #: "max" when a larger metric is better, "min" when a smaller one is.
    mode: str
    val_metric: float | None
    #: "name:version" the run started from, or None.
    parent: str | None
    #: The parent's metric on the same validation set, when known.
    parent_val_metric: float | None
    # Gathered for SERVING_POLICIES only:
    #: The version serving as the model's default when the run finished (None: none but
    #: this one).
    serving_version: int | None = None
    #: That version's metric on this run's validation set, when known.
    serving_val_metric: float | None = None
    #: How much worse than the serving version's the metric may be (metric units).
    tolerance: float = DEFAULT_TOLERANCE
    #: Both versions' speed, side by side (None: not measured).
    speed: SpeedCheck | None = None


@dataclass(frozen=True)
class Decision:
    deploy: bool
    outcome: str
    reason: str


def policy_none(facts: RunFacts) -> Decision:
    return Decision(False, NOT_REQUESTED, "deploy policy none: not deployed")


def policy_deploy(facts: RunFacts) -> Decision:
    return Decision(True, DEPLOYED, "deploy policy deploy")


def policy_deploy_if_better(facts: RunFacts) -> Decision:
    metric = facts.metric or "metric"
    if facts.parent is None:
        return Decision(True, DEPLOYED, "no parent to compare with: deployed")
    if facts.val_metric is None or facts.parent_val_metric is None:
        return Decision(False, KEPT_PARENT,
                        f"the parent's {metric} on this run's validation set is unknown; kept {facts.parent}")
    new, old = facts.val_metric, facts.parent_val_metric
    ok = new >= old if facts.mode == "max" else new <= old
    sign = (">=" if ok else "<") if facts.mode == "max" else ("<=" if ok else ">")
    if ok:
        return Decision(True, DEPLOYED, f"{metric} {new:.4f} {sign} parent {facts.parent}'s {old:.4f}: deployed")
    return Decision(False, KEPT_PARENT, f"{metric} {new:.4f} {sign} parent {facts.parent}'s {old:.4f}: "
                                        f"kept {facts.parent}")


def within_tolerance(facts: RunFacts) -> bool | None:
    """Whether the new metric is no worse than the serving version's by more than the
    tolerance (in the metric's direction); None when either is unknown."""
    if facts.val_metric is None or facts.serving_val_metric is None:
        return None
    worse_by = (facts.serving_val_metric - facts.val_metric if facts.mode == "max"
                else facts.val_metric - facts.serving_val_metric)
    return worse_by <= facts.tolerance + 1e-12  # 0.905 vs 0.915 is within 0.01 despite binary floats


def policy_deploy_if_faster(facts: RunFacts) -> Decision:
    serving = facts.serving_version
    if serving is None or serving == facts.version:
        return Decision(True, DEPLOYED, f"{facts.name} has no other version serving: deployed")
    metric = facts.metric or "metric"
    ok_metric = within_tolerance(facts)
    if ok_metric is None:
        metric_text = f"no {metric} of version {serving} on this run's validation set to compare with"
    else:
        metric_text = (f"{metric} {facts.val_metric:.4f} vs {facts.serving_val_metric:.4f} "
                       f"{'within' if ok_metric else 'outside'} {facts.tolerance:g}")
    speed = facts.speed or SpeedCheck(error="not run")
    speed_text = speed.describe()
    if speed.measured and not speed.faster:
        speed_text += f" (not faster by the {speed.margin:.0%} margin)"
    if ok_metric and speed.faster:
        return Decision(True, DEPLOYED, f"{speed_text}, {metric_text}: deployed")
    outcome = NO_COMPARABLE_METRIC if ok_metric is None else OUTSIDE_TOLERANCE if not ok_metric else NOT_FASTER
    return Decision(False, outcome, f"{speed_text}, {metric_text}: kept version {serving}")


#: Deploy policy name -> decision function.
DEPLOY_POLICIES: dict[str, Callable[[RunFacts], Decision]] = {
    "none": policy_none,
    "deploy": policy_deploy,
    "deploy-if-better": policy_deploy_if_better,
    "deploy-if-faster": policy_deploy_if_faster,
}
#: Policies that compare with the model's serving version (the plane gathers
#: RunFacts.serving_version, serving_val_metric, tolerance and speed for them).
SERVING_POLICIES = frozenset({"deploy-if-faster"})
