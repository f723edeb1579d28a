"""Serving under load while it changes underneath (issue 7, points 3 and 4a).

One real instance as ``modelctl serve`` composes it (ServingWithControl; the version swap also
runs on the native engine, ``--engine native``, with the same control API): TorchServe 0.12
with our handler, the nginx token proxy for REST, our gRPC gateway and the control API,
with real archives written by the model store. The load is real HTTP and gRPC from 8
client threads with the operator's API token, to the public endpoints only.

- A version swap under load: a new version lands in the store, the control API deploys
  it (the Deployer registers it, waits for READY workers, makes it default) and rolls it
  back, while the load runs. Not one request may fail.
- SIGKILL of a TorchServe worker under load: TorchServe replaces it; the only requests
  that may fail are those in flight at the kill, each with an error status (never a hang:
  the client's timeout is bounded and must never fire); readiness comes back. Over gRPC
  that status is UNAVAILABLE (the gateway's translation; TorchServe says
  RESOURCE_EXHAUSTED). Over REST it is TorchServe's own, which the proxy passes on: 507
  after a SIGKILL (exit 137, which TorchServe takes for the OOM killer), else 500.

Nothing is faked. The converger's periodic pass is slowed to once an hour so that the
version swap's registration is the Deployer's own (it would otherwise race to register
the new archive; both are product paths, the test wants to drive one of them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen import inference_pb2, inference_pb2_grpc
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.app import with_control
from service.modelstore import ModelStore
from service.deploy import readiness
from tests.helpers import make_bundle, random_image
from tests.test_serving import settings_for

SWAP = "swapped"  # point 3
VICTIM = "victim"  # point 4a
CONCURRENCY = 8
#: The client's bound on one request. A healthy request takes milliseconds; the bound only
#: turns a hang into a recorded failure, and the tests assert it never fires.
CLIENT_TIMEOUT_S = 60.0
IMAGE = random_image(1, 16, 16, seed=7)


def _bundle(seed: int, tag: str):
    """A small CNN whose weights (seed) and label names (tag) tell the versions apart."""
    bundle = make_bundle("cnn", seed=seed)
    return dataclasses.replace(bundle, labels=[f"{tag}-{i}" for i in range(len(bundle.labels))])


def _serve(root, engine: str):
    store = ModelStore(root / "store")
    store.write(SWAP, _bundle(1, "old"))
    store.write(VICTIM, _bundle(3, "victim"))
    settings = settings_for(root / "store", root / "state", startup_timeout_s=120, sync_interval_s=3600,
                            engine=engine)
    control = ControlConfig(port=0, db_path=root / "control.db", runs_dir=root / "runs", data_roots=(root,),
                            max_concurrent_jobs=1, poll_s=0.2, deploy_timeout_s=120)
    serving = with_control(engine)(settings, control)
    serving.start()
    try:
        assert all(r.ready for r in serving.report), readiness.summary(serving.report)
        yield SimpleNamespace(serving=serving, store=store, settings=settings, token=serving.api_token.value,
                              control=ControlClient(serving.control.target, token=serving.api_token.value))
    finally:
        serving.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``modelctl serve`` on TorchServe."""
    yield from _serve(tmp_path_factory.mktemp("resilience"), "torchserve")


@pytest.fixture(scope="module")
def native_served(tmp_path_factory):
    """``modelctl serve --engine native``: the same control API deploys to it."""
    yield from _serve(tmp_path_factory.mktemp("resilience-native"), "native")


# ---- the load -------------------------------------------------------------------------------------
@dataclass
class Result:
    kind: str  # "rest" or "grpc"
    started: float
    ended: float
    ok: bool
    version: str | None = None
    labels: frozenset = frozenset()
    #: HTTP status (REST) or gRPC status name of a failure; "timeout" / "connection" when none came.
    status: object = None
    detail: str = ""
    client: int = -1  # which of the CONCURRENCY client threads sent it


@dataclass
class Load:
    """CONCURRENCY threads sending predictions of ``model`` until ``done()`` says stop.

    Every 4th request goes over the gRPC gateway, the rest through the REST proxy.
    """

    served: SimpleNamespace
    model: str
    done: Callable[["Load"], bool]  # called with the lock held
    results: list[Result] = field(default_factory=list)
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0

    def _next(self) -> int | None:
        with self._lock:
            if self.done(self):
                return None
            self._count += 1
            self.in_flight += 1
            return self._count

    def _finish(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)
            self.in_flight -= 1

    def _rest(self, session: requests.Session) -> Result:
        url = f"http://127.0.0.1:{self.served.settings.inference_port}/predictions/{self.model}"
        started = time.monotonic()
        try:
            r = session.post(url, data=IMAGE, timeout=CLIENT_TIMEOUT_S,
                             headers={"Authorization": f"Bearer {self.served.token}",
                                      "Content-Type": "application/octet-stream"})
        except requests.Timeout as exc:
            return Result("rest", started, time.monotonic(), False, status="timeout", detail=str(exc))
        except requests.ConnectionError as exc:
            return Result("rest", started, time.monotonic(), False, status="connection", detail=str(exc))
        if r.status_code != 200:
            return Result("rest", started, time.monotonic(), False, status=r.status_code, detail=r.text[:300])
        return _answer("rest", started, r.json())

    def _grpc(self, stub) -> Result:
        started = time.monotonic()
        try:
            reply = stub.Predictions(inference_pb2.PredictionsRequest(model_name=self.model, input={"data": IMAGE}),
                                     metadata=[("authorization", f"Bearer {self.served.token}")],
                                     timeout=CLIENT_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code()
            status = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
            return Result("grpc", started, time.monotonic(), False, status=status, detail=exc.details() or "")
        return _answer("grpc", started, json.loads(reply.prediction))

    def _client(self, index: int) -> None:
        with requests.Session() as session, \
                grpc.insecure_channel(f"127.0.0.1:{self.served.serving.grpc_port}") as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            while (n := self._next()) is not None:
                try:
                    result = self._grpc(stub) if n % 4 == 0 else self._rest(session)
                except Exception as exc:  # recorded, never lost: the assertions name it
                    result = Result("?", time.monotonic(), time.monotonic(), False, status=type(exc).__name__,
                                    detail=str(exc))
                self._finish(dataclasses.replace(result, client=index))

    def start(self) -> "Load":
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
                         for i in range(CONCURRENCY)]
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "the load did not end in time"

    @property
    def completed(self) -> int:
        with self._lock:
            return len(self.results)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if not r.ok]


def _answer(kind: str, started: float, body: dict) -> Result:
    labels = frozenset(e["label"] for p in body["predictions"] for e in p["top_k"])
    return Result(kind, started, time.monotonic(), True, version=str(body["version"]), labels=labels)


def _until(fn, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := fn()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _stop_after(total: int, marks: dict[str, float], mark: str, answered: int = 200) -> Callable[[Load], bool]:
    """A Load's ``done``: at least ``total`` requests sent, and ``answered`` of them answered
    right that started after ``marks[mark]`` (a monotonic time the test sets)."""
    def done(load: Load) -> bool:
        since = marks.get(mark, float("inf"))
        after = sum(1 for r in load.results if r.ok and r.started > since)
        return len(load.results) + load.in_flight >= total and after >= answered
    return done


def _describe(failures: list[Result]) -> str:
    return "; ".join(f"{r.kind} {r.status}: {r.detail[:200]}" for r in failures[:10])


# ---- point 3: a version swap under load ------------------------------------------------------------
@pytest.mark.parametrize("engine", [pytest.param("served", marks=pytest.mark.torchserve),
                                    pytest.param("native_served", marks=pytest.mark.native)])
def test_a_version_swap_under_load_fails_no_request(engine, request):
    served = request.getfixturevalue(engine)
    swap: dict[str, float] = {}
    # At least 2000 requests, and the load outlives the swap by 200 more.
    load = Load(served, SWAP, _stop_after(2000, swap, "rolled_back")).start()
    _until(lambda: load.completed >= 200, 120, "200 answers before the swap")

    # A new version lands in the store, not default (as a fine-tuning run leaves it) ...
    served.store.write(SWAP, _bundle(2, "new"), keep_default=True)
    assert served.store.default_version(SWAP) == 1
    # ... and the control API deploys it, then rolls it back, while the load runs.
    swap["deploy"] = time.monotonic()
    dep = served.control.deploy(SWAP, 2)
    swap["deployed"] = time.monotonic()
    assert (dep.action, dep.version, dep.previous_version) == ("deploy", 2, 1)
    _until(lambda: sum(1 for r in load.snapshot() if r.started > swap["deployed"]) >= 200, 120,
           "200 answers after the deployment")
    swap["rollback"] = time.monotonic()
    back = served.control.rollback(SWAP)
    swap["rolled_back"] = time.monotonic()
    assert (back.action, back.version, back.previous_version) == ("rollback", 1, 2)
    load.join(300)

    results = load.results
    failures = load.failures()
    assert len(results) >= 2000
    assert not failures, f"{len(failures)} of {len(results)} failed: {_describe(failures)}"
    assert {r.kind for r in results} == {"rest", "grpc"}
    # The swap happened under load: answers from both versions, each with its own labels.
    by_version = {v: {lab for r in results if r.version == v for lab in r.labels} for v in ("1", "2")}
    assert by_version["1"] and by_version["2"], by_version
    assert all(lab.startswith("old-") for lab in by_version["1"]), by_version
    assert all(lab.startswith("new-") for lab in by_version["2"]), by_version
    assert {r.version for r in results} == {"1", "2"}
    # Version 1 before the deployment, version 2 in between, version 1 again after the rollback.
    assert {r.version for r in results if r.ended < swap["deploy"]} == {"1"}
    assert {r.version for r in results if swap["deployed"] < r.started and r.ended < swap["rollback"]} == {"2"}
    assert {r.version for r in results if r.started > swap["rolled_back"]} == {"1"}
    both = {(r.kind, r.version) for r in results}
    assert both == {("rest", "1"), ("rest", "2"), ("grpc", "1"), ("grpc", "2")}, both

    # The final default is the rolled-back version: in TorchServe, in the store, in the history.
    assert int(served.serving.mgmt.describe(SWAP)[0]["modelVersion"]) == 1
    assert served.store.desired(SWAP).version == 1
    listed = {(m.name, m.version): m for m in served.control.list_models(SWAP).versions}
    assert listed[(SWAP, 1)].is_default and not listed[(SWAP, 2)].is_default, listed


# ---- point 4a: SIGKILL of a TorchServe worker under load ---------------------------------------------
def _victim(serving) -> readiness.ModelReadiness:
    return next(r for r in readiness.check(serving.mgmt) if r.key == (VICTIM, "1"))


def _health(serving, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def _worker_died(r: Result) -> bool:
    if r.kind == "grpc":
        return r.status == "UNAVAILABLE" and r.detail == "Worker died."
    try:
        return r.status in (500, 507) and json.loads(r.detail)["message"] == "Worker died."
    except (ValueError, KeyError, TypeError):
        return False


@pytest.mark.torchserve
def test_a_killed_worker_is_replaced_and_only_its_requests_fail(served):
    serving = served.serving
    before = _victim(serving)
    assert before.ready and len(before.pids) == 1, before
    (old_pid,) = before.pids
    kill: dict[str, float] = {}
    # At least 600 requests, and 200 answered after the new worker was READY.
    load = Load(served, VICTIM, _stop_after(600, kill, "replaced")).start()
    _until(lambda: load.completed >= 200, 120, "200 answers before the kill")
    with load._lock:
        busy = load.in_flight
        os.kill(old_pid, signal.SIGKILL)
        kill["at"] = time.monotonic()
    assert busy > 0, "the load was not running at the kill"
    seen: list[readiness.ModelReadiness] = []

    def replaced():
        seen.append(r := _victim(serving))
        return r.ready and r.pids and old_pid not in r.pids and r

    new = _until(replaced, 120, "a new READY worker")
    kill["replaced"] = time.monotonic()
    load.join(300)

    results = load.results
    failures = load.failures()
    (new_pid,) = new.pids
    assert new_pid != old_pid and new.ready_workers == 1, new
    assert any(not r.ready for r in seen), "readiness never showed the dead worker"
    # Only requests in flight while the worker died may fail: those running at the kill or
    # sent before TorchServe knew of it (its first "Worker died." answer; one sent in the
    # few ms between can still join the dying worker's batch): at most one per client.
    known = min((r.ended for r in failures), default=kill["at"])
    assert all(r.started < known for r in failures), _describe(failures)
    assert len({r.client for r in failures}) == len(failures) <= CONCURRENCY, _describe(failures)
    # Each failure is an answer with an error status, none the client's timeout.
    # TorchServe's REST answer is its own: 500, or 507 after a SIGKILL (exit 137, which it
    # takes for the OOM killer). The gateway answers UNAVAILABLE (it said RESOURCE_EXHAUSTED).
    assert all(_worker_died(r) for r in failures), _describe(failures)
    assert not [r for r in results if r.status == "timeout"], "the client's timeout fired"
    # Requests sent while no worker was READY waited for the new one and were answered.
    assert [r for r in results if known < r.started < kill["replaced"]], "no request was sent during the outage"
    # The load went on after the replacement, and everything then was answered.
    assert any(r.ok and r.started > kill["replaced"] for r in results)
    assert all(r.ok for r in results if r.started > kill["replaced"]), _describe(failures)
    assert {r.kind for r in results if r.ok} == {"rest", "grpc"}
    # Our readiness is back: the management view, the gateway's health service.
    assert all(r.ready for r in serving.readiness()), readiness.summary(serving.readiness())
    serving_status = health_pb2.HealthCheckResponse.SERVING
    assert _health(serving) == serving_status and _health(serving, VICTIM) == serving_status
    # And plain requests afterwards succeed on both endpoints.
    after = Load(served, VICTIM, lambda load: len(load.results) + load.in_flight >= 40).start()
    after.join(120)
    assert not after.failures() and len(after.results) == 40, _describe(after.failures())
