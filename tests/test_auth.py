"""The operator's API token on every API: REST (nginx before TorchServe), gRPC inference
(the gateway) and the control API (with and without TLS).

Real parts throughout: nginx from Debian's package (scripts/system_deps.sh), real gRPC
servers and channels, the openssl CLI for a self-signed certificate, and (second half) two
real TorchServes that share one token file, as two replicas behind a Service would.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import grpc
import psutil
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._gen import inference_pb2, inference_pb2_grpc
from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.auth import (
    INVALID_MESSAGE,
    MISSING_MESSAGE,
    STATE_FILE,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    ApiToken,
    find_token,
    load_token,
)
from service.predict_client import PredictionClient, read_token
from service.control.api.client import ControlClient
from service.control.settings import ControlConfig
from service.control.api.servicer import create_server, stop_server
from service.errors import FailedPrecondition, InvalidArgument, ServiceError, Unauthenticated
from service.serving.torchserve.config import parse_properties, render_config_properties
from service.serving.torchserve.management import ManagementClient
from service.serving.torchserve.proxy import NginxProxy
from service.serving.settings import ServeSettings
from service.serving.torchserve.supervisor import Serving
from tests.test_serving import ECHO_HANDLER, build_archive, settings_for

TOKEN = "operator-token-0123456789abcdef"


def _assert_401(r: requests.Response, message: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"code": 401, "type": "Unauthenticated", "message": message}


# ---- where the token comes from ------------------------------------------------------------
def test_token_from_file_env_or_generated_once(tmp_path, caplog):
    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN + "\n")  # a mounted Secret may end in a newline
    from_file = load_token(tmp_path / "s1", {TOKEN_FILE_ENV: str(secret), TOKEN_ENV: "ignored-token-xxxxxxx"})
    assert from_file.value == TOKEN and from_file.source == f"{TOKEN_FILE_ENV}={secret}"
    assert TOKEN not in repr(from_file)
    assert load_token(tmp_path / "s1", {TOKEN_ENV: TOKEN}).value == TOKEN
    assert not (tmp_path / "s1").exists()  # a provided token writes nothing

    with pytest.raises(FailedPrecondition, match="no API token"):
        load_token(tmp_path / "s2", {})
    assert find_token(tmp_path / "s2", {}) is None
    with caplog.at_level("INFO", logger="service.auth"):
        generated = load_token(tmp_path / "s2", {}, create=True)
    path = tmp_path / "s2" / STATE_FILE
    assert (path.stat().st_mode & 0o777) == 0o600
    assert str(path) in caplog.text and generated.value not in caplog.text
    assert len(generated.value) >= 32
    # Generated once: a restart, a client and the CLI's helper all read the same one.
    assert load_token(tmp_path / "s2", {}, create=True).value == generated.value
    assert find_token(tmp_path / "s2", {}).value == generated.value
    assert find_token(None, {"MODELCTL_STATE_DIR": str(tmp_path / "s2")}).value == generated.value

    for bad in ("short", "has space in the middle", "quote\"-0123456789abcdef", "$var-0123456789abcdef"):
        with pytest.raises(InvalidArgument, match=TOKEN_ENV):
            load_token(tmp_path, {TOKEN_ENV: bad})
    with pytest.raises(FailedPrecondition, match="cannot read"):
        load_token(tmp_path, {TOKEN_FILE_ENV: str(tmp_path / "missing")})


def test_bearer_check():
    token = ApiToken(TOKEN, "test")
    token.check(f"Bearer {TOKEN}")
    token.check(f"bearer   {TOKEN}")
    for header, message in ((None, MISSING_MESSAGE), ("", MISSING_MESSAGE),
                            (f"Basic {TOKEN}", INVALID_MESSAGE), (f"Bearer {TOKEN}x", INVALID_MESSAGE),
                            (TOKEN, INVALID_MESSAGE), ("Bearer", INVALID_MESSAGE)):
        with pytest.raises(Unauthenticated) as e:
            token.check(header)
        assert e.value.message == message and e.value.http_status == 401
        assert e.value.grpc_code == "UNAUTHENTICATED"
    with pytest.raises(Unauthenticated, match="more than one"):
        token.check_metadata([("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer x")])


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


# ---- the control API: token and TLS (a stub plane; no TorchServe) -------------------------------
class _Plane:
    def list_models(self, name):
        return [], True


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


def _control(tls=None):
    kw = {"tls_cert": tls[0], "tls_key": tls[1]} if tls else {}
    server, port = create_server(ControlConfig(port=0, max_workers=4, **kw), _Plane(),
                                 token=ApiToken(TOKEN, "test"))
    server.start()
    return server, f"127.0.0.1:{port}"


def _unauthenticated(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
    return e.value.details()


def test_control_api_needs_the_token_health_and_reflection_do_not():
    server, target = _control()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ModelControlStub(channel)
            request = pb.ListModelsRequest()
            assert _unauthenticated(lambda: stub.ListModels(request, timeout=10)) == MISSING_MESSAGE
            assert _unauthenticated(lambda: stub.ListModels(
                request, metadata=[("authorization", "Bearer wrong-token-0123456789")], timeout=10)) \
                == INVALID_MESSAGE
            # A streaming call is guarded too.
            assert _unauthenticated(lambda: list(stub.WatchFineTuneJob(
                pb.WatchFineTuneJobRequest(job_id="x"), timeout=10))) == MISSING_MESSAGE
            reply = stub.ListModels(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
            assert reply.serving_available
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            assert "modelctl.v1.ModelControl" in {s.name for a in answers
                                                  for s in a.list_services_response.service}
        with ControlClient(target, token=TOKEN) as client:
            assert client.list_models().serving_available
        with ControlClient(target, token="wrong-token-0123456789") as client:
            with pytest.raises(Unauthenticated, match=INVALID_MESSAGE):
                client.list_models()
    finally:
        stop_server(server)


def test_control_api_over_tls(certificate, monkeypatch):
    cert, _ = certificate
    server, target = _control(certificate)
    try:
        with ControlClient(target, token=TOKEN, tls_ca=cert) as client:
            assert client.list_models().serving_available
        monkeypatch.setenv("MODELCTL_CONTROL_TLS_CA", str(cert))  # the CLI's way
        with ControlClient(target, token=TOKEN) as client:
            assert client.list_models().serving_available
        with ControlClient(target, token="wrong-token-0123456789") as client:
            with pytest.raises(Unauthenticated):
                client.list_models()
        # Plaintext to the TLS port: no answer at all.
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ModelControlStub(channel).ListModels(
                    pb.ListModelsRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_server(server)
    with pytest.raises(InvalidArgument, match="MODELCTL_CONTROL_TLS_KEY"):
        ControlConfig.from_env({"MODELCTL_CONTROL_TLS_CERT": str(cert)})


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


def test_read_token_finds_the_generated_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    generated = load_token(tmp_path, create=True)
    assert read_token(tmp_path) == generated.value
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert read_token(tmp_path) == TOKEN  # the environment's token wins


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
