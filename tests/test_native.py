"""The native engine (issue 11), as a client sees it: real servers on free ports, real clients.

One engine (``NativeServing``) serves four real archives written by the model store (an
image CNN with batching, a float-sequence LSTM, a text GRU with a vocabulary, a ResNet-18)
for the whole module. It is called with NVIDIA's ``tritonclient`` (OIP v2, REST with the
binary tensor extension and gRPC with ``raw_input_contents``; tests/oip_clients.py), with
``requests`` on TorchServe's ``/predictions`` routes and with TorchServe's own gRPC stub.
Every answer is compared with an in-process forward of the same weights (1e-4).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen import inference_pb2, inference_pb2_grpc
from service._gen.oip.v2 import open_inference_grpc_pb2 as pb
from service._gen.oip.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from service.inference import Predictor
from service.modelstore import ModelStore
from service.inference.options import ServingOptions
from service.serving.native import oip
from service.serving.native.engine import NativeServing
from tests import oip_clients
from tests.helpers import TEXTS, HeldWatches, make_bundle, random_image, wait_for
from tests.test_serving import settings_for

pytestmark = pytest.mark.native

BUNDLES = {"cnn": "cnn", "lstm": "lstm", "text": "gru-text", "resnet": "resnet"}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    store = ModelStore(root / "store")
    bundles = {}
    for name, kind in BUNDLES.items():
        bundles[name] = make_bundle(kind, seed=3)
        store.write(name, bundles[name], options=ServingOptions(batch_size=4, max_batch_delay_ms=2))
    settings = settings_for(root / "store", root / "state", engine="native", startup_timeout_s=120,
                            job_queue_size=4)
    engine = NativeServing(settings)
    report = engine.start()
    try:
        assert all(r.ready for r in report), report
        expected = {name: Predictor(b, "cpu", name=name, version="1") for name, b in bundles.items()}
        yield SimpleNamespace(engine=engine, settings=settings, token=engine.api_token.value, store=store,
                              rest=f"http://127.0.0.1:{engine.rest_port}", grpc=f"127.0.0.1:{engine.grpc_port}",
                              expected=expected, bundles=bundles)
    finally:
        engine.stop()


def _auth(native) -> dict:
    return {"Authorization": f"Bearer {native.token}"}


def _probs(predictor: Predictor, payload: dict, k: int = 5) -> list[list[tuple[int, float]]]:
    answer = predictor.predict([payload], [k]).outputs[0]
    return [[(e["index"], e["probability"]) for e in p["top_k"]] for p in answer["predictions"]]


def _same(got_classes, got_probs, expected) -> None:
    assert np.asarray(got_classes).tolist() == [[i for i, _ in row] for row in expected]
    np.testing.assert_allclose(np.asarray(got_probs), [[p for _, p in row] for row in expected], atol=1e-4)


IMAGES = [random_image(1, 16, 16, seed=s) for s in range(3)]
JPEGS = [random_image(3, 80, 70, fmt="jpeg", seed=s) for s in range(2)]


# ---- OIP v2 with tritonclient ----------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_health_and_metadata(native, protocol):
    make = oip_clients.http_client if protocol == "http" else oip_clients.grpc_client
    client = make(native.rest[len("http://"):] if protocol == "http" else native.grpc, native.token)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("cnn") and client.is_model_ready("cnn", "1")
        assert not client.is_model_ready("cnn", "9")
        meta = client.get_model_metadata("cnn")
        assert meta["name"] == "cnn" and meta["versions"] == ["1"]
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("images", "BYTES")]
        assert [t["name"] for t in meta["outputs"]] == ["labels", "probabilities", "classes"]
        seq = client.get_model_metadata("lstm")
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in seq["inputs"]] == [
            ("sequences", "FP32", [-1, -1, 8]), ("lengths", "INT64", [-1])]
        server = client.get_server_metadata()
        assert server["name"] == "modelctl" and "binary_tensor_data" in server["extensions"]
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_infers_images_and_sequences_like_in_process(native, protocol):
    make = oip_clients.http_client if protocol == "http" else oip_clients.grpc_client
    client = make(native.rest[len("http://"):] if protocol == "http" else native.grpc, native.token)
    try:
        result = oip_clients.infer_images(client, "cnn", IMAGES, top_k=3)
        expected = [_probs(native.expected["cnn"], {"x": img}, 3)[0] for img in IMAGES]
        _same(result.as_numpy("classes"), result.as_numpy("probabilities"), expected)
        labels = result.as_numpy("labels")
        assert labels.shape == (3, 3)
        assert [[b.decode() for b in row] for row in labels.tolist()] == [
            [native.bundles["cnn"].labels[i] for i, _ in row] for row in expected]

        result = oip_clients.infer_images(client, "resnet", JPEGS, version="1")
        expected = [_probs(native.expected["resnet"], {"x": img})[0] for img in JPEGS]
        _same(result.as_numpy("classes"), result.as_numpy("probabilities"), expected)

        seqs = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
        result = oip_clients.infer_fp32(client, "lstm", seqs, lengths=[6, 4], top_k=2)
        expected = _probs(native.expected["lstm"], {"s": [seqs[0].tolist(), seqs[1][:4].tolist()]}, 2)
        _same(result.as_numpy("classes"), result.as_numpy("probabilities"), expected)

        result = oip_clients.infer_texts(client, "text", TEXTS[:2])
        _same(result.as_numpy("classes"), result.as_numpy("probabilities"),
              _probs(native.expected["text"], {"t": TEXTS[:2]}))
    finally:
        client.close()


def test_tritonclient_errors_keep_their_status(native):
    from tritonclient.utils import InferenceServerException

    http = oip_clients.http_client(native.rest[len("http://"):], native.token)
    with pytest.raises(InferenceServerException) as err:
        oip_clients.infer_images(http, "nope", IMAGES[:1])
    assert "404" in str(err.value.status()) and "nope" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        oip_clients.infer_images(http, "cnn", [b"not an image"])
    assert "400" in str(err.value.status())
    with pytest.raises(InferenceServerException) as err:
        oip_clients.infer_images(oip_clients.http_client(native.rest[len("http://"):], None), "cnn", IMAGES[:1])
    assert "401" in str(err.value.status())
    with oip_clients.grpc_client(native.grpc, native.token) as client:
        with pytest.raises(InferenceServerException) as err:
            oip_clients.infer_images(client, "cnn", [b"not an image"])
        assert "INVALID_ARGUMENT" in str(err.value.status())
        with pytest.raises(InferenceServerException) as err:
            oip_clients.infer_images(client, "cnn", IMAGES[:1], version="7")
        assert "NOT_FOUND" in str(err.value.status())


# ---- OIP v2 REST by hand: JSON tensors, the binary extension, errors --------------------------------
def test_rest_json_tensors_and_named_binary_outputs(native):
    body = {"id": "r1", "parameters": {"top_k": 2},
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(img).decode() for img in IMAGES[:2]]}],
            "outputs": [{"name": "classes", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}
    r = requests.post(f"{native.rest}/v2/models/cnn/versions/1/infer", json=body, headers=_auth(native), timeout=30)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["id"] == "r1" and head["model_name"] == "cnn" and head["model_version"] == "1"
    assert [o["name"] for o in head["outputs"]] == ["classes", "probabilities"]
    classes = np.frombuffer(r.content[n:], dtype="<i8").reshape(2, 2)
    expected = [_probs(native.expected["cnn"], {"x": img}, 2)[0] for img in IMAGES[:2]]
    _same(classes, np.array(head["outputs"][1]["data"]).reshape(2, 2), expected)


def _binary_request(inputs: list[tuple[dict, bytes]], extra: dict | None = None) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{**d, "parameters": {"binary_data_size": len(raw)}} for d, raw in inputs],
                       **(extra or {})}).encode()
    return head + b"".join(raw for _, raw in inputs), {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("case,status,needle", [
    ("shape_disagrees", 400, "elements"),
    ("wrong_datatype", 400, "must be BYTES"),
    ("binary_over", 400, "beyond the body"),
    ("binary_under", 400, "after the last input"),
    ("header_beyond_body", 400, "beyond the body"),
    ("bytes_cut_short", 400, "declares"),
    ("huge_shape", 413, "elements"),
    ("unknown_output", 400, "unknown output"),
    ("bad_top_k", 400, "k must be between"),
])
def test_rest_oip_bad_input_is_4xx_with_an_error_body(native, case, status, needle):
    img = IMAGES[0]
    one = oip.to_raw(oip.Tensor("images", "BYTES", [1], [img]))
    images = {"name": "images", "datatype": "BYTES", "shape": [1]}
    headers = {}
    if case == "shape_disagrees":
        body = json.dumps({"inputs": [{"name": "lengths", "datatype": "INT64", "shape": [2], "data": [1]}]}).encode()
        url = "lstm"
    else:
        url = "cnn"
        if case == "wrong_datatype":
            body, headers = _binary_request([({**images, "datatype": "FP32", "shape": [1]}, b"\0" * 4)])
        elif case == "binary_over":
            head = json.dumps({"inputs": [{**images, "parameters": {"binary_data_size": len(one) + 10}}]}).encode()
            body, headers = head + one, {"Inference-Header-Content-Length": str(len(head))}
        elif case == "binary_under":
            body, headers = _binary_request([(images, one)])
            body += b"\0" * 7  # more data than the inputs declare
        elif case == "header_beyond_body":
            body, headers = _binary_request([(images, one)])
            headers = {"Inference-Header-Content-Length": str(len(body) + 5)}
        elif case == "bytes_cut_short":
            body, headers = _binary_request([(images, one[:-5])])
        elif case == "huge_shape":
            body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [10**6, 10**6],
                                           "data": []}]}).encode()
        elif case == "unknown_output":
            body, headers = _binary_request([(images, one)], {"outputs": [{"name": "logits"}]})
        elif case == "bad_top_k":
            body, headers = _binary_request([(images, one)], {"parameters": {"top_k": 0}})
    r = requests.post(f"{native.rest}/v2/models/{url}/infer", data=body,
                      headers={**_auth(native), **headers}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.text
    assert requests.get(f"{native.rest}/v2/health/ready", timeout=10).status_code == 200


def test_oip_grpc_typed_contents_and_raw_errors(native):
    md = [("authorization", f"Bearer {native.token}")]
    with grpc.insecure_channel(native.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        seqs = np.random.default_rng(1).normal(size=(1, 5, 8)).astype(np.float32)
        req = pb.ModelInferRequest(model_name="lstm")
        t = req.inputs.add(name="sequences", datatype="FP32", shape=[1, 5, 8])
        t.contents.fp32_contents.extend(seqs.reshape(-1).tolist())
        reply = stub.ModelInfer(req, metadata=md, timeout=30)
        classes = np.frombuffer(reply.raw_output_contents[2], dtype="<i8").reshape(1, -1)
        probs = np.frombuffer(reply.raw_output_contents[1], dtype="<f4").reshape(1, -1)
        _same(classes, probs, _probs(native.expected["lstm"], {"s": seqs.tolist()}))
        bad = pb.ModelInferRequest(model_name="lstm")
        bad.inputs.add(name="sequences", datatype="FP32", shape=[1, 5, 8])
        bad.raw_input_contents.append(b"\0" * 12)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 160" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name="ghost"), metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---- TorchServe's routes, the same answers ------------------------------------------------------------
def test_torchserve_routes_answer_like_the_torchserve_handler(native):
    img = JPEGS[0]
    expected = native.expected["resnet"].predict([{"body": img}], ["3"]).outputs[0]
    r = requests.post(f"{native.rest}/predictions/resnet", data=img, headers={**_auth(native), "X-Top-K": "3"},
                      timeout=30)
    assert r.status_code == 200, r.text
    # a declared length, not chunked: the whole answer goes out in one write
    assert int(r.headers["content-length"]) == len(r.content) and "transfer-encoding" not in r.headers
    got = r.json()
    assert got["model"] == "resnet" and got["version"] == "1"
    assert [e["index"] for e in got["predictions"][0]["top_k"]] == [e["index"] for e in expected["predictions"][0]["top_k"]]
    np.testing.assert_allclose([e["probability"] for e in got["predictions"][0]["top_k"]],
                               [e["probability"] for e in expected["predictions"][0]["top_k"]], atol=1e-4)
    # multipart fields, k as a field, a version in the path
    files = {"a": ("a", IMAGES[0], "image/png"), "b": ("b", IMAGES[1], "image/png"), "k": (None, "2")}
    r = requests.post(f"{native.rest}/predictions/cnn/1", files=files, headers=_auth(native), timeout=30)
    assert r.status_code == 200, r.text
    assert [p["input"] for p in r.json()["predictions"]] == ["a", "b"]
    assert all(len(p["top_k"]) == 2 for p in r.json()["predictions"])
    # a JSON body for a sequence model
    r = requests.post(f"{native.rest}/predictions/lstm", json={"inputs": [[0.1] * 8] * 3, "k": 1},
                      headers=_auth(native), timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 1
    # errors: TorchServe's body shape, our statuses
    r = requests.post(f"{native.rest}/predictions/cnn", data=b"junk", headers=_auth(native), timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidInput"
    assert int(r.headers["content-length"]) == len(r.content)
    r = requests.post(f"{native.rest}/predictions/ghost", data=b"junk", headers=_auth(native), timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"code", "type", "message"}
    r = requests.post(f"{native.rest}/predictions/cnn", data=b"x" * (native.settings.max_request_size_bytes + 1),
                      headers=_auth(native), timeout=60)
    assert r.status_code == 413
    with grpc.insecure_channel(native.grpc) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        md = [("authorization", f"Bearer {native.token}")]
        reply = stub.Predictions(inference_pb2.PredictionsRequest(model_name="resnet", input={"data": img, "k": b"3"}),
                                 metadata=md, timeout=30)
        assert json.loads(reply.prediction)["predictions"][0]["top_k"] == got["predictions"][0]["top_k"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Predictions(inference_pb2.PredictionsRequest(model_name="cnn", input={"data": b"junk"}),
                             metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- the token ----------------------------------------------------------------------------------------
def test_every_route_but_health_wants_the_token(native):
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert requests.get(native.rest + path, timeout=10).status_code == 200
    for method, path in [("GET", "/v2"), ("GET", "/v2/models/cnn"), ("GET", "/v2/models/cnn/ready"),
                         ("GET", "/v2/models/cnn/versions/1"), ("POST", "/v2/models/cnn/infer"),
                         ("POST", "/predictions/cnn"), ("GET", "/ping"), ("GET", "/nothing/here")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
            r = requests.request(method, native.rest + path, data=b"{}", headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers.get("www-authenticate") == "Bearer"
    with grpc.insecure_channel(native.grpc) as channel:
        oip_stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ts_stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        calls = [lambda md: oip_stub.ServerLive(pb.ServerLiveRequest(), metadata=md),
                 lambda md: oip_stub.ModelMetadata(pb.ModelMetadataRequest(name="cnn"), metadata=md),
                 lambda md: oip_stub.ModelInfer(pb.ModelInferRequest(model_name="cnn"), metadata=md),
                 lambda md: ts_stub.Predictions(inference_pb2.PredictionsRequest(model_name="cnn"), metadata=md),
                 lambda md: list(ts_stub.StreamPredictions(inference_pb2.PredictionsRequest(model_name="cnn"),
                                                           metadata=md))]
        for call in calls:
            for md in ((), (("authorization", "Bearer nope-nope-nope-nope"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="cnn/1"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


# ---- admission ---------------------------------------------------------------------------------------
def _hold_device(native) -> threading.Event:
    """Block the device thread (a control task that waits) so that requests stay queued."""
    release = threading.Event()
    entered = threading.Event()

    def hold():
        entered.set()
        release.wait(60)

    native.engine.models.runners[0].call(hold)
    assert entered.wait(10)
    return release


def test_a_full_queue_is_429_and_resource_exhausted_with_a_retry_after(native):
    release = _hold_device(native)
    url = f"{native.rest}/predictions/cnn"
    results: list = []

    def send():
        results.append(requests.post(url, data=IMAGES[0], headers=_auth(native), timeout=60).status_code)

    try:
        senders = [threading.Thread(target=send) for _ in range(native.settings.job_queue_size)]
        for t in senders:
            t.start()
        lane = native.engine.models.get("cnn").lane
        deadline = time.monotonic() + 20
        while lane.in_flight < native.settings.job_queue_size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lane.in_flight == native.settings.job_queue_size
        r = requests.post(url, data=IMAGES[0], headers=_auth(native), timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == str(native.settings.retry_after_s)
        assert "job_queue_size" in r.json()["message"]
        with grpc.insecure_channel(native.grpc) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predictions(inference_pb2.PredictionsRequest(model_name="cnn", input={"data": IMAGES[0]}),
                                 metadata=[("authorization", f"Bearer {native.token}")], timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(err.value.trailing_metadata())["retry-after"] == str(native.settings.retry_after_s)
        # Another model is not held back by this one's queue (only by the device).
        assert native.engine.models.get("lstm").lane.in_flight == 0
    finally:
        release.set()
    for t in senders:
        t.join(30)
    assert results == [200] * native.settings.job_queue_size
    assert native.engine.models.get("cnn").lane.in_flight == 0
    assert native.engine.plane.bytes_in_flight == 0


def test_the_byte_budget_refuses_what_does_not_fit(native):
    plane = native.engine.plane
    budget = plane.byte_budget
    assert budget == native.settings.inflight_bytes_budget
    held = plane.reserve_bytes(budget - 1000)  # as if large bodies were queued
    try:
        r = requests.post(f"{native.rest}/predictions/cnn", data=IMAGES[0] + b"\0" * 2000, headers=_auth(native),
                          timeout=10)
        assert r.status_code == 429 and "max_inflight_bytes" in r.json()["message"]
        r = requests.post(f"{native.rest}/predictions/cnn", data=IMAGES[0], headers=_auth(native), timeout=10)
        assert r.status_code == 200, r.text  # a small one still fits
    finally:
        held.release()
    assert plane.bytes_in_flight == 0


# ---- readiness means warmed up -----------------------------------------------------------------------
def test_a_version_is_ready_only_after_its_warm_up_ran_on_its_device(native, monkeypatch):
    started, release = threading.Event(), threading.Event()
    seen = {}
    real = Predictor.warm_up

    def slow_warm_up(self, sizes=(1,)):
        seen["thread"] = threading.current_thread().name
        started.set()
        release.wait(60)
        return real(self, sizes)

    monkeypatch.setattr(Predictor, "warm_up", slow_warm_up)
    native.store.write("cnn", make_bundle("cnn", seed=9), keep_default=True)
    native.engine.models.register(str(native.store.path("cnn", 2)), initial_workers=1)
    try:
        assert started.wait(30)
        r = requests.get(f"{native.rest}/v2/models/cnn/versions/2/ready", headers=_auth(native), timeout=10)
        assert r.status_code == 503 and r.json() == {"name": "cnn", "ready": False}
        assert requests.get(f"{native.rest}/v2/health/ready", timeout=10).status_code == 503
        r = requests.post(f"{native.rest}/predictions/cnn/2", data=IMAGES[0], headers=_auth(native), timeout=10)
        assert r.status_code == 503
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while not native.engine.models.get("cnn", "2").ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen["thread"] == "modelctl-torch-cpu"
    r = requests.get(f"{native.rest}/v2/models/cnn/versions/2/ready", headers=_auth(native), timeout=10)
    assert r.status_code == 200
    r = requests.post(f"{native.rest}/predictions/cnn/2", data=IMAGES[0], headers=_auth(native), timeout=10)
    assert r.status_code == 200 and r.json()["version"] == "2"
    assert native.engine.models.default_of("cnn") == "1"  # registering does not switch the default
    native.engine.models.unregister("cnn", "2")


def test_metrics_carry_the_engine_label(native):
    text = requests.get(f"http://127.0.0.1:{native.settings.exporter_port}/metrics", timeout=10).text
    assert 'modelctl_requests_total{engine="native",model="cnn",outcome="ok",version="1"}' in text
    assert 'modelctl_request_latency_seconds_count{engine="native",model="resnet",stage="inference",version="1"}' in text
    assert 'modelctl_queue_depth{model="cnn",version="1"}' in text


def test_torch_runs_on_the_device_thread_only(native):
    """The I/O thread never ran torch: its intra-op pool was never created there."""
    got = native.engine.models.runners[0].call(torch.get_num_threads).result(10)
    assert got == native.engine.models.runners[0].threads


def test_not_ready_until_start_up_registered_the_whole_store(native):
    """During start-up, versions registered so far may all be READY while others of the store
    are not registered yet: the replica is not ready then (a probe must not send traffic)."""
    plane = native.engine.plane
    assert requests.get(f"{native.rest}/v2/health/ready", timeout=10).status_code == 200
    plane.starting = True
    try:
        assert requests.get(f"{native.rest}/v2/health/ready", timeout=10).status_code == 503
        assert requests.get(f"{native.rest}/v2/health/live", timeout=10).status_code == 200
        native.engine.expected.append(("not-yet", 1))
        report = {r.key: r for r in native.engine.readiness()}
        assert not report[("not-yet", "1")].ready and report[("not-yet", "1")].reason == "not registered yet"
    finally:
        plane.starting = False
        native.engine.expected.remove(("not-yet", 1))
    assert requests.get(f"{native.rest}/v2/health/ready", timeout=10).status_code == 200


# ---- open streams (issue 12, point 3) -------------------------------------------------------------
def test_open_watch_streams_starve_nothing_on_the_grpc_port(native):
    """200 health Watch streams without a token, never read: Check answers within 1 s and a
    prediction succeeds; the streams beyond the bound (MODELCTL_MAX_OPEN_STREAMS, 100) are
    RESOURCE_EXHAUSTED; once they close, as many new streams as the bound open again."""
    limit = native.settings.max_open_streams
    assert limit == 100
    md = [("authorization", f"Bearer {native.token}")]
    with HeldWatches(native.grpc, 200) as held:
        held.settle(open_streams=limit)
        with grpc.insecure_channel(native.grpc) as channel:
            for _ in range(3):
                started = time.monotonic()
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1
            reply = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                inference_pb2.PredictionsRequest(model_name="cnn", input={"data": IMAGES[0]}), metadata=md, timeout=30)
            assert json.loads(reply.prediction)["predictions"][0]["top_k"]
        assert len(held.calls) - len(held.refused()) == limit
    streams = native.engine._grpc._modelctl_streams
    wait_for(lambda: streams.counts()["anonymous"] == 0, 10, "the closed streams' places back")
    with HeldWatches(native.grpc, limit) as again:
        again.settle(open_streams=limit)


def test_deep_json_is_refused_whatever_the_recursion_limit(native):
    """Python's JSON reader refuses deep nesting only past the process's recursion limit, which
    torch.compile raises: the engine bounds the depth itself (make test found a 1500-deep
    ``parameters`` answered 200 after a compile had raised the limit)."""
    import sys

    body = ('{"inputs": [{"name": "sequences", "datatype": "FP32", "shape": [1, 1, 8], "data": [0, 0, 0, 0, 0, 0, 0, 0]}],'
            ' "parameters": ' + '{"a":' * 1500 + '1' + '}' * 1500 + '}')
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 20000))
    try:
        r = requests.post(f"{native.rest}/v2/models/lstm/infer", data=body, headers=_auth(native), timeout=30)
    finally:
        sys.setrecursionlimit(before)
    assert r.status_code == 400 and "nested deeper than" in r.json()["error"], r.text
