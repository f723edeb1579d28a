"""The one assembly of the service's gRPC servers, and the interceptors every one of them runs.

Three servers are built here: the control API (:mod:`service.control.api.servicer`, a
synchronous ``grpc.server``), the TorchServe gateway (:mod:`service.serving.torchserve.gateway`)
and the native engine's gRPC API (:mod:`service.serving.native.grpc_api`), both ``grpc.aio``.
Each one, described by a :class:`ServerSpec`:

* runs three interceptors, outermost first: :class:`AuthInterceptor` (the operator's API
  token), :class:`ErrorInterceptor` (exceptions to statuses, through
  :func:`service.errors.grpc_status`) and the bound on its open streams
  (:mod:`service.grpc_streams`), so a call without the token is refused before it is
  counted or run, and a stream refused for the bound is answered by the error mapping;
* serves gRPC health and reflection (listing its own services, health and reflection);
  both are open, without a token (:data:`OPEN_SERVICES`); every other call needs it;
* bounds the messages it sends and receives to ``max_message_bytes`` (None: grpc's defaults);
* never shares its port (``grpc.so_reuseport`` 0): a taken port is
  :class:`~service.errors.Unavailable` naming the server and the address (:func:`bind`).

The synchronous server runs unary calls on a pool of ``max_workers`` threads and streams on
a pool of their own (:func:`service.grpc_streams.streams_pool`); a ``grpc.aio`` server's
streams are coroutines and hold no thread.
"""

from __future__ import annotations

import inspect
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.auth import ApiToken
from service.errors import InvalidInput, ResourceExhausted, ServiceError, Unauthenticated, Unavailable, grpc_status
from service.grpc_streams import AioStreamLimitInterceptor, StreamLimit, StreamLimitInterceptor, streams_pool

log = logging.getLogger(__name__)

#: Services answered without a token: health (probes need it) and reflection (tools), in
#: both reflection versions grpc serves.
OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME,
                           "grpc.reflection.v1.ServerReflection"})


def service_of(method: str) -> str:
    """``"pkg.Service"`` of a call's full method name ``"/pkg.Service/Method"``."""
    return method.lstrip("/").split("/", 1)[0]


# ---- the interceptors ------------------------------------------------------------------------
# Each works on both kinds of server: a synchronous server's ``continuation`` returns the
# method's handler, a grpc.aio server's an awaitable of it; what they return matches.

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _kind(handler) -> str:
    """Which of the four behaviours ``handler`` has (``"unary_unary"``...)."""
    return next(kind for kind in _FACTORIES if getattr(handler, kind) is not None)


def _rebuilt(handler, behavior, *, request_deserializer=None, keep_deserializer: bool = True):
    """A handler of ``handler``'s kind and serializers running ``behavior``."""
    return _FACTORIES[_kind(handler)](
        behavior,
        request_deserializer=handler.request_deserializer if keep_deserializer else request_deserializer,
        response_serializer=handler.response_serializer)


def _like(inner, outer):
    """``outer`` with the thread-pool and non-blocking marks of the behaviour it wraps
    (a synchronous server reads them from the outermost behaviour)."""
    for mark in ("experimental_thread_pool", "experimental_non_blocking"):
        if getattr(inner, mark, None) is not None:
            setattr(outer, mark, getattr(inner, mark))
    return outer


class AuthInterceptor(grpc.ServerInterceptor, aio.ServerInterceptor):
    """Every call but those of ``open_services`` must carry the operator's API token
    (``authorization: Bearer <token>``, :meth:`service.auth.ApiToken.check_metadata`).

    A call without it, or with a wrong one, is answered UNAUTHENTICATED with
    :class:`~service.errors.Unauthenticated`'s message before any other interceptor or the
    method runs, and its request is never parsed.
    """

    def __init__(self, token: ApiToken, open_services=OPEN_SERVICES):
        if not isinstance(token, ApiToken):
            raise TypeError("a gRPC server needs the operator's ApiToken")
        self.token = token
        self.open_services = frozenset(open_services)

    def refusal(self, details) -> Unauthenticated | None:
        """Why the call ``details`` is refused; None when it may go on."""
        if service_of(details.method) in self.open_services:
            return None
        try:
            self.token.check_metadata(details.invocation_metadata)
        except Unauthenticated as err:
            return err
        return None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        err = self.refusal(details)
        if err is None:
            return handler
        log.debug("%s: UNAUTHENTICATED %s", details.method, err.message)
        if inspect.isawaitable(handler):
            return self._refused_aio(handler, err)
        return None if handler is None else _refusing(handler, err)

    @staticmethod
    async def _refused_aio(handler, err: Unauthenticated):
        handler = await handler
        return None if handler is None else _refusing(handler, err, asynchronous=True)


def _refusing(handler, err: ServiceError, *, asynchronous: bool = False):
    """A handler of ``handler``'s kind answering ``err``'s status at once (its request,
    left unparsed, unread)."""
    code, message = grpc_status(err), err.message
    if not asynchronous:
        def refuse(request, context):
            context.abort(code, message)
    elif handler.response_streaming:
        async def refuse(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises
    else:
        async def refuse(request, context):
            await context.abort(code, message)
    return _rebuilt(handler, refuse, keep_deserializer=False)


class _Undecodable:
    """A request message that did not parse (what :func:`_lenient` hands on instead)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    """``deserializer``, but a message that does not parse comes out as :class:`_Undecodable`
    rather than raising inside grpc (which answers UNKNOWN or INTERNAL, with a traceback)."""
    if deserializer is None:
        return None

    def parse(data):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever the parser raises
            return _Undecodable(exc)

    return parse


def _decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidInput(f"the request is not a valid message ({type(request.error).__name__}: "
                           f"{str(request.error)[:200]})")


class ErrorInterceptor(grpc.ServerInterceptor, aio.ServerInterceptor):
    """The one place where an exception leaving a method becomes a gRPC status: a named error
    (:class:`~service.errors.ServiceError`) its own code (:func:`~service.errors.grpc_status`)
    and message, logged at ``log_level``; anything else INTERNAL with a generic message naming
    ``server``'s log, where its traceback goes. A ResourceExhausted also carries
    ``retry-after`` (``retry_after_s``) and ``grpc-retry-pushback-ms`` trailing metadata.

    With ``lenient_requests``, a unary request that does not parse is InvalidInput
    (INVALID_ARGUMENT) rather than grpc's own answer. Aborts (``context.abort``) pass through.
    """

    def __init__(self, server: str, *, retry_after_s: int = 1, lenient_requests: bool = False,
                 log_level: int = logging.INFO):
        self.server = server
        self.retry_after_s = retry_after_s
        self.lenient_requests = lenient_requests
        self.log_level = log_level

    def status(self, exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
        """The status and message ``exc`` is answered with (and its log line)."""
        code = grpc_status(exc)
        if isinstance(exc, ServiceError):
            log.log(self.log_level, "%s: %s %s", method, code.name, exc.message)
            return code, exc.message
        log.error("%s failed", method, exc_info=exc)
        return code, f"internal error ({type(exc).__name__}); see the {self.server}'s log"

    def trailers(self, exc: BaseException) -> tuple[tuple[str, str], ...] | None:
        if not isinstance(exc, ResourceExhausted):
            return None
        return (("retry-after", str(self.retry_after_s)),
                ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000)))

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if inspect.isawaitable(handler):
            return self._wrapped_aio(handler, details.method)
        return None if handler is None else self._wrap(handler, details.method, asynchronous=False)

    async def _wrapped_aio(self, handler, method: str):
        handler = await handler
        return None if handler is None else self._wrap(handler, method, asynchronous=True)

    def _wrap(self, handler, method: str, *, asynchronous: bool):
        kind = _kind(handler)
        inner = getattr(handler, kind)
        lenient = self.lenient_requests and not handler.request_streaming
        check = _decoded if lenient else None
        wrap = self._aio_behavior if asynchronous else self._sync_behavior
        return _rebuilt(handler, wrap(inner, method, handler.response_streaming, check),
                        request_deserializer=_lenient(handler.request_deserializer),
                        keep_deserializer=not lenient)

    # -- synchronous servers
    def _abort(self, context, exc: BaseException, method: str):
        code, message = self.status(exc, method)
        trailers = self.trailers(exc)
        if trailers is not None:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    def _sync_behavior(self, inner, method: str, streaming: bool, check):
        if getattr(inner, "experimental_non_blocking", False):
            # grpc's non-blocking streaming (health's Watch): it answers through the
            # callback and holds no thread; a generator here would hold one while it is open.
            def call(request, context, send_response_callback=None):
                try:
                    inner(request, context, send_response_callback=send_response_callback)
                except Exception as exc:  # noqa: BLE001 - the one mapping point
                    self._abort(context, exc, method)
        elif streaming:
            def call(request, context):
                try:
                    if check is not None:
                        check(request)
                    yield from inner(request, context)
                except Exception as exc:  # noqa: BLE001 - the one mapping point
                    self._abort(context, exc, method)
        else:
            def call(request, context):
                try:
                    if check is not None:
                        check(request)
                    return inner(request, context)
                except Exception as exc:  # noqa: BLE001 - the one mapping point
                    self._abort(context, exc, method)
        return _like(inner, call)

    # -- grpc.aio servers
    async def _abort_aio(self, context, exc: BaseException, method: str):
        code, message = self.status(exc, method)
        trailers = self.trailers(exc)
        if trailers is not None:
            context.set_trailing_metadata(trailers)
        await context.abort(code, message)

    def _aio_behavior(self, inner, method: str, streaming: bool, check):
        if streaming and inspect.isasyncgenfunction(inner):
            async def call(request, context):
                try:
                    if check is not None:
                        check(request)
                    async for item in inner(request, context):
                        yield item
                except aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the one mapping point
                    await self._abort_aio(context, exc, method)
            return call

        # A coroutine: a unary answer, or a stream it writes with context.write (health's Watch).
        async def call(request, context):
            try:
                if check is not None:
                    check(request)
                return await inner(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping point
                await self._abort_aio(context, exc, method)
        return call


# ---- the assembly ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    """One gRPC server: ``name`` (in log lines and errors: "control API"), its own
    ``services`` (full names, listed by reflection), the operator's ``token``, the bound on
    open streams per kind, ``retry_after_s`` of its RESOURCE_EXHAUSTED answers,
    ``max_message_bytes`` (None: grpc's defaults), and ``lenient_requests``
    (:class:`ErrorInterceptor`)."""

    name: str
    services: tuple[str, ...]
    token: ApiToken
    max_open_streams: int
    retry_after_s: int = 1
    max_message_bytes: int | None = None
    lenient_requests: bool = False
    log_level: int = logging.INFO


def server_options(max_message_bytes: int | None = None) -> list[tuple[str, int]]:
    """A server's channel options: message sizes (when bounded), never a shared port."""
    sizes = [] if max_message_bytes is None else [("grpc.max_send_message_length", max_message_bytes),
                                                  ("grpc.max_receive_message_length", max_message_bytes)]
    return [*sizes, ("grpc.so_reuseport", 0)]  # a busy port is an error, not a shared one


def _auth_and_errors(spec: ServerSpec) -> list:
    return [AuthInterceptor(spec.token),
            ErrorInterceptor(spec.name, retry_after_s=spec.retry_after_s,
                             lenient_requests=spec.lenient_requests, log_level=spec.log_level)]


def stream_limit(spec: ServerSpec) -> StreamLimit:
    return StreamLimit(spec.max_open_streams, server=spec.name, retry_after_s=spec.retry_after_s)


def sync_server(spec: ServerSpec, *, max_workers: int, thread_name_prefix: str
                ) -> tuple[grpc.Server, StreamLimit, futures.ThreadPoolExecutor]:
    """A synchronous server (not bound, not started) with its interceptors; unary calls on
    ``max_workers`` threads, streams on a pool of their own. Returns the server, its open
    streams and that pool (shut it down after the server stops)."""
    streams = stream_limit(spec)
    pool = streams_pool(streams, f"{thread_name_prefix}-stream")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
        interceptors=[*_auth_and_errors(spec), StreamLimitInterceptor(streams, pool, open_services=OPEN_SERVICES)],
        options=server_options(spec.max_message_bytes))
    return server, streams, pool


def aio_server(spec: ServerSpec) -> tuple[aio.Server, StreamLimit]:
    """A grpc.aio server (not bound, not started; build it inside the loop that runs it)
    with its interceptors. Returns it with its open streams."""
    streams = stream_limit(spec)
    server = aio.server(
        interceptors=[*_auth_and_errors(spec), AioStreamLimitInterceptor(streams, open_services=OPEN_SERVICES)],
        options=server_options(spec.max_message_bytes))
    return server, streams


def serve_health_and_reflection(server, spec: ServerSpec, health_servicer) -> None:
    """Add ``health_servicer`` (sync or aio, as the server) and reflection over the spec's
    services, health and reflection."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*spec.services, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind(server, spec: ServerSpec, host: str, port: int,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``host:port`` (port 0: a free one), with TLS when ``credentials`` are given;
    returns the port. A port that cannot be bound (taken, or a bad host) is Unavailable."""
    where = address(host, port)
    try:
        bound = (server.add_secure_port(where, credentials) if credentials is not None
                 else server.add_insecure_port(where))
    except RuntimeError as exc:
        raise Unavailable(f"cannot bind the {spec.name} to {where}: {exc}") from None
    if not bound:
        raise Unavailable(f"cannot bind the {spec.name} to {where}")
    return bound
