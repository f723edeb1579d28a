"""Open gRPC streams, bounded per server and kept off the threads unary calls need.

A stream (health ``Watch``, reflection's ``ServerReflectionInfo``, ``WatchFineTuneJob``,
``StreamPredictions``...) may stay open for as long as its client likes, read or not. Each
server counts its open streams in a :class:`StreamLimit`, in two kinds counted apart:

* ``anonymous``: streams of the services answered without a token (health, reflection),
  which anyone who reaches the port can open;
* ``authenticated``: the streams of callers with the API token (a call of a closed
  service without a valid token is not counted: it is refused UNAUTHENTICATED anyway).

Each kind holds at most ``limit`` streams (``MODELCTL_MAX_OPEN_STREAMS``, default
:data:`DEFAULT_MAX_OPEN_STREAMS`); one more is answered RESOURCE_EXHAUSTED with
``retry-after`` and ``grpc-retry-pushback-ms`` trailing metadata, before its handler runs.
A stream's place is given back when the call ends (finished, cancelled, or its client gone).
Anonymous clients filling their kind cannot refuse the operator's own streams.

Threads: on a ``grpc.aio`` server (the gateway, the native engine) a stream is a coroutine
and holds no thread. On the control API's synchronous server, unary calls run on the
server's pool (``max_workers``) and streams on a pool of their own (:func:`streams_pool`):
health ``Watch`` uses grpc's non-blocking streaming and holds no thread at all; a stream that
does hold one (reflection, ``WatchFineTuneJob``) holds one of that second pool, and there are
at most ``limit`` of each kind. So no number of streams, open or idle, can take the threads
that unary calls (``Check``, ``ListFineTuneJobs``) need.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from concurrent import futures

import grpc
from grpc import aio

from service.errors import ResourceExhausted

log = logging.getLogger(__name__)

#: Streams of each kind a server holds open at once unless ``MODELCTL_MAX_OPEN_STREAMS`` says.
DEFAULT_MAX_OPEN_STREAMS = 100
ANONYMOUS = "anonymous"
AUTHENTICATED = "authenticated"
#: Threads of the streams pool beyond the streams that may hold one: refusals and the
#: set-up of non-blocking streams run there, and must never wait behind held streams.
_SPARE_THREADS = 4
#: Seconds between two log lines about refused streams (one per refusal would be a flood).
_LOG_EVERY_S = 60.0


class StreamLimit:
    """Open streams of one server, per kind, each kind at most ``limit`` (thread-safe)."""

    def __init__(self, limit: int = DEFAULT_MAX_OPEN_STREAMS, *, server: str = "gRPC server",
                 retry_after_s: int = 1):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the open streams' limit must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self.server = server
        self.retry_after_s = max(1, int(retry_after_s))
        self._counts = {ANONYMOUS: 0, AUTHENTICATED: 0}
        self._refused = 0
        self._logged = float("-inf")
        self._lock = threading.Lock()

    def acquire(self, kind: str) -> bool:
        """Take a place of ``kind``; False (and the refusal counted) when none is left."""
        with self._lock:
            if self._counts[kind] >= self.limit:
                self._refused += 1
                refused, now = self._refused, time.monotonic()
                if now - self._logged < _LOG_EVERY_S:
                    return False
                self._logged = now
            else:
                self._counts[kind] += 1
                return True
        log.warning("%s: %d %s streams open, the most allowed (MODELCTL_MAX_OPEN_STREAMS); "
                    "refusing more with RESOURCE_EXHAUSTED (%d refused so far)", self.server,
                    self.limit, kind, refused)
        return False

    def release(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] = max(0, self._counts[kind] - 1)

    def releaser(self, kind: str):
        """``release(kind)`` that acts once, however often it is called."""
        done = threading.Lock()

        def release() -> None:
            if done.acquire(blocking=False):
                self.release(kind)

        return release

    def counts(self) -> dict[str, int]:
        """Streams open now, per kind."""
        with self._lock:
            return dict(self._counts)

    @property
    def refused(self) -> int:
        return self._refused

    def message(self, kind: str) -> str:
        return (f"too many {kind} streams on this server (at most {self.limit} at once, "
                f"MODELCTL_MAX_OPEN_STREAMS); retry after {self.retry_after_s}s")

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", str(self.retry_after_s)),
                ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000)))


def streams_pool(limit: StreamLimit, name: str = "grpc-stream") -> futures.ThreadPoolExecutor:
    """The thread pool of a synchronous server's streams: every stream that may hold a
    thread holds one of these (at most ``limit`` per kind), plus spares for refusals."""
    return futures.ThreadPoolExecutor(max_workers=2 * limit.limit + _SPARE_THREADS,
                                      thread_name_prefix=name)


def enter_sync_stream(limit: StreamLimit, kind: str, context):
    """In a synchronous stream handler, before it runs: take a place of ``kind`` and have it
    given back when the call ends; returns the (idempotent) release. Without a place, raises
    :class:`~service.errors.ResourceExhausted` (for the server's error mapping), the retry
    metadata already set on ``context``."""
    if not limit.acquire(kind):
        context.set_trailing_metadata(limit.trailers())
        raise ResourceExhausted(limit.message(kind))
    release = limit.releaser(kind)
    if not context.add_callback(release):  # the call has ended already
        release()
    return release


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """The bound on a synchronous server, innermost of its interceptors
    (:mod:`service.grpc_server`): every stream takes a place of its kind before its handler
    runs (:func:`enter_sync_stream`; refused: :class:`~service.errors.ResourceExhausted`, for
    the error mapping outside) and runs on ``pool`` (:func:`streams_pool`), never on the
    server's own threads. ``open_services``: the services answered without a token (their
    streams are ``anonymous``); a call of another service has passed the token check
    already, so its streams are ``authenticated``. Unary calls pass through untouched.
    """

    def __init__(self, limit: StreamLimit, pool: futures.ThreadPoolExecutor, *, open_services):
        self.limit = limit
        self.pool = pool
        self.open_services = frozenset(open_services)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        service = details.method.lstrip("/").split("/", 1)[0]
        kind = ANONYMOUS if service in self.open_services else AUTHENTICATED
        enter = lambda context: enter_sync_stream(self.limit, kind, context)  # noqa: E731
        for factory, behavior in ((grpc.unary_stream_rpc_method_handler, handler.unary_stream),
                                  (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
                                  (grpc.stream_unary_rpc_method_handler, handler.stream_unary)):
            if behavior is not None:
                return factory(self._bounded(behavior, enter, handler.response_streaming),
                               request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)
        return handler

    def _bounded(self, behavior, enter, streaming: bool):
        """``behavior`` in its place among the open streams, given back when the call ends.

        A non-blocking behavior (grpc's ``experimental_non_blocking``: health's Watch
        answers through a callback and holds no thread) stays non-blocking; wrapping it in a
        generator would hold a thread for as long as the stream is open."""
        if getattr(behavior, "experimental_non_blocking", False):
            def call(request, context, send_response_callback=None):
                enter(context)
                behavior(request, context, send_response_callback=send_response_callback)
            call.experimental_non_blocking = True
        elif streaming:
            def call(request, context):
                release = enter(context)
                try:
                    yield from behavior(request, context)
                finally:
                    release()
        else:
            def call(request_iterator, context):
                release = enter(context)
                try:
                    return behavior(request_iterator, context)
                finally:
                    release()
        call.experimental_thread_pool = self.pool
        return call


class AioStreamLimitInterceptor(aio.ServerInterceptor):
    """The bound on a ``grpc.aio`` server, innermost of its interceptors
    (:mod:`service.grpc_server`).

    ``open_services``: the services answered without a token (their streams are
    ``anonymous``); a call of another service has passed the token check already, so its
    streams are ``authenticated``. Unary calls pass through untouched.
    """

    def __init__(self, limit: StreamLimit, *, open_services):
        self.limit = limit
        self.open_services = frozenset(open_services)

    def _kind(self, details) -> str:
        service = details.method.lstrip("/").split("/", 1)[0]
        return ANONYMOUS if service in self.open_services else AUTHENTICATED

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        kind = self._kind(details)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._bounded(handler.unary_stream, kind),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._bounded(handler.stream_stream, kind),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._bounded(handler.stream_unary, kind),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    async def _enter(self, kind: str, context) -> None:
        if not self.limit.acquire(kind):
            context.set_trailing_metadata(self.limit.trailers())
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.limit.message(kind))

    def _bounded(self, behavior, kind: str):
        limit = self.limit
        if inspect.isasyncgenfunction(behavior):
            async def stream(request, context):
                await self._enter(kind, context)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    limit.release(kind)
            return stream

        if not inspect.iscoroutinefunction(behavior):
            # grpc.aio runs a plain function in its thread pool; none of ours has one, and
            # running it here would block the loop: refused rather than left unbounded.
            raise TypeError(f"{behavior!r}: a synchronous stream handler on a grpc.aio server")

        # A coroutine: it writes with context.write (as health's Watch does), or returns
        # the answer of a stream-unary call.
        async def call(request, context):
            await self._enter(kind, context)
            try:
                return await behavior(request, context)
            finally:
                limit.release(kind)
        return call
