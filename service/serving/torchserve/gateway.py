"""The public gRPC inference endpoint: TorchServe's own inference API, with real statuses.

It serves ``org.pytorch.serve.grpc.inference.InferenceAPIsService`` (TorchServe's proto,
so TorchServe gRPC clients work unchanged). Every call must carry the operator's API token
(``authorization: Bearer <token>`` metadata, :mod:`service.auth`); without it, or with a
wrong one, the call ends UNAUTHENTICATED before anything is forwarded. The gateway then
forwards the call, with the caller's other metadata and deadline, to TorchServe's own gRPC
inference port on loopback, with TorchServe's current inference key as ``authorization``
(read from key_file.json, so renewed keys are used at once; a unary call that meets a key
renewed in between is sent once more with the new key). TorchServe answers there with the
wrong status codes:

* an unknown model or version is INTERNAL ("Model not found: x\\norg.pytorch...
  ModelNotFoundException" / "...ModelVersionNotFoundException");
* a per-request error of the handler (``context.set_response_status(400, ...)`` plus an
  error body ``{"code", "type", "message"}``) is OK, with the error body as the prediction:
  it is the named error of the body's ``type`` here (:func:`service.errors.from_body`, the
  one table), with its message;
* a model version without workers is INTERNAL ("Model \"x\" has no worker to serve
  inference request. ...", ``ApiUtils.getStreamingInferenceErrorResponseMessage``): it is
  UNAVAILABLE here. TorchServe says exactly the same when its job queue is full, so that
  case is kept from happening: the gateway lets at most ``admit_per_model`` calls of one
  model (``Predictions``, ``StreamPredictions``) through at once, half of TorchServe's
  ``job_queue_size`` (the REST proxy holds the other half), and answers one more
  RESOURCE_EXHAUSTED with ``retry-after`` (seconds) and ``grpc-retry-pushback-ms``
  trailing metadata. A unary call whose client cancels, goes away or reaches its deadline
  keeps its place until TorchServe has answered upstream (TorchServe 0.12 runs such a job
  all the same; ``Predictions`` is therefore forwarded without the caller's deadline), so
  the count is that of TorchServe's queue. Each call's message also takes its exact size
  (``ByteSize()``) from the gateway's half of the replica's byte budget
  (service/serving/torchserve/budget.py: :class:`ByteAdmission`), for as long as it holds
  its place; a message that does not fit is answered RESOURCE_EXHAUSTED with the same
  metadata. ``StreamPredictions2`` is served as the native engine serves it, each message
  one counted ``Predictions`` call, answered in order: TorchServe's own needs a model set up
  for sequence batching, which no modelctl archive is (without a ``sequence_id`` it answers
  each message "Parameter sequenceId is required.", with one the call fails UNKNOWN), and
  forwarded as it was, its messages reached TorchServe's heap uncounted;
* a request whose worker died under it ("Worker died.\\norg.pytorch...InternalServerException")
  is INTERNAL, or RESOURCE_EXHAUSTED when the worker was SIGKILLed (exit 137, which
  TorchServe takes for the OOM killer): it is UNAVAILABLE here (TorchServe starts a new
  worker, so a retry can succeed), never RESOURCE_EXHAUSTED, which means "too many calls".

:func:`translate` is the one place where this is corrected, through the named errors of
``service.errors`` and their ``grpc_status``. Everything else (UNAVAILABLE when TorchServe
is down) passes through unchanged.

The server, its interceptors (the token, the error mapping, the streams' bound), health and
reflection are :mod:`service.grpc_server`'s. Also served, without a token (probes need none):
gRPC health checking
(``grpc.health.v1``; service ``""`` is SERVING only when every registered model version
is ready, ``"<model>"`` when every version of that model is, ``"<model>/<version>"`` for
one version) and server reflection.

Streams (health ``Watch``, reflection, ``StreamPredictions``, ``StreamPredictions2``) are
coroutines here and hold no thread; they are bounded per kind by ``max_open_streams``
(``MODELCTL_MAX_OPEN_STREAMS``, :mod:`service.grpc_streams`), one more is RESOURCE_EXHAUSTED.

Two steps, so tests bind port 0 and call through a real channel::

    server, port = create_gateway(settings, "127.0.0.1:7072", readiness_fn,  # in a loop
                                  token=api_token, upstream_key=torchserve.inference_key)
    await server.start()
    ...
    await close_gateway(server)

:class:`GatewayThread` runs the same in a background thread for synchronous callers.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
from typing import Callable, Iterable

import grpc
from grpc import aio

from service import grpc_server
from service._gen import inference_pb2, inference_pb2_grpc
from service.auth import ApiToken
from service.errors import NotFound, ResourceExhausted, ServiceError, Unavailable, from_body, grpc_status
from service.serving.health import ReadinessHealthServicer
from service.serving.torchserve.budget import SizeClass, endpoint_shares, size_classes

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
#: Services answered without a token (their streams count as anonymous).
OPEN_SERVICES = grpc_server.OPEN_SERVICES
#: A prediction larger than this is model output, never an error body: not parsed.
_MAX_ERROR_BODY = 64 * 1024
_NOT_FOUND_MARKERS = ("ModelNotFoundException", "ModelVersionNotFoundException")
#: Metadata that belongs to a connection or is set by gRPC itself: not forwarded.
_HOP_HEADERS = {"user-agent", "content-type", "te", "host", "content-length",
                "accept-encoding", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"}
#: TorchServe's answer to a key it does not (or no longer) accept.
_KEY_REFUSED = "Token Authorization failed"
#: TorchServe's answer (INTERNAL) when a model version has no worker (or a full queue,
#: which the admission limit below keeps from happening).
_NO_WORKER_MARKER = "has no worker to serve inference request"
#: TorchServe's answer (INTERNAL, or RESOURCE_EXHAUSTED after a SIGKILL) to the requests a
#: dying worker was running.
_WORKER_DIED = "Worker died."


def error_body(prediction: bytes) -> dict | None:
    """The handler's per-request error body ``{"code": >=400, "type", "message"}``, or None."""
    if not prediction or len(prediction) > _MAX_ERROR_BODY or not prediction.lstrip().startswith(b"{"):
        return None
    try:
        body = json.loads(prediction)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or set(body) != {"code", "type", "message"}:
        return None
    code = body["code"]
    if not isinstance(code, int) or isinstance(code, bool) or code < 400:
        return None
    if not isinstance(body["type"], str) or not isinstance(body["message"], str):
        return None
    return body


def translate(item) -> ServiceError | None:
    """THE status mapping of the gateway: what TorchServe said -> the error to answer.

    ``item`` is an upstream ``grpc.RpcError`` or a ``PredictionResponse``. Returns the
    named error to abort with, or None when the item passes through unchanged.
    """
    if isinstance(item, grpc.RpcError):
        details = item.details() or ""
        if item.code() == grpc.StatusCode.INTERNAL and any(m in details for m in _NOT_FOUND_MARKERS):
            return NotFound(details.splitlines()[0])
        if item.code() == grpc.StatusCode.INTERNAL and _NO_WORKER_MARKER in details:
            return Unavailable(details.splitlines()[0])
        if item.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED) \
                and details.splitlines()[:1] == [_WORKER_DIED]:
            return Unavailable(_WORKER_DIED)
        return None
    if isinstance(item, inference_pb2.PredictionResponse):
        body = error_body(item.prediction)
        if body is None:
            return None
        return from_body(body)
    return None


async def _abort_for(context, item) -> None:
    """Abort the call for an upstream error or error body (translated when it must be)."""
    err = translate(item)
    if err is not None:
        await context.abort(grpc_status(err), err.message)
    if isinstance(item, grpc.RpcError):
        await context.abort(item.code(), item.details() or "",
                            _forwardable(item.trailing_metadata() or ()))


def _forwardable(metadata: Iterable) -> tuple:
    out = []
    for key, value in metadata:
        k = key.lower()
        if k.startswith(":") or k in _HOP_HEADERS:
            continue
        out.append((k, value))
    return tuple(out)


class Admission:
    """Calls per model let through at once (used only inside the server's event loop)."""

    def __init__(self, limit: int | None, retry_after_s: int = 1):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._counts: dict[str, int] = {}

    def acquire(self, model: str) -> bool:
        count = self._counts.get(model, 0)
        if self.limit is not None and count >= self.limit:
            return False
        self._counts[model] = count + 1
        return True

    def release(self, model: str) -> None:
        count = self._counts.get(model, 0) - 1
        if count > 0:
            self._counts[model] = count
        else:
            self._counts.pop(model, None)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def refusal(self, model: str) -> tuple[ResourceExhausted, tuple]:
        err = ResourceExhausted(f"too many requests for model {model!r} at once (more than "
                                f"{self.limit}); retry after {self.retry_after_s}s")
        return err, (("retry-after", str(self.retry_after_s)),
                     ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000)))


class ByteAdmission:
    """Bytes of request messages let through at once, by size class: the gateway's share of
    the replica's byte budget (used only inside the server's event loop). A message of ``n``
    bytes fits when, for every class whose lower bound it is over, the bytes held by such
    messages plus ``n`` stay within that class's ``nested_bytes``: the share for the
    smallest class, less for the larger ones, so that large messages never take the room
    kept for small ones."""

    def __init__(self, classes: list[SizeClass] | None, retry_after_s: int = 1):
        self.classes = list(classes or ())
        self.retry_after_s = retry_after_s
        self.share = self.classes[0].nested_bytes if self.classes else None
        self._held = {c.above: 0 for c in self.classes}

    def acquire(self, nbytes: int) -> bool:
        over = [c for c in self.classes if nbytes > c.above]
        if any(self._held[c.above] + nbytes > c.nested_bytes for c in over):
            return False
        for c in over:
            self._held[c.above] += nbytes
        return True

    def release(self, nbytes: int) -> None:
        for c in self.classes:
            if nbytes > c.above:
                self._held[c.above] -= nbytes

    def held(self) -> int:
        """Bytes of the messages let through and not yet answered."""
        return self._held.get(0, 0)

    def refusal(self, nbytes: int) -> tuple[ResourceExhausted, tuple]:
        err = ResourceExhausted(f"request bodies in flight over gRPC would exceed the gateway's "
                                f"{self.share} bytes of the byte budget (half of "
                                f"max_inflight_bytes) with this one of {nbytes} bytes; retry after "
                                f"{self.retry_after_s}s")
        return err, (("retry-after", str(self.retry_after_s)),
                     ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000)))


class InferenceGateway(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Forwards TorchServe's inference API to ``upstream_target``.

    The operator's API token is checked before a call gets here (``AuthInterceptor``,
    :mod:`service.grpc_server`). ``upstream_key``: returns
    TorchServe's current inference key (None: the upstream wants none); ``fresh_upstream_key``
    the same without any cache (after TorchServe refused a key). ``admit_per_model``: calls
    of one model let through at once (None: no limit), the others are refused
    RESOURCE_EXHAUSTED with a retry-after of ``retry_after_s``. ``byte_classes``: the
    gateway's share of the byte budget (:class:`ByteAdmission`; None: no limit).
    """

    def __init__(self, upstream_target: str, *, max_message_bytes: int,
                 upstream_key: Callable[[], str] | None = None,
                 fresh_upstream_key: Callable[[], str] | None = None,
                 admit_per_model: int | None = None, retry_after_s: int = 1,
                 byte_classes: list[SizeClass] | None = None):
        self.upstream_target = upstream_target
        self._upstream_key = upstream_key
        self._fresh_key = fresh_upstream_key or upstream_key
        self.admission = Admission(admit_per_model, retry_after_s)
        self.bytes = ByteAdmission(byte_classes, retry_after_s)
        #: Upstream unary calls still running (also those whose caller has gone).
        self._upstream_tasks: set[asyncio.Task] = set()
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel: aio.Channel | None = None
        self._stub = None

    def _upstream(self):
        # Created on first use, inside the server's event loop.
        if self._stub is None:
            # TorchServe restarted by the supervisor is back within seconds: retry the
            # loopback connection every 2 s at most, not after gRPC's backoff of up to 120 s.
            self._channel = aio.insecure_channel(
                self.upstream_target,
                options=[*self._options, ("grpc.initial_reconnect_backoff_ms", 500),
                         ("grpc.min_reconnect_backoff_ms", 500),
                         ("grpc.max_reconnect_backoff_ms", 2000)])
            self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)
        return self._stub

    def _call_args(self, context, *, fresh_key: bool = False, deadline: bool = True) -> dict:
        remaining = context.time_remaining() if deadline else None
        metadata = [(k, v) for k, v in _forwardable(context.invocation_metadata() or ())
                    if k != "authorization"]  # the operator's token stays here
        if self._upstream_key is not None:
            key = self._fresh_key() if fresh_key else self._upstream_key()
            metadata.append(("authorization", f"Bearer {key}"))
        return {"metadata": tuple(metadata),
                "timeout": remaining if remaining is not None and remaining > 0 else None}

    async def _unary(self, method: str, request, context, *, deadline: bool = True):
        """One unary call upstream; once more if TorchServe's key was renewed meanwhile.
        ``deadline``: with the caller's deadline (else TorchServe's answer is awaited)."""
        try:
            return await getattr(self._upstream(), method)(
                request, **self._call_args(context, deadline=deadline))
        except aio.AioRpcError as exc:
            if not (exc.code() == grpc.StatusCode.PERMISSION_DENIED
                    and _KEY_REFUSED in (exc.details() or "") and self._upstream_key):
                raise
            log.info("gateway: TorchServe refused its key (renewed?); sending %s again", method)
            return await getattr(self._upstream(), method)(
                request, **self._call_args(context, fresh_key=True, deadline=deadline))

    async def Ping(self, request, context):
        try:
            return await self._unary("Ping", request, context)
        except aio.AioRpcError as exc:
            await _abort_for(context, exc)

    async def _admit(self, context, model: str, nbytes: int) -> None:
        """Take a place for ``model`` and ``nbytes`` of the byte budget, or abort
        RESOURCE_EXHAUSTED with a retry-after (holding neither)."""
        if not self.admission.acquire(model):
            err, trailers = self.admission.refusal(model)
            await context.abort(grpc_status(err), err.message, trailers)
        if not self.bytes.acquire(nbytes):
            self.admission.release(model)
            err, trailers = self.bytes.refusal(nbytes)
            await context.abort(grpc_status(err), err.message, trailers)

    def _upstream_task(self, model: str, nbytes: int, coro) -> asyncio.Task:
        """``coro`` as a task that gives ``model``'s place and ``nbytes`` back when it ends,
        not before: a caller that cancels does not cancel it (TorchServe runs the job anyway)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._upstream_tasks.add(task)

        def _done(t: asyncio.Task) -> None:
            self._upstream_tasks.discard(t)
            self.admission.release(model)
            self.bytes.release(nbytes)
            if not t.cancelled():
                t.exception()  # retrieved: a caller that left does not read it

        task.add_done_callback(_done)
        return task

    def pending_upstream(self) -> int:
        """Upstream unary calls still running, their callers there or not."""
        return len(self._upstream_tasks)

    async def Predictions(self, request, context):
        nbytes = request.ByteSize()
        await self._admit(context, request.model_name, nbytes)
        # Without the caller's deadline upstream: TorchServe runs a job whose caller has
        # gone all the same, so the place is held until it has answered (the caller still
        # gets DEADLINE_EXCEEDED at its deadline, from gRPC itself).
        upstream = self._upstream_task(request.model_name, nbytes,
                                       self._unary("Predictions", request, context,
                                                   deadline=False))
        try:
            response = await asyncio.shield(upstream)
        except aio.AioRpcError as exc:
            await _abort_for(context, exc)
            return None  # not reached: abort raises
        await _abort_for(context, response)
        return response

    async def StreamPredictions(self, request, context):
        # Served as one unary call upstream, its answer the stream's one message. Every
        # served archive has modelctl's handler (service/modelstore/check.py), which answers
        # once per request; TorchServe 0.12's own StreamPredictions of such a handler throws
        # a NullPointerException in its frontend (GRPCJob.response reads the missing
        # ``ts_stream_next`` header) and kills the worker.
        yield await self.Predictions(request, context)

    async def StreamPredictions2(self, request_iterator, context):
        # Each message one Predictions call (counted, in order), as the native engine serves
        # it: TorchServe's own StreamPredictions2 serves only models set up for sequence
        # batching, which no modelctl archive is, and it took the messages uncounted.
        async for request in request_iterator:
            yield await self.Predictions(request, context)

    async def close(self) -> None:
        for task in list(self._upstream_tasks):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def create_gateway(settings, upstream_target: str, readiness_fn: Callable[[], list], *,
                   token: ApiToken, upstream_key: Callable[[], str] | None = None,
                   fresh_upstream_key: Callable[[], str] | None = None,
                   port: int | None = None, host: str | None = None,
                   health_poll_s: float = 2.0) -> tuple[aio.Server, int]:
    """Build (not start) the gateway server; returns ``(server, bound_port)``.

    ``token``: the operator's API token inference calls must carry; ``upstream_key``:
    TorchServe's current inference key, put on every forwarded call (``fresh_upstream_key``:
    the same read again, after TorchServe refused one).

    Binds ``host:port`` (default ``settings.host:settings.grpc_inference_port``; port 0
    picks a free one). Call it inside the event loop that will run the server. Stop it
    with :func:`close_gateway`, which also closes the upstream channel.
    """
    spec = grpc_server.ServerSpec("gRPC gateway", (SERVICE_NAME,), token, settings.max_open_streams,
                                  retry_after_s=settings.retry_after_s,
                                  max_message_bytes=settings.max_request_size_bytes, log_level=logging.DEBUG)
    server, streams = grpc_server.aio_server(spec)
    gateway = InferenceGateway(upstream_target, max_message_bytes=settings.max_request_size_bytes,
                               upstream_key=upstream_key, fresh_upstream_key=fresh_upstream_key,
                               admit_per_model=settings.admit_per_model,
                               retry_after_s=settings.retry_after_s,
                               byte_classes=size_classes(endpoint_shares(settings)[1],
                                                         settings.max_request_size_bytes))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(gateway, server)
    health_servicer = ReadinessHealthServicer(readiness_fn, services=(SERVICE_NAME,), poll_s=health_poll_s)
    grpc_server.serve_health_and_reflection(server, spec, health_servicer)
    bound = grpc_server.bind(server, spec, settings.host if host is None else host,
                             settings.grpc_inference_port if port is None else port)
    server._modelctl_parts = (gateway, health_servicer)  # for close_gateway
    server._modelctl_streams = streams  # the open streams (tests)
    return server, bound


async def close_gateway(server: aio.Server, grace: float | None = 2.0) -> None:
    """Health NOT_SERVING, stop the server (``grace`` seconds), close the upstream channel."""
    gateway, health_servicer = getattr(server, "_modelctl_parts", (None, None))
    if health_servicer is not None:
        await health_servicer.close()
    await server.stop(grace)
    if gateway is not None:
        await gateway.close()


class GatewayThread:
    """The gateway in a background thread with its own event loop (for sync callers).

    :meth:`alive` is False once that thread has ended other than through :meth:`stop`
    (its loop stopped or raised), and :attr:`died` then says how; ``Serving.run_forever``
    starts another gateway (service/serving/torchserve/supervisor.py). :meth:`stop` also
    closes the server of a gateway whose thread died, so its port is free again.
    """

    def __init__(self, settings, upstream_target: str, readiness_fn: Callable[[], list],
                 **kwargs):
        self._args = (settings, upstream_target, readiness_fn)
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: aio.Server | None = None
        self.port: int | None = None
        #: How the event loop's thread ended when it was not stopped (None: it runs, or
        #: was stopped).
        self.died: str | None = None

    def start(self, timeout_s: float = 30.0) -> int:
        """Start serving; returns the bound port."""
        if self._thread is not None:
            return self.port
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._closing = False
        self.died = None
        self._thread = threading.Thread(target=self._run, args=(self._loop,),
                                        name="grpc-gateway", daemon=True)
        self._thread.start()

        async def _start():
            server, port = create_gateway(*self._args, **self._kwargs)
            await server.start()
            return server, port

        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(
                _start(), self._loop).result(timeout_s)
        except BaseException:
            self._shutdown_loop()
            raise
        return self.port

    def load(self, timeout_s: float = 10.0) -> dict:
        """What the gateway holds now: ``admitted`` (calls per model let through),
        ``bytes`` (their messages' bytes), ``upstream`` (upstream unary calls running) and
        ``tasks`` (the event loop's tasks, the asking one left out), read inside its loop."""
        gateway = self._server._modelctl_parts[0]

        async def _read():
            return {"admitted": gateway.admission.counts(), "bytes": gateway.bytes.held(),
                    "upstream": gateway.pending_upstream(),
                    "tasks": len(asyncio.all_tasks()) - 1}

        return asyncio.run_coroutine_threadsafe(_read(), self._loop).result(timeout_s)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """The thread: the event loop until stop(); records how it ended otherwise."""
        try:
            loop.run_forever()
        except BaseException as exc:  # SystemExit and KeyboardInterrupt leave run_forever
            self.died = f"its event loop raised {exc!r}"
        else:
            if not self._closing:
                self.died = "its event loop stopped"

    def alive(self) -> bool:
        """Whether the event loop's thread runs (False before start and after stop too)."""
        return self._thread is not None and self._thread.is_alive()

    def _on_loop_error(self, loop, context) -> None:
        # grpc.aio's poller can fire once more on its closed socket while the loop
        # shuts down (EBADF). It is harmless then; anything else is reported as usual.
        exc = context.get("exception")
        if self._closing and isinstance(exc, OSError) and exc.errno == errno.EBADF:
            log.debug("gateway: ignored grpc poller callback after shutdown: %s", exc)
            return
        loop.default_exception_handler(context)

    def stop(self, grace: float = 2.0) -> None:
        if self._loop is None:
            return
        self._closing = True
        if self._server is not None:
            try:
                if self.alive():
                    asyncio.run_coroutine_threadsafe(
                        close_gateway(self._server, grace), self._loop).result(grace + 10)
                else:  # its thread died: close the server in its loop, here, to free the port
                    self._loop.run_until_complete(
                        asyncio.wait_for(close_gateway(self._server, 0), grace + 10))
            except Exception:
                log.exception("gateway: error while stopping")
            self._server = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None
