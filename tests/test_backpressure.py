"""Backpressure and callers that leave (issue 7, points 5a and 5b), against one real
TorchServe behind the real nginx proxy and the real gRPC gateway.

5a: a model with more requests than its share of TorchServe's job queue answers
429 + ``Retry-After`` (REST) / RESOURCE_EXHAUSTED + ``retry-after`` and
``grpc-retry-pushback-ms`` (gRPC), never 503; a model without workers answers 503 /
UNAVAILABLE. TorchServe 0.12 itself answers both cases with the same 503 "has no worker"
(shown here on its loopback port), which is why the limit is held by the proxy and the
gateway (service/serving/torchserve/proxy.py, gateway.py).

5b: gRPC calls cancelled by their client, a client process SIGKILLed with calls in flight,
and a REST client that resets its connection: afterwards the gateway and TorchServe are
healthy, the next requests succeed, and every place and upstream task is given back.

The model is a real modelctl archive (a small CNN, batch size 1, one worker);
``job_queue_size`` is 4, so each public endpoint lets 2 requests of a model through at
once. The slow path is a stalled worker: its process is SIGSTOPped while a test's requests
arrive and SIGCONTed afterwards, so what is queued, refused and answered does not depend
on timing. Nothing is faked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen import inference_pb2, inference_pb2_grpc
from service.modelstore import ModelStore
from service.inference.options import ServingOptions
from service.deploy import readiness
from service.deploy.store_scan import link_archive
from service.serving.torchserve.supervisor import Serving
from tests.helpers import make_bundle, random_image
from tests.test_serving import eventually, settings_for

pytestmark = pytest.mark.torchserve

QUEUE = 4  # TorchServe's job_queue_size: 2 requests per model through each endpoint
ADMIT = QUEUE // 2
RETRY_AFTER = 2
IMAGE = random_image(1, 16, 16, seed=3)


# -- one real TorchServe ------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    root = tmp_path_factory.mktemp("backpressure")
    store = ModelStore(root / "store")
    store.write("slow", make_bundle("cnn"), options=ServingOptions(batch_size=1, max_batch_delay_ms=1))
    # sync_interval_s: no converge pass during the module (a test registers a model by hand).
    settings = settings_for(store.root, root / "state", startup_timeout_s=90, job_queue_size=QUEUE,
                            retry_after_s=RETRY_AFTER, sync_interval_s=3600)
    sv = Serving(settings)
    sv.start()
    sv.baseline = {"worker_pids": _slow_pids(sv), "torchserve": sv.torchserve.pid,
                   "nginx": {sv.torchserve.proxy.pid, *sv.torchserve.proxy.workers()},
                   "tasks": sv.gateway.load()["tasks"]}
    assert len(sv.baseline["worker_pids"]) == 1
    yield sv
    sv.stop()


@pytest.fixture(scope="module")
def channel(serving):
    ch = grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}")
    yield ch
    ch.close()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(16) as p:
        yield p


def _slow_pids(serving) -> tuple[int, ...]:
    return next(r.pids for r in readiness.check(serving.mgmt) if r.name == "slow" and r.ready)


@contextlib.contextmanager
def stalled(serving):
    """The model's one worker stopped (SIGSTOP) inside the block, going on (SIGCONT) after
    it: what TorchServe hands it meanwhile waits, and the rest waits in TorchServe's queue."""
    (pid,) = serving.baseline["worker_pids"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def _md(serving):
    return list(serving.api_token.metadata())


def _rest(serving, model="slow", base=None, token=None):
    base = base or serving.torchserve.inference_url
    return requests.post(f"{base}/predictions/{model}", data=IMAGE, timeout=60,
                         headers={"Authorization": f"Bearer {token or serving.api_token.value}",
                                  "Content-Type": "image/png"})


def _request(model="slow"):
    return inference_pb2.PredictionsRequest(model_name=model, input={"x": IMAGE})


def _together(n, fn):
    """``fn(i)`` in ``n`` threads released at the same moment; their results in order."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as p:
        return list(p.map(run, range(n)))


def _outcome(future):
    try:
        return grpc.StatusCode.OK, json.loads(future.result().prediction), {}
    except grpc.RpcError as e:
        return e.code(), e.details(), dict(e.trailing_metadata() or ())


def _done(futures, n, timeout_s=30.0) -> list:
    """Wait until ``n`` of ``futures`` are done; the done ones (fails if more finish)."""
    assert eventually(lambda: sum(f.done() for f in futures) >= n, timeout_s=timeout_s, poll_s=0.05), \
        f"only {sum(f.done() for f in futures)} of {len(futures)} answered, {n} expected"
    done = [f for f in futures if f.done()]
    assert len(done) == n, f"{len(done)} answered, {n} expected"
    return done


def _assert_ok_rest(r):
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.json()["model"] == "slow" and len(r.json()["predictions"]) == 1


def _assert_ok_grpc(outcome):
    assert outcome[0] == grpc.StatusCode.OK, outcome
    assert outcome[1]["model"] == "slow" and len(outcome[1]["predictions"]) == 1


def _assert_busy_rest(r):
    assert r.status_code == 429, (r.status_code, r.text)
    assert r.headers["Retry-After"] == str(RETRY_AFTER)
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["code"] == 429 and body["type"] == "ResourceExhausted", body
    assert f"more than {ADMIT}" in body["message"], body


def _assert_busy_grpc(outcome):
    code, details, trailers = outcome
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert "'slow'" in details and f"more than {ADMIT}" in details, details
    assert trailers.get("retry-after") == str(RETRY_AFTER), trailers
    assert trailers.get("grpc-retry-pushback-ms") == str(RETRY_AFTER * 1000), trailers


def _assert_healthy(serving, channel):
    """Nothing stuck, leaked or restarted; the next requests over both endpoints succeed,
    and each endpoint lets its whole share through again."""
    assert eventually(lambda: serving.gateway.load()["upstream"] == 0, timeout_s=30), serving.gateway.load()
    load = serving.gateway.load()
    assert load["admitted"] == {} and load["tasks"] <= serving.baseline["tasks"], (load, serving.baseline)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    assert "Healthy" in stub.Ping(empty_pb2.Empty(), metadata=_md(serving), timeout=30).health
    assert _slow_pids(serving) == serving.baseline["worker_pids"]  # no worker restarted
    assert serving.torchserve.pid == serving.baseline["torchserve"] and serving.torchserve.running()
    proxy = serving.torchserve.proxy
    assert {proxy.pid, *proxy.workers()} == serving.baseline["nginx"]
    for r in _together(ADMIT, lambda i: _rest(serving)):
        _assert_ok_rest(r)
    futures = [stub.Predictions.future(_request(), metadata=_md(serving), timeout=60) for _ in range(ADMIT)]
    for f in futures:
        _assert_ok_grpc(_outcome(f))


def _requests_seen(serving) -> float:
    """TorchServe's count of inference requests for ``slow`` (its Prometheus metrics)."""
    text = requests.get(f"{serving.torchserve.metrics_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ts_inference_requests_total{") and 'model_name="slow"' in line)


# -- 5a: a full queue -----------------------------------------------------------------------


def test_torchserve_answers_a_full_queue_as_if_it_had_no_worker(serving, pool):
    """Why the proxy and the gateway hold the limit: on its own loopback port, TorchServe
    answers a full queue of a model with a READY worker and a model without any worker
    with the same 503 and message."""
    s = serving.settings
    key = serving.torchserve.tokens.inference
    direct = serving.torchserve.ts_inference_url
    with stalled(serving):
        futures = [pool.submit(_rest, serving, base=direct, token=key) for _ in range(8)]
        # 1 handed to the worker and QUEUE waiting; or QUEUE waiting, when the worker had
        # not taken the first one yet when the queue filled.
        assert eventually(lambda: sum(f.done() for f in futures) >= 3, timeout_s=30, poll_s=0.05)
        full = [f.result() for f in futures if f.done()]
    answers = [f.result() for f in futures]
    assert len(full) in (3, 4) and sorted(r.status_code for r in answers) == \
        [200] * (8 - len(full)) + [503] * len(full), [(r.status_code, r.text) for r in answers]
    message = full[0].json()["message"]
    assert message.startswith('Model "slow" has no worker to serve inference request'), message
    assert _slow_pids(serving) == serving.baseline["worker_pids"]  # its worker READY throughout

    ModelStore(s.model_store).write("idle", make_bundle("cnn", seed=1),
                                    options=ServingOptions(batch_size=1, max_batch_delay_ms=1))
    serving.mgmt.register(link_archive(s, "idle", 1), initial_workers=0, synchronous=True)
    try:
        none = _rest(serving, model="idle", base=direct, token=key)
        assert none.status_code == 503 and none.json()["message"] == message.replace('"slow"', '"idle"')
        # Through the proxy and the gateway: no worker is 503 / UNAVAILABLE, no retry-after.
        r = _rest(serving, model="idle")
        assert r.status_code == 503 and "Retry-After" not in r.headers, r.text
        assert r.json()["message"] == none.json()["message"]
        with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                inference_pb2_grpc.InferenceAPIsServiceStub(ch).Predictions(
                    _request("idle"), metadata=_md(serving), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert e.value.details().startswith('Model "idle" has no worker') and "\n" not in e.value.details()
        assert "retry-after" not in dict(e.value.trailing_metadata() or ())
    finally:
        serving.mgmt.unregister("idle", 1)


def test_rest_full_queue_is_429_with_retry_after(serving, channel, pool):
    with stalled(serving):
        futures = [pool.submit(_rest, serving) for _ in range(8)]
        for f in _done(futures, 8 - ADMIT):  # refused at once, not queued
            _assert_busy_rest(f.result())
    admitted = [f.result() for f in futures if f.result().status_code != 429]
    assert len(admitted) == ADMIT
    for r in admitted:
        _assert_ok_rest(r)
    _assert_healthy(serving, channel)


def test_grpc_full_queue_is_resource_exhausted_with_retry_metadata(serving, channel):
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    with stalled(serving):
        futures = [stub.Predictions.future(_request(), metadata=_md(serving), timeout=60) for _ in range(8)]
        for f in _done(futures, 8 - ADMIT):
            _assert_busy_grpc(_outcome(f))
        assert serving.gateway.load()["admitted"] == {"slow": ADMIT}
    admitted = [_outcome(f) for f in futures if _outcome(f)[0] != grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(admitted) == ADMIT
    for o in admitted:
        _assert_ok_grpc(o)

    # A stream is a call of its model too: refused the same way when the share is taken.
    with stalled(serving):
        futures = [stub.Predictions.future(_request(), metadata=_md(serving), timeout=60) for _ in range(ADMIT)]
        assert eventually(lambda: serving.gateway.load()["upstream"] == ADMIT, timeout_s=10)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamPredictions(_request(), metadata=_md(serving), timeout=30))
        _assert_busy_grpc((e.value.code(), e.value.details(), dict(e.value.trailing_metadata())))
    for f in futures:
        _assert_ok_grpc(_outcome(f))
    _assert_healthy(serving, channel)


def test_both_endpoints_at_once_never_overflow_torchserve(serving, channel, pool):
    """REST and gRPC together get their two shares, QUEUE in all: TorchServe's queue (1 in
    the stalled worker, 3 waiting) never overflows into its 503."""
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    with stalled(serving):
        rest = [pool.submit(_rest, serving) for _ in range(6)]
        calls = [stub.Predictions.future(_request(), metadata=_md(serving), timeout=60) for _ in range(6)]
        for f in _done(rest, 6 - ADMIT):
            _assert_busy_rest(f.result())
        for f in _done(calls, 6 - ADMIT):
            _assert_busy_grpc(_outcome(f))
        entry = serving.mgmt.describe("slow")[0]
        assert entry["jobQueueStatus"]["pendingRequests"] in (QUEUE - 1, QUEUE), entry["jobQueueStatus"]
    for f in rest:
        if f.result().status_code != 429:
            _assert_ok_rest(f.result())
    for f in calls:
        if _outcome(f)[0] != grpc.StatusCode.RESOURCE_EXHAUSTED:
            _assert_ok_grpc(_outcome(f))
    assert sum(f.result().status_code == 200 for f in rest) == ADMIT
    assert sum(_outcome(f)[0] == grpc.StatusCode.OK for f in calls) == ADMIT
    _assert_healthy(serving, channel)


# -- 5b: callers that leave mid-request -------------------------------------------------------


def test_cancelled_grpc_calls_leave_the_server_healthy(serving, channel):
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    with stalled(serving):
        short = stub.Predictions.future(_request(), metadata=_md(serving), timeout=1.5)
        futures = [stub.Predictions.future(_request(), metadata=_md(serving), timeout=60)
                   for _ in range(ADMIT - 1)]
        assert eventually(lambda: serving.gateway.load()["upstream"] == ADMIT, timeout_s=10)
        assert _outcome(short)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        # Its job still waits in TorchServe: its place stays taken (watched for a second).
        assert not eventually(lambda: serving.gateway.load()["admitted"] != {"slow": ADMIT},
                              timeout_s=1.0, poll_s=0.05)
        for f in futures:
            assert f.cancel()
        for f in futures:
            assert f.cancelled()
            with pytest.raises(grpc.FutureCancelledError):
                f.result()
        # TorchServe runs the cancelled jobs all the same: their places stay taken until
        # it has answered them.
        load = serving.gateway.load()
        assert load["admitted"] == {"slow": ADMIT} and load["upstream"] == ADMIT, load
        _assert_busy_grpc(_outcome(stub.Predictions.future(_request(), metadata=_md(serving), timeout=30)))
    _assert_healthy(serving, channel)


KILLED_CLIENT = """
import os, sys, time
import grpc
from service._gen import inference_pb2, inference_pb2_grpc

channel = grpc.insecure_channel(sys.argv[1])
stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
metadata = [("authorization", "Bearer " + os.environ["BACKPRESSURE_TOKEN"])]
request = inference_pb2.PredictionsRequest(model_name="slow", input={"x": open(sys.argv[2], "rb").read()})
calls = [stub.Predictions.future(request, metadata=metadata, timeout=60) for _ in range(int(sys.argv[3]))]
print("sent", flush=True)
time.sleep(600)
"""


def test_a_killed_grpc_client_leaves_the_server_healthy(serving, channel, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(IMAGE)
    env = dict(os.environ, BACKPRESSURE_TOKEN=serving.api_token.value,
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with stalled(serving):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, f"127.0.0.1:{serving.grpc_port}",
                                 str(image), str(ADMIT)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
            assert eventually(lambda: serving.gateway.load()["upstream"] == ADMIT, timeout_s=15), \
                serving.gateway.load()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            assert serving.gateway.load()["admitted"] == {"slow": ADMIT}  # until TorchServe answers
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    _assert_healthy(serving, channel)


def test_a_rest_client_that_disconnects_leaves_the_server_healthy(serving, channel, pool):
    head = (f"POST /predictions/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {serving.api_token.value}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(IMAGE)}\r\n\r\n").encode()
    with stalled(serving):
        seen = _requests_seen(serving)
        sock = socket.create_connection(("127.0.0.1", serving.settings.inference_port), timeout=10)
        sock.sendall(head + IMAGE)
        assert eventually(lambda: _requests_seen(serving) == seen + 1, timeout_s=10)  # TorchServe has it
        # Gone without a word: a reset, not a close.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        # Its job still waits for the worker, so it keeps its place: one more gets through.
        futures = [pool.submit(_rest, serving) for _ in range(ADMIT)]
        for f in _done(futures, ADMIT - 1):
            _assert_busy_rest(f.result())
    for f in futures:
        if f.result().status_code != 429:
            _assert_ok_rest(f.result())
    _assert_healthy(serving, channel)


def test_a_stream_of_a_modelctl_model_is_its_one_answer(serving, channel):
    """StreamPredictions of our handler's model: one message, the same answer as Predictions,
    and the worker lives on. (Forwarded as TorchServe 0.12's own StreamPredictions, it made
    the frontend throw a NullPointerException in GRPCJob.response and killed the worker.)"""
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    unary = stub.Predictions(_request(), metadata=_md(serving), timeout=60)
    for _ in range(3):
        chunks = list(stub.StreamPredictions(_request(), metadata=_md(serving), timeout=60))
        assert len(chunks) == 1
        assert json.loads(chunks[0].prediction) == json.loads(unary.prediction)
    _assert_healthy(serving, channel)
