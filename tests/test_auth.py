"""The operator's API token on the serving APIs: REST (nginx before TorchServe) and gRPC
inference (the gateway). Where the token comes from and the control API (with and without
TLS) are tests/test_auth_unit.py.

Real parts throughout: nginx from Debian's package (scripts/system_deps.sh), real gRPC
servers and channels, and two real TorchServes that share one token file, as two replicas
behind a Service would.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from datetime import datetime, timedelta, timezone

import grpc
import psutil
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._gen import inference_pb2, inference_pb2_grpc
from service.auth import (
    INVALID_MESSAGE,
    MISSING_MESSAGE,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ApiToken,
    load_token,
)
from service.predict_client import PredictionClient
from service.errors import ServiceError, Unauthenticated
from service.serving.torchserve.config import parse_properties, render_config_properties
from service.serving.torchserve.management import ManagementClient
from service.serving.torchserve.proxy import NginxProxy
from service.serving.settings import ServeSettings
from service.serving.torchserve.supervisor import Serving
from tests.test_serving import ECHO_HANDLER, build_archive, settings_for

pytestmark = pytest.mark.torchserve

TOKEN = "operator-token-0123456789abcdef"


def _assert_401(r: requests.Response, message: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"code": 401, "type": "Unauthenticated", "message": message}


# ---- nginx before a stub upstream (no TorchServe) --------------------------------------------
class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = json.dumps({"authorization": self.headers.get("Authorization"), "bytes": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_nginx_checks_the_token_limits_bodies_and_swaps_the_upstream_key(tmp_path):
    settings = settings_for(tmp_path / "store", tmp_path / "state", max_request_size_bytes=100_000)
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", settings.ts_inference_port), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy = NginxProxy(settings, ApiToken(TOKEN, "test"))
    try:
        proxy.start("first-key")
        assert (proxy.config_path.stat().st_mode & 0o777) == 0o600
        url = f"http://127.0.0.1:{settings.inference_port}/predictions/m"
        _assert_401(requests.post(url, data=b"x", timeout=10), MISSING_MESSAGE)
        _assert_401(requests.post(url, data=b"x", headers={"Authorization": "Bearer first-key"}, timeout=10),
                    INVALID_MESSAGE)
        ok = requests.post(url, data=b"x" * 100_000, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        # The caller's token never reaches the upstream: TorchServe's key does.
        assert ok.status_code == 200 and ok.json() == {"authorization": "Bearer first-key", "bytes": 100_000}
        big = requests.post(url, data=b"x" * 100_001, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert big.status_code == 413 and big.json()["type"] == "PayloadTooLarge"
        master = proxy.pid
        proxy.set_upstream_key("second-key")
        assert proxy.pid == master  # reloaded, not restarted
        again = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert again.json()["authorization"] == "Bearer second-key"
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
    assert not psutil.pid_exists(master) or psutil.Process(master).status() == psutil.STATUS_ZOMBIE


def _unauthenticated(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    return e.value.details()


# ---- two real TorchServes sharing one token file ------------------------------------------------
@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    store = root / "store"
    build_archive(store, root / "work", "echo", 1, ECHO_HANDLER)
    secret = root / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN)
    env = {TOKEN_FILE_ENV: str(secret)}  # what the Kubernetes manifests set, read the same way
    started = []
    try:
        for name in ("a", "b"):
            settings = settings_for(store, root / name, startup_timeout_s=90, max_request_size_bytes=200_000)
            serving = Serving(settings, api_token=load_token(settings.state_dir, env))
            started.append(serving)
            serving.start()
        yield started
    finally:
        for serving in started:
            serving.stop()


def _rest(serving, path="/predictions/echo", token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    kw.setdefault("json", {"x": 1})
    return requests.post(f"{serving.torchserve.inference_url}{path}", headers=headers, timeout=30, **kw)


def _grpc(serving, metadata, payload=b'{"x": 1}'):
    with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}",
                               options=[("grpc.max_send_message_length", 1 << 24)]) as channel:
        reply = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            inference_pb2.PredictionsRequest(model_name="echo", input={"data": payload}),
            metadata=metadata, timeout=30)
    return json.loads(reply.prediction)


def test_rest_wants_the_operator_token_on_every_replica(replicas):
    for serving in replicas:
        ok = _rest(serving)
        assert ok.status_code == 200 and ok.json()["echo"] == {"x": 1}, ok.text
        _assert_401(_rest(serving, token=None), MISSING_MESSAGE)
        _assert_401(_rest(serving, token="wrong-token-0123456789"), INVALID_MESSAGE)
        # TorchServe's own per-instance key is no public credential any more.
        _assert_401(_rest(serving, token=serving.torchserve.tokens.inference), INVALID_MESSAGE)
        ping = requests.get(f"{serving.torchserve.inference_url}/ping", timeout=30,
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert ping.status_code == 200 and "Healthy" in ping.text
        _assert_401(requests.get(f"{serving.torchserve.inference_url}/ping", timeout=30), MISSING_MESSAGE)
        # TorchServe's metrics stay open (the liveness probe), as documented.
        metrics = requests.get(f"{serving.torchserve.metrics_url}/metrics", timeout=30)
        assert metrics.status_code == 200
    # The CLI's and the clients' way to the token: the environment, here the same file.
    a = replicas[0]
    client = PredictionClient(a.torchserve.inference_url, f"127.0.0.1:{a.grpc_port}", token=TOKEN)
    assert client.rest_json("echo", {"y": 2})["echo"] == {"y": 2}
    assert client.grpc("echo", {"data": b'{"y": 3}'})["echo"] == {"y": 3}
    with pytest.raises(Unauthenticated, match="HTTP 401"):
        PredictionClient(a.torchserve.inference_url, "", token="wrong-token-0123456789").rest_json("echo", {})


def test_grpc_inference_wants_the_operator_token_health_does_not(replicas):
    for serving in replicas:
        assert _grpc(serving, [("authorization", f"Bearer {TOKEN}")])["echo"] == {"x": 1}
        assert _unauthenticated(lambda s=serving: _grpc(s, [])) == MISSING_MESSAGE
        assert _unauthenticated(
            lambda s=serving: _grpc(s, [("authorization", "Bearer wrong-token-0123456789")])) == INVALID_MESSAGE
        assert _unauthenticated(lambda s=serving: _grpc(
            s, [("authorization", f"Bearer {s.torchserve.tokens.inference}")])) == INVALID_MESSAGE
        with grpc.insecure_channel(f"127.0.0.1:{serving.grpc_port}") as channel:
            from google.protobuf import empty_pb2

            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            assert _unauthenticated(lambda: stub.Ping(empty_pb2.Empty(), timeout=30)) == MISSING_MESSAGE
            assert "Healthy" in stub.Ping(empty_pb2.Empty(), timeout=30,
                                          metadata=[("authorization", f"Bearer {TOKEN}")]).health
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_renewing_torchserve_keys_does_not_affect_clients(replicas):
    a = replicas[0]
    old = a.torchserve.tokens
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert a.renew_tokens_if_due(now=later) == ["management", "inference"]
    new = a.torchserve.tokens
    assert new.inference != old.inference and new.management != old.management
    # TorchServe itself refuses the old key now ...
    direct = requests.post(f"{a.torchserve.ts_inference_url}/predictions/echo", json={"x": 1},
                           headers={"Authorization": f"Bearer {old.inference}"}, timeout=30)
    assert "Token Authorization failed" in direct.text
    # ... while the operator's token keeps working, over REST and gRPC, many times.
    for i in range(20):
        r = _rest(a, json={"i": i})
        assert r.status_code == 200 and r.json()["echo"] == {"i": i}, r.text
        assert _grpc(a, [("authorization", f"Bearer {TOKEN}")], json.dumps({"i": i}).encode())["echo"] == {"i": i}
    assert {m["modelName"] for m in a.mgmt.list_models()} == {"echo"}
    # A key renewed behind modelctl's back (TorchServe's own API): the gateway follows at
    # once, the proxy at the supervisor's next look (sync_proxy_key, every 30 s).
    r = requests.put(f"{a.torchserve.management_url}/token", params={"type": "inference"},
                     headers={"Authorization": f"Bearer {a.torchserve.tokens.api}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert _grpc(a, [("authorization", f"Bearer {TOKEN}")])["echo"] == {"x": 1}
    assert a.torchserve.sync_proxy_key() is True
    assert _rest(a).status_code == 200
    assert a.torchserve.sync_proxy_key() is False


def test_oversized_bodies_are_refused_and_the_server_stays_up(replicas):
    a = replicas[0]
    limit = a.settings.max_request_size_bytes
    big = _rest(a, json=None, data=b"x" * (limit + 1))
    assert big.status_code == 413, big.text
    assert big.json()["type"] == "PayloadTooLarge" and str(limit) in big.json()["message"]
    with pytest.raises(grpc.RpcError) as e:
        _grpc(a, [("authorization", f"Bearer {TOKEN}")], b"x" * (limit + 1))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _rest(a).status_code == 200
    assert _grpc(a, [("authorization", f"Bearer {TOKEN}")])["echo"] == {"x": 1}


def test_private_ports_listen_on_loopback_only(replicas):
    """Management (REST, gRPC), TorchServe's REST and gRPC inference: 127.0.0.1, even with
    the public endpoints on every interface (the container's MODELCTL_HOST=0.0.0.0)."""
    a = replicas[0]
    s = a.settings
    private = {s.management_port, s.grpc_management_port, s.ts_inference_port, s.ts_grpc_inference_port}
    listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port in private}
    # Java reports loopback as IPv4-mapped IPv6 (::ffff:127.0.0.1): the same address.
    assert set(listening) == private, listening
    assert set(listening.values()) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    props = parse_properties(render_config_properties(ServeSettings(host="0.0.0.0")))
    for key in ("inference_address", "management_address"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", props[key]), (key, props[key])
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"


def test_registering_from_outside_the_model_store_is_refused(replicas, tmp_path):
    a = replicas[0]
    outside = tmp_path / "elsewhere" / "echo"
    outside.mkdir(parents=True)
    (outside / "7.mar").write_bytes((a.settings.model_store / "echo" / "1.mar").read_bytes())
    mgmt = ManagementClient(a.torchserve.management_url, lambda: a.torchserve.tokens.management)
    try:
        for url in (f"file://{outside}/7.mar", "http://127.0.0.1:9/echo/7.mar", "file:///etc/passwd"):
            with pytest.raises(ServiceError, match="(?i)allowed"):
                mgmt.register(url, initial_workers=1, synchronous=True)
        assert {m["modelName"] for m in mgmt.list_models()} == {"echo"}
    finally:
        mgmt.close()


def test_cli_predict_finds_the_token(replicas, monkeypatch, capsys):
    from service.cli import main

    a = replicas[0]
    s = a.settings
    args = ["predict", "echo", "--json", '{"z": 5}', "--state-dir", str(s.state_dir),
            "--inference-port", str(s.inference_port), "--grpc-inference-port", str(a.grpc_port)]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    # The replicas were given their token: their state dirs hold none to find.
    assert main(args) == 2 and "no API token" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_FILE_ENV, str(s.model_store.parent / "secret" / "token"))
    for extra in ([], ["--grpc"]):
        assert main(args + extra) == 0
        assert json.loads(capsys.readouterr().out)["echo"] == {"z": 5}
    monkeypatch.delenv(TOKEN_FILE_ENV)
    assert main(args + ["--token", "wrong-token-0123456789"]) == 2
    assert "HTTP 401: invalid bearer token" in capsys.readouterr().err
