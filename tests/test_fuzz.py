"""Bad input, fuzzed: over 1000 generated bad payloads against each real engine, REST and gRPC.

Every test with the ``server`` fixture runs once per engine: one TorchServe (a tiny image CNN
and a tiny float-sequence LSTM, one worker each) with the real gRPC gateway, then the native
engine (in this process) serving the same two archives. The native engine also gets the OIP
v2 category (REST ``/v2/models/<m>/infer`` and gRPC ``ModelInfer``). The generator and the
campaign are in ``testkit/fuzzing.py``; ``make fuzz`` runs the same campaigns for BENCHMARKS.md.
The generator's determinism and the PNG check in process are tests/test_fuzz_unit.py.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import time

import grpc
import numpy as np
import pytest
import requests
import torch

from service._gen import inference_pb2, inference_pb2_grpc
from testkit import fuzzing
from testkit.fuzzing import IMAGE_MODEL, SEQ_MODEL, generate, run_campaign, start_server
from tests.helpers import engine_params

@pytest.fixture(scope="module", params=engine_params(*fuzzing.ENGINES), ids=[f"engine={e}" for e in fuzzing.ENGINES])
def server(request, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp(f"fuzz-{request.param}"), engine=request.param)
    try:
        yield s
    finally:
        s.stop()


def _native_only(server) -> None:
    if server.engine != "native":
        pytest.skip("OIP v2: the native engine only")


def test_a_thousand_bad_payloads_get_4xx_and_the_engine_survives(server):
    cases, dropped = generate(engine=server.engine)
    result = run_campaign(server, cases, threads=4, timeout_s=30, checkpoints=4, dropped=dropped)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    assert summary["inputs"] >= 1000
    failures = result.failures()
    assert not failures, f"{len(failures)} bad answers on {server.engine}, e.g.:\n" + "\n".join(
        f"{o.case.describe()}: {o.status} {o.message[:200]!r}" for o in failures[:25])
    # TorchServe: the workers it started are the ones still serving, none died on the way.
    # Native: its one process (this one) serves every version, each still READY.
    assert result.restarts() == []
    assert len(result.checkpoints) == 4
    for mark in result.checkpoints:
        assert mark["failures"] == [], mark  # a valid request per model and transport succeeded
        assert mark["workers"] == result.workers_before
    assert all(ready for ready, pids in result.workers_before.values() if pids)
    # alive and READY after the campaign (native: device threads and I/O loop running,
    # /v2/health/ready 200, every version of serving.models READY)
    assert result.health_after == []
    if server.engine == "native":
        assert all(v.ready for v in server.serving.models.versions())
        assert len(server.serving.models.versions()) == 2
        assert summary["valid_requests"] == 4 * 8  # the OIP requests too, at each checkpoint
    by_kind = {}
    for o in result.outcomes:
        by_kind.setdefault((o.case.category, o.case.kind, o.case.transport), set()).add(o.status)
    # the statuses that say why
    assert by_kind[("oversize_body", "over_max_request_size", "rest")] == {"HTTP 413"}
    assert by_kind[("oversize_body", "over_max_request_size", "grpc")] == {"RESOURCE_EXHAUSTED"}
    assert by_kind[("decompression_bomb", "png_huge_header", "rest")] == {"HTTP 413"}
    assert by_kind[("decompression_bomb", "too_many_images", "rest")] == {"HTTP 413"}
    for o in result.outcomes:
        if o.case.category == "decompression_bomb":
            assert "limit" in o.message, o.case.describe()
        if o.case.category == "bad_k":  # NaN or a 4400-digit k: refused by the JSON reader already
            assert any(why in o.message for why in ("k must", "not a finite number", "digits")), (
                o.case.describe(), o.message)
    assert summary["max_seconds"] < 30
    if server.engine == "native":
        _check_oip_outcomes(result)


def _check_oip_outcomes(result) -> None:
    """The OIP category: the statuses that say why, and every REST answer {"error": ...}."""
    oip = [o for o in result.outcomes if o.case.api == "oip"]
    assert len(oip) >= 600
    by_kind: dict[tuple[str, str], set] = {}
    for o in oip:
        by_kind.setdefault((o.case.kind.split("/")[0], o.case.transport), set()).add(o.status)
        assert o.message.strip(), o.case.describe()  # REST: the body's "error" (Sender reads no other)
    assert by_kind[("unknown_model", "rest")] == {"HTTP 404"}
    assert by_kind[("unknown_model", "grpc")] == {"NOT_FOUND"}
    for kind in ("shape_mismatch", "wrong_datatype", "bytes_cut_short", "unknown_input", "missing_input",
                 "bad_top_k", "bad_lengths", "unknown_output", "bad_values"):
        assert by_kind[(kind, "rest")] == {"HTTP 400"}, kind
        assert by_kind[(kind, "grpc")] == {"INVALID_ARGUMENT"}, kind
    for kind in ("binary_size_over", "binary_size_under", "header_length_beyond", "header_length_not_number",
                 "nested_too_deep", "non_json_header", "bad_parameters"):
        assert by_kind[(kind, "rest")] == {"HTTP 400"}, kind
    for kind in ("raw_count_mismatch", "contents_and_raw", "not_protobuf"):
        assert by_kind[(kind, "grpc")] == {"INVALID_ARGUMENT"}, kind
    # millions of elements that agree with their shape: over what the model takes, refused
    # before they are decoded one by one
    assert by_kind[("element_bomb", "rest")] == {"HTTP 413"}
    assert by_kind[("element_bomb", "grpc")] <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    # shapes declaring up to 2**100 elements: refused before anything is allocated, at once
    assert by_kind[("bad_dims", "rest")] == {"HTTP 400", "HTTP 413"}
    assert by_kind[("bad_dims", "grpc")] == {"INVALID_ARGUMENT"}
    huge = [o for o in oip if o.case.kind.startswith("bad_dims/")]
    assert max(o.seconds for o in huge) < 2, max(huge, key=lambda o: o.seconds).case.describe()
    assert by_kind[("bad_batch", "rest")] == {"HTTP 400", "HTTP 413"}  # 413: over 64 inputs


def _rest(server, model, body, headers):
    return requests.post(f"{server.rest_url}/predictions/{model}", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.token}", **headers})


def test_body_over_max_request_size_is_413_and_the_server_stays_up(server):
    limit = server.settings.max_request_size_bytes
    if server.engine == "torchserve":  # TorchServe's frontend has the limit too
        config = (server.settings.state_dir / "config.properties").read_text()
        assert f"max_request_size={limit}" in config.splitlines()
    doc = json.dumps({"inputs": [[[0.5] * fuzzing.FEATURES] * 3], "k": 1}).encode()
    # valid JSON padded with blanks to just under the limit: answered
    under = doc + b" " * (limit - 1024 - len(doc))
    ok = _rest(server, SEQ_MODEL, under, {"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text
    over = doc + b" " * (limit + 1 - len(doc))
    resp = _rest(server, SEQ_MODEL, over, {"Content-Type": "application/json"})
    assert resp.status_code == 413
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predictions(inference_pb2.PredictionsRequest(model_name=SEQ_MODEL, input={"data": over}),
                             metadata=[("authorization", f"Bearer {server.token}")], timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
    assert fuzzing.Sender(server, 30).valid_requests() == []
    assert server.health() == []


def test_pixel_budget_counts_every_image_of_a_request(server):
    """Two valid 6000x6000 PNGs (36 M pixels each, under the per-image limit) in one
    request: refused before either is decoded, and fast."""
    img = fuzzing._cached_gray_png(6000, 6000)
    start = time.perf_counter()
    resp = requests.post(f"{server.rest_url}/predictions/{IMAGE_MODEL}", timeout=60,
                         files={"a": ("a", img), "b": ("b", img)},
                         headers={"Authorization": f"Bearer {server.token}"})
    assert resp.status_code == 413, resp.text
    assert "72000000 pixels together" in resp.json()["message"]
    assert time.perf_counter() - start < 10


# ---- OIP v2 (native engine) ------------------------------------------------------------------
def _oip_post(server, model, body, headers):
    return requests.post(f"{server.rest_url}/v2/models/{model}/infer", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.token}", **headers})


def test_oip_header_length_is_ascii_digits_or_400(server):
    """Inference-Header-Content-Length arrives as latin-1 text: a superscript digit (byte
    0xB2) passes str.isdigit() but not int(), and int() refuses more than 4300 digits. Each
    was a 500 ("internal error"); each is a 400 naming the header, and the engine serves on."""
    _native_only(server)
    rows = np.full((1, 3, fuzzing.FEATURES), 0.5, dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "sequences", "datatype": "FP32", "shape": [1, 3, fuzzing.FEATURES],
                                   "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
    body = head + rows.tobytes()
    for value in ("\xb2", "\xb9\xb2", "\xb3" * 3, "9" * 5000, "1" * 4301, "12 34", "0x10", str(len(body) + 1)):
        resp = _oip_post(server, SEQ_MODEL, body, {fuzzing.HEADER_LENGTH: value})
        assert resp.status_code == 400, (value[:10], resp.status_code, resp.text)
        assert "inference-header-content-length" in resp.json()["error"].lower()
    # leading zeros are still a number: the header's length, written long
    resp = _oip_post(server, SEQ_MODEL, body, {fuzzing.HEADER_LENGTH: "0" * 5000 + str(len(head))})
    assert resp.status_code == 200, resp.text
    assert _oip_post(server, SEQ_MODEL, body, {fuzzing.HEADER_LENGTH: str(len(head))}).status_code == 200
    assert server.health() == []


def test_oip_huge_shapes_are_refused_before_anything_is_allocated(server):
    """A shape of 10**12 (or 2**100) elements with a few bytes of data: 413 or 400 at once,
    and the engine (this process) does not grow: nothing of that size was allocated."""
    _native_only(server)
    from service._gen.oip.v2 import open_inference_grpc_pb2 as pb

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    for model, name, datatype, shape in ((SEQ_MODEL, "sequences", "FP32", [10**12]),
                                         (IMAGE_MODEL, "images", "BYTES", [2**100]),
                                         (SEQ_MODEL, "sequences", "FP32", [1, 10**6, 10**6]),
                                         (SEQ_MODEL, "lengths", "INT64", [2**31, 2**31])):
        for binary in (False, True):
            tensor = {"name": name, "datatype": datatype, "shape": shape}
            if binary:
                tensor["parameters"] = {"binary_data_size": 8}
                head = json.dumps({"inputs": [tensor]}).encode()
                resp = _oip_post(server, model, head + bytes(8), {fuzzing.HEADER_LENGTH: str(len(head))})
            else:
                tensor["data"] = [0, 0]
                resp = _oip_post(server, model, json.dumps({"inputs": [tensor]}).encode(),
                                 {"Content-Type": "application/json"})
            assert resp.status_code == 413, (name, shape, binary, resp.status_code, resp.text)
            assert "elements" in resp.json()["error"]
    resp = _oip_post(server, SEQ_MODEL, json.dumps({"inputs": [{"name": "sequences", "datatype": "FP32",
                                                                "shape": [1e12], "data": [0.5]}]}).encode(), {})
    assert resp.status_code == 400 and "not a size" in resp.json()["error"], resp.text
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(fuzzing.OIP_MODEL_INFER)
        for shape in ([10**12], [2**62], [2**31, 2**31, 2**31]):
            req = pb.ModelInferRequest(model_name=SEQ_MODEL)
            req.inputs.add(name="sequences", datatype="FP32", shape=shape)
            req.raw_input_contents.append(struct.pack("<ff", 0.5, 0.5))
            with pytest.raises(grpc.RpcError) as info:
                infer(req.SerializeToString(), metadata=[("authorization", f"Bearer {server.token}")], timeout=30)
            assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "elements" in info.value.details()
    assert time.perf_counter() - start < 10
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert server.health() == []


def test_oip_element_bombs_are_refused_before_decoding_and_the_engine_keeps_answering(server):
    """16 MiB bodies of millions of tiny elements that agree with their shapes (4-byte empty
    BYTES elements, "0," numbers, 2-byte empty gRPC strings). Decoded one by one on the I/O
    loop they took 8 to 16 s each, and no other request (health probes included) was
    answered meanwhile. Now each is refused by its element count, before decoding."""
    _native_only(server)
    import threading

    sender = fuzzing.Sender(server, 60)
    latencies: list[float] = []
    stop = threading.Event()

    def probe():
        session = requests.Session()
        while not stop.is_set():
            start = time.perf_counter()
            session.get(f"{server.rest_url}/v2/health/ready", timeout=60)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        outcomes = []
        for transport, ways in fuzzing._Gen.ELEMENT_BOMBS.items():
            for way in ways:
                model, body, headers = fuzzing.element_bomb(way, server.settings.max_request_size_bytes)
                case = fuzzing.Case(-1, "oip", f"element_bomb/{way}", transport, model, body=body, headers=headers,
                                    api="oip")
                outcomes.append(sender.send(case))
    finally:
        stop.set()
        prober.join(60)
        sender.close()
    for o in outcomes:
        assert o.verdict == "expected", (o.case.describe(), o.status, o.message)
        assert o.status in ("HTTP 413", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), (o.case.describe(), o.status)
        assert o.seconds < 5, (o.case.describe(), o.seconds)
    assert max(latencies) < 3, f"a health probe waited {max(latencies):.1f} s"
    assert server.health() == []


# ---- weights that need pickled code: refused where the worker loads them ----------------
class _Payload:
    """Pickles as a call to os.system: if anything unpickled it with code allowed, the
    marker file would appear."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_archive_whose_weights_need_pickled_code_is_refused_by_the_real_worker(server, tmp_path):
    """TorchServe: its worker refuses the weights and dies, again and again (crash-looping).
    Native: the load in this process refuses them, and the version is FAILED with the reason."""
    from service.errors import AlreadyExists
    from service.modelstore import ModelStore
    from service.deploy import readiness
    from service.deploy.store_scan import link_archive
    from tests.helpers import broken_archive_copy

    marker = tmp_path / "pickled-code-ran"
    buf = io.BytesIO()
    torch.save({"rnn.weight_ih_l0": torch.zeros(32, 4), "payload": _Payload(marker)}, buf)
    store = ModelStore(server.settings.model_store)
    name = "fuzz-pickled"
    broken_archive_copy(store.path(SEQ_MODEL, 1), store.root / name / "1.mar", weights=buf.getvalue(),
                        modelName=name)
    mgmt = server.serving.mgmt
    try:
        if server.engine == "native":
            _native_refuses_pickled_weights(server, name)
            assert not marker.exists()
            assert fuzzing.Sender(server, 30).valid_requests() == []
            return
        # the replica registers new archives of the store by itself; where it does not
        # (yet), register it as it would
        deadline = time.monotonic() + 10
        while (name, "1") not in {r.key for r in readiness.check(mgmt)}:
            if time.monotonic() > deadline:
                try:
                    mgmt.register(link_archive(server.settings, name, 1), initial_workers=1,
                                  response_timeout_s=server.settings.response_timeout_s, synchronous=False)
                except AlreadyExists:
                    pass
                break
            time.sleep(0.5)
        report = readiness.wait_until_ready(mgmt, [(name, 1)], timeout_s=90)
        entry = next(r for r in report if r.key == (name, "1"))
        assert not entry.ready and "crash-looping" in entry.reason, entry
        logs = server.settings.state_dir / "logs"
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        assert "weights.pt needs pickled code to load (posix.system)" in text
        assert not marker.exists()
        # the other models keep serving
        assert fuzzing.Sender(server, 30).valid_requests() == []
    finally:
        (store.root / name / "1.mar").unlink(missing_ok=True)  # so that it is not registered again
        try:
            mgmt.unregister(name, 1)
        except Exception:  # noqa: BLE001 - not registered at all: nothing to undo
            pass
    assert server.health() == []


def _native_refuses_pickled_weights(server, name: str) -> None:
    from service.errors import AlreadyExists, ServiceError
    from service.deploy import readiness
    from service.deploy.store_scan import link_archive

    mgmt = server.serving.mgmt
    why = "weights.pt needs pickled code to load (posix.system)"
    try:  # loaded in this process: a synchronous registration says why it failed
        mgmt.register(link_archive(server.settings, name, 1), initial_workers=1, synchronous=True)
    except AlreadyExists:  # registered meanwhile by the replica itself
        pass
    except ServiceError as exc:
        assert why in exc.message, exc.message
    entry = server.serving.models.get(name, "1")
    deadline = time.monotonic() + 60
    while entry.state == "LOADING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert entry.state == "FAILED" and why in entry.error, (entry.state, entry.error)
    found = next(r for r in readiness.check(mgmt) if r.key == (name, "1"))
    assert not found.ready, found
