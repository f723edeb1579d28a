"""Containment's settings without a trainer (issue 12, point 5): the memory limit and deadline
reach the local runner, the Kubernetes Job the runner builds is contained like the deployments,
and its limit settings are checked. Real trainers past their limit or deadline are
tests/test_containment.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from service.control.settings import ControlConfig
from service.control.runners.local import local_runner
from service.errors import InvalidArgument

pytestmark = pytest.mark.unit


def test_the_settings_reach_the_local_runner():
    config = ControlConfig(model_store="/m", runs_dir="/r", job_memory_limit_mb=2048, job_deadline_s=600,
                           cancel_grace_s=7)
    runner = local_runner(config)
    assert (runner.memory_limit_mb, runner.deadline_s, runner.grace_s) == (2048, 600, 7)
    defaults = ControlConfig()
    assert (defaults.job_memory_limit_mb, defaults.job_deadline_s) == (8192, 86400)
    env = ControlConfig.from_env({"MODELCTL_JOB_MEMORY_LIMIT_MB": "4096", "MODELCTL_JOB_DEADLINE_S": "3600"})
    assert (env.job_memory_limit_mb, env.job_deadline_s) == (4096, 3600)
    with pytest.raises(InvalidArgument, match="MODELCTL_JOB_MEMORY_LIMIT_MB"):
        ControlConfig(job_memory_limit_mb=100)
    with pytest.raises(InvalidArgument, match="MODELCTL_JOB_DEADLINE_S"):
        ControlConfig(job_deadline_s=0)


def _settings(**kw):
    from service.control.runners.kubernetes import K8sSettings, Mount

    base = dict(image="img", namespace="ns", volume_claim="store", cpu_request="2", memory_request="4Gi",
                mounts=(Mount("store", "/models"), Mount("runs", "/runs"), Mount("data", "/data", True)),
                model_store="/models", data_roots=("/data",), memory_limit_mb=6144, deadline_s=3600)
    base.update(kw)
    return K8sSettings(**base)


@pytest.mark.parametrize("nproc, gpus", [(1, 0), (4, 2)])
def test_kubernetes_jobs_are_contained_like_the_deployments(nproc, gpus):
    from service.control.runners.kubernetes import build_job

    job = SimpleNamespace(id="job-0123", attempts=1, run_dir="/runs/job-0123", output_model="m",
                          spec={"hyperparameters": {"nproc": nproc}})
    body, _ = build_job(job, 1, _settings(gpus_per_pod=gpus))
    assert body["spec"]["activeDeadlineSeconds"] == 3600 and body["spec"]["backoffLimit"] == 0
    pod = body["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    (trainer,) = pod["containers"]
    assert trainer["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "capabilities": {"drop": ["ALL"]}}
    limits = trainer["resources"]["limits"]
    assert limits["cpu"] == "2" and limits["memory"] == "6144Mi"
    assert trainer["resources"]["requests"]["memory"] == "4Gi"
    if gpus:
        assert limits["nvidia.com/gpu"] == "2"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1024Mi"}
    assert volumes["tmp"]["emptyDir"] == {}
    mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
    # Writable: /dev/shm, /tmp and the run directory and model store on the shared volume;
    # the data read-only; the rest of the root file system read-only.
    assert mounts["/dev/shm"]["name"] == "dshm" and mounts["/tmp"]["name"] == "tmp"
    assert not mounts["/runs"].get("readOnly") and not mounts["/models"].get("readOnly")
    assert mounts["/data"]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["OMP_NUM_THREADS"] == str(max(1, 2 // (2 if gpus else nproc)))


def test_kubernetes_limit_settings_are_checked():
    from service.control.runners.kubernetes import K8sSettings

    assert _settings(shm_mb=0).effective_shm_mb == 1024
    assert _settings(memory_limit_mb=1024, memory_request="").effective_shm_mb == 512
    assert _settings(cpu_limit="", cpu_request="").effective_cpu_limit == "4"
    assert _settings(cpu_limit="3").effective_cpu_limit == "3"
    with pytest.raises(InvalidArgument, match="MODELCTL_K8S_MEMORY_REQUEST"):
        _settings(memory_request="8Gi")  # above the 6144 MB limit
    with pytest.raises(InvalidArgument, match="MODELCTL_K8S_CPU_REQUEST"):
        _settings(cpu_limit="1")
    with pytest.raises(InvalidArgument, match="MODELCTL_K8S_SHM_MB"):
        _settings(shm_mb=4000)
    with pytest.raises(InvalidArgument, match="MODELCTL_K8S_CPU_LIMIT"):
        _settings(cpu_limit="lots")
    config = ControlConfig(model_store="/m", runs_dir="/r", job_memory_limit_mb=2048, job_deadline_s=600)
    s = K8sSettings.from_env(config, {"MODELCTL_K8S_IMAGE": "i", "MODELCTL_K8S_CPU_LIMIT": "500m",
                                      "MODELCTL_K8S_SHM_MB": "256"})
    assert (s.memory_limit_mb, s.deadline_s, s.cpu_limit, s.shm_mb) == (2048, 600, "500m", 256)
