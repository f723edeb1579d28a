"""The TorchServe engine's byte budget per replica (issue 12, point 1).

Request bodies in flight (queued or running, REST and gRPC together) stay within
``ServeSettings.inflight_bytes_budget``: derived from the frontend's Java heap unless
``MODELCTL_MAX_INFLIGHT_BYTES`` sets it, split between nginx and the gateway by size class
(service/serving/torchserve/budget.py). Beyond it: 429 + ``Retry-After`` / RESOURCE_EXHAUSTED
+ ``retry-after`` and ``grpc-retry-pushback-ms``.

* pure parts (tests/test_byte_budget_unit.py): the derivation, the size classes, the
  Content-Length regexes, nginx's text and the gateway's byte admission;
* nginx accepts the conf (``nginx -t``);
* the real nginx in front of a stub upstream that holds large bodies: what each class lets
  through, chunked bodies, small requests beside full classes;
* one real TorchServe (default heap, 512 MiB) behind the real nginx and gateway: 100
  concurrent ~12 MiB images, half REST and half gRPC, while small requests keep coming.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import requests

from service._gen import inference_pb2, inference_pb2_grpc
from service.auth import ApiToken
from service.modelstore import ModelStore
from service.inference.options import ServingOptions
from service.deploy import readiness
from service.serving.settings import FRONTEND_BODY_COPIES, ServeSettings
from service.serving.torchserve.budget import (
    MiB,
    endpoint_shares,
    size_classes,
)
from service.serving.torchserve.proxy import NginxProxy
from service.serving.torchserve.supervisor import Serving
from tests.helpers import make_bundle, random_image
from tests.test_serving import eventually, settings_for

pytestmark = pytest.mark.torchserve

KiB = 1024
TOKEN = ApiToken("byte-budget-test-token-0123456789abcdef", "test")


# -- nginx's text ------------------------------------------------------------------------------


def test_nginx_accepts_the_conf(tmp_path):
    proxy = NginxProxy(ServeSettings(state_dir=tmp_path / "state"), TOKEN)
    proxy.write_config("upstream-key")
    proxy.check_config()  # nginx -t


# -- the real nginx, a stub upstream -----------------------------------------------------------


class _Upstream(ThreadingHTTPServer):
    """Stands for TorchServe: answers a body up to 256 KiB at once, holds a larger one (and a
    chunked one) until ``release`` is set; counts what it holds."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.held = 0
        self.seen = 0

    def holding(self) -> int:
        with self.lock:
            return self.held


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(b'{"status": "Healthy"}')

    def do_POST(self):
        server = self.server
        n = int(self.headers.get("Content-Length", "0"))  # nginx sends a whole body with its length
        self.rfile.read(n)
        with server.lock:
            server.seen += 1
        if n > 256 * KiB or self.headers.get("X-Hold"):
            with server.lock:
                server.held += 1
            server.release.wait(60)
            with server.lock:
                server.held -= 1
        self._answer(json.dumps({"bytes": n}).encode())


@pytest.fixture
def stub_proxy(tmp_path):
    upstream = _Upstream()
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    # REST's share: 48 MiB of 96: 1 place over 4 MiB, 4 over 1 MiB, 8 over 256 KiB, 32 up to 256 KiB.
    settings = settings_for(tmp_path / "store", tmp_path / "state", max_inflight_bytes=96 * MiB,
                            retry_after_s=3)
    settings = ServeSettings(**{**settings.__dict__, "ts_inference_port": upstream.server_address[1]})
    proxy = NginxProxy(settings, TOKEN).start("upstream-key")
    try:
        yield proxy, upstream
    finally:
        upstream.release.set()
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()


def _post(proxy, body, *, headers=None, model="m"):
    return requests.post(f"http://127.0.0.1:{proxy.settings.inference_port}/predictions/{model}", data=body,
                         headers={"Authorization": TOKEN.header(), **(headers or {})}, timeout=60)


def _busy(r) -> bool:
    if r.status_code != 429:
        return False
    assert r.headers["Retry-After"] == "3" and r.json()["type"] == "ResourceExhausted", r.text
    return True


def test_nginx_admits_bodies_by_size_class(stub_proxy):
    proxy, upstream = stub_proxy
    classes = size_classes(endpoint_shares(proxy.settings)[0], proxy.settings.max_request_size_bytes)
    assert [(c.places, c.nested_places) for c in classes] == [(32, 45), (8, 13), (4, 5), (1, 1)]
    with ThreadPoolExecutor(64) as pool:
        # Over 4 MiB: one place. The others are refused at once, while it is held.
        large = [pool.submit(_post, proxy, b"L" * (5 * MiB)) for _ in range(4)]
        assert eventually(lambda: sum(f.done() for f in large) == 3 and upstream.holding() == 1, timeout_s=20)
        assert all(_busy(f.result()) for f in large if f.done())
        # Over 1 MiB: 5 places, one taken by the large body.
        mid = [pool.submit(_post, proxy, b"M" * (2 * MiB)) for _ in range(6)]
        assert eventually(lambda: sum(f.done() for f in mid) == 2 and upstream.holding() == 5, timeout_s=20)
        assert all(_busy(f.result()) for f in mid if f.done())
        # A chunked body (no Content-Length) counts as the largest: no place left.
        assert _busy(_post(proxy, iter([b"x" * 1000] * 3)))
        # A body of 1 MiB exactly is in the class up to 1 MiB: 8 more places there.
        small_mid = [pool.submit(_post, proxy, b"S" * MiB) for _ in range(10)]
        assert eventually(lambda: sum(f.done() for f in small_mid) == 2 and upstream.holding() == 13, timeout_s=20)
        assert all(_busy(f.result()) for f in small_mid if f.done())
        # Small bodies still go through (the 32 places kept for them), and GETs count nowhere.
        smalls = list(pool.map(lambda i: _post(proxy, b"s" * (200 * KiB)), range(20)))
        assert [r.status_code for r in smalls] == [200] * 20
        assert _post(proxy, b"", model="other").status_code == 200  # Content-Length: 0
        ping = requests.get(f"http://127.0.0.1:{proxy.settings.inference_port}/ping",
                            headers={"Authorization": TOKEN.header()}, timeout=10)
        assert ping.status_code == 200
        # ... up to the first zone's 45: 13 held, 32 small ones more held, then 429.
        held_small = [pool.submit(_post, proxy, b"h", headers={"X-Hold": "1"}) for _ in range(32)]
        assert eventually(lambda: upstream.holding() == 45, timeout_s=20)
        assert _busy(_post(proxy, b"h"))
        upstream.release.set()
        for f in large + mid + small_mid + held_small:
            assert f.result().status_code in (200, 429)
    upstream.release.clear()
    # Every place is back: a large body passes again, once.
    with ThreadPoolExecutor(2) as pool:
        again = [pool.submit(_post, proxy, b"L" * (16 * MiB)) for _ in range(2)]
        assert eventually(lambda: any(f.done() for f in again) and upstream.holding() == 1, timeout_s=20)
        upstream.release.set()
        assert sorted(f.result().status_code for f in again) == [200, 429]
    assert _post(proxy, b"x" * (16 * MiB + 1)).status_code == 413


# -- one real TorchServe, 100 concurrent ~12 MiB images -------------------------------------------

BIG = random_image(1, 3550, 3550, seed=11)  # ~12 MiB of PNG, 12.6 M pixels (the limit: 40 M)
SMALL = random_image(1, 16, 16, seed=3)
#: One G1 log line: "[1.234s][info][gc] GC(7) Pause Young (Normal) (G1 Evacuation Pause) 150M->120M(512M) 3.1ms".
_GC_LINE = re.compile(r"\[([\d.]+)s\].*GC\(\d+\) (Pause [^(]+).*? (\d+)M->(\d+)M\((\d+)M\)")


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """modelctl serve on its defaults (heap 512 MiB, job_queue_size 100, 16 MiB bodies), two
    models of one worker each, the frontend's G1 collections logged."""
    root = tmp_path_factory.mktemp("byte_budget")
    store = ModelStore(root / "store")
    for name in ("cnn", "cnn-b"):  # two: a model's requests per endpoint are limited to 50 too
        store.write(name, make_bundle("cnn"), options=ServingOptions(batch_size=1, max_batch_delay_ms=1))
    gc_log = root / "gc.log"
    assert not re.search(r"\s", str(gc_log))  # TorchServe splits vmargs on blanks
    settings = settings_for(store.root, root / "state", startup_timeout_s=120, sync_interval_s=3600,
                            frontend_jvm_options=f"-Xlog:gc:file={gc_log}")
    sv = Serving(settings)
    sv.start()
    sv.gc_log = gc_log
    # Small requests came first: the gateway's channel to TorchServe is up. (Made while this
    # process's client threads sent ~100 MiB over both endpoints, its connection attempt
    # timed out before TorchServe's SETTINGS frame, and the gateway's callers got
    # UNAVAILABLE; with the REST load in another process it connected.)
    with grpc.insecure_channel(f"127.0.0.1:{sv.grpc_port}") as channel:
        for model in ("cnn", "cnn-b"):
            inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                inference_pb2.PredictionsRequest(model_name=model, input={"x": SMALL}),
                metadata=list(sv.api_token.metadata()), timeout=60)
    yield sv
    sv.stop()


def _gc_events(path: Path) -> list[tuple[float, str, int, int]]:
    """(seconds since the JVM started, kind, heap MiB before, after) of each collection."""
    return [(float(m[1]), m[2].strip(), int(m[3]), int(m[4]))
            for m in map(_GC_LINE.search, path.read_text().splitlines()) if m]


def _pids(sv) -> dict:
    workers = next(r.pids for r in readiness.check(sv.mgmt) if r.name == "cnn" and r.ready)
    proxy = sv.torchserve.proxy
    return {"frontend": sv.torchserve.frontend_pid, "workers": tuple(workers),
            "nginx": {proxy.pid, *proxy.workers()}}


def test_concurrent_large_bodies_stay_within_the_budget(replica):
    from benchmarks.soak import java_heap, live_heap

    sv, s = replica, replica.settings
    budget, (rest_share, grpc_share) = s.inflight_bytes_budget, endpoint_shares(s)
    assert 11.5 * MiB < len(BIG) < 12.5 * MiB
    before = _pids(sv)
    frontend = before["frontend"]
    at_rest = live_heap(frontend, 3)["used_mb"]
    gc_before = len(_gc_events(sv.gc_log))
    url = f"{sv.torchserve.inference_url}/predictions/cnn"
    headers = {"Authorization": sv.api_token.header(), "Content-Type": "image/png"}
    md = list(sv.api_token.metadata())
    # The small requests' client and the large ones' each have their own connection, made
    # before the burst.
    channels = [grpc.insecure_channel(f"127.0.0.1:{sv.grpc_port}") for _ in range(2)]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)
    small_stub, stub = (inference_pb2_grpc.InferenceAPIsServiceStub(ch) for ch in channels)
    # Small requests came before the burst too.
    assert requests.post(url, data=SMALL, headers=headers, timeout=60).status_code == 200
    small_stub.Predictions(inference_pb2.PredictionsRequest(model_name="cnn", input={"x": SMALL}),
                           metadata=md, timeout=60)
    stop = threading.Event()
    small, heap_used, gateway_bytes = [], [], []

    def small_rest():
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(url, data=SMALL, headers=headers, timeout=60)
                small.append(("rest", r.status_code, r.text[:200]))

    def small_grpc():
        while not stop.is_set():
            try:
                small_stub.Predictions(inference_pb2.PredictionsRequest(model_name="cnn", input={"x": SMALL}),
                                       metadata=md, timeout=60)
                small.append(("grpc", "OK", ""))
            except grpc.RpcError as e:
                small.append(("grpc", e.code().name, f"{time.monotonic() - started:.1f}s " + e.details()))

    def watch():
        while not stop.is_set():
            heap = java_heap(frontend)
            if "used_mb" in heap:
                heap_used.append(heap["used_mb"])
            gateway_bytes.append(sv.gateway.load()["bytes"])
            time.sleep(0.2)

    barrier = threading.Barrier(101)

    def big_rest(i):
        barrier.wait()
        r = requests.post(url, data=BIG, headers=headers, timeout=120)
        return r.status_code, r.headers.get("Retry-After"), r.text[:300]

    def big_grpc(i):
        request = inference_pb2.PredictionsRequest(model_name="cnn", input={"x": BIG})
        barrier.wait()
        try:
            stub.Predictions(request, metadata=md, timeout=120)
            return "OK", {}, ""
        except grpc.RpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ()), e.details()

    background = [threading.Thread(target=f, daemon=True) for f in (small_rest, small_grpc, watch)]
    started = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        for t in background:
            t.start()
        rest = [pool.submit(big_rest, i) for i in range(50)]
        calls = [pool.submit(big_grpc, i) for i in range(50)]
        barrier.wait()
        rest, calls = [f.result() for f in rest], [f.result() for f in calls]
    burst_s = time.monotonic() - started
    small_during = len(small)
    time.sleep(1.0)  # small requests go on after the burst too
    stop.set()
    for t in background:
        t.join(90)
    for ch in channels:
        ch.close()

    counts = {"rest": {c: sum(r[0] == c for r in rest) for c in (200, 413, 429)},
              "grpc": {c: sum(r[0] == c for r in calls) for c in ("OK", "RESOURCE_EXHAUSTED")}}
    events = _gc_events(sv.gc_log)[gc_before:]
    peak_after = max(after_mb for _, _, _, after_mb in events)
    live_after = live_heap(frontend, 3)["used_mb"]
    report = (f"burst {burst_s:.1f}s; REST {counts['rest']}, gRPC {counts['grpc']}; {len(small)} small requests "
              f"({sum(x[1] in (200, 'OK') for x in small)} OK); live heap at rest {at_rest:.0f} MiB, after {live_after:.0f} MiB; {len(events)} collections, "
              f"heap after a collection at most {peak_after} MiB, before one at most "
              f"{max(before_mb for _, _, before_mb, _ in events)} MiB, sampled used at most "
              f"{max(heap_used, default=0):.0f} MiB; gateway held at most {max(gateway_bytes) / MiB:.1f} MiB; "
              f"budget {budget / MiB:.0f} MiB (REST {rest_share / MiB:.0f}, gRPC {grpc_share / MiB:.0f})")
    print(report)
    # Each large body: 200, 413 or 429 (+ Retry-After); gRPC OK or RESOURCE_EXHAUSTED (+ retry metadata).
    for status, retry_after, text in rest:
        assert status in (200, 413, 429), (status, text)
        if status == 429:
            assert retry_after == str(s.retry_after_s), text
    for code, trailers, details in calls:
        assert code in ("OK", "RESOURCE_EXHAUSTED"), (code, details)
        if code == "RESOURCE_EXHAUSTED":
            assert trailers.get("retry-after") == str(s.retry_after_s), (trailers, details)
            assert trailers.get("grpc-retry-pushback-ms") == str(s.retry_after_s * 1000), trailers
    # The budget is what refused them, and some went through on each endpoint.
    assert counts["rest"][200] >= 1 and counts["rest"][429] >= 1, counts
    assert counts["grpc"]["OK"] >= 1 and counts["grpc"]["RESOURCE_EXHAUSTED"] >= 1, counts
    assert any("max_inflight_bytes" in d for c, _, d in calls if c == "RESOURCE_EXHAUSTED"), calls[:3]
    # Every small request succeeded, during the burst and after it.
    assert small_during >= 4 and small, small
    assert all(status in (200, "OK") for _, status, _ in small), [x for x in small if x[1] not in (200, "OK")][:5]
    # No process exited or was replaced; the frontend never ran out of heap.
    after = _pids(sv)
    assert after == before, (before, after)
    assert sv.torchserve.running()
    log = sv.torchserve.log_path.read_text(errors="replace")
    assert "java.lang.OutOfMemoryError" not in log and "Terminating due to" not in log
    # The gateway never held more than its share; the frontend's heap after each collection
    # during the burst (its live heap, and any old garbage not yet collected) stayed within
    # what it held at rest plus the budget, below the heap.
    assert max(gateway_bytes) <= grpc_share, (max(gateway_bytes), grpc_share)
    assert events, "no collection during the burst"
    assert peak_after * MiB <= at_rest * MiB + budget, report
    assert peak_after < s.frontend_heap_mb, report


def test_a_full_budget_fits_the_frontend_heap(replica):
    """The worst case: both models' workers stopped, and each endpoint's classes filled with
    bodies of their classes' tops (REST 3 x 16 MiB, 6 x 4 MiB, 12 x 1 MiB, 48 x 256 KiB; gRPC
    as much), so the whole budget, 192 MiB, waits in TorchServe's queues. One more body of
    any class is refused; the frontend's live heap is what it held at rest plus the bodies,
    and it never runs out."""
    from benchmarks.soak import live_heap

    sv, s = replica, replica.settings
    frontend = sv.torchserve.frontend_pid
    at_rest = live_heap(frontend, 3)["used_mb"]
    gc_before = len(_gc_events(sv.gc_log))
    workers = {r.name: r.pids for r in readiness.check(sv.mgmt) if r.ready}
    rest_classes = size_classes(endpoint_shares(s)[0], s.max_request_size_bytes)
    grpc_classes = size_classes(endpoint_shares(s)[1], s.max_request_size_bytes)
    url = sv.torchserve.inference_url + "/predictions/{}"
    headers = {"Authorization": sv.api_token.header()}
    md = list(sv.api_token.metadata())
    empty = inference_pb2.PredictionsRequest(model_name="cnn-b", input={"x": b""}).ByteSize()

    def rest(size, i):
        r = requests.post(url.format(("cnn", "cnn-b")[i % 2]), data=b"\1" * size, headers=headers, timeout=120)
        return r.status_code

    def call(stub, size, i):
        # A message of ``size`` bytes in all, input and the rest.
        model = ("cnn", "cnn-b")[i % 2]
        n = size - empty
        while (request := inference_pb2.PredictionsRequest(model_name=model, input={"x": b"\1" * n})).ByteSize() > size:
            n -= 1
        try:
            stub.Predictions(request, metadata=md, timeout=120)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    def pending() -> int:
        return sum(sv.mgmt.describe(m)[0]["jobQueueStatus"]["pendingRequests"] for m in ("cnn", "cnn-b"))

    pids = [pid for name in ("cnn", "cnn-b") for pid in workers[name]]
    channel = grpc.insecure_channel(f"127.0.0.1:{sv.grpc_port}")
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    total = sum(c.places for c in rest_classes) + sum(c.places for c in grpc_classes)
    with ThreadPoolExecutor(total + 8) as pool:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            held = [pool.submit(rest, c.top, i) for c in rest_classes for i in range(c.places)]
            held += [pool.submit(call, stub, c.top, i) for c in grpc_classes for i in range(c.places)]
            # All but the two in the stopped workers wait in TorchServe's queues.
            ok = eventually(lambda: pending() >= total - 2, timeout_s=60, poll_s=0.5)
            assert ok, (pending(), total, [(i, f.result()) for i, f in enumerate(held) if f.done()],
                        sv.gateway.load(), [sv.mgmt.describe(m)[0]["jobQueueStatus"] for m in ("cnn", "cnn-b")])
            assert not any(f.done() for f in held), [f.result() for f in held if f.done()][:5]
            assert sv.gateway.load()["bytes"] == pytest.approx(endpoint_shares(s)[1], rel=0.01)
            # Full: one more of any class is refused on both endpoints.
            for c in rest_classes:
                assert rest(c.top, 0) == 429, c
                assert call(stub, c.top, 0) == "RESOURCE_EXHAUSTED", c
            full = live_heap(frontend, 3)["used_mb"]
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    answers = [f.result() for f in held]
    channel.close()
    events = _gc_events(sv.gc_log)[gc_before:]
    in_flight_mb = s.inflight_bytes_budget / MiB
    print(f"full budget: {total} bodies, {in_flight_mb:.0f} MiB in flight; live heap at rest {at_rest:.0f} MiB, "
          f"full {full:.0f} MiB ({(full - at_rest) / in_flight_mb:.2f} heap bytes per body byte); "
          f"{len(events)} collections, heap after one at most {max((e[3] for e in events), default=0)} MiB, "
          f"before one at most {max((e[2] for e in events), default=0)} MiB, of {s.frontend_heap_mb}; "
          f"answers {sorted(set(map(str, answers)))}")
    # Every held request was answered (the bodies are no images: 400 / INVALID_ARGUMENT).
    assert set(answers) <= {400, "INVALID_ARGUMENT"}, sorted(set(map(str, answers)))
    # Live: one copy of each body and its request (measured 1.12 heap bytes per body byte);
    # with the garbage of their copies, never more than the reserve and two copies of each.
    assert (full - at_rest) * MiB <= 1.25 * s.inflight_bytes_budget
    assert max(e[3] for e in events) * MiB <= s.frontend_reserve_bytes + FRONTEND_BODY_COPIES * s.inflight_bytes_budget
    assert sv.torchserve.frontend_pid == frontend and sv.torchserve.running()
    log = sv.torchserve.log_path.read_text(errors="replace")
    assert "java.lang.OutOfMemoryError" not in log and "Terminating due to" not in log
    assert {r.name: r.pids for r in readiness.check(sv.mgmt) if r.ready} == workers


def test_stream_predictions2_is_one_counted_call_per_message(replica):
    """The gateway serves StreamPredictions2 as the native engine does: each message one
    Predictions call, counted and answered in order. (TorchServe's own needs a model set up
    for sequence batching: it answered each message "Parameter sequenceId is required.")"""
    sv = replica
    md = list(sv.api_token.metadata())
    with grpc.insecure_channel(f"127.0.0.1:{sv.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name="cnn", input={"x": SMALL})
        unary = json.loads(stub.Predictions(request, metadata=md, timeout=60).prediction)
        answers = list(stub.StreamPredictions2(iter([request] * 3), metadata=md, timeout=60))
        assert [json.loads(a.prediction) for a in answers] == [unary] * 3
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StreamPredictions2(iter([inference_pb2.PredictionsRequest(model_name="nope", input={"x": SMALL})]),
                                         metadata=md, timeout=60))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert eventually(lambda: sv.gateway.load()["upstream"] == 0, timeout_s=10)
    load = sv.gateway.load()
    assert load["admitted"] == {} and load["bytes"] == 0, load
