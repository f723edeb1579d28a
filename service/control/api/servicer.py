"""The control API's gRPC server: a thin servicer, one error interceptor, health, reflection.

Two steps, so tests bind port 0 and call through a real channel::

    server, port = create_server(config, plane, token=api_token)   # plane: a ControlPlane
    server.start()
    ...
    stop_server(server)

:class:`ControlService` runs both steps with the plane's own start and stop.

The servicer only translates messages (:mod:`service.control.api.messages`) to and from
:class:`~service.control.jobs.plane.ControlPlane` calls. Every exception leaving it is turned
into a status in one place, :class:`ErrorInterceptor`, through
:func:`service.errors.grpc_status`: a named error keeps its message; anything else is
INTERNAL with a generic message (and its traceback in the log).

Every call of ``modelctl.v1.ModelControl`` needs the operator's API token in its metadata
(``authorization: Bearer <token>``, :mod:`service.auth`); the same interceptor checks it
first, so a missing or wrong token is :class:`~service.errors.Unauthenticated`
(UNAUTHENTICATED) like any other named error. Health and reflection stay open for probes.

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
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.auth import ApiToken
from service.control.api import messages
from service.errors import FailedPrecondition, ServiceError, Unavailable, grpc_status
from service.grpc_streams import ANONYMOUS, AUTHENTICATED, StreamLimit, enter_sync_stream, streams_pool

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelControl"].full_name  # "modelctl.v1.ModelControl"
#: Services answered without a token: probes and tools need them.
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME,
                 "grpc.reflection.v1.ServerReflection")


# ---- errors -----------------------------------------------------------------------------------
def _abort(context, exc: BaseException, method: str) -> None:
    code = grpc_status(exc)
    if isinstance(exc, ServiceError):
        log.info("%s: %s %s", method, code.name, exc.message)
        message = exc.message
    else:
        log.exception("%s failed", method, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the control service's log"
    context.abort(code, message)


class ErrorInterceptor(grpc.ServerInterceptor):
    """The one place where exceptions become gRPC statuses (unary and streaming calls).

    With ``token``, a call of any service but the open ones (health, reflection) first
    checks the operator's API token: Unauthenticated goes through the same mapping.

    With ``streams`` (a :class:`~service.grpc_streams.StreamLimit`) and ``pool``, every
    stream is counted (after the token check) and bounded, and runs on ``pool``, never on
    the server's own threads.
    """

    def __init__(self, token: ApiToken | None = None, *, streams: StreamLimit | None = None,
                 pool=None):
        self.token = token
        self.streams = streams
        self.pool = pool

    def _stream_guard(self, method: str):
        """What a stream does before it runs: take its place (see :func:`_guard_stream`)."""
        if self.streams is None:
            return None
        service = method.lstrip("/").split("/", 1)[0]
        kind = ANONYMOUS if service in OPEN_SERVICES else AUTHENTICATED
        return lambda context: enter_sync_stream(self.streams, kind, context)

    def _authenticate(self, method: str):
        service = method.lstrip("/").split("/", 1)[0]
        if self.token is None or service in OPEN_SERVICES:
            return None
        return self.token.check_metadata

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        auth = self._authenticate(method)
        if auth is not None:
            metadata = handler_call_details.invocation_metadata
            check = lambda: auth(metadata)  # noqa: E731
        else:
            check = None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, check),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        enter = self._stream_guard(method)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, check, enter, self.pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if check is not None:
            # Client-streaming calls: only reflection has them, and it is open. Anything
            # else would bypass the check, so it is refused.
            raise RuntimeError(f"{method}: streaming requests are not guarded")
        if handler.stream_stream is not None and enter is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method, None, enter, self.pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def _guard_unary(behavior, method, check=None):
    def call(request, context):
        try:
            if check is not None:
                check()
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - the one mapping point
            _abort(context, exc, method)
    return call


def _guard_stream(behavior, method, check=None, enter=None, pool=None):
    """A stream's behavior: the token ``check``, then ``enter`` (its place among the open
    streams, given back when the call ends), then ``behavior``; run on ``pool``.

    A non-blocking behavior (grpc's ``experimental_non_blocking``: health's Watch answers
    through a callback and holds no thread) stays non-blocking; wrapping it in a generator
    would hold a thread for as long as the stream is open."""
    if getattr(behavior, "experimental_non_blocking", False):
        def call(request, context, send_response_callback=None):
            try:
                if check is not None:
                    check()
                if enter is not None:
                    enter(context)
                behavior(request, context, send_response_callback=send_response_callback)
            except Exception as exc:  # noqa: BLE001 - the one mapping point
                _abort(context, exc, method)
        call.experimental_non_blocking = True
    else:
        def call(request, context):
            release = None
            try:
                if check is not None:
                    check()
                if enter is not None:
                    release = enter(context)
                yield from behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - the one mapping point
                _abort(context, exc, method)
            finally:
                if release is not None:
                    release()
    if pool is not None:
        call.experimental_thread_pool = pool
    return call


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
    streams = StreamLimit(config.max_open_streams, server="control API")
    pool = streams_pool(streams, "modelctl-grpc-stream")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="modelctl-grpc"),
        interceptors=[ErrorInterceptor(token, streams=streams, pool=pool)],
        options=[("grpc.so_reuseport", 0)],  # a busy port is an error, not a shared one
    )
    pb_grpc.add_ModelControlServicer_to_server(ModelControlServicer(deps), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise Unavailable(f"cannot bind the control API to {address}: {exc}") from None
    if not port:
        raise Unavailable(f"cannot bind the control API to {address}")
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
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame: self._stop.set())
        try:
            self.start()
            log.info("ready: %s", self.describe())
            self._stop.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
