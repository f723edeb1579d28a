"""modelctl serve's parts without a server: settings, TorchServe's config, the store scan, the
gateway's one status mapping (a dead worker's answer included), and a launcher that fails. The real TorchServe is
tests/test_serving.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from service._gen import inference_pb2  # generated: scripts/build_protos.py
from service.errors import InvalidArgument, Unavailable
from service.serving.settings import ServeSettings
from service.deploy.store_scan import scan_model_store
from service.serving.torchserve.config import frontend_jvm_args, parse_properties, render_config_properties
from service.serving.torchserve.gateway import error_body, translate
from service.serving.torchserve.process import TorchServeProcess
from tests.test_serving import settings_for

pytestmark = pytest.mark.unit


def test_settings_from_env_precedence_and_errors(tmp_path):
    env = {"MODELCTL_MODEL_STORE": str(tmp_path / "store"), "MODELCTL_INFERENCE_PORT": "9180",
           "MODELCTL_STARTUP_TIMEOUT_S": "7.5", "MODELCTL_WORKERS_PER_MODEL": "2"}
    s = ServeSettings.from_env(env, workers_per_model=3, metrics_port=None)
    assert s.model_store == tmp_path / "store"
    assert s.inference_port == 9180 and s.startup_timeout_s == 7.5
    assert s.workers_per_model == 3  # an override beats the environment
    assert s.metrics_port == 8082  # None = not given: the default stays
    assert s.state_dir == Path.cwd() / ".modelctl"
    with pytest.raises(InvalidArgument, match="MODELCTL_INFERENCE_PORT"):
        ServeSettings.from_env({"MODELCTL_INFERENCE_PORT": "http"})
    with pytest.raises(InvalidArgument, match="MODELCTL_METRICS_PORT"):
        ServeSettings.from_env({"MODELCTL_METRICS_PORT": "70000"})
    with pytest.raises(InvalidArgument, match="ports must differ"):
        ServeSettings.from_env({"MODELCTL_METRICS_PORT": "8080"})
    with pytest.raises(InvalidArgument, match="workers_per_model"):
        ServeSettings.from_env({}, workers_per_model="many")


def test_frontend_jvm_settings(tmp_path):
    env = {"MODELCTL_FRONTEND_HEAP_MB": "256",
           "MODELCTL_FRONTEND_JVM_OPTIONS": " -XX:+UseSerialGC  -XX:NativeMemoryTracking=summary "}
    s = ServeSettings.from_env(env, model_store=tmp_path / "store", state_dir=tmp_path / "state")
    assert frontend_jvm_args(s) == ["-Xms256m", "-Xmx256m", "-XX:+AlwaysPreTouch",
                                    "-XX:+ExitOnOutOfMemoryError",
                                    f"-Djava.io.tmpdir={(tmp_path / 'state' / 'tmp').as_posix()}",
                                    "-XX:+UseSerialGC", "-XX:NativeMemoryTracking=summary"]
    assert parse_properties(render_config_properties(s))["vmargs"] == " ".join(frontend_jvm_args(s))
    # TorchServe splits vmargs on blanks: a state dir with one keeps TEMP (set by
    # TorchServeProcess) for the JVM's tmpdir, and the heap options stay
    blank = ServeSettings(model_store=tmp_path / "store", state_dir=tmp_path / "my state")
    assert frontend_jvm_args(blank) == ["-Xms512m", "-Xmx512m", "-XX:+AlwaysPreTouch",
                                        "-XX:+ExitOnOutOfMemoryError"]
    with pytest.raises(InvalidArgument, match="MODELCTL_FRONTEND_HEAP_MB: frontend_heap_mb must be >= 64"):
        ServeSettings.from_env({"MODELCTL_FRONTEND_HEAP_MB": "32"})
    with pytest.raises(InvalidArgument, match="MODELCTL_FRONTEND_JVM_OPTIONS: .*'UseSerialGC', which is not"):
        ServeSettings.from_env({"MODELCTL_FRONTEND_JVM_OPTIONS": "-Xlog:gc UseSerialGC"})
    with pytest.raises(InvalidArgument, match="holds '-Xmx2g': set the heap with frontend_heap_mb"):
        ServeSettings(frontend_jvm_options="-Xmx2g")


def test_config_properties(tmp_path):
    store = tmp_path / "my store+1"
    s = settings_for(store, tmp_path / "state", host="0.0.0.0")
    text = render_config_properties(s)
    props = parse_properties(text)
    assert props["management_address"] == f"http://127.0.0.1:{s.management_port}"
    # TorchServe's REST inference is loopback only: the public port is the proxy's.
    assert props["inference_address"] == f"http://127.0.0.1:{s.ts_inference_port}"
    assert props["metrics_address"] == f"http://0.0.0.0:{s.metrics_port}"
    assert props["grpc_inference_address"] == "127.0.0.1"
    assert props["grpc_inference_port"] == str(s.ts_grpc_inference_port)
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"
    assert props["metrics_mode"] == "prometheus"
    assert props["install_py_dep_per_model"] == "false"
    assert props["initial_worker_port"] == str(s.worker_port_base)
    assert props["max_request_size"] == str(s.max_request_size_bytes)
    assert props["model_store"] == s.archive_dir.as_posix()
    # the frontend's heap is fixed and resident from the start (frontend_heap_mb, 512 MiB)
    assert props["vmargs"].split() == ["-Xms512m", "-Xmx512m", "-XX:+AlwaysPreTouch",
                                       "-XX:+ExitOnOutOfMemoryError",
                                       f"-Djava.io.tmpdir={(s.state_dir / 'tmp').as_posix()}"]
    # allowed_urls: archives of this store only (Python's regex reads this one like Java).
    allowed = re.compile(props["allowed_urls"])
    root = store.as_posix()
    assert allowed.fullmatch(f"file://{root}/digits-cnn/3.mar")
    for url in (f"file://{root}X/digits-cnn/3.mar", f"file://{root}/a/b/3.mar",
                f"file://{root}/digits/x.mar", "file:///etc/passwd.mar",
                "https://example.com/m.mar", f"file://{root}/m/3.mar.txt"):
        assert not allowed.fullmatch(url), url
    # Each non-default key is explained by a comment just above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("allowed_urls="):
            assert lines[i - 1].startswith("#")


def test_scan_model_store_ignores_everything_else(tmp_path):
    for rel in ("b/2.mar", "b/10.mar", "a/1.mar", "a/notes.txt", "a/x.mar", "c/1.5.mar",
                ".hidden/1.mar", "1.mar"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "d" / "3.mar").mkdir(parents=True)  # a directory, not an archive
    assert scan_model_store(tmp_path) == {"a": [1], "b": [2, 10]}
    assert scan_model_store(tmp_path / "missing") == {}


def test_translate_is_the_one_status_mapping():
    def resp(body):
        return inference_pb2.PredictionResponse(prediction=json.dumps(body).encode())

    # By the body's type, through service.errors' named errors; its code is not read.
    cases = {"InvalidInput": "INVALID_ARGUMENT", "PayloadTooLarge": "INVALID_ARGUMENT",
             "InvalidSpec": "INVALID_ARGUMENT", "NotFound": "NOT_FOUND", "AlreadyExists": "ALREADY_EXISTS",
             "ArchiveRefused": "FAILED_PRECONDITION", "ResourceExhausted": "RESOURCE_EXHAUSTED",
             "Unavailable": "UNAVAILABLE", "Internal": "INTERNAL", "X": "INTERNAL"}
    for type_, name in cases.items():
        err = translate(resp({"code": 418, "type": type_, "message": f"m {type_}"}))
        assert err is not None and err.grpc_code == name and err.message == f"m {type_}"
        assert err.type == (type_ if type_ != "X" else "ServiceError")
    for ok in ({"code": 200, "type": "X", "message": "m"}, {"code": 400, "type": "X"},
               {"code": 400, "type": "X", "message": "m", "extra": 1}, {"echo": 1},
               {"code": True, "type": "X", "message": "m"}):
        assert translate(resp(ok)) is None, ok
    assert error_body(b"not json") is None and error_body(b"[1]") is None


def test_start_reports_a_launcher_that_exits(tmp_path):
    fake = tmp_path / "torchserve"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    (tmp_path / "store").mkdir()
    ts = TorchServeProcess(settings_for(tmp_path / "store", tmp_path / "state"),
                           torchserve_bin=fake)
    with pytest.raises(Unavailable, match="(?s)status 3.*boom: cannot start"):
        ts.start(timeout_s=20)
    assert not ts.running()


def test_tmp_dir_stays_short_enough_for_worker_sockets(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    ts = TorchServeProcess(settings_for(tmp_path, deep))
    assert len(str(ts.tmp_dir / ".ts.sock.65535")) < 108
    assert TorchServeProcess(settings_for(tmp_path, tmp_path / "s")).tmp_dir == tmp_path / "s" / "tmp"


def test_the_gateway_answers_a_dead_worker_unavailable():
    """TorchServe's gRPC statuses for "Worker died.", as it sends them (seen in tests/test_resilience.py)."""
    died = "Worker died.\norg.pytorch.serve.http.InternalServerException"
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED):
        err = translate(AioRpcError(code, Metadata(), Metadata(), details=died))
        assert isinstance(err, Unavailable) and err.message == "Worker died." and err.grpc_code == "UNAVAILABLE"
    other = AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, Metadata(), Metadata(), details="too many")
    assert translate(other) is None, "other RESOURCE_EXHAUSTED answers pass through"
