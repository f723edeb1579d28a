"""Clients for the prediction endpoints: REST (the proxy before TorchServe) and gRPC (the
gateway).

Both speak TorchServe's own wire formats, so any TorchServe client works the same way. Both
want the operator's API token (service/auth.py) as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import requests

from service.auth import TOKEN_ENV, TOKEN_FILE_ENV, find_token
from service.errors import (
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

KEY_FILE = "key_file.json"


def read_token(state_dir: Path | str | None = None, kind: str = "inference") -> str:
    """The token a client sends.

    ``inference`` (and ``api``, ``control``): the operator's API token, from
    ``MODELCTL_API_TOKEN_FILE`` / ``MODELCTL_API_TOKEN``, else ``<state_dir>/api_token``
    that ``modelctl serve`` generated. ``management``: TorchServe's own per-instance
    management key from key_file.json (loopback only; it expires and is renewed).
    """
    if kind == "management":
        path = Path(state_dir if state_dir is not None else ".modelctl") / KEY_FILE
        try:
            return json.loads(path.read_text())[kind]["key"]
        except FileNotFoundError as exc:
            raise Unavailable(f"no {KEY_FILE} in {path.parent}: is `modelctl serve` running "
                              "there?") from exc
    if kind not in ("inference", "api", "control"):
        raise InvalidArgument(f"unknown token kind {kind!r}")
    token = find_token(state_dir)
    if token is None:
        where = f"{state_dir}/api_token" if state_dir is not None else "the state dir"
        raise Unavailable(f"no API token: set {TOKEN_FILE_ENV} or {TOKEN_ENV}, or start "
                          f"`modelctl serve` once so that it generates {where}")
    return token.value


_STATUS_ERRORS = {400: InvalidArgument, 401: Unauthenticated, 404: NotFound,
                  413: PayloadTooLarge, 429: ResourceExhausted, 503: Unavailable}


def _error_from_http(status: int, body: bytes) -> ServiceError:
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:500]
    exc = _STATUS_ERRORS.get(status, ServiceError)(f"HTTP {status}: {message}")
    exc.http_status = status
    return exc


@dataclass
class PredictionClient:
    """Predict over REST (``rest_url``, e.g. http://127.0.0.1:8080) or gRPC (``grpc_target``)."""

    rest_url: str
    grpc_target: str
    token: str | None = None
    timeout_s: float = 60.0

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @staticmethod
    def _path(name: str, version: str | int | None) -> str:
        return f"/predictions/{name}" + (f"/{version}" if version not in (None, "") else "")

    def rest(self, name: str, inputs: dict[str, bytes], version=None, k: int | None = None) -> dict:
        """Several named inputs (images or JSON bytes) as multipart/form-data."""
        files = {key: (key, value, "application/octet-stream") for key, value in inputs.items()}
        if k is not None:
            files["k"] = (None, str(k))
        resp = requests.post(
            self.rest_url + self._path(name, version), files=files,
            headers=self._headers(), timeout=self.timeout_s,
        )
        if resp.status_code != 200:
            raise _error_from_http(resp.status_code, resp.content)
        return resp.json()

    def rest_json(self, name: str, body, version=None) -> dict:
        """One JSON body (sequences), sent as application/json."""
        resp = requests.post(
            self.rest_url + self._path(name, version), data=json.dumps(body),
            headers={**self._headers(), "Content-Type": "application/json"}, timeout=self.timeout_s,
        )
        if resp.status_code != 200:
            raise _error_from_http(resp.status_code, resp.content)
        return resp.json()

    def grpc(self, name: str, inputs: dict[str, bytes], version=None, k: int | None = None) -> dict:
        """TorchServe's InferenceAPIsService.Predictions; errors raise grpc.RpcError."""
        import grpc

        from service._gen import inference_pb2, inference_pb2_grpc

        payload = dict(inputs)
        if k is not None:
            payload["k"] = str(k).encode()
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            reply = stub.Predictions(
                inference_pb2.PredictionsRequest(
                    model_name=name, model_version=str(version or ""), input=payload
                ),
                metadata=metadata,
                timeout=self.timeout_s,
            )
        return json.loads(reply.prediction)
