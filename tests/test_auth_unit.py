"""The operator's API token without TorchServe: where it comes from, the bearer check, and the
control API (a stub plane behind it) with and without TLS. nginx and two real TorchServes
sharing one token file are tests/test_auth.py."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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
from service.control.api.client import ControlClient
from service.control.api.servicer import create_server, stop_server
from service.control.settings import ControlConfig
from service.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from service.predict_client import read_token
from tests.test_auth import TOKEN, _unauthenticated

pytestmark = pytest.mark.unit


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


def test_read_token_finds_the_generated_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    generated = load_token(tmp_path, create=True)
    assert read_token(tmp_path) == generated.value
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert read_token(tmp_path) == TOKEN  # the environment's token wins
