"""Every family archived, served by each engine, and predicted over REST and gRPC.

Each engine in turn (the module's fixture is parametrized): a real TorchServe with the real
gRPC gateway, then the native engine, on free ports, on archives written by the real model
store. The same tests, the same answers and statuses. Nothing is faked.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
import torch
from torchvision.io import ImageReadMode, decode_image

from service.predict_client import PredictionClient, read_token
from service.models import image_eval_transform, load_model
from service.modelstore import ModelStore
from service.inference.options import ServingOptions
from service.serving.settings import ServeSettings
from service.deploy.store_scan import refused_archives
from service.serving.engines import serving_class
from tests.helpers import TEXTS, broken_archive_copy, engine_params, free_port, make_bundle, random_image

MODELS = {"resnet": "t-resnet", "mobilenet": "t-mobilenet", "cnn": "t-cnn", "lstm": "t-lstm", "gru-text": "t-text"}


@pytest.fixture(scope="module", params=engine_params("torchserve", "native"))
def served(tmp_path_factory, request):
    engine = request.param
    root = tmp_path_factory.mktemp(f"e2e-{engine}")
    store = ModelStore(root / "store")
    bundles = {kind: make_bundle(kind) for kind in MODELS}
    for kind, name in MODELS.items():
        # TorchServe batching on: up to 4 requests per batch, 50 ms to fill it.
        store.write(name, bundles[kind], options=ServingOptions(batch_size=4, max_batch_delay_ms=50))
    # A second, different version of the CNN: the latest must become the default.
    bundles["cnn-v2"] = make_bundle("cnn", seed=7)
    store.write(MODELS["cnn"], bundles["cnn-v2"], options=ServingOptions(batch_size=4, max_batch_delay_ms=50))
    broken_archive_copy(store.path(MODELS["cnn"], 1), store.root / "t-broken" / "1.mar", modelName="t-broken")
    settings = ServeSettings(
        model_store=store.root,
        state_dir=root / "state",
        inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
        ts_grpc_inference_port=free_port(),
        ts_inference_port=free_port(),
        exporter_port=free_port(),
        worker_port_base=random.randint(20000, 40000),
        startup_timeout_s=90,
        engine=engine,
    )
    serving = serving_class(engine)(settings)
    report = serving.start()  # waits for every worker: READY, or crash-looping
    try:
        client = PredictionClient(
            rest_url=f"http://127.0.0.1:{settings.inference_port}",
            grpc_target=f"127.0.0.1:{settings.grpc_inference_port}",
            token=read_token(settings.state_dir),
        )
        yield {"settings": settings, "client": client, "bundles": bundles, "report": report, "serving": serving,
               "engine": engine}
    finally:
        serving.stop()


def _expected_image_probs(bundle, data: bytes) -> torch.Tensor:
    model = load_model(bundle.spec, bundle.state_dict)
    mode = ImageReadMode.GRAY if bundle.spec.input.channels == 1 else ImageReadMode.RGB
    x = image_eval_transform(bundle.spec.input)(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode))
    with torch.no_grad():
        return torch.softmax(model(x.unsqueeze(0)), 1)[0]


def _expected_seq_probs(bundle, seq) -> torch.Tensor:
    model = load_model(bundle.spec, bundle.state_dict)
    x = torch.tensor([seq])
    with torch.no_grad():
        return torch.softmax(model(x, torch.tensor([len(seq)])), 1)[0]


def _assert_matches(prediction: dict, expected: torch.Tensor, labels) -> None:
    top = prediction["top_k"]
    assert top, prediction
    for entry in top:
        assert entry["label"] == labels[entry["index"]]
        assert entry["probability"] == pytest.approx(expected[entry["index"]].item(), abs=1e-4)
    assert top[0]["index"] == int(expected.argmax())


def _rest_raw(served, name, data, headers=None, version=None):
    s = served["settings"]
    url = f"http://127.0.0.1:{s.inference_port}/predictions/{name}" + (f"/{version}" if version else "")
    return requests.post(
        url, data=data, timeout=60,
        headers={"Authorization": f"Bearer {served['client'].token}", **(headers or {})},
    )


def test_every_model_is_ready_and_the_broken_one_is_refused(served):
    report = {(m.name, int(m.version)): m for m in served["report"]}
    for name in MODELS.values():
        assert report[(name, 1)].ready, report[(name, 1)]
    assert report[("t-cnn", 2)].ready
    # Its weights do not fit its spec: refused by the archive check, never registered, so
    # it neither crash-loops nor holds the replica's readiness down.
    assert ("t-broken", 1) not in report
    assert "t-broken" not in {m["modelName"] for m in served["serving"].mgmt.list_models()}
    assert "weights.pt does not fit spec.json" in refused_archives(served["settings"].model_store)[("t-broken", 1)]


@pytest.mark.parametrize("kind, fmt", [("resnet", "jpeg"), ("mobilenet", "png"), ("cnn", "png")])
def test_images_over_rest_and_grpc_match_in_process(served, kind, fmt):
    name, client = MODELS[kind], served["client"]
    bundle = served["bundles"]["cnn-v2" if kind == "cnn" else kind]
    channels = bundle.spec.input.channels
    images = {f"img{i}": random_image(channels, 40 + 7 * i, 50, fmt, seed=i) for i in range(3)}
    for answer in (client.rest(name, images, k=3), client.grpc(name, images, k=3)):
        assert answer["model"] == name
        preds = {p["input"]: p for p in answer["predictions"]}
        assert set(preds) == set(images)  # a batch of images in one request
        for key, data in images.items():
            assert len(preds[key]["top_k"]) == 3
            _assert_matches(preds[key], _expected_image_probs(bundle, data), bundle.labels)


def test_latest_version_is_default_and_old_versions_answer(served):
    client = served["client"]
    image = {"x": random_image(1, 16, 16, seed=5)}
    latest = client.rest("t-cnn", image, k=10)
    v1 = client.rest("t-cnn", image, version=1, k=10)
    assert (latest["version"], v1["version"]) == ("2", "1")
    _assert_matches(latest["predictions"][0], _expected_image_probs(served["bundles"]["cnn-v2"], image["x"]),
                    served["bundles"]["cnn-v2"].labels)
    _assert_matches(v1["predictions"][0], _expected_image_probs(served["bundles"]["cnn"], image["x"]),
                    served["bundles"]["cnn"].labels)
    grpc_v1 = client.grpc("t-cnn", image, version=1, k=10)
    assert grpc_v1["version"] == "1"


def test_torchserve_batching_gives_the_same_answers(served):
    client = served["client"]
    images = [{"x": random_image(1, 16, 16, seed=100 + i)} for i in range(12)]
    sequential = [client.rest("t-cnn", img, k=10) for img in images]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda img: client.rest("t-cnn", img, k=10), images))
    for seq_answer, conc_answer in zip(sequential, concurrent):
        a = {p["index"]: p["probability"] for p in seq_answer["predictions"][0]["top_k"]}
        b = {p["index"]: p["probability"] for p in conc_answer["predictions"][0]["top_k"]}
        assert a.keys() == b.keys()
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)
    described = served["serving"].mgmt.describe("t-cnn", "2")[0]
    assert described["batchSize"] == 4 and described["maxBatchDelay"] == 50


def test_sequences_over_rest_and_grpc_match_in_process(served):
    client, bundle = served["client"], served["bundles"]["lstm"]
    torch.manual_seed(0)
    seqs = [torch.randn(n, 8).tolist() for n in (5, 12)]
    body = {"inputs": seqs, "k": 2}
    for answer in (client.rest_json("t-lstm", body), client.grpc("t-lstm", {"data": json.dumps(body).encode()})):
        assert len(answer["predictions"]) == 2
        for pred, seq in zip(answer["predictions"], seqs):
            assert len(pred["top_k"]) == 2
            _assert_matches(pred, _expected_seq_probs(bundle, seq), bundle.labels)


def test_raw_text_uses_the_saved_vocabulary(served):
    client, bundle = served["client"], served["bundles"]["gru-text"]
    for answer in (
        client.rest_json("t-text", {"inputs": TEXTS}),
        client.grpc("t-text", {"data": TEXTS[1].encode()}),
    ):
        texts = TEXTS if len(answer["predictions"]) == 3 else [TEXTS[1]]
        for pred, text in zip(answer["predictions"], texts):
            _assert_matches(pred, _expected_seq_probs(bundle, bundle.vocab.encode(text)), bundle.labels)


def _assert_still_serving(served):
    answer = served["client"].rest("t-cnn", {"x": random_image(1, 16, 16)}, k=1)
    assert len(answer["predictions"][0]["top_k"]) == 1


BAD_REST = [
    ("t-cnn", b"this is not an image", {"Content-Type": "application/octet-stream"}, 400, "JPEG or PNG"),
    ("t-cnn", random_image(1, 32, 32)[:40], {"Content-Type": "image/png"}, 400, "image"),
    ("t-lstm", json.dumps([[0.5] * 5]).encode(), {"Content-Type": "application/json"}, 400, "expects 8"),
    ("t-lstm", json.dumps({"inputs": [[0.5] * 8], "k": 0}).encode(), {"Content-Type": "application/json"}, 400, "k must"),
    ("t-cnn", random_image(1, 16, 16), {"X-Top-K": "-2"}, 400, "k must"),
    ("t-cnn", b"", {"Content-Type": "application/octet-stream"}, 400, ""),
]


@pytest.mark.parametrize("name, body, headers, status, needle", BAD_REST)
def test_bad_input_over_rest_is_4xx_with_a_message(served, name, body, headers, status, needle):
    resp = _rest_raw(served, name, body, headers)
    assert resp.status_code == status, resp.text
    error = resp.json()
    assert error["message"] and needle in error["message"]
    _assert_still_serving(served)


@pytest.mark.parametrize(
    "name, inputs, needle",
    [
        ("t-cnn", {"x": b"GIF89a not supported"}, "JPEG or PNG"),
        ("t-lstm", {"data": json.dumps([[1.0] * 3]).encode()}, "expects 8"),
        ("t-cnn", {"x": random_image(1, 16, 16), "k": b"0"}, "k must"),
        ("t-cnn", {"x": random_image(1, 16, 16), "k": b"many"}, "k must"),
    ],
)
def test_bad_input_over_grpc_is_invalid_argument(served, name, inputs, needle):
    with pytest.raises(grpc.RpcError) as info:
        served["client"].grpc(name, inputs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    _assert_still_serving(served)


@pytest.mark.parametrize("name, version", [("no-such-model", None), ("t-cnn", 9)])
def test_unknown_model_or_version_is_not_found(served, name, version):
    resp = _rest_raw(served, name, random_image(1, 16, 16), version=version)
    assert resp.status_code == 404
    assert resp.json()["message"]
    with pytest.raises(grpc.RpcError) as info:
        served["client"].grpc(name, {"x": random_image(1, 16, 16)}, version=version)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details()
    _assert_still_serving(served)


def test_k_is_capped_at_the_number_of_classes(served):
    answer = served["client"].rest("t-resnet", {"x": random_image(3, 64, 64)}, k=50)
    assert len(answer["predictions"][0]["top_k"]) == 4


def test_grpc_health_reflects_worker_readiness(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{served['settings'].grpc_inference_port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ok = stub.Check(health_pb2.HealthCheckRequest(service="t-cnn"), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:  # never registered: not a service of health
            stub.Check(health_pb2.HealthCheckRequest(service="t-broken"), timeout=10)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # A refused archive does not hold the replica's readiness down (a model whose workers
    # cannot load does: tests/test_serving.py).
    assert overall.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_predict_over_rest_and_grpc(served, tmp_path, capsys):
    from service.cli import main

    s = served["settings"]
    image = tmp_path / "digit.png"
    image.write_bytes(random_image(1, 16, 16, seed=9))
    flags = ["--inference-port", str(s.inference_port), "--grpc-inference-port", str(s.grpc_inference_port),
             "--state-dir", str(s.state_dir)]
    answers = []
    for extra in ([], ["--grpc"]):
        assert main(["predict", "t-cnn", "--image", str(image), "-k", "2", *flags, *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1]
    assert len(answers[0]["predictions"][0]["top_k"]) == 2


def _scrape(served) -> dict:
    """Samples of modelctl's /metrics as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{served['settings'].exporter_port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_latency_histograms_count_requests_per_model_and_version(served):
    def count(samples, model, version, stage):
        key = ("modelctl_request_latency_seconds_count",
               (("engine", served["engine"]), ("model", model), ("stage", stage), ("version", version)))
        return samples.get(key, 0.0)

    def outcome(samples, model, version, name):
        key = ("modelctl_requests_total",
               (("engine", served["engine"]), ("model", model), ("outcome", name), ("version", version)))
        return samples.get(key, 0.0)

    before = _scrape(served)
    client = served["client"]
    for i in range(5):
        client.rest("t-resnet", {"x": random_image(3, 64, 64, seed=i)})
    for i in range(3):
        client.rest("t-cnn", {"x": random_image(1, 16, 16, seed=i)}, version=1)
    assert _rest_raw(served, "t-cnn", b"junk", {"Content-Type": "application/octet-stream"},
                     version=1).status_code == 400
    after = _scrape(served)
    for stage in ("request", "preprocess", "inference", "postprocess"):
        assert count(after, "t-resnet", "1", stage) - count(before, "t-resnet", "1", stage) == 5
        assert count(after, "t-cnn", "1", stage) - count(before, "t-cnn", "1", stage) == 4
    assert count(after, "t-cnn", "2", "request") == count(before, "t-cnn", "2", "request")
    assert outcome(after, "t-cnn", "1", "ok") - outcome(before, "t-cnn", "1", "ok") == 3
    assert outcome(after, "t-cnn", "1", "client_error") - outcome(before, "t-cnn", "1", "client_error") == 1
    assert after[("modelctl_gpu_count", ())] == 0  # no GPU here: zero GPUs, no error
    assert ("modelctl_queue_depth", (("model", "t-resnet"), ("version", "1"))) in after
    inference_sum = after[("modelctl_request_latency_seconds_sum",
                           (("engine", served["engine"]), ("model", "t-resnet"), ("stage", "inference"), ("version", "1")))]
    assert inference_sum > 0
