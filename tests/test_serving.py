"""modelctl serve against a real TorchServe: config, registration, readiness, gateway, stop.

One TorchServe (module-scoped) on free ports, with a model store of tiny archives built
here from minimal handlers. Run ``python scripts/build_protos.py`` first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import psutil
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.predict_client import read_token
from service.errors import AlreadyExists, InvalidArgument, NotFound
from service.deploy import readiness
from service.serving.torchserve.management import ManagementClient
from service.serving.settings import ServeSettings
from service.deploy.store_scan import register_store
from service.serving.torchserve.supervisor import Serving
from service.serving.torchserve.process import torch_threads_for
from tests.helpers import free_port

from service._gen import inference_pb2, inference_pb2_grpc  # generated: scripts/build_protos.py

pytestmark = pytest.mark.torchserve

ECHO_HANDLER = '''
import json
import os



def _decode(row):
    value = row.get("data", row.get("body"))
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        value = json.loads(value)
    return value


def handle(data, context):
    if data is None:  # the initialisation call
        return None
    version = context.manifest["model"].get("modelVersion")
    out = []
    for i, row in enumerate(data):
        value = _decode(row)
        if isinstance(value, dict) and "bad" in value:
            context.set_response_status(400, "bad input", idx=i)
            out.append(json.dumps({"code": 400, "type": "InvalidInput",
                                   "message": "bad input"}))
        else:
            out.append(json.dumps({"echo": value, "version": version,
                                   "threads": os.environ.get("MODELCTL_TORCH_THREADS")}))
    return out
'''

BROKEN_HANDLER = '''
class BrokenHandler:
    def initialize(self, context):
        raise RuntimeError("this model cannot load")

    def handle(self, data, context):
        return ["never"] * len(data)
'''


def free_ports(n: int) -> list[int]:
    """``n`` free ports, none handed out before in this process (tests/helpers.free_port)."""
    return [free_port() for _ in range(n)]


def build_archive(store: Path, work: Path, name: str, version: int, handler_src: str) -> Path:
    """``<store>/<name>/<version>.mar`` from a handler source, with torch-model-archiver."""
    work.mkdir(parents=True, exist_ok=True)
    handler = work / f"{name}_handler.py"
    handler.write_text(textwrap.dedent(handler_src))
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run([str(archiver), "--model-name", name, "--version", str(version),
                    "--handler", str(handler), "--export-path", str(work), "-f"],
                   check=True, capture_output=True)
    target = store / name / f"{version}.mar"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(work / f"{name}.mar", target)
    return target


def settings_for(store: Path, state: Path, **kw) -> ServeSettings:
    p = free_ports(9)
    return ServeSettings(model_store=store, state_dir=state, inference_port=p[0],
                         management_port=p[1], metrics_port=p[2], grpc_inference_port=p[3],
                         grpc_management_port=p[4], ts_grpc_inference_port=p[5],
                         worker_port_base=p[6], exporter_port=p[7], ts_inference_port=p[8], **kw)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def eventually(fn, timeout_s=10.0, poll_s=0.2):
    """fn() until it returns truthy (returned) or the timeout passes (last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


# -- one real TorchServe ------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    store, work = root / "store", root / "work"
    build_archive(store, work, "echo", 1, ECHO_HANDLER)
    build_archive(store, work, "echo", 2, ECHO_HANDLER)
    build_archive(store, work, "mirror", 1, ECHO_HANDLER)
    settings = settings_for(store, root / "state", startup_timeout_s=90)
    sv = Serving(settings)
    sv.start()
    yield sv
    sv.stop()


@pytest.fixture(scope="module")
def stub(serving):
    channel = grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}")
    yield inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    channel.close()


@pytest.fixture
def md(serving):
    return list(serving.api_token.metadata())  # the operator's token (generated in the state dir)


def predict_request(model, payload, version=""):
    return inference_pb2.PredictionsRequest(model_name=model, model_version=version,
                                            input={"data": json.dumps(payload).encode()})


def test_start_registers_store_with_latest_default(serving):
    assert sorted(serving.registered) == [("echo", 1), ("echo", 2), ("mirror", 1)]
    report = {r.key: r for r in serving.report}
    assert set(report) == {("echo", "1"), ("echo", "2"), ("mirror", "1")}
    assert all(r.ready and r.ready_workers == 1 for r in report.values()), report
    assert report[("echo", "2")].is_default and not report[("echo", "1")].is_default
    # The real store is untouched: TorchServe registered symlinks in archive_dir.
    assert sorted(p.name for p in serving.settings.model_store.iterdir()) == ["echo", "mirror"]
    assert (serving.settings.archive_dir / "echo-v2.mar").resolve() == \
        (serving.settings.model_store / "echo" / "2.mar").resolve()


def test_rest_predict_needs_the_api_token(serving):
    url = f"{serving.torchserve.inference_url}/predictions/echo"
    key = serving.api_token.value
    assert key == (serving.settings.state_dir / "api_token").read_text().strip()
    r = requests.post(url, json={"x": 1}, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["echo"] == {"x": 1} and r.json()["version"] == "2"
    r1 = requests.post(f"{url}/1", json={"x": 1}, headers={"Authorization": f"Bearer {key}"},
                       timeout=30)
    assert r1.status_code == 200 and r1.json()["version"] == "1"
    assert requests.post(url, json={"x": 1}, timeout=30).status_code == 401  # no token


def test_workers_get_a_thread_budget(serving, stub, md):
    answer = json.loads(stub.Predictions(predict_request("mirror", {"t": 1}), metadata=md,
                                         timeout=30).prediction)
    assert answer["threads"] == str(torch_threads_for(3))  # 3 archives x 1 worker


def test_gateway_predictions_and_status_mapping(stub, md):
    ok = stub.Predictions(predict_request("echo", {"a": 1}), metadata=md, timeout=30)
    answer = json.loads(ok.prediction)
    assert answer["echo"] == {"a": 1} and answer["version"] == "2"  # the default version

    with pytest.raises(grpc.RpcError) as e:
        stub.Predictions(predict_request("nope", {"a": 1}), metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "Model not found: nope"

    with pytest.raises(grpc.RpcError) as e:
        stub.Predictions(predict_request("echo", {"a": 1}, version="9"), metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "9" in e.value.details() and "\n" not in e.value.details()

    with pytest.raises(grpc.RpcError) as e:
        stub.Predictions(predict_request("echo", {"bad": 1}), metadata=md, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "bad input"

    again = stub.Predictions(predict_request("echo", {"b": 2}, version="1"), metadata=md,
                             timeout=30)
    assert json.loads(again.prediction)["echo"] == {"b": 2}
    assert json.loads(again.prediction)["version"] == "1"


def test_gateway_wants_the_api_token(stub):
    from google.protobuf import empty_pb2

    for call in (lambda md: stub.Predictions(predict_request("echo", {"a": 1}), metadata=md,
                                             timeout=30),
                 lambda md: stub.Ping(empty_pb2.Empty(), metadata=md, timeout=30)):
        for md, message in (([("authorization", "Bearer wrong-token-0123456789")], "invalid"),
                            ([], "missing")):
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details().startswith(f"{message} bearer token")


def test_gateway_ping_and_stream(stub, md):
    """StreamPredictions is served as one unary call upstream: the stream's one message is
    the answer Predictions gives (served archives answer once per request; TorchServe's own
    streaming path kills the worker of such a handler, see gateway.StreamPredictions)."""
    from google.protobuf import empty_pb2

    assert "Healthy" in stub.Ping(empty_pb2.Empty(), metadata=md, timeout=30).health

    unary = json.loads(stub.Predictions(predict_request("echo", {"s": 2}), metadata=md, timeout=30).prediction)
    chunks = [json.loads(r.prediction) for r in
              stub.StreamPredictions(predict_request("echo", {"s": 2}), metadata=md, timeout=30)]
    assert chunks == [unary] and unary["echo"] == {"s": 2}

    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamPredictions(predict_request("echo", {"bad": 1}), metadata=md, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "bad input"

    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamPredictions(predict_request("nope", {"s": 1}), metadata=md, timeout=30))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def health_status(serving, service):
    channel = grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}")
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status
    finally:
        channel.close()


def test_health_and_reflection(serving):
    serving_ = health_pb2.HealthCheckResponse.SERVING
    assert health_status(serving, "") == serving_
    assert health_status(serving, "echo") == serving_
    assert health_status(serving, "echo/1") == serving_
    with pytest.raises(grpc.RpcError) as e:
        health_status(serving, "nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    channel = grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="echo"), timeout=10)
        assert next(watch).status == serving_  # a real status from the first answer on
        watch.cancel()
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for a in answers for s in a.list_services_response.service}
    finally:
        channel.close()
    assert {"org.pytorch.serve.grpc.inference.InferenceAPIsService",
            "grpc.health.v1.Health"} <= names


def test_management_client_errors_and_pagination(serving):
    mgmt = serving.mgmt
    assert {m["modelName"] for m in mgmt.list_models(page_size=1)} == {"echo", "mirror"}
    with pytest.raises(NotFound, match="nope"):
        mgmt.describe("nope")
    with pytest.raises(NotFound):
        mgmt.set_default("echo", 9)
    with pytest.raises(AlreadyExists, match="already registered"):
        mgmt.register("echo-v1.mar", initial_workers=1)
    bad = ManagementClient(serving.torchserve.management_url, "wrong")
    with pytest.raises(InvalidArgument, match="Token Authorization failed"):
        bad.list_models()
    # register_store again: everything is registered already, nothing breaks.
    assert sorted(register_store(mgmt, serving.settings)) == sorted(serving.registered)


def test_scale_changes_ready_workers(serving):
    mgmt = serving.mgmt
    mgmt.scale("mirror", 1, 2, synchronous=True)
    try:
        report = readiness.wait_until_ready(mgmt, [("mirror", 1)], timeout_s=60)
        mirror = next(r for r in report if r.key == ("mirror", "1"))
        assert mirror.ready and mirror.ready_workers == 2 and mirror.workers == 2
    finally:
        mgmt.scale("mirror", 1, 1, synchronous=True)
    mirror = next(r for r in readiness.check(mgmt) if r.key == ("mirror", "1"))
    assert mirror.workers == 1


def test_worker_that_cannot_load_is_not_ready(serving, tmp_path, caplog):
    settings = serving.settings
    build_archive(settings.model_store, tmp_path, "broken", 1, BROKEN_HANDLER)
    try:
        registered = register_store(serving.mgmt, settings)
        assert ("broken", 1) in registered
        report = readiness.wait_until_ready(serving.mgmt, [("broken", 1), ("echo", 2)],
                                            timeout_s=3)
        by_key = {r.key: r for r in report}
        broken = by_key[("broken", "1")]
        assert not broken.ready and broken.ready_workers == 0
        assert broken.reason.startswith("0/1 workers READY"), broken.reason
        assert by_key[("echo", "2")].ready and by_key[("mirror", "1")].ready

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert eventually(lambda: health_status(serving, "broken") == not_serving)
        assert health_status(serving, "") == not_serving
        assert health_status(serving, "echo") == health_pb2.HealthCheckResponse.SERVING

        # The supervisor's verdict after its timeout: one WARNING naming the model.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.serving.torchserve.supervisor"):
            serving.expected.append(("broken", 1))
            try:
                serving.wait_ready(timeout_s=1)
            finally:
                serving.expected.remove(("broken", 1))
        records = [r for r in caplog.records if r.name == "service.serving.torchserve.supervisor"]
        assert [r.levelname for r in records] == ["WARNING"]
        assert "broken:1" in records[0].getMessage() and "echo:" not in records[0].getMessage()
    finally:
        try:
            serving.mgmt.unregister("broken", 1)
        except NotFound:
            pass
        (settings.model_store / "broken" / "1.mar").unlink()
        (settings.model_store / "broken").rmdir()
    assert eventually(lambda: health_status(serving, "") == health_pb2.HealthCheckResponse.SERVING)

    # Everything ready again: one INFO line naming every endpoint.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.serving.torchserve.supervisor"):
        report = serving.wait_ready(timeout_s=30)
    assert all(r.ready for r in report) and {r.name for r in report} == {"echo", "mirror"}
    records = [r for r in caplog.records if r.name == "service.serving.torchserve.supervisor"]
    assert [r.levelname for r in records] == ["INFO"]
    line = records[0].getMessage()
    s = settings
    for endpoint in (f":{s.inference_port}/predictions", f":{serving.grpc_port}",
                     f":{s.management_port}", f":{s.metrics_port}/metrics"):
        assert endpoint in line, (endpoint, line)


def test_wait_until_ready_reports_missing_versions(serving):
    start = time.monotonic()
    report = readiness.wait_until_ready(serving.mgmt, [("echo", 1), ("ghost", 4)],
                                        timeout_s=1.0, poll_s=0.2)
    assert time.monotonic() - start < 10
    ghost = next(r for r in report if r.key == ("ghost", "4"))
    assert not ghost.ready and ghost.reason == "not registered"


def test_keys_are_renewed_before_they_expire(serving):
    from datetime import datetime, timedelta, timezone

    old = serving.torchserve.tokens
    assert serving.renew_tokens_if_due() == []  # an hour left: nothing to do
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert serving.renew_tokens_if_due(now=later) == ["management", "inference"]
    new = serving.torchserve.tokens
    assert new.management != old.management and new.inference != old.inference
    assert {m["modelName"] for m in serving.mgmt.list_models()} == {"echo", "mirror"}


def listening(port: int) -> list:
    """Sockets in LISTEN on ``port`` (any address), of any process."""
    return [c for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]


def bind_like_a_server(port: int) -> None:
    """Bind and listen on 127.0.0.1:``port`` as nginx, TorchServe (Netty) and gRPC do: with
    SO_REUSEADDR. A connection its server closed first stays in TIME_WAIT on the server's port
    for a minute, and only a bind without SO_REUSEADDR fails on that (EADDRINUSE)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_stop_leaves_no_process(serving, stub, md):
    """Last test of the module: it stops the shared TorchServe.

    Clients are still connected when it stops (the module's gRPC channel, and a kept-alive
    REST connection opened here), as they would be in production; the servers close those
    connections first, which leaves them in TIME_WAIT on the servers' ports. The ports are
    then free for a server (nothing listens; a bind with SO_REUSEADDR works), not for a plain
    bind(): that is what once failed here with EADDRINUSE (issue 12, point 7).
    """
    ts = serving.torchserve
    pids = set(ts.group_pids())
    workers = {w["pid"] for r in serving.mgmt.list_models()
               for e in serving.mgmt.describe(r["modelName"], "all") for w in e["workers"]}
    assert ts.pid in pids and ts.frontend_pid in pids and workers and workers <= pids
    ports = [serving.settings.inference_port, serving.settings.ts_inference_port,
             serving.settings.management_port, serving.grpc_port]
    nginx = {ts.proxy.pid, *ts.proxy.workers()}
    assert len(nginx) == 2 and all(alive(p) for p in nginx)  # the REST proxy: master, worker
    kept_alive = requests.Session()  # open across stop(): nginx closes it, first
    r = kept_alive.post(f"{ts.inference_url}/predictions/echo", json={"k": 1}, timeout=30,
                        headers={"Authorization": f"Bearer {serving.api_token.value}"})
    assert r.status_code == 200
    stub.Predictions(predict_request("echo", {"k": 2}), metadata=md, timeout=30)  # the channel is up
    try:
        serving.stop()
    finally:
        kept_alive.close()
    assert not [p for p in pids | workers | nginx if alive(p)]
    assert not ts.running()
    for port in ports:  # everything is closed, the ports are free again
        assert not listening(port), port
        bind_like_a_server(port)


def test_run_forever_serves_until_sigterm(tmp_path):
    """The `modelctl serve` path: from MODELCTL_* variables, SIGTERM stops everything."""
    store = tmp_path / "store"
    build_archive(store, tmp_path / "work", "echo", 1, ECHO_HANDLER)
    s = settings_for(store, tmp_path / "state")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for name in ("model_store", "state_dir", "inference_port", "ts_inference_port", "management_port",
                 "metrics_port", "grpc_inference_port", "grpc_management_port",
                 "ts_grpc_inference_port", "worker_port_base"):
        env[ServeSettings.env_var(name)] = str(getattr(s, name))
    code = ("import logging, sys\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from service.serving.settings import ServeSettings\n"
            "from service.serving.torchserve.supervisor import Serving\n"
            "Serving(ServeSettings.from_env()).run_forever()\n")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    descendants: set[int] = set()
    try:
        assert eventually(lambda: "every worker READY" in log_path.read_text()
                          or proc.poll() is not None, timeout_s=90, poll_s=0.3)
        assert proc.poll() is None, log_path.read_text()
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert len(descendants) >= 5, descendants  # launcher, java, one worker, nginx x2
        r = requests.post(f"http://127.0.0.1:{s.inference_port}/predictions/echo", json={"v": 1},
                          headers={"Authorization": "Bearer " + read_token(s.state_dir)},
                          timeout=30)
        assert r.status_code == 200 and r.json()["echo"] == {"v": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        assert not [p for p in descendants if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in descendants:  # a failed test must not leave a TorchServe behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
