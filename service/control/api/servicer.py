"""The control API's gRPC server: a thin servicer on the service's one gRPC server assembly.

Two steps, so tests bind port 0 and call through a real channel::

    server, port = create_server(config, plane, token=api_token)   # plane: a ControlPlane
    server.start()
    ...
    stop_server(server)

:class:`ControlService` runs both steps with the plane's own start and stop.

The servicer only translates messages (:mod:`service.control.api.messages`) to and from
:class:`~service.control.jobs.plane.ControlPlane` calls. The server, its interceptors, health
and reflection are :mod:`service.grpc_server`'s: every exception leaving the servicer is turned
into a status in one place, its ``ErrorInterceptor``, through
:func:`service.errors.grpc_status`: a named error keeps its message; anything else is
INTERNAL with a generic message (and its traceback in the log).

Every call of ``modelctl.v1.ModelControl`` needs the operator's API token in its metadata
(``authorization: Bearer <token>``, :mod:`service.auth`); ``AuthInterceptor`` checks it
first: a missing or wrong token is UNAUTHENTICATED with
:class:`~service.errors.Unauthenticated`'s message. Health and reflection stay open for probes.

Streams cannot starve unary calls (:mod:`service.grpc_streams`): unary calls run on the
server's pool of ``config.max_workers`` threads, streams on a pool of their own. Health
``Watch`` is served with grpc's non-blocking streaming and holds no thread; reflection and
``WatchFineTuneJob`` hold one of the streams' pool while open. Open streams are counted per
kind (the open services', the token's) and bounded by ``config.max_open_streams``
(``MODELCTL_MAX_OPEN_STREAMS``): one more is RESOURCE_EXHAUSTED with a retry-after.
(Measured against moving to grpc.aio, whose streams hold no thread: with the servicer
blocking on SQLite and deployments, grpc.aio would run every unary call in a thread pool
anyway, one hop more, and unary calls were slower, p50 1.1 ms against 0.75 ms; the bounded
streams' threads cost about 15 MB at most.)
With ``config.tls_cert`` and ``config.tls_key`` (``MODELCTL_CONTROL_TLS_CERT`` /
``MODELCTL_CONTROL_TLS_KEY``) the port speaks TLS only.
"""

from __future__ import annotations

import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2

from service import grpc_server, signals
from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.auth import ApiToken
from service.control.api import messages
from service.errors import FailedPrecondition

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelControl"].full_name  # "modelctl.v1.ModelControl"
#: Services answered without a token: probes and tools need them.
OPEN_SERVICES = grpc_server.OPEN_SERVICES


# ---- the servicer -------------------------------------------------------------------------------
class ModelControlServicer(pb_grpc.ModelControlServicer):
    """``modelctl.v1.ModelControl`` over a ControlPlane: translation only."""

    def __init__(self, plane):
        self.plane = plane

    def CreateFineTuneJob(self, request, context):
        job = self.plane.create_job(messages.spec_of(request),
                                    deploy_policy=messages.policy_of(request.deploy_policy),
                                    deploy_workers=request.deploy_workers, runner=request.runner,
                                    deploy_tolerance=messages.tolerance_of(request))
        return messages.job_message(job)

    def GetFineTuneJob(self, request, context):
        return messages.job_message(self.plane.get_job(request.job_id))

    def ListFineTuneJobs(self, request, context):
        jobs, token = self.plane.list_jobs(states=messages.states_of(request.states),
                                           output_model=request.output_model,
                                           page_size=request.page_size, page_token=request.page_token)
        return pb.ListFineTuneJobsResponse(jobs=[messages.job_message(j) for j in jobs], next_page_token=token)

    def CancelFineTuneJob(self, request, context):
        return messages.job_message(self.plane.cancel_job(request.job_id))

    def WatchFineTuneJob(self, request, context):
        for update in self.plane.watch_job(request.job_id, skip_history=request.skip_history,
                                           active=context.is_active):
            yield messages.update_message(update)

    def ListModels(self, request, context):
        views, available = self.plane.list_models(request.name)
        return pb.ListModelsResponse(versions=[messages.model_version_message(v) for v in views],
                                     serving_available=available)

    def DeployModel(self, request, context):
        return messages.deployment_message(self.plane.deploy(request.name, request.version,
                                                             workers=request.workers,
                                                             timeout_s=request.timeout_s))

    def RollbackModel(self, request, context):
        return messages.deployment_message(self.plane.rollback(request.name, request.version,
                                                               workers=request.workers))


# ---- the server -----------------------------------------------------------------------------------
def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS credentials from ``config.tls_cert`` / ``config.tls_key``; None without them."""
    if config.tls_cert is None:
        return None
    try:
        cert, key = config.tls_cert.read_bytes(), config.tls_key.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"control API TLS: cannot read {exc.filename}: "
                                 f"{exc.strerror or exc}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def create_server(config, deps, *, token: ApiToken) -> tuple[grpc.Server, int]:
    """A gRPC server for ``deps`` (a ControlPlane) bound to ``config.host:config.port``
    (port 0: a free one), not started. Returns it with its port. Every ModelControl call
    needs ``token``; TLS when the config names a certificate and key."""
    if not isinstance(token, ApiToken):
        raise TypeError("the control API needs the operator's ApiToken")
    credentials = server_credentials(config)
    spec = grpc_server.ServerSpec("control API", (SERVICE_NAME,), token, config.max_open_streams)
    server, streams, pool = grpc_server.sync_server(spec, max_workers=config.max_workers,
                                                    thread_name_prefix="modelctl-grpc")
    pb_grpc.add_ModelControlServicer_to_server(ModelControlServicer(deps), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    grpc_server.serve_health_and_reflection(server, spec, health_servicer)
    port = grpc_server.bind(server, spec, config.host, config.port, credentials)
    server._modelctl_health = health_servicer  # for stop_server
    server._modelctl_streams = (streams, pool)  # the open streams (tests), the pool to stop
    return server, port


def stop_server(server: grpc.Server, grace_s: float = 2.0) -> None:
    """Health NOT_SERVING, then stop (running calls get ``grace_s`` to end).

    Health's ``set`` sends the new status to every open ``Watch`` from the calling thread
    (grpc's non-blocking streaming) and waits until each is sent, which a client that does
    not read can hold up: it runs in a thread of its own, given at most ``grace_s``."""
    health_servicer = getattr(server, "_modelctl_health", None)
    if health_servicer is not None:
        notify = threading.Thread(target=_enter_graceful_shutdown, args=(health_servicer,),
                                  name="modelctl-health-shutdown", daemon=True)
        notify.start()
        notify.join(grace_s)
    server.stop(grace_s).wait()
    _, pool = getattr(server, "_modelctl_streams", (None, None))
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _enter_graceful_shutdown(health_servicer) -> None:
    try:
        health_servicer.enter_graceful_shutdown()
    except Exception:  # noqa: BLE001 - a watcher's failure must not stop the shutdown
        log.warning("health: telling the watchers NOT_SERVING failed", exc_info=True)


class ControlService:
    """The control API running: its plane (scheduler) and its gRPC server."""

    def __init__(self, config, plane, *, token: ApiToken):
        self.config = config
        self.plane = plane
        self.token = token
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self._stop = threading.Event()

    @property
    def target(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        return f"{host}:{self.port}"

    def bind(self) -> int:
        """Create the server and bind its port (fails early if the port is taken)."""
        if self.server is None:
            self.server, self.port = create_server(self.config, self.plane, token=self.token)
        return self.port

    def start(self) -> "ControlService":
        self.bind()
        try:
            self.plane.start()
            self.server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, stop_jobs: bool = True) -> None:
        self._stop.set()
        if self.server is not None:
            stop_server(self.server)
            self.server = None
        self.plane.stop(stop_jobs=stop_jobs)

    def describe(self) -> str:
        c = self.plane.config
        tls = "TLS" if self.config.tls_cert is not None else "plaintext"
        return (f"control API on {self.target} ({tls}, bearer token from {self.token.source}; "
                f"max {c.max_concurrent_jobs} concurrent job(s); "
                f"jobs {c.db_path}; runs {c.runs_dir})")

    def run_forever(self) -> None:
        """Start, log one ready line, block until SIGINT/SIGTERM, stop."""
        with signals.stopping(self._stop):
            try:
                self.start()
                log.info("ready: %s", self.describe())
                self._stop.wait()
            finally:
                self.stop()
