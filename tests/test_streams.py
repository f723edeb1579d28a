"""Open gRPC streams cannot starve unary calls, and are bounded (issue 12, point 3).

The control API's real gRPC server (``create_server``) on a free port, over a stub plane
with a unary pool of two threads and a bound of five streams per kind; and the real gRPC
gateway (``GatewayThread``) with no TorchServe behind it. The tests with real servers and
the defaults (200 Watch streams against a bound of 100, while Check, ListFineTuneJobs and a
prediction succeed) are in tests/test_control.py (the control API and the TorchServe
gateway) and tests/test_native.py (the native engine's port).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from service._gen import inference_pb2_grpc
from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.auth import ApiToken
from service.control.settings import ControlConfig
from service.control.api.servicer import create_server, stop_server
from service.grpc_streams import DEFAULT_MAX_OPEN_STREAMS, StreamLimit
from service.serving.settings import ServeSettings
from service.serving.torchserve.gateway import GatewayThread
from tests.helpers import HeldWatches, wait_for

pytestmark = pytest.mark.unit

TOKEN = ApiToken("streams-test-token-0123456789", "test")
LIMIT = 5


class _Plane:
    """ListFineTuneJobs answers at once; WatchFineTuneJob stays open, silent, until its
    client leaves."""

    def list_jobs(self, **kwargs):
        return [], ""

    def watch_job(self, job_id, *, skip_history=False, active=lambda: True):
        while active():
            time.sleep(0.02)
        return
        yield  # pragma: no cover


@pytest.fixture
def control():
    server, port = create_server(ControlConfig(port=0, max_workers=2, max_open_streams=LIMIT), _Plane(),
                                 token=TOKEN)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, f"127.0.0.1:{port}", channel, server._modelctl_streams[0]
    finally:
        channel.close()
        stop_server(server, grace_s=0.5)


def _never():
    """A request stream that sends nothing (for a minute: the test is over by then)."""
    threading.Event().wait(60)
    return
    yield  # pragma: no cover


def _unary_calls_answer(channel) -> None:
    """Check within 1 s, and a ModelControl call, on a server whose two unary threads are free."""
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(5):
        started = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 1
    pb_grpc.ModelControlStub(channel).ListFineTuneJobs(pb.ListFineTuneJobsRequest(), metadata=TOKEN.metadata(),
                                                       timeout=2)


def test_the_default_bound_is_the_same_for_every_server():
    assert ControlConfig().max_open_streams == ServeSettings().max_open_streams == DEFAULT_MAX_OPEN_STREAMS
    assert ControlConfig.from_env({"MODELCTL_MAX_OPEN_STREAMS": "7"}).max_open_streams == 7
    assert ServeSettings.from_env({"MODELCTL_MAX_OPEN_STREAMS": "7"}).max_open_streams == 7
    with pytest.raises(Exception, match="max_open_streams"):
        ControlConfig(max_open_streams=0)
    with pytest.raises(Exception, match="max_open_streams"):
        ServeSettings(max_open_streams=0)
    with pytest.raises(ValueError):
        StreamLimit(0)


def test_watch_streams_hold_no_unary_thread_and_are_bounded(control):
    server, target, channel, streams = control
    with HeldWatches(target, 40) as held:  # 20 times the unary threads
        held.settle(open_streams=LIMIT)
        assert streams.counts() == {"anonymous": LIMIT, "authenticated": 0}
        _unary_calls_answer(channel)
    wait_for(lambda: streams.counts()["anonymous"] == 0, 10, "the closed streams' places back")
    # The count went back: as many new streams as the bound are all accepted.
    with HeldWatches(target, LIMIT) as again:
        again.settle(open_streams=LIMIT)
        assert streams.counts()["anonymous"] == LIMIT


def test_idle_reflection_streams_use_their_own_threads(control):
    server, target, channel, streams = control
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    idle = [stub.ServerReflectionInfo(_never()) for _ in range(LIMIT + 3)]  # never send a request
    try:
        wait_for(lambda: sum(c.done() for c in idle) == 3, 10, "three refused reflection streams")
        assert {c.code() for c in idle if c.done()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert streams.counts()["anonymous"] == LIMIT
        _unary_calls_answer(channel)  # five threads held by streams, none of the two unary ones
    finally:
        for call in idle:
            call.cancel()
    wait_for(lambda: streams.counts()["anonymous"] == 0, 10, "the reflection streams' places back")


def test_the_tokens_streams_are_counted_apart_from_anonymous_ones(control):
    server, target, channel, streams = control
    stub = pb_grpc.ModelControlStub(channel)
    with HeldWatches(target, LIMIT + 5) as held:
        held.settle(open_streams=LIMIT)  # the anonymous kind is full
        watches = [stub.WatchFineTuneJob(pb.WatchFineTuneJobRequest(job_id=f"j{i}"), metadata=TOKEN.metadata())
                   for i in range(LIMIT + 1)]
        try:
            wait_for(lambda: sum(c.done() for c in watches) == 1, 10, "one refused WatchFineTuneJob")
            refused = next(c for c in watches if c.done())
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "authenticated streams" in refused.details()
            assert streams.counts() == {"anonymous": LIMIT, "authenticated": LIMIT}
            # Without the token: UNAUTHENTICATED, never counted, never a place taken.
            with pytest.raises(grpc.RpcError) as error:
                next(stub.WatchFineTuneJob(pb.WatchFineTuneJobRequest(job_id="x"), timeout=5))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            _unary_calls_answer(channel)
        finally:
            for call in watches:
                call.cancel()
    wait_for(lambda: streams.counts() == {"anonymous": 0, "authenticated": 0}, 10, "every place back")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_gateway_streams_are_bounded_per_kind():
    settings = ServeSettings(max_open_streams=LIMIT)
    gateway = GatewayThread(settings, "127.0.0.1:9", lambda: [], token=TOKEN, port=0, host="127.0.0.1")
    port = gateway.start()
    streams = gateway._server._modelctl_streams
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with HeldWatches(f"127.0.0.1:{port}", 4 * LIMIT) as held:
                held.settle(open_streams=LIMIT)
                assert streams.counts()["anonymous"] == LIMIT
                started = time.monotonic()
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                assert time.monotonic() - started < 1
                # A stream of the inference service without the token is refused by the
                # gateway, and takes no place.
                stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
                with pytest.raises(grpc.RpcError) as error:
                    next(stub.StreamPredictions2(_never(), timeout=5))
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert streams.counts()["authenticated"] == 0
            wait_for(lambda: streams.counts()["anonymous"] == 0, 10, "the gateway's places back")
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    finally:
        gateway.stop()
