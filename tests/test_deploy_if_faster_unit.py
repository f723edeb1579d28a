"""deploy-if-faster's decision without a speed check (issue 13, section 6): the policy needs both
faster and within the tolerance, the tolerance and the speed check's settings are bounded, and
a version-2 job database gains the deploy check's columns. The real speed check through the
control plane, and a job through the control API, are tests/test_deploy_if_faster.py."""

from __future__ import annotations

import math
import sqlite3

import pytest

from service.deploy import policies
from service.control.settings import ControlConfig
from service.control.jobs.plane import check_tolerance
from service.deploy.speed import SpeedCheck
from service.control.jobs.jobstore import JobStore
from service.errors import InvalidArgument, InvalidSpec

pytestmark = pytest.mark.unit


FAST_SPEED = SpeedCheck(device="cpu", new_p50_ms_b1=1.0, serving_p50_ms_b1=3.0, new_throughput_b8=900,
                        serving_throughput_b8=300, rounds=3, margin=0.05)


@pytest.mark.parametrize("mode, new, old, tolerance, speed, outcome", [
    ("max", 0.905, 0.915, 0.01, FAST_SPEED, policies.DEPLOYED),         # 1 point worse: within
    ("max", 0.95, 0.915, 0.0, FAST_SPEED, policies.DEPLOYED),           # better, no tolerance
    ("max", 0.90, 0.915, 0.01, FAST_SPEED, policies.OUTSIDE_TOLERANCE),
    ("min", 0.30, 0.25, 0.05, FAST_SPEED, policies.DEPLOYED),           # mse: absolute on the loss side
    ("min", 0.31, 0.25, 0.05, FAST_SPEED, policies.OUTSIDE_TOLERANCE),
    ("max", 0.95, 0.915, 0.01, SpeedCheck(new_p50_ms_b1=1.0, serving_p50_ms_b1=3.0, new_throughput_b8=299,
                                          serving_throughput_b8=300, rounds=3), policies.NOT_FASTER),
    ("max", 0.95, 0.915, 0.01, SpeedCheck(new_p50_ms_b1=2.9, serving_p50_ms_b1=3.0, new_throughput_b8=900,
                                          serving_throughput_b8=300, rounds=3, margin=0.05), policies.NOT_FASTER),
    ("max", 0.95, 0.915, 0.01, SpeedCheck(error="timed out after 1 s", margin=0.05), policies.NOT_FASTER),
    ("max", 0.95, None, 0.01, FAST_SPEED, policies.NO_COMPARABLE_METRIC),
    ("max", 0.80, 0.915, 0.01, SpeedCheck(new_p50_ms_b1=9, serving_p50_ms_b1=3, new_throughput_b8=100,
                                          serving_throughput_b8=300, rounds=3), policies.OUTSIDE_TOLERANCE),
])
def test_the_policy_needs_both_faster_and_within_tolerance(mode, new, old, tolerance, speed, outcome):
    facts = policies.RunFacts("m", 2, "accuracy", mode, new, "m:1", old, serving_version=1, serving_val_metric=old,
                              tolerance=tolerance, speed=speed)
    decision = policies.DEPLOY_POLICIES["deploy-if-faster"](facts)
    assert (decision.outcome, decision.deploy) == (outcome, outcome == policies.DEPLOYED), decision
    assert decision.reason.endswith(": deployed" if decision.deploy else ": kept version 1"), decision.reason
    if speed.measured:
        assert f"p50 {speed.new_p50_ms_b1:.2f} ms vs {speed.serving_p50_ms_b1:.2f} ms" in decision.reason
    else:
        assert "speed not measured (timed out after 1 s)" in decision.reason
    if old is None:
        assert "no accuracy of version 1 on this run's validation set" in decision.reason
    else:
        assert f"accuracy {new:.4f} vs {old:.4f}" in decision.reason
    # a model with no other version serving: deployed, nothing compared
    alone = policies.RunFacts("m", 2, "accuracy", mode, new, None, None, serving_version=None)
    assert policies.DEPLOY_POLICIES["deploy-if-faster"](alone).deploy


def test_the_tolerance_is_validated():
    assert check_tolerance(None, "deploy-if-faster") == policies.DEFAULT_TOLERANCE == 0.01
    assert check_tolerance(0, "deploy-if-faster") == 0.0 and check_tolerance(1, "deploy-if-faster") == 1.0
    assert check_tolerance(None, "deploy") is None
    for bad in (-0.01, 1.01, math.nan, math.inf, True, "0.1"):
        with pytest.raises(InvalidSpec) as err:
            check_tolerance(bad, "deploy-if-faster")
        assert err.value.field == "deploy_tolerance" and "from 0 to 1" in err.value.message
    with pytest.raises(InvalidSpec, match="applies to deploy-if-faster only"):
        check_tolerance(0.1, "deploy-if-better")


def test_the_speed_check_settings_have_bounds():
    assert ControlConfig.from_env(environ={"MODELCTL_SPEED_CHECK_TIMEOUT_S": "30", "MODELCTL_SPEED_CHECK_ROUNDS": "2",
                                           "MODELCTL_SPEED_CHECK_MARGIN": "0.1",
                                           "MODELCTL_SPEED_CHECK_DEVICE": "cpu"}).speed_check_rounds == 2
    for env, value in (("MODELCTL_SPEED_CHECK_TIMEOUT_S", "0"), ("MODELCTL_SPEED_CHECK_ROUNDS", "0"),
                       ("MODELCTL_SPEED_CHECK_ROUNDS", "101"), ("MODELCTL_SPEED_CHECK_MARGIN", "1"),
                       ("MODELCTL_SPEED_CHECK_DEVICE", "tpu")):
        with pytest.raises(InvalidArgument, match=env):
            ControlConfig.from_env(environ={env: value})


def test_a_version_2_job_database_gains_the_deploy_check_columns(tmp_path):
    db = tmp_path / "control.db"
    JobStore(db).close()
    with sqlite3.connect(db) as conn:  # as version 2 made it
        conn.execute("ALTER TABLE jobs DROP COLUMN deploy_tolerance")
        conn.execute("ALTER TABLE jobs DROP COLUMN deploy_check")
        conn.execute("INSERT INTO jobs (id, state, spec, output_model, runner, run_dir, log_path, deploy_policy, "
                     "created_at, updated_at) VALUES ('job-old', 'QUEUED', '{}', 'm', 'local', 'r', 'l', "
                     "'deploy-if-better', 0, 0)")
        conn.execute("PRAGMA user_version=2")
    jobs = JobStore(db)
    try:
        old = jobs.get("job-old")
        assert (old.deploy_tolerance, old.deploy_check) == (None, None)
        jobs.update("job-old", deploy_check={"serving_version": 1})
        assert jobs.get("job-old").deploy_check == {"serving_version": 1}
    finally:
        jobs.close()
