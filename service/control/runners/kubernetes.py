"""The ``kubernetes`` runner: each attempt of a fine-tune job is a batch/v1 Job.

With ``runner: kubernetes`` (or ``MODELCTL_DEFAULT_RUNNER=kubernetes``) the scheduler starts,
follows and stops trainers through :class:`KubernetesRunner`, which has the runner protocol
of :mod:`service.control.runners.local` (``start``, ``adopt``, ``poll``, ``signal``, ``reap``):

* ``start(job)`` creates the Job ``modelctl-<job id>-<attempt>`` through the official
  ``kubernetes`` client: the control service's image, the trainer's command (the local
  runner's, ``python -m service.training run <run dir>/spec.json --run-dir … --store …``),
  CPU/memory requests, ``nvidia.com/gpu`` requests, the shared volume mounted at the same
  paths as in the control service (so the run directory, the model store and the data roots
  mean the same inside the Job), and labels carrying the job id and the attempt. Kubernetes
  does not retry the pod (``backoffLimit: 0``): the scheduler decides, as for a local
  process, whether an ended attempt failed or was interrupted and resumes from the
  checkpoint;
* each Job is contained as the Deployments of ``k8s/base`` are: CPU and memory limits
  (``MODELCTL_K8S_CPU_LIMIT``, ``MODELCTL_JOB_MEMORY_LIMIT_MB``; ``OMP_NUM_THREADS`` follows
  the CPU limit), a ``/dev/shm`` of ``MODELCTL_K8S_SHM_MB`` (a memory-backed ``emptyDir`` with
  a ``sizeLimit``; it counts toward the memory limit), ``activeDeadlineSeconds`` of
  ``MODELCTL_JOB_DEADLINE_S``, ``seccompProfile: RuntimeDefault``, a read-only root file
  system with a writable ``emptyDir`` on ``/tmp`` (the run directory and the model store are
  the shared volume's mounts), no privilege escalation, no capabilities. :meth:`KubernetesRunner.limit`
  names the limit a failed attempt hit (a trainer container ``OOMKilled``, the Job's
  ``DeadlineExceeded``), which makes the job FAILED with it rather than resumed;
* a multi-node run (``hyperparameters.nproc`` larger than the processes one pod takes:
  ``MODELCTL_K8S_GPUS_PER_POD``, or ``MODELCTL_K8S_PROCS_PER_POD`` on CPU) is an *Indexed*
  Job with one pod per node and a headless Service; every pod runs ``torchrun --nnodes N
  --node-rank <completion index> --nproc-per-node P`` with rank 0's pod
  (``<job>-0.<service>``) as the rendezvous address;
* the Jobs are *watched* (one watch per runner, on the label
  ``app.kubernetes.io/managed-by=modelctl-control``); :func:`job_phase` maps a Job's
  conditions to pending / running / succeeded / failed / deleting, and ``poll`` to the
  scheduler's ``(running, exit status)``. A Failed Job's exit status is its pod's (so a
  trainer error stays a failure, and a pod killed by a signal or evicted, with no status
  or >= 128, is an interruption that resumes);
* ``signal`` (cancel, or the control service stopping) deletes the Job with *foreground*
  propagation: the Job stays, marked for deletion, until its pods are gone; the pods get
  SIGTERM and the trainer stops at a safe point keeping its checkpoint. SIGKILL deletes
  again with a zero grace period;
* ``reap`` copies the pods' logs into the job's ``train.log`` (the scheduler reads the
  trainer's error line there) and deletes the Job and its Service.

The handle's ``run_key`` (a 31-bit number from the job id and the attempt, also a label of
the Job) is what the job records (its ``pid`` field), so a restarted control service finds
the Job of a RUNNING job again (``adopt``).

Settings (environment; the control service's ConfigMap in ``k8s/``):

=============================== =========================================================
``MODELCTL_K8S_IMAGE``          image of the Jobs (required; the runner is offered only
                                where it is set, see :data:`service.control.runners.local.RUNNERS`)
``MODELCTL_K8S_NAMESPACE``      namespace [the pod's own, else ``default``]
``MODELCTL_K8S_VOLUME_CLAIM``   PersistentVolumeClaim mounted into the Jobs [none]
``MODELCTL_K8S_MOUNTS``         ``subPath:path[:ro],…`` of that claim [``store:<model
                                store>,runs:<runs dir>,data:<first data root>:ro``]
``MODELCTL_K8S_SERVICE_ACCOUNT`` the Jobs' service account [the namespace's default]
``MODELCTL_K8S_GPUS_PER_POD``   GPUs a pod may take, one per process [0: CPU]
``MODELCTL_K8S_PROCS_PER_POD``  processes per pod on CPU [0: all in one pod]
``MODELCTL_K8S_CPU_REQUEST``, ``MODELCTL_K8S_MEMORY_REQUEST`` per pod [none]
``MODELCTL_K8S_CPU_LIMIT``      CPU limit per pod [the CPU request, else 4]
``MODELCTL_K8S_SHM_MB``         size of each pod's ``/dev/shm`` [1024, at most half the memory limit]
``MODELCTL_JOB_MEMORY_LIMIT_MB`` memory limit per pod (the control service's setting) [8192]
``MODELCTL_JOB_DEADLINE_S``     ``activeDeadlineSeconds`` (the control service's setting) [86400]
``MODELCTL_K8S_TTL_S``          ``ttlSecondsAfterFinished`` of a Job left behind [86400]
``MODELCTL_K8S_KUBECONFIG``     kubeconfig outside a cluster [in-cluster, else ~/.kube/config]
=============================== =========================================================
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import signal as signals
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from service import rundir
from service.control.runners.local import RunHandle
from service.environ import Environ, to_size
from service.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

NAME = "kubernetes"
MANAGED_BY = "modelctl-control"
LABEL_JOB_ID = "modelctl.dev/job-id"
LABEL_ATTEMPT = "modelctl.dev/attempt"
LABEL_RUN_KEY = "modelctl.dev/run-key"
LABEL_RUN = "modelctl.dev/run"
CONTAINER = "trainer"
#: torchrun's rendezvous port on rank 0's pod.
MASTER_PORT = 29500
GPU_RESOURCE = "nvidia.com/gpu"
_IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Lines of each pod's log copied into train.log when an attempt ends.
_LOG_TAIL_LINES = 2000


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    sub_path: str
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class K8sSettings:
    image: str = ""
    namespace: str = "default"
    volume_claim: str = ""
    mounts: tuple[Mount, ...] = ()
    service_account: str = ""
    gpus_per_pod: int = 0
    procs_per_pod: int = 0
    cpu_request: str = ""
    memory_request: str = ""
    #: CPU limit of a pod ("" = the request, else :data:`DEFAULT_CPU_LIMIT`).
    cpu_limit: str = ""
    #: Memory limit of a pod, MB (the control service's job_memory_limit_mb).
    memory_limit_mb: int = 8192
    #: Size of a pod's /dev/shm, MB (0 = :data:`DEFAULT_SHM_MB`, at most half the memory limit).
    shm_mb: int = 0
    #: activeDeadlineSeconds of a Job (the control service's job_deadline_s).
    deadline_s: int = 86400
    ttl_s: int = 86400
    kubeconfig: str = ""
    #: Seconds a pod has to stop after SIGTERM (the control service's cancel grace).
    grace_s: int = 30
    #: Command lines of the trainer (the local runner's): python, model store, data roots.
    python: str = "python"
    model_store: str = ""
    data_roots: tuple[str, ...] = ()
    #: (variable, value) of the operator's run bounds, for the trainer (service/bounds.py).
    run_bounds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        cpu = _cpu_millis(self.effective_cpu_limit, "MODELCTL_K8S_CPU_LIMIT")
        if self.cpu_request and _cpu_millis(self.cpu_request, "MODELCTL_K8S_CPU_REQUEST") > cpu:
            raise InvalidArgument(f"MODELCTL_K8S_CPU_REQUEST ({self.cpu_request}) is above MODELCTL_K8S_CPU_LIMIT "
                                  f"({self.effective_cpu_limit})")
        if self.memory_request and _memory_bytes(self.memory_request, "MODELCTL_K8S_MEMORY_REQUEST") \
                > self.memory_limit_mb * 2**20:
            raise InvalidArgument(f"MODELCTL_K8S_MEMORY_REQUEST ({self.memory_request}) is above "
                                  f"MODELCTL_JOB_MEMORY_LIMIT_MB ({self.memory_limit_mb} MB)")
        if self.shm_mb and self.shm_mb > self.memory_limit_mb // 2:
            raise InvalidArgument(f"MODELCTL_K8S_SHM_MB ({self.shm_mb}) is above half of MODELCTL_JOB_MEMORY_LIMIT_MB "
                                  f"({self.memory_limit_mb}): /dev/shm counts toward the pod's memory")

    @property
    def effective_cpu_limit(self) -> str:
        return self.cpu_limit or self.cpu_request or DEFAULT_CPU_LIMIT

    @property
    def effective_shm_mb(self) -> int:
        return self.shm_mb or min(DEFAULT_SHM_MB, self.memory_limit_mb // 2)

    @classmethod
    def from_env(cls, config=None, environ=None) -> "K8sSettings":
        env = Environ(environ)

        def get(name, default=""):
            return env.str(f"MODELCTL_K8S_{name}", default)

        def integer(name, default):
            return env.int(f"MODELCTL_K8S_{name}", default, minimum=0)

        store = str(getattr(config, "model_store", "") or "")
        runs = str(getattr(config, "runs_dir", "") or "")
        roots = tuple(str(r) for r in (getattr(config, "data_roots", ()) or ()))
        namespace = get("NAMESPACE")
        if not namespace:
            try:
                namespace = _IN_CLUSTER_NAMESPACE.read_text().strip()
            except OSError:
                namespace = "default"
        raw_mounts = get("MOUNTS")
        if raw_mounts:
            mounts = tuple(_parse_mount(m) for m in raw_mounts.split(",") if m.strip())
        else:
            mounts = tuple(m for m in (Mount("store", store) if store else None,
                                       Mount("runs", runs) if runs else None,
                                       Mount("data", roots[0], True) if len(roots) == 1 else None) if m)
        return cls(image=get("IMAGE"), namespace=namespace, volume_claim=get("VOLUME_CLAIM"), mounts=mounts,
                   service_account=get("SERVICE_ACCOUNT"), gpus_per_pod=integer("GPUS_PER_POD", 0),
                   procs_per_pod=integer("PROCS_PER_POD", 0), cpu_request=get("CPU_REQUEST"),
                   memory_request=get("MEMORY_REQUEST"), cpu_limit=get("CPU_LIMIT"), shm_mb=integer("SHM_MB", 0),
                   memory_limit_mb=int(getattr(config, "job_memory_limit_mb", 8192) or 8192),
                   deadline_s=int(getattr(config, "job_deadline_s", 86400) or 86400),
                   ttl_s=integer("TTL_S", 86400),
                   kubeconfig=get("KUBECONFIG"),
                   grace_s=max(1, int(round(float(getattr(config, "cancel_grace_s", 30) or 30)))),
                   model_store=store, data_roots=roots, run_bounds=_run_bounds(config))


def _run_bounds(config) -> tuple[tuple[str, str], ...]:
    from service.bounds import RUN_BOUNDS, trainer_env

    if config is None or not all(hasattr(config, name) for name in RUN_BOUNDS):
        return ()
    return tuple(sorted(trainer_env(config).items()))


#: A pod's CPU limit when neither MODELCTL_K8S_CPU_LIMIT nor a request is set.
DEFAULT_CPU_LIMIT = "4"
#: A pod's /dev/shm (DataLoader workers hand batches over in it; NCCL uses it), MB.
DEFAULT_SHM_MB = 1024
#: A Kubernetes memory quantity ("8Gi", "512Mi", "1G", "1e9", "2048") in bytes.
_memory_bytes = to_size


def _cpu_millis(text: str, source: str) -> int:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in millicores."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)(m?)\s*", text or "")
    if m is None or float(m.group(1)) <= 0:
        raise InvalidArgument(f"{source}: expected a CPU quantity such as 2 or 500m, got {text!r}")
    return int(float(m.group(1)) * (1 if m.group(2) else 1000))


def _parse_mount(text: str) -> Mount:
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or (
            len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidArgument(f"MODELCTL_K8S_MOUNTS: expected subPath:/path[:ro], got {text.strip()!r}")
    return Mount(parts[0], parts[1], len(parts) == 3 and parts[2] == "ro")


# ---- names and the Job ---------------------------------------------------------------------
def _dns_label(text: str, limit: int = 52) -> str:
    """A DNS-1123 label from ``text`` (lower case, [a-z0-9-]), short enough for the pods'
    hostnames (``<job>-<index>``) and the Job controller's generated names."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if len(label) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        label = label[:limit - 9].rstrip("-") + "-" + digest
    return label or "x"


def job_name(job_id: str, attempt: int) -> str:
    return _dns_label(f"modelctl-{job_id}-{attempt}")


def run_key(job_id: str, attempt: int) -> int:
    """The number standing for one attempt: the handle's ``run_key`` and the Job's run-key label.
    31 bits, as the control API carries a pid as an int32; only the Jobs that exist at once
    (they are deleted when their attempt ends) need to differ."""
    return int(hashlib.sha256(f"{job_id}/{attempt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF or 1


class Layout(NamedTuple):
    """How a run is spread over pods: ``nodes`` pods of ``procs`` processes (and GPUs)."""

    nodes: int
    procs: int
    gpus: int


def layout(nproc: int, device: str, settings: K8sSettings) -> Layout:
    nproc = max(1, int(nproc))
    use_gpu = settings.gpus_per_pod > 0 and device != "cpu"
    per_pod = settings.gpus_per_pod if use_gpu else (settings.procs_per_pod or nproc)
    per_pod = max(1, min(per_pod, nproc))
    if nproc % per_pod:
        raise InvalidArgument(f"hyperparameters.nproc is {nproc}: a multi-node run needs a multiple of the "
                              f"{per_pod} processes a pod takes")
    return Layout(nproc // per_pod, per_pod, per_pod if use_gpu else 0)


def trainer_command(run_dir: str, settings: K8sSettings, shape: Layout, name: str) -> list[str]:
    args = rundir.trainer_argv(run_dir, store=settings.model_store or None, data_roots=settings.data_roots)
    if shape.nodes == 1:
        # One pod: the trainer starts torchrun itself when nproc > 1 (--standalone).
        return [settings.python, "-m", rundir.TRAINER_MODULE, *args]
    return [settings.python, "-m", "torch.distributed.run", f"--nnodes={shape.nodes}",
            "--node-rank=$(JOB_COMPLETION_INDEX)", f"--nproc-per-node={shape.procs}",
            f"--master-addr={name}-0.{name}", f"--master-port={MASTER_PORT}",
            "-m", rundir.TRAINER_MODULE, *args]


def build_job(job, attempt: int, settings: K8sSettings) -> tuple[dict, dict | None]:
    """The batch/v1 Job of one attempt of ``job``, and its headless Service (multi-node)."""
    if not settings.image:
        raise FailedPrecondition("the kubernetes runner has no image: set MODELCTL_K8S_IMAGE")
    spec = job.spec if isinstance(job.spec, dict) else json.loads(job.spec)
    hp = spec.get("hyperparameters") or {}
    shape = layout(hp.get("nproc", 1), hp.get("device", "auto"), settings)
    name = job_name(job.id, attempt)
    labels = {
        "app.kubernetes.io/name": "modelctl",
        "app.kubernetes.io/component": "finetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB_ID: _dns_label(job.id, 63),
        LABEL_ATTEMPT: str(attempt),
        LABEL_RUN_KEY: str(run_key(job.id, attempt)),
        LABEL_RUN: name,
    }
    annotations = {"modelctl.dev/job-id": job.id, "modelctl.dev/run-dir": str(job.run_dir),
                   "modelctl.dev/output-model": str(getattr(job, "output_model", "") or "")}
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
           {"name": "MODELCTL_JOB_ID", "value": job.id}]
    if settings.model_store:
        env.append({"name": "MODELCTL_MODEL_STORE", "value": settings.model_store})
    if settings.data_roots:
        env.append({"name": "MODELCTL_DATA_ROOTS", "value": os.pathsep.join(settings.data_roots)})
    env += [{"name": name, "value": value} for name, value in settings.run_bounds]
    # torch's threads per process follow the CPU limit, not the node's cores (throttling).
    threads = max(1, _cpu_millis(settings.effective_cpu_limit, "MODELCTL_K8S_CPU_LIMIT") // 1000 // shape.procs)
    env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    requests = {}
    limits = {"cpu": settings.effective_cpu_limit, "memory": f"{settings.memory_limit_mb}Mi"}
    if settings.cpu_request:
        requests["cpu"] = settings.cpu_request
    if settings.memory_request:
        requests["memory"] = settings.memory_request
    if shape.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(shape.gpus)
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "command": trainer_command(str(job.run_dir), settings, shape, name),
        "workingDir": str(job.run_dir),
        "env": env,
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    volumes = [  # writable: /dev/shm (DataLoader workers, NCCL; counts toward the memory limit), /tmp
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{settings.effective_shm_mb}Mi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if settings.volume_claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": settings.volume_claim}})
        container["volumeMounts"] += [{"name": "shared", "mountPath": m.path, "subPath": m.sub_path,
                                       **({"readOnly": True} if m.read_only else {})} for m in settings.mounts]
    pod = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.grace_s,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if shape.gpus:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "backoffLimit": 0,  # the scheduler decides about another attempt
            "activeDeadlineSeconds": settings.deadline_s,
            "ttlSecondsAfterFinished": settings.ttl_s,
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
        },
    }
    service = None
    if shape.nodes > 1:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        container["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
        body["spec"].update(completionMode="Indexed", completions=shape.nodes, parallelism=shape.nodes)
        pod["subdomain"] = name  # <job>-<index>.<service>: stable DNS names of the pods
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_RUN: name},
                     "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]},
        }
    return body, service


# ---- conditions -> states ------------------------------------------------------------------
PENDING, RUNNING, SUCCEEDED, FAILED, DELETING = "pending", "running", "succeeded", "failed", "deleting"


def job_phase(obj: dict) -> tuple[str, str]:
    """``(phase, reason)`` of a Job object (a dict as the API returns it)."""
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return DELETING, "deleted, waiting for its pods to end"
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conditions:
        return SUCCEEDED, conditions["Complete"].get("reason") or "Complete"
    if "Failed" in conditions:
        c = conditions["Failed"]
        return FAILED, ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or "Failed"
    if "Suspended" in conditions:
        return PENDING, "suspended"
    if status.get("active"):
        return RUNNING, f"{status['active']} pod(s) active"
    return PENDING, "waiting for its pods"


def pod_exit_code(pods: list[dict]) -> int | None:
    """The exit status a failed attempt reports: rank 0's trainer, else any failed trainer;
    None when no trainer container ended with a status (evicted, deleted, never started)."""
    def index(p):
        ann = (p.get("metadata") or {}).get("annotations") or {}
        return int(ann.get("batch.kubernetes.io/job-completion-index", "0") or 0)

    codes = []
    for pod in sorted(pods, key=index):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == CONTAINER and term and term.get("exitCode") is not None:
                codes.append(int(term["exitCode"]))
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else (codes[0] if codes else None)


# ---- the runner ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class K8sRunHandle(RunHandle):
    """A started (or adopted) attempt, its Job ``name``; ``started`` is the Job's creation."""

    #: The attempt's :func:`run_key`, what the job records to adopt it.
    run_key: int
    name: str = ""
    job_id: str = ""
    log_path: str = ""
    service: bool = False
    kill_sent: bool = False
    logs_copied: bool = field(default=False, repr=False)

    @property
    def ref(self) -> int:
        return self.run_key


class KubernetesRunner:
    """Fine-tune attempts as batch/v1 Jobs (see the module's docstring)."""

    name = NAME
    #: Jobs run in the cluster, not in this process: a control service that stops (a
    #: rollout, a rescheduled pod) leaves them running, and the next one adopts them.
    outlives_service = True

    def __init__(self, settings: K8sSettings, api_client=None):
        self.settings = settings
        self._api_client = api_client
        self._batch = self._core = None
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}  # Job name -> object, kept by the watch
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- API access (lazy: building a runner touches no cluster) ---------------------------
    def _apis(self):
        if self._batch is None:
            from kubernetes import client, config as kconfig

            api_client = self._api_client
            if api_client is None:
                if os.environ.get("KUBERNETES_SERVICE_HOST") and not self.settings.kubeconfig:
                    kconfig.load_incluster_config()
                else:
                    kconfig.load_kube_config(config_file=self.settings.kubeconfig or None)
                api_client = client.ApiClient()
            self._api_client = api_client
            self._batch, self._core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        return self._batch, self._core

    @staticmethod
    def _json(response) -> dict:
        return json.loads(response.data)

    def _get_job(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        batch, _ = self._apis()
        try:
            return self._json(batch.read_namespaced_job(name, self.settings.namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _list_jobs(self, selector: str) -> tuple[list[dict], str]:
        batch, _ = self._apis()
        data = self._json(batch.list_namespaced_job(self.settings.namespace, label_selector=selector,
                                                    _preload_content=False))
        return data.get("items") or [], (data.get("metadata") or {}).get("resourceVersion", "")

    def pods(self, name: str) -> list[dict]:
        _, core = self._apis()
        data = self._json(core.list_namespaced_pod(self.settings.namespace, label_selector=f"{LABEL_RUN}={name}",
                                                   _preload_content=False))
        return data.get("items") or []

    # ---- the watch -------------------------------------------------------------------------
    def _ensure_watch(self) -> None:
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch_loop, name="modelctl-k8s-watch", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        while not self._stop.is_set():
            try:
                items, version = self._list_jobs(selector)
                with self._lock:
                    self._cache = {o["metadata"]["name"]: o for o in items}
                self._synced.set()
                batch, _ = self._apis()
                stream = watch.Watch()
                for event in stream.stream(batch.list_namespaced_job, self.settings.namespace,
                                           label_selector=selector, resource_version=version,
                                           timeout_seconds=60, allow_watch_bookmarks=False):
                    if self._stop.is_set():
                        stream.stop()
                        break
                    obj = event.get("raw_object") or {}
                    kind, name = event.get("type"), (obj.get("metadata") or {}).get("name")
                    if kind == "ERROR" or not name:
                        break  # relist
                    with self._lock:
                        if kind == "DELETED":
                            self._cache.pop(name, None)
                        else:
                            self._cache[name] = obj
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: the version expired; relist
                    log.warning("kubernetes runner: watching Jobs failed: %s %s", exc.status, exc.reason)
                    self._stop.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - the watch must outlive a bad connection
                log.warning("kubernetes runner: watching Jobs failed: %s", exc)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()

    def observed(self, name: str) -> dict | None:
        """The Job ``name`` as last seen: from the watch, else read once."""
        with self._lock:
            obj = self._cache.get(name)
        return obj if obj is not None else self._get_job(name)

    # ---- the runner protocol -----------------------------------------------------------------
    def start(self, job) -> K8sRunHandle:
        from kubernetes.client.exceptions import ApiException

        attempt = max(1, int(job.attempts or 1))
        body, service = build_job(job, attempt, self.settings)
        name = body["metadata"]["name"]
        batch, core = self._apis()
        self._ensure_watch()
        Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(body["spec"]["template"]["spec"]["containers"][0]["command"])
        with open(job.log_path, "a", encoding="utf-8") as logf:
            logf.write(rundir.attempt_header(job.id, attempt, f"Kubernetes Job {self.settings.namespace}/{name} "
                                                              f"({self.settings.image}): {command}"))
        try:
            if service is not None:
                try:
                    core.create_namespaced_service(self.settings.namespace, service, _preload_content=False)
                except ApiException as exc:
                    if exc.status != 409:  # left by an earlier try of this attempt: reuse it
                        raise
            try:
                created = self._json(batch.create_namespaced_job(self.settings.namespace, body,
                                                                 _preload_content=False))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                created = self._get_job(name)  # this attempt's Job exists already: follow it
        except ApiException as exc:
            raise FailedPrecondition(f"creating Job {name}: {exc.status} {_api_message(exc)}") from None
        log.info("job %s attempt %d: Kubernetes Job %s/%s", job.id, attempt, self.settings.namespace, name)
        return K8sRunHandle(run_key=run_key(job.id, attempt), started=_created(created), name=name,
                            job_id=job.id, log_path=str(job.log_path), service=service is not None)

    def adopt(self, key: int | None, started: float | None) -> K8sRunHandle | None:
        """The Job of a RUNNING job's attempt (found by its run ``key``, the job's recorded
        ``pid``), also when it has ended."""
        if not key:
            return None
        self._ensure_watch()
        items, _ = self._list_jobs(f"{LABEL_RUN_KEY}={int(key)}")
        if not items:
            return None
        obj = items[0]
        meta = obj["metadata"]
        ann = meta.get("annotations") or {}
        run_dir = ann.get("modelctl.dev/run-dir", "")
        spec = obj["spec"]
        return K8sRunHandle(run_key=int(key), started=_created(obj), name=meta["name"],
                            job_id=ann.get("modelctl.dev/job-id", ""),
                            log_path=str(Path(run_dir) / rundir.LOG_FILE) if run_dir else "",
                            service=int(spec.get("completions") or 1) > 1 or "subdomain" in spec["template"]["spec"])

    def poll(self, handle: K8sRunHandle) -> tuple[bool, int | None]:
        obj = self.observed(handle.name)
        if obj is None:
            return False, None  # gone: deleted (cancel, or by hand) before it ended
        phase, _ = job_phase(obj)
        if phase == SUCCEEDED:
            return False, 0
        if phase == FAILED:
            return False, pod_exit_code(self.pods(handle.name))
        return True, None

    def limit(self, handle: K8sRunHandle) -> str | None:
        """The limit a failed attempt hit: its Job's deadline (``DeadlineExceeded``), or a
        trainer container ``OOMKilled`` at the memory limit; None otherwise (the cluster
        enforces both: nothing to do while it runs)."""
        if handle.limit_hit is not None:
            return handle.limit_hit
        obj = self.observed(handle.name)
        if obj is None or job_phase(obj)[0] != FAILED:
            return None
        conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        if any(c.get("type") == "Failed" and c.get("reason") == "DeadlineExceeded" for c in conditions):
            handle.limit_hit = (f"deadline: the Job ran longer than its activeDeadlineSeconds "
                                f"({self.settings.deadline_s} s, MODELCTL_JOB_DEADLINE_S) and was stopped")
        elif any((((cs.get("state") or {}).get("terminated") or {}).get("reason") == "OOMKilled")
                 for pod in self.pods(handle.name)
                 for cs in (pod.get("status") or {}).get("containerStatuses") or [] if cs.get("name") == CONTAINER):
            handle.limit_hit = (f"memory limit: a trainer container was OOMKilled at its memory limit "
                                f"({self.settings.memory_limit_mb} MB, MODELCTL_JOB_MEMORY_LIMIT_MB)")
        return handle.limit_hit

    def phase(self, handle: K8sRunHandle) -> tuple[str, str]:
        obj = self.observed(handle.name)
        return ("deleted", "the Job is gone") if obj is None else job_phase(obj)

    def signal(self, handle: K8sRunHandle, sig: int) -> None:
        """SIGTERM: delete the Job, foreground (pods get SIGTERM and their grace period);
        SIGKILL: delete again with no grace period."""
        kill = sig == signals.SIGKILL
        if kill and handle.kill_sent:
            return
        self._delete(handle, grace_s=0 if kill else None)
        handle.term_sent = True
        handle.kill_sent = handle.kill_sent or kill

    def reap(self, handle: K8sRunHandle) -> None:
        """The attempt has ended: its pods' logs into train.log, then the Job and Service go."""
        if not handle.logs_copied:
            handle.logs_copied = True
            self._copy_logs(handle)
        self._delete(handle, grace_s=None, propagation="Background")

    # ---- helpers ------------------------------------------------------------------------------
    def _delete(self, handle: K8sRunHandle, *, grace_s: int | None, propagation: str = "Foreground") -> None:
        from kubernetes.client.exceptions import ApiException

        batch, core = self._apis()
        options = {"propagationPolicy": propagation, "apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_s is not None:
            options["gracePeriodSeconds"] = grace_s
        # Raw replies: the generated models cannot read every server's (v1.20 answers a
        # Service's deletion with a Status).
        calls = [lambda: batch.delete_namespaced_job(handle.name, self.settings.namespace, body=options,
                                                     _preload_content=False)]
        if handle.service:
            calls.append(lambda: core.delete_namespaced_service(handle.name, self.settings.namespace,
                                                                _preload_content=False))
        for call in calls:
            try:
                call()
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("kubernetes runner: deleting %s: %s %s", handle.name, exc.status,
                                _api_message(exc))

    def _copy_logs(self, handle: K8sRunHandle) -> None:
        if not handle.log_path:
            return
        from kubernetes.client.exceptions import ApiException

        _, core = self._apis()
        lines = []
        try:
            pods = self.pods(handle.name)
        except ApiException as exc:
            pods = []
            lines.append(f"---- pods of Job {handle.name}: {exc.status} {_api_message(exc)}\n")
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            try:
                text = core.read_namespaced_pod_log(pod_name, self.settings.namespace, container=CONTAINER,
                                                    tail_lines=_LOG_TAIL_LINES, _preload_content=False).data
                text = text.decode("utf-8", "replace")
                lines.append(f"---- pod {pod_name}\n{text}{'' if text.endswith(chr(10)) or not text else chr(10)}")
            except ApiException as exc:
                lines.append(f"---- pod {pod_name}: no log ({exc.status} {_api_message(exc)})\n")
        if lines:
            try:
                with open(handle.log_path, "a", encoding="utf-8") as logf:
                    logf.writelines(lines)
            except OSError as exc:
                log.warning("kubernetes runner: writing %s: %s", handle.log_path, exc)


def _created(obj: dict | None) -> float:
    stamp = ((obj or {}).get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return time.time()
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _api_message(exc) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def kubernetes_runner(config) -> KubernetesRunner:
    """The registry's factory: settings from ``MODELCTL_K8S_*`` and the control config."""
    return KubernetesRunner(K8sSettings.from_env(config))
