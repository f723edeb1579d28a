"""Clients for the prediction endpoints: REST (TorchServe) and gRPC (the gateway).

Both speak TorchServe's own wire formats, so any TorchServe client works the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import requests

from service.errors import InvalidArgument, NotFound, ServiceError, Unavailable

KEY_FILE = "key_file.json"


def read_token(state_dir: Path | str, kind: str = "inference") -> str:
    """TorchServe's per-instance key (``inference`` or ``management``) from key_file.json."""
    path = Path(state_dir) / KEY_FILE
    try:
        return json.loads(path.read_text())[kind]["key"]
    except FileNotFoundError as exc:
        raise Unavailable(f"no {KEY_FILE} in {state_dir}: is `modelctl serve` running there?") from exc


_STATUS_ERRORS = {400: InvalidArgument, 404: NotFound, 413: InvalidArgument, 503: Unavailable}


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
