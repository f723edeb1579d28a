"""Supervision on one machine (issue 12, point 2): ``modelctl serve`` restarts what dies.

The rules, without servers (service/serving/torchserve/liveness.py: the backoff, the give-up
rule, how an exit and a worker's end are told from TorchServe's log), are
tests/test_supervision_unit.py.

One real ``modelctl serve`` (ServingWithControl on TorchServe 0.12, its ``run_forever``
in a thread, as the CLI runs it, with the liveness look every 0.5 s and a give-up after 2
restarts of one component), killed piece by piece, in order, with no action of the test
in between: a worker (SIGKILL), the Java frontend (SIGKILL), the nginx master (SIGKILL),
the gateway. The gateway is a thread of this process, not a process: its "death" is its
event loop dying (a SystemExit raised inside it, which ends ``run_forever`` of an asyncio
loop as a crash would), which the supervisor sees as the thread's end. Each is back, and
every worker READY, within 60 s; the log names what died and why, and
``modelctl_component_restarts_total{component}`` on the instance's exporter counts it.
Meanwhile a client calls ListFineTuneJobs on the control API every 0.3 s: every call
succeeds, those made during each outage included. Last, nginx is killed until the restarts
loop: ``run_forever`` gives up, stops everything and says why (``failure``; the CLI exits 1).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from types import SimpleNamespace

import grpc
import psutil
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen import inference_pb2_grpc
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.app import with_control
from service.errors import Unavailable
from tests.test_serving import ECHO_HANDLER, alive, build_archive, predict_request, settings_for

pytestmark = pytest.mark.torchserve

#: Back, and every worker READY, within this long after a kill (the issue's bound).
BACK_WITHIN_S = 60.0
SUPERVISOR = "service.serving.torchserve.supervisor"




# ---- one real modelctl serve, killed piece by piece ---------------------------------------------


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record):
        with self._lock:
            self.messages.append(record.getMessage())

    def find(self, pattern: str) -> list[str]:
        with self._lock:
            return [m for m in self.messages if re.search(pattern, m)]


class ControlCalls:
    """ListFineTuneJobs every 0.3 s until stopped; each call's start, end and outcome."""

    def __init__(self, client: ControlClient):
        self.client = client
        self.calls: list[tuple[float, float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-calls", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.3):
            started = time.monotonic()
            try:
                self.client.list_jobs()
                error = None
            except Exception as exc:  # recorded: the tests assert there is none
                error = f"{type(exc).__name__}: {exc}"
            self.calls.append((started, time.monotonic(), error))

    def during(self, start: float, end: float) -> list[tuple[float, float, str | None]]:
        return [c for c in self.calls if start <= c[0] <= end]

    def stop(self):
        self._stop.set()
        self._thread.join(15)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervision")
    store = root / "store"
    build_archive(store, root / "work", "echo", 1, ECHO_HANDLER)
    build_archive(store, root / "work", "mirror", 1, ECHO_HANDLER)
    settings = settings_for(store, root / "state", startup_timeout_s=120, liveness_interval_s=0.5,
                            restart_limit=2, restart_window_s=600)
    control = ControlConfig(port=0, db_path=root / "control.db", runs_dir=root / "runs",
                            data_roots=(root,), max_concurrent_jobs=1, poll_s=0.2)
    serving = with_control("torchserve")(settings, control)
    records = Records()
    logger = logging.getLogger(SUPERVISOR)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    thread = threading.Thread(target=serving.run_forever, name="modelctl-serve", daemon=True)
    thread.start()
    calls = None
    try:
        assert _until(lambda: records.find("every worker READY") or not thread.is_alive(), 180)
        assert thread.is_alive(), records.messages
        token = serving.api_token.value
        calls = ControlCalls(ControlClient(serving.control.target, token=token, timeout_s=10))
        yield SimpleNamespace(serving=serving, settings=settings, records=records, thread=thread,
                              calls=calls, token=token, control_server=serving.control.server)
    finally:
        if calls is not None:
            calls.stop()
        serving._stop.set()
        thread.join(60)
        serving.stop()
        logger.removeHandler(records)
        logger.setLevel(level)


def _until(fn, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


def _restarts(served) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{served.settings.exporter_port}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^modelctl_component_restarts_total\{component="(\w+)"\} (\S+)$', text, re.M)}


def _health(served) -> int | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served.settings.grpc_inference_port}") as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=5).status
    except grpc.RpcError:
        return None


def _ready(served) -> bool:
    try:
        report = served.serving.readiness()
    except Unavailable:
        return False
    return {r.key for r in report} == {("echo", "1"), ("mirror", "1")} and all(r.ready for r in report)


def _serves(served) -> bool:
    """Every worker READY (readiness, gRPC health) and a prediction over REST and gRPC."""
    if not (_ready(served) and _health(served) == health_pb2.HealthCheckResponse.SERVING):
        return False
    try:
        r = requests.post(f"http://127.0.0.1:{served.settings.inference_port}/predictions/echo",
                          json={"v": 1}, headers={"Authorization": f"Bearer {served.token}"}, timeout=10)
        if r.status_code != 200:
            return False
        with grpc.insecure_channel(f"127.0.0.1:{served.settings.grpc_inference_port}") as channel:
            reply = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                predict_request("mirror", {"v": 2}), metadata=[("authorization", f"Bearer {served.token}")],
                timeout=10)
        return json.loads(reply.prediction)["echo"] == {"v": 2}
    except (requests.RequestException, grpc.RpcError):
        return False


def _outage(served, kill, component: str, before: dict[str, float], *, calls: bool = True) -> float:
    """Kill (``kill()``), see readiness go false, wait (no action) until everything serves
    again; returns the seconds it took. The control API answered throughout (``calls``)."""
    assert _serves(served)
    start = time.monotonic()
    kill()
    assert _until(lambda: not _ready(served), 10, 0.05), "readiness never went false"
    assert _until(lambda: _serves(served), BACK_WITHIN_S, 0.25), \
        f"{component} not back within {BACK_WITHIN_S:.0f}s: {served.records.messages[-8:]}"
    took = time.monotonic() - start
    print(f"\n{component}: killed, every worker READY and serving again after {took:.1f}s")
    assert served.thread.is_alive() and served.serving.failure is None
    after = _restarts(served)
    assert after[component] == before.get(component, 0) + 1, after
    assert all(after[c] == before.get(c, 0) for c in after if c != component), after
    if not calls:
        return took
    assert served.calls.during(start, start + took), "no control API call during the outage"
    assert [c for c in served.calls.calls if c[2]] == [], "a control API call failed"
    assert served.serving.control.server is served.control_server, "the control service was restarted"
    return took


def test_a_dead_worker_is_logged_with_model_version_pid_and_cause(served):
    report = {r.key: r for r in served.serving.readiness()}
    (pid,) = report[("echo", "1")].pids
    os.kill(pid, signal.SIGKILL)
    line = _until(lambda: served.records.find(rf"a worker of echo version 1 died \(pid {pid}\b"), 30)
    assert line, served.records.messages[-5:]
    assert "Worker disconnected" in line[0] and "process died" in line[0], line
    assert _until(lambda: _serves(served), BACK_WITHIN_S)
    assert _restarts(served) == {"torchserve": 0, "nginx": 0, "gateway": 0}, "a worker is TorchServe's to restart"


def test_a_killed_java_frontend_is_restarted_with_new_keys(served):
    serving = served.serving
    ts = serving.torchserve
    old_key, old_mgmt = ts.tokens.management, serving.mgmt
    frontend, workers = ts.frontend_pid, set(ts.group_pids())
    assert frontend in workers
    _outage(served, lambda: os.kill(frontend, signal.SIGKILL), "torchserve", _restarts(served))
    died = served.records.find(r"^TorchServe \(the Java frontend\) died \(killed by SIGKILL; ")
    assert died and "restarting it in 1s" in died[0], served.records.messages[-8:]
    assert served.records.find(r"^restarted TorchServe \(the Java frontend\) \(restart 1 of at most 2 ")
    assert served.records.find(r"^serving again: every worker READY, [\d.]+s after torchserve died$")
    assert not [p for p in workers if alive(p)], "the old frontend's workers were left"
    # The new TorchServe has new keys; the converger and the control API's deployer follow it.
    assert ts.tokens.management != old_key
    assert serving.mgmt is not old_mgmt
    assert serving.control.plane.deployer.mgmt() is serving.mgmt
    assert serving._require_mgmt()._headers() == {"Authorization": f"Bearer {ts.tokens.management}"}
    assert {m["modelName"] for m in serving.control.plane.deployer.mgmt().list_models()} == {"echo", "mirror"}
    listed = ControlClient(serving.control.target, token=served.token).list_models()
    assert listed.serving_available and {v.name for v in listed.versions} == {"echo", "mirror"}


def test_a_killed_nginx_is_restarted(served):
    proxy = served.serving.torchserve.proxy
    master, workers = proxy.pid, proxy.workers()
    assert workers
    _outage(served, lambda: os.kill(master, signal.SIGKILL), "nginx", _restarts(served))
    died = served.records.find(r"^nginx \(the REST proxy\) died \(killed by SIGKILL; end of ")
    assert died, served.records.messages[-8:]
    assert not [p for p in workers if alive(p)], "the old master's worker is left"
    assert proxy.pid != master


def test_a_gateway_whose_event_loop_died_is_restarted(served):
    """The gateway is a thread here: its death is its event loop's (a SystemExit raised in it)."""
    old = served.serving.gateway

    def crash():
        raise SystemExit("simulated crash of the gateway's event loop")

    _outage(served, lambda: old._loop.call_soon_threadsafe(crash), "gateway", _restarts(served))
    died = served.records.find(r"^the gRPC gateway died \(its event loop raised SystemExit")
    assert died, served.records.messages[-8:]
    assert served.serving.gateway is not old and served.serving.gateway.alive()


def test_restarts_that_loop_make_it_give_up_and_stop(served):
    """restart_limit 2 (MODELCTL_RESTART_LIMIT): nginx restarted once above, once more here,
    and its third death within the window ends run_forever with ``failure`` set."""
    served.calls.stop()
    serving = served.serving
    proxy = serving.torchserve.proxy
    master = proxy.pid
    _outage(served, lambda: os.kill(master, signal.SIGKILL), "nginx", _restarts(served), calls=False)
    assert _restarts(served)["nginx"] == 2
    pids = set(serving.torchserve.group_pids()) | {proxy.pid}
    ports = [served.settings.inference_port, served.settings.management_port,
             served.settings.grpc_inference_port]
    os.kill(proxy.pid, signal.SIGKILL)
    served.thread.join(60)
    assert not served.thread.is_alive(), "run_forever did not give up"
    assert serving.failure == ("nginx needed more than 2 restarts within 600s "
                               "(MODELCTL_RESTART_LIMIT, MODELCTL_RESTART_WINDOW_S)")
    assert served.records.find(r"^giving up: nginx needed more than 2 restarts .*exits non-zero")
    assert not [p for p in pids if alive(p)]
    for port in ports:  # stopped: nothing listens any more
        assert not [c for c in psutil.net_connections("tcp")
                    if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN], port
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
