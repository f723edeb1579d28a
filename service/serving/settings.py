"""Settings of ``modelctl serve``: one frozen dataclass, read from ``MODELCTL_*`` variables.

Every field ``f`` can be set by the environment variable ``MODELCTL_<F upper>`` (for
example ``MODELCTL_MODEL_STORE``, ``MODELCTL_INFERENCE_PORT``); keyword overrides given to
:meth:`ServeSettings.from_env` (CLI flags; ``None`` means "not given") win over the
environment, which wins over the defaults below.

Ports:

* ``inference_port`` (8080): the public REST inference endpoint (``host``): nginx
  (``service.serving.torchserve.proxy``), which checks the operator's API token and forwards to
  TorchServe's REST inference API on ``ts_inference_port``.
* ``ts_inference_port`` (8084): TorchServe's own REST inference API, 127.0.0.1 only,
  behind the proxy.
* ``management_port`` (8081): TorchServe's REST management API, always on 127.0.0.1.
* ``metrics_port`` (8082): TorchServe's Prometheus metrics, public (``host``) so a
  scraper can reach it.
* ``grpc_inference_port`` (7070): the public gRPC inference endpoint, i.e. our gateway
  (``service.serving.torchserve.gateway``), which speaks TorchServe's own inference proto.
* ``grpc_management_port`` (7071): TorchServe's gRPC management API, 127.0.0.1 only.
* ``ts_grpc_inference_port`` (7072): TorchServe's own gRPC inference API, 127.0.0.1
  only, behind the gateway.
* ``exporter_port`` (8083): modelctl's own Prometheus endpoint (histograms, GPUs,
  queue depth), bound to ``host``.
* ``worker_port_base`` (9000): TorchServe's ``initial_worker_port``; workers listen on
  unix sockets ``/tmp/.ts.sock.<port>`` numbered from it, so two TorchServes on one
  machine need different bases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.environ import EnvSettings
from service.errors import InvalidArgument


def _default_state_dir() -> Path:
    return Path.cwd() / ".modelctl"


def _default_model_store() -> Path:
    return Path.cwd() / "model_store"


MiB = 1024 * 1024
#: The TorchServe engine's byte budget (``ServeSettings.frontend_bytes_budget``): heap kept
#: for the frontend itself (at least this, or a quarter of the heap) ...
FRONTEND_RESERVE_MIN_MB = 64
#: ... and heap bytes per body byte in flight. Measured (TorchServe 0.12, JDK 17, G1, 512
#: MiB heap): 10 queued bodies of 11.7 MiB held 121-122 MiB of live heap over REST and over
#: gRPC alike (1.04 copies each), and before a collection the heap held 186 MiB (REST) and
#: 210 MiB (gRPC) for them: the copies made while a body is received and parsed. With the
#: whole default budget queued (192 MiB in 138 bodies of every size class, both endpoints,
#: tests/test_byte_budget.py) the live heap went from 45 to 260 MiB (1.12 per body byte)
#: and the heap held 448 MiB of its 512 before a collection. Large bodies are also G1
#: humongous objects (contiguous regions, never moved), so the free heap fragments. Two
#: copies cover it.
FRONTEND_BODY_COPIES = 2

#: The serving engines (``engine``): TorchServe (Java frontend, nginx, gRPC gateway) or the
#: native engine (one Python process, service/serving/native).
ENGINES = ("torchserve", "native")


@dataclass(frozen=True)
class ServeSettings(EnvSettings):
    settings_kind = "serve"  # service/environ.py: from_env, env_var

    #: Which engine serves the archives (:data:`ENGINES`).
    engine: str = "torchserve"
    #: Root of the model store: ``<model_store>/<name>/<version>.mar``.
    model_store: Path = field(default_factory=_default_model_store)
    #: Runtime state: generated config, TorchServe's log, key file, logs/, tmp/.
    state_dir: Path = field(default_factory=_default_state_dir)
    #: Address the public endpoints (REST inference, metrics, gRPC gateway) bind to.
    host: str = "127.0.0.1"
    inference_port: int = 8080
    #: TorchServe's own REST inference API: loopback only, behind the nginx proxy.
    ts_inference_port: int = 8084
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    ts_grpc_inference_port: int = 7072
    #: Prometheus endpoint of modelctl: latency histograms, GPUs, queues (and jobs).
    exporter_port: int = 8083
    worker_port_base: int = 9000
    workers_per_model: int = 1
    #: How long ``Serving.start`` waits for every worker to be READY.
    startup_timeout_s: float = 120.0
    #: Seconds between two looks at the model store's desired state (service/deploy/converge.py).
    sync_interval_s: float = 2.0
    #: Seconds between two liveness looks of ``run_forever`` at TorchServe, nginx and the
    #: gateway (whether each process or thread still runs: no request is made); one that died
    #: is restarted with backoff (service/serving/torchserve/liveness.py). Worker pids are
    #: read from the management API every 2 s at most, to log a worker's death.
    liveness_interval_s: float = 1.0
    #: More restarts than this of one component (TorchServe, nginx or the gateway) within
    #: ``restart_window_s`` seconds, and ``modelctl serve`` gives up: it stops everything and
    #: exits non-zero, to be restarted whole (Kubernetes restarts the container). 0: never
    #: restart, exit at the first death.
    restart_limit: int = 5
    restart_window_s: float = 600.0
    #: Largest request and response accepted over REST (nginx answers 413 above it) and
    #: gRPC (the gateway and TorchServe).
    max_request_size_bytes: int = 16 * 1024 * 1024
    #: TorchServe's per-request timeout in a worker before it is restarted.
    response_timeout_s: int = 120
    #: Lifetime of TorchServe's inference and management keys (key_file.json), minutes.
    #: TorchServe's own default is 60; after that every call with the old key fails until
    #: the key is renewed with the API key (``TorchServeProcess.renew_token``). Clients never
    #: see these keys: they send the operator's API token (service/auth.py), and the proxy
    #: and the gateway put TorchServe's current key on what they forward.
    token_expiration_min: int = 60
    #: TorchServe's ``job_queue_size``: requests one model version may have waiting. TorchServe
    #: 0.12 answers a full queue exactly as a model without workers (REST 503, gRPC INTERNAL,
    #: both "has no worker to serve inference request"), so the queue is guarded in front of
    #: it: the REST proxy and the gRPC gateway each let at most :attr:`admit_per_model` of
    #: a model's requests through at once (half of this), and answer one more with
    #: 429 / RESOURCE_EXHAUSTED and a retry-after. Together they can never fill TorchServe's
    #: queue, so its 503 / "has no worker" keeps meaning just that (503 / UNAVAILABLE).
    job_queue_size: int = 100
    #: Seconds a refused client is told to wait (``Retry-After``; gRPC ``retry-after`` and
    #: ``grpc-retry-pushback-ms`` trailing metadata).
    retry_after_s: int = 1
    #: The Java frontend's heap in MiB, fixed (``-Xms`` = ``-Xmx``) and touched at start
    #: (``-XX:+AlwaysPreTouch``). Left to itself the JVM starts at 1/64 of the machine's
    #: memory and grows its heap towards 1/4 of it under load (of the container's limit in
    #: Kubernetes), so the frontend's resident memory climbs in steps for minutes and its
    #: ceiling depends on the node. Fixed and pre-touched, its heap is resident from the
    #: start, and a rise in resident memory means a leak. Out of heap, the JVM exits
    #: (``-XX:+ExitOnOutOfMemoryError``) rather than run on with dead threads, and
    #: ``modelctl serve`` restarts it (``restart_limit``). Request bodies waiting in
    #: TorchServe's queues live in this heap: up to ``job_queue_size`` of them per model,
    #: each up to ``max_request_size_bytes``.
    frontend_heap_mb: int = 512
    #: More JVM options for the frontend, separated by blanks (TorchServe splits ``vmargs``
    #: on blanks, so one option cannot contain one), for example
    #: ``-XX:NativeMemoryTracking=summary`` or GC logging.
    frontend_jvm_options: str = ""
    #: Request bodies in flight at once on this replica (queued or running, REST and gRPC
    #: together), in bytes; one more gets 429 / RESOURCE_EXHAUSTED with a retry-after.
    #: 0 derives it from the engine: :attr:`inflight_bytes_budget`.
    max_inflight_bytes: int = 0
    #: Native engine: how long, at most, a batch waits for more requests after its first one,
    #: in ms; the archive's own ``max_batch_delay_ms`` when larger. The wait is adaptive: only
    #: while the batch holds fewer requests than are in flight, or than the last batch held,
    #: so nothing waits at concurrency 1 and a larger cap costs nothing there (README).
    batch_wait_cap_ms: float = 10.0
    #: gRPC streams the public gRPC port holds open at once (the gateway, or the native
    #: engine's server), per kind: health Watch and reflection (no token), and the token's
    #: (StreamPredictions...); one more is RESOURCE_EXHAUSTED with a retry-after
    #: (service/grpc_streams.py). The control API reads the same variable.
    max_open_streams: int = 100

    def __post_init__(self):
        # Normalise paths (str given by a caller) and check ranges once, here.
        for name in ("model_store", "state_dir"):
            value = getattr(self, name)
            if not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
            object.__setattr__(self, name, getattr(self, name).expanduser().absolute())
        for name in _PORT_FIELDS:
            port = getattr(self, name)
            if not (0 < port < 65536):
                raise InvalidArgument(f"{name} must be a TCP port (1-65535), got {port}")
        # worker_port_base only numbers unix sockets, so it may equal a TCP port.
        tcp = [n for n in _PORT_FIELDS if n != "worker_port_base"]
        ports = [getattr(self, n) for n in tcp]
        if len(set(ports)) != len(ports):
            raise InvalidArgument(
                "ports must differ: " + ", ".join(f"{n}={getattr(self, n)}" for n in tcp)
            )
        for name in ("workers_per_model", "max_request_size_bytes",
                     "response_timeout_s", "token_expiration_min", "retry_after_s", "max_open_streams"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frontend_heap_mb < 64:  # TorchServe's frontend alone needs about 60 MiB live
            raise InvalidArgument(f"frontend_heap_mb must be >= 64, got {self.frontend_heap_mb}")
        for option in self.frontend_jvm_options.split():
            if not option.startswith("-"):
                raise InvalidArgument(f"frontend_jvm_options holds {option!r}, which is not a JVM "
                                      "option (each starts with '-'; blanks separate them)")
            if option.startswith(("-Xms", "-Xmx", "-XX:InitialHeapSize", "-XX:MaxHeapSize")):
                raise InvalidArgument(f"frontend_jvm_options holds {option!r}: set the heap "
                                      "with frontend_heap_mb")
        if self.engine not in ENGINES:
            raise InvalidArgument(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.batch_wait_cap_ms <= 1000:
            raise InvalidArgument(f"batch_wait_cap_ms must be between 0 and 1000, got {self.batch_wait_cap_ms}")
        if self.max_inflight_bytes < 0:
            raise InvalidArgument(f"max_inflight_bytes must be >= 0 (0: derived), got {self.max_inflight_bytes}")
        if self.max_inflight_bytes and self.max_inflight_bytes < self.max_request_size_bytes:
            raise InvalidArgument(f"max_inflight_bytes must be 0 or at least max_request_size_bytes "
                                  f"({self.max_request_size_bytes}), got {self.max_inflight_bytes}")
        if self.engine == "torchserve" and self.inflight_bytes_budget < 2 * self.max_request_size_bytes:
            # nginx and the gateway each take half: each must let one whole request through.
            need = 2 * self.max_request_size_bytes
            if self.max_inflight_bytes:
                raise InvalidArgument(
                    f"max_inflight_bytes must be 0 or at least {need} for the TorchServe engine (two "
                    f"requests of max_request_size_bytes: nginx and the gateway each take half of "
                    f"it), got {self.max_inflight_bytes}")
            raise InvalidArgument(
                f"frontend_heap_mb is too small: {self.frontend_heap_mb} MiB leaves a byte budget of "
                f"{self.frontend_bytes_budget} bytes ((heap - reserve) / {FRONTEND_BODY_COPIES}), less "
                f"than two requests of max_request_size_bytes ({need}): raise frontend_heap_mb, "
                "lower max_request_size_bytes or set max_inflight_bytes")
        if self.job_queue_size < 2:  # one request per public endpoint at least
            raise InvalidArgument(f"job_queue_size must be >= 2, got {self.job_queue_size}")
        if self.restart_limit < 0:
            raise InvalidArgument(f"restart_limit must be >= 0, got {self.restart_limit}")
        for name in ("startup_timeout_s", "sync_interval_s", "liveness_interval_s", "restart_window_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def admit_per_model(self) -> int:
        """Requests of one model that the REST proxy, and separately the gRPC gateway, let
        through to TorchServe at once (waiting in its queue or running): half of
        ``job_queue_size``, so both endpoints together never overflow a version's queue."""
        return self.job_queue_size // 2

    @property
    def inflight_bytes_budget(self) -> int:
        """Request bytes this replica holds in flight at once (queued or running, REST and
        gRPC together): ``max_inflight_bytes``, or, when 0, its engine's derivation
        (:attr:`frontend_bytes_budget`, :attr:`native_bytes_budget`)."""
        if self.max_inflight_bytes:
            return self.max_inflight_bytes
        return self.frontend_bytes_budget if self.engine == "torchserve" else self.native_bytes_budget

    @property
    def native_bytes_budget(self) -> int:
        """The native engine's derived budget: a quarter of ``job_queue_size`` full-size
        requests (100 x 16 MiB / 4 = 400 MiB on the defaults); never less than one."""
        return max(self.max_request_size_bytes, self.job_queue_size * self.max_request_size_bytes // 4)

    @property
    def frontend_reserve_bytes(self) -> int:
        """The part of TorchServe's Java heap kept for the frontend itself, never for request
        bodies: a quarter of ``frontend_heap_mb``, at least 64 MiB (its live heap at rest was
        27 MiB with one model and 55-60 MiB with several; G1 needs free regions on top)."""
        return max(FRONTEND_RESERVE_MIN_MB, self.frontend_heap_mb // 4) * MiB

    @property
    def frontend_bytes_budget(self) -> int:
        """The TorchServe engine's derived budget: what the frontend's heap holds beyond its
        reserve, divided by :data:`FRONTEND_BODY_COPIES` (a queued body is one live copy in the
        heap, and the copies made while it is received or handed to a worker are garbage
        of the same size until the next collection). (512 - 128) MiB / 2 = 192 MiB on the
        defaults; nginx and the gateway each take half (service/serving/torchserve/budget.py)."""
        return max(0, self.frontend_heap_mb * MiB - self.frontend_reserve_bytes) // FRONTEND_BODY_COPIES

    @property
    def archive_dir(self) -> Path:
        """TorchServe's own ``model_store``: one symlink per registered archive.

        TorchServe copies an archive registered by ``file://`` URL into its model store
        under the URL's base name (``<version>.mar``), so two models with the same version
        collide (HTTP 500 "Model file already exists") and the copies would litter the real
        store. Registering ``<name>-v<version>.mar``, a symlink in this directory, by plain
        file name avoids both.
        """
        return self.state_dir / "archives"


_PORT_FIELDS = ("inference_port", "ts_inference_port", "management_port", "metrics_port", "grpc_inference_port",
                "grpc_management_port", "ts_grpc_inference_port", "exporter_port",
                "worker_port_base")
