"""Settings of the control service: one frozen dataclass, read from ``MODELCTL_*`` variables.

Every field ``f`` can be set by ``MODELCTL_<F upper>`` (the port by ``MODELCTL_CONTROL_PORT``,
the data roots by ``MODELCTL_DATA_ROOTS``, ``os.pathsep``-separated); keyword overrides given
to :meth:`ControlConfig.from_env` (CLI flags; ``None`` = not given) win over the environment,
which wins over the defaults. Paths left unset derive from the serving settings: the job
database is ``<state_dir>/control.db`` and job run directories ``<state_dir>/runs/<job id>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from service import bounds
from service.deploy.speed import SPEED_CHECK_DEVICES
from service.environ import EnvSettings
from service.errors import InvalidArgument
from service.grpc_streams import DEFAULT_MAX_OPEN_STREAMS

#: The control API's port unless configured.
DEFAULT_PORT = 50051

#: The least memory limit of a job, MB: a small trainer holds about 450 MB once torch is imported.
MIN_JOB_MEMORY_LIMIT_MB = 512

#: Values of ``deploy_target``.
DEPLOY_TARGETS = ("torchserve", "store")
#: The most rounds of a speed check (its devices: service/deploy/speed.py's SPEED_CHECK_DEVICES).
MAX_SPEED_CHECK_ROUNDS = 100
#: Environment variable of each field whose name is not simply ``MODELCTL_<FIELD>``.
_ENV_NAMES = {"port": "MODELCTL_CONTROL_PORT", "host": "MODELCTL_CONTROL_HOST",
              "db_path": "MODELCTL_CONTROL_DB", "tls_cert": "MODELCTL_CONTROL_TLS_CERT",
              "tls_key": "MODELCTL_CONTROL_TLS_KEY"}


@dataclass(frozen=True)
class ControlConfig(EnvSettings):
    settings_kind = "control"  # service/environ.py: from_env, env_var
    env_names = _ENV_NAMES

    #: Address the control API binds to.
    host: str = "127.0.0.1"
    #: Its port; 0 picks a free one (tests).
    port: int = DEFAULT_PORT
    #: SQLite job database.
    db_path: Path | None = None
    #: One run directory per job under it.
    runs_dir: Path | None = None
    #: The model store the trainer writes to and deployments read from.
    model_store: Path | None = None
    #: Where datasets named by a run spec may be read from (the trainer's policy).
    data_roots: tuple[Path, ...] = ()
    #: Jobs that run at once; the others wait in QUEUED.
    max_concurrent_jobs: int = 1
    #: Seconds between SIGTERM and SIGKILL when a running job is cancelled.
    cancel_grace_s: float = 20.0
    #: Attempts of a job before an interrupted run is given up as FAILED.
    max_attempts: int = 3
    #: Seconds a deployment waits for its workers to be READY.
    deploy_timeout_s: float = 120.0
    #: Workers per deployed version unless the request says otherwise; 0 = the serving
    #: settings' ``workers_per_model``.
    deploy_workers: int = 0
    #: The most workers a deployment may ask for (DeployModel, RollbackModel, a job's
    #: deploy_workers; INVALID_ARGUMENT beyond, before anything is registered). 0 = one per
    #: GPU a replica sees where it sees any, else one per core, and never less than the
    #: default workers (service/bounds.py).
    max_deploy_workers: int = 0
    # The operator's bounds on run specs (service/bounds.py): each may lower this service's
    # ceiling, which is also its default, never raise it. They reach the trainers too.
    #: Epochs of a run.
    max_epochs: int = bounds.MAX_EPOCHS
    #: Examples per process and step.
    max_batch_size: int = bounds.MAX_BATCH_SIZE
    #: Training processes of a run.
    max_nproc: int = bounds.MAX_NPROC
    #: DataLoader worker processes per training process.
    max_dataloader_workers: int = bounds.MAX_DATALOADER_WORKERS
    #: Examples of a dataset (and train_size, val_size).
    max_examples: int = bounds.MAX_EXAMPLES
    #: Elements of a .npz dataset's arrays, all together, read from their headers.
    max_dataset_elements: int = bounds.MAX_DATASET_ELEMENTS
    #: Memory of one attempt of a fine-tune job, its processes together, in MB. Local runner:
    #: a memory cgroup where the service can make one, else a watch of the processes'
    #: resident memory (service/control/runners/containment.py); Kubernetes: the trainer container's
    #: memory limit. Past it the job is FAILED "memory limit: …", its checkpoint kept.
    #: Measured: a ResNet-18 run (64 px, batch 64, 2 DataLoader workers) peaked at 1.1 GB in
    #: a cgroup, 2.2 GB as the watch counts; a small CNN at 0.43 GB.
    job_memory_limit_mb: int = 8192
    #: Wall-clock seconds one attempt may run (Kubernetes: the Job's activeDeadlineSeconds).
    #: Past it the trainer is stopped (SIGTERM, SIGKILL after cancel_grace_s) and the job is
    #: FAILED "deadline: …", its checkpoint kept. No spec field overrides either bound.
    job_deadline_s: int = 86400
    #: How often the scheduler looks at running jobs, and watchers at event files.
    poll_s: float = 0.2
    #: What a deployment changes: "torchserve" registers the version in the TorchServe beside
    #: this service, waits for READY workers, switches the default, then records the desired
    #: state in the model store; "store" only records it, for serving replicas elsewhere
    #: (Kubernetes) that converge on it (service/deploy/converge.py).
    deploy_target: str = "torchserve"
    #: Runner of jobs that do not name one.
    default_runner: str = "local"
    # deploy-if-faster's speed check (service/deploy/speed.py): a subprocess that measures
    # the new version against the serving one, side by side.
    #: Wall-clock seconds the check may take, loading and warm-up included; past it the
    #: process is killed and the version is not deployed (NOT_FASTER, "timed out").
    speed_check_timeout_s: float = 300.0
    #: Rounds of the check (each: both versions, 10 requests of 1 input and 3 of 8 apiece),
    #: from 1 to MAX_SPEED_CHECK_ROUNDS.
    speed_check_rounds: int = 5
    #: Noise margin of "faster": a p50 below the serving version's * (1 - margin) and a
    #: throughput above its * (1 + margin); from 0 to below 1.
    speed_check_margin: float = 0.05
    #: Where it measures: "auto" (cuda:0 where the control service's host has a GPU, as a
    #: serving worker there gets one; else the CPU), "cpu" or "cuda".
    speed_check_device: str = "auto"
    #: Threads of the gRPC server for unary calls. Streams run on threads of their own
    #: (service/grpc_streams.py), so no stream, open or idle, takes one of these.
    max_workers: int = 32
    #: Streams the control API holds open at once, per kind: the open services' (health
    #: Watch, reflection: no token) and the token's (WatchFineTuneJob); one more is
    #: RESOURCE_EXHAUSTED with a retry-after. ``MODELCTL_MAX_OPEN_STREAMS``.
    max_open_streams: int = DEFAULT_MAX_OPEN_STREAMS
    #: PEM certificate (chain) and private key: the control API speaks TLS only. Both or
    #: neither. (Clients name the CA with MODELCTL_CONTROL_TLS_CA.)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both MODELCTL_CONTROL_TLS_CERT and "
                                  "MODELCTL_CONTROL_TLS_KEY (a certificate and its key)")
        for name in ("db_path", "runs_dir", "model_store", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().absolute())
        object.__setattr__(self, "data_roots",
                           tuple(Path(r).expanduser().absolute() for r in self.data_roots))
        if not 0 <= self.port < 65536:
            raise InvalidArgument(f"port must be a TCP port (0-65535), got {self.port}")
        for name in ("max_concurrent_jobs", "max_attempts", "max_workers", "max_open_streams"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.job_memory_limit_mb < MIN_JOB_MEMORY_LIMIT_MB:
            raise InvalidArgument(f"{self.env_var('job_memory_limit_mb')} must be >= {MIN_JOB_MEMORY_LIMIT_MB} "
                                  f"(a small trainer holds about 450 MB once torch is imported), got {self.job_memory_limit_mb}")
        if self.job_deadline_s < 1:
            raise InvalidArgument(f"{self.env_var('job_deadline_s')} must be >= 1 (seconds), got {self.job_deadline_s}")
        for name in ("cancel_grace_s", "deploy_timeout_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")
        if self.deploy_workers < 0:
            raise InvalidArgument(f"deploy_workers must be >= 0, got {self.deploy_workers}")
        if self.max_deploy_workers < 0:
            raise InvalidArgument(f"{self.env_var('max_deploy_workers')} must be >= 0 (0: automatic), "
                                  f"got {self.max_deploy_workers}")
        if self.max_deploy_workers and self.deploy_workers > self.max_deploy_workers:
            raise InvalidArgument(f"{self.env_var('deploy_workers')} ({self.deploy_workers}) is above "
                                  f"{self.env_var('max_deploy_workers')} ({self.max_deploy_workers})")
        for name in bounds.RUN_BOUNDS:
            bounds.check_run_bound(name, getattr(self, name))
        if self.speed_check_timeout_s <= 0:
            raise InvalidArgument(f"{self.env_var('speed_check_timeout_s')} must be > 0 (seconds), "
                                  f"got {self.speed_check_timeout_s}")
        if not 1 <= self.speed_check_rounds <= MAX_SPEED_CHECK_ROUNDS:
            raise InvalidArgument(f"{self.env_var('speed_check_rounds')} must be from 1 to {MAX_SPEED_CHECK_ROUNDS}, "
                                  f"got {self.speed_check_rounds}")
        if not 0 <= self.speed_check_margin < 1:
            raise InvalidArgument(f"{self.env_var('speed_check_margin')} must be >= 0 and < 1, "
                                  f"got {self.speed_check_margin}")
        if self.speed_check_device not in SPEED_CHECK_DEVICES:
            raise InvalidArgument(f"{self.env_var('speed_check_device')} must be one of "
                                  f"{', '.join(SPEED_CHECK_DEVICES)}, got {self.speed_check_device!r}")
        if self.deploy_target not in DEPLOY_TARGETS:
            raise InvalidArgument(f"deploy_target must be one of {', '.join(DEPLOY_TARGETS)}, "
                                  f"got {self.deploy_target!r}")

    @property
    def target(self) -> str:
        """``host:port`` a client dials."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    def resolved(self, serve_settings) -> "ControlConfig":
        """Unset paths filled in from the serving settings (state dir, model store)."""
        state = Path(serve_settings.state_dir)
        return dataclasses.replace(
            self,
            db_path=self.db_path or state / "control.db",
            runs_dir=self.runs_dir or state / "runs",
            model_store=self.model_store or Path(serve_settings.model_store),
            data_roots=self.data_roots or (Path.cwd(),),
        )

    def run_bounds(self) -> dict[str, int]:
        """The run-spec bounds as :class:`service.training.run_spec.Policy` fields."""
        return {policy: getattr(self, name) for name, (policy, _, _) in bounds.RUN_BOUNDS.items()}

    def deploy_workers_limit(self, default_workers: int) -> int:
        """The most workers a deployment may have: ``max_deploy_workers``, or when it is 0,
        one per GPU (else per core) and at least ``default_workers``."""
        if self.max_deploy_workers:
            if default_workers > self.max_deploy_workers:
                raise InvalidArgument(f"the default workers of a deployment ({default_workers}, MODELCTL_DEPLOY_WORKERS "
                                      f"or MODELCTL_WORKERS_PER_MODEL) is above {self.env_var('max_deploy_workers')} "
                                      f"({self.max_deploy_workers})")
            return self.max_deploy_workers
        return max(bounds.default_max_deploy_workers(), default_workers)
