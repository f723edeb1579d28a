"""The one gRPC server assembly (service/grpc_server.py), on real servers on free ports.

Each test runs on both kinds of server the service has: a synchronous one (the control
API's) and a grpc.aio one (the gateway's, the native engine's), over a small raw-bytes
service ``test.Echo`` whose methods echo, fail or stream. The servers of the three APIs are
tested through their own modules (test_auth.py, test_streams.py, test_native.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service import grpc_server
from service.auth import INVALID_MESSAGE, MISSING_MESSAGE, ApiToken
from service.errors import InvalidSpec, NotFound, ResourceExhausted, Unavailable, from_body

pytestmark = pytest.mark.unit

TOKEN = ApiToken("grpc-server-test-token-0123456789", "test")
SERVICE = "test.Echo"
KINDS = ("sync", "aio")


def _spec(**kw) -> grpc_server.ServerSpec:
    return grpc_server.ServerSpec("test server", (SERVICE,), TOKEN, max_open_streams=4, retry_after_s=3, **kw)


def _strict(data: bytes) -> bytes:
    if data == b"garbage":
        raise ValueError("not a message")
    return data


def _echo_handler(kind: str):
    """``test.Echo``: Say echoes its request, Fail raises the exception its request names,
    Count streams its request's bytes one by one."""
    failures = {b"not-found": NotFound("no such thing"), b"busy": ResourceExhausted("queue full"),
                b"bug": RuntimeError("secret detail")}
    if kind == "sync":
        def say(request, context):
            return request

        def fail(request, context):
            raise failures[request]

        def count(request, context):
            for b in request:
                yield bytes([b])
    else:
        async def say(request, context):
            return request

        async def fail(request, context):
            raise failures[request]

        async def count(request, context):
            for b in request:
                yield bytes([b])
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Say": grpc.unary_unary_rpc_method_handler(say, request_deserializer=_strict),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    })


@contextlib.contextmanager
def _serving(kind: str, spec: grpc_server.ServerSpec):
    """The assembled server of ``kind`` on a free port, serving; yields its target."""
    if kind == "sync":
        server, _, pool = grpc_server.sync_server(spec, max_workers=2, thread_name_prefix="test-grpc")
        server.add_generic_rpc_handlers((_echo_handler(kind),))
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        grpc_server.serve_health_and_reflection(server, spec, health_servicer)
        port = grpc_server.bind(server, spec, "127.0.0.1", 0)
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(0).wait()
            pool.shutdown(wait=False)
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server, _ = grpc_server.aio_server(spec)
        server.add_generic_rpc_handlers((_echo_handler(kind),))
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        grpc_server.serve_health_and_reflection(server, spec, health_servicer)
        port = grpc_server.bind(server, spec, "127.0.0.1", 0)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.mark.parametrize("kind", KINDS)
def test_health_and_reflection_answer_without_a_token(kind):
    with _serving(kind, _spec()) as target, grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        listed = {s.name for s in next(answers).list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


@pytest.mark.parametrize("kind", KINDS)
def test_every_other_call_needs_the_token(kind):
    with _serving(kind, _spec()) as target, grpc.insecure_channel(target) as channel:
        say, count = channel.unary_unary(f"/{SERVICE}/Say"), channel.unary_stream(f"/{SERVICE}/Count")
        for metadata, message in (((), MISSING_MESSAGE),
                                  ((("authorization", "Bearer wrong-token-0123456789"),), INVALID_MESSAGE),
                                  ((("authorization", TOKEN.value),), INVALID_MESSAGE)):
            for call in (lambda md=metadata: say(b"hi", metadata=md, timeout=10),
                         lambda md=metadata: list(count(b"hi", metadata=md, timeout=10))):
                error = _rpc_error(call)
                assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
        # An unparseable request without the token is refused for the token: it is never parsed.
        error = _rpc_error(lambda: say(b"garbage", timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert say(b"hi", metadata=TOKEN.metadata(), timeout=10) == b"hi"
        assert list(count(b"ab", metadata=TOKEN.metadata(), timeout=10)) == [b"a", b"b"]


@pytest.mark.parametrize("kind", KINDS)
def test_errors_become_their_statuses(kind):
    with _serving(kind, _spec()) as target, grpc.insecure_channel(target) as channel:
        fail = channel.unary_unary(f"/{SERVICE}/Fail")
        error = _rpc_error(lambda: fail(b"not-found", metadata=TOKEN.metadata(), timeout=10))
        assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "no such thing")
        error = _rpc_error(lambda: fail(b"busy", metadata=TOKEN.metadata(), timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(error.trailing_metadata())["retry-after"] == "3"
        error = _rpc_error(lambda: fail(b"bug", metadata=TOKEN.metadata(), timeout=10))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error (RuntimeError); see the test server's log"


@pytest.mark.parametrize("kind", KINDS)
def test_an_unparseable_request_is_invalid_argument_when_lenient(kind):
    with _serving(kind, _spec(lenient_requests=True)) as target, grpc.insecure_channel(target) as channel:
        say = channel.unary_unary(f"/{SERVICE}/Say")
        error = _rpc_error(lambda: say(b"garbage", metadata=TOKEN.metadata(), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message (ValueError: not a message)" in error.details()
        assert say(b"hi", metadata=TOKEN.metadata(), timeout=10) == b"hi"


@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_port_fails_clearly(kind):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    spec = _spec()
    try:
        if kind == "sync":
            server, _, pool = grpc_server.sync_server(spec, max_workers=1, thread_name_prefix="test-grpc")
            with pytest.raises(Unavailable, match=f"cannot bind the test server to 127.0.0.1:{port}"):
                grpc_server.bind(server, spec, "127.0.0.1", port)
            pool.shutdown()
        else:
            async def bind():
                server, _ = grpc_server.aio_server(spec)
                grpc_server.bind(server, spec, "127.0.0.1", port)

            with pytest.raises(Unavailable, match=f"cannot bind the test server to 127.0.0.1:{port}"):
                asyncio.run(bind())
    finally:
        taken.close()


def test_options_and_addresses():
    assert grpc_server.server_options() == [("grpc.so_reuseport", 0)]
    assert grpc_server.server_options(1024) == [("grpc.max_send_message_length", 1024),
                                                ("grpc.max_receive_message_length", 1024),
                                                ("grpc.so_reuseport", 0)]
    assert grpc_server.address("::", 7) == "[::]:7"
    assert grpc_server.address("[::1]", 7) == "[::1]:7"
    assert grpc_server.address("0.0.0.0", 7) == "0.0.0.0:7"
    with pytest.raises(TypeError):
        grpc_server.AuthInterceptor("a token as a string")


def test_an_error_body_is_its_named_error_by_type():
    err = from_body({"code": 500, "type": "InvalidSpec", "message": "model.family: unknown"})
    assert isinstance(err, InvalidSpec) and err.grpc_code == "INVALID_ARGUMENT"
    assert err.message == "model.family: unknown" and err.http_status == 400
    unknown = from_body({"code": 404, "type": "SomethingElse", "message": "m"})
    assert (unknown.type, unknown.grpc_code, unknown.message) == ("ServiceError", "INTERNAL", "m")
