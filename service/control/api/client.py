"""A Python client of the control API (``modelctl.v1.ModelControl``).

    with ControlClient("127.0.0.1:50051") as control:
        job = control.create_job({"base": "digits-cnn", "dataset": "builtin:digits", ...},
                                 deploy="deploy-if-better")
        for update in control.watch(job.id):       # state changes and epochs, live
            ...
        job = control.wait(job.id)                   # the final FineTuneJob
        control.deploy("digits-cnn", 3); control.rollback("digits-cnn")

Replies are the ``modelctl.v1`` messages. A failed call raises the named error of
:mod:`service.errors` that matches its status (NotFound, InvalidArgument, Unauthenticated,
...), with the server's message; ``exc.grpc_code`` keeps the status code.

Every call carries the operator's API token (``token``; by default the one
:func:`service.auth.find_token` finds: ``MODELCTL_API_TOKEN_FILE``, ``MODELCTL_API_TOKEN``,
or ``<state dir>/api_token`` of a local ``modelctl serve``). ``tls_ca`` (default
``$MODELCTL_CONTROL_TLS_CA``), a PEM file of the CA that signed the server's certificate,
makes the channel TLS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import grpc

from service._gen.modelctl.v1 import control_pb2 as pb
from service._gen.modelctl.v1 import control_pb2_grpc as pb_grpc
from service.auth import ApiToken, find_token, validate
from service.control.api import messages
from service.control.settings import DEFAULT_PORT, ControlConfig
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

#: A status code -> the named error a client raises for it.
_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
FINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
TARGET_ENV = "MODELCTL_CONTROL_TARGET"
TLS_CA_ENV = "MODELCTL_CONTROL_TLS_CA"


def default_target(environ=None) -> str:
    """``$MODELCTL_CONTROL_TARGET``, else 127.0.0.1:``$MODELCTL_CONTROL_PORT`` (50051)."""
    environ = os.environ if environ is None else environ
    if environ.get(TARGET_ENV):
        return environ[TARGET_ENV]
    port = environ.get(ControlConfig.env_var("port")) or DEFAULT_PORT
    return f"127.0.0.1:{port}"


def error_from_rpc(exc: grpc.RpcError, target: str = "") -> ServiceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or code.name
    if code == grpc.StatusCode.UNAVAILABLE and target:
        details = f"control API at {target}: {details}"
    error = _ERRORS.get(code, ServiceError)(details)
    error.grpc_code = code.name
    return error


class ControlClient:
    def __init__(self, target: str | None = None, *, timeout_s: float = 120.0,
                 token: ApiToken | str | None = None, tls_ca: str | Path | None = None):
        self.target = target or default_target()
        self.timeout_s = timeout_s
        if isinstance(token, str):
            token = ApiToken(validate(token, "the control API token"), "argument")
        self.token = token if token is not None else find_token()
        #: Sent with every call; none when no token was found (the server then says so).
        self._metadata = self.token.metadata() if self.token is not None else ()
        tls_ca = tls_ca if tls_ca is not None else (os.environ.get(TLS_CA_ENV) or None)
        if tls_ca:
            try:
                root = Path(tls_ca).read_bytes()
            except OSError as exc:
                raise FailedPrecondition(f"control API CA certificate {tls_ca}: "
                                         f"{exc.strerror or exc}") from None
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(self.target, credentials)
        else:
            self._channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.ModelControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout_s: float | None = None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout_s or self.timeout_s,
                                              metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from None

    # ---- jobs -----------------------------------------------------------------------------
    def create_job(self, spec, *, deploy: str = "none", workers: int = 0, runner: str = "",
                   tolerance: float | None = None) -> pb.FineTuneJob:
        """``spec``: a dict (sent as a struct), a Path to a JSON/YAML file, or JSON/YAML text.
        ``tolerance``: deploy-if-faster's metric tolerance (None: the service's default, 0.01)."""
        if deploy not in messages.POLICIES:
            raise InvalidArgument(f"deploy: unknown policy {deploy!r} (allowed: {', '.join(messages.POLICIES)})")
        request = pb.CreateFineTuneJobRequest(deploy_policy=messages.POLICIES[deploy], deploy_workers=workers,
                                              runner=runner)
        if tolerance is not None:
            request.deploy_tolerance = tolerance
        if isinstance(spec, dict):
            request.spec_struct.CopyFrom(messages.struct(json.loads(json.dumps(spec))))
        elif isinstance(spec, Path):
            if not spec.is_file():
                raise NotFound(f"run spec {spec} does not exist")
            request.spec_text = spec.read_text()
        else:
            request.spec_text = str(spec)
        return self._call("CreateFineTuneJob", request)

    def get_job(self, job_id: str) -> pb.FineTuneJob:
        return self._call("GetFineTuneJob", pb.GetFineTuneJobRequest(job_id=job_id))

    def list_jobs(self, *, states=(), output_model: str = "", page_size: int = 0,
                  page_token: str = "") -> pb.ListFineTuneJobsResponse:
        """``states``: names ("RUNNING") or JobState values."""
        values = [messages.STATES[s] if isinstance(s, str) else s for s in states]
        return self._call("ListFineTuneJobs", pb.ListFineTuneJobsRequest(
            states=values, output_model=output_model, page_size=page_size, page_token=page_token))

    def cancel_job(self, job_id: str) -> pb.FineTuneJob:
        return self._call("CancelFineTuneJob", pb.CancelFineTuneJobRequest(job_id=job_id))

    def watch(self, job_id: str, *, skip_history: bool = False,
              timeout_s: float | None = None) -> Iterator[pb.JobUpdate]:
        """The job's updates until it is final (``timeout_s``: none by default)."""
        stream = self.stub.WatchFineTuneJob(
            pb.WatchFineTuneJobRequest(job_id=job_id, skip_history=skip_history), timeout=timeout_s,
            metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        finally:
            stream.cancel()

    def wait(self, job_id: str, timeout_s: float | None = None) -> pb.FineTuneJob:
        """Block until the job is final; returns it."""
        last = None
        for update in self.watch(job_id, skip_history=True, timeout_s=timeout_s):
            last = update.job
        if last is None or last.state not in FINAL:
            return self.get_job(job_id)
        return last

    # ---- models ---------------------------------------------------------------------------
    def list_models(self, name: str = "") -> pb.ListModelsResponse:
        return self._call("ListModels", pb.ListModelsRequest(name=name))

    def deploy(self, name: str, version: int, *, workers: int = 0, timeout_s: float = 0.0) -> pb.Deployment:
        return self._call("DeployModel", pb.DeployModelRequest(name=name, version=int(version), workers=workers,
                                                               timeout_s=timeout_s),
                          timeout_s=max(self.timeout_s, timeout_s + 30))

    def rollback(self, name: str, version: int = 0, *, workers: int = 0) -> pb.Deployment:
        return self._call("RollbackModel", pb.RollbackModelRequest(name=name, version=int(version), workers=workers))
