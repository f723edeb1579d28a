"""Client of TorchServe's REST management API, raising the service's named errors.

TorchServe answers errors with a JSON body ``{"code", "type", "message"}``; the status
becomes NotFound (404), AlreadyExists (409), InvalidArgument (400, which is also what a
missing, wrong or expired key gets: type ``InvalidKeyException``), Unavailable (503 and
no connection) or ServiceError (anything else), always with TorchServe's message.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Union
from urllib.parse import quote

import requests

from service.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

#: A key, or a function returning the current key (keys are renewed while serving).
Token = Union[str, Callable[[], str], None]

_BY_STATUS = {400: InvalidArgument, 404: NotFound, 409: AlreadyExists, 503: Unavailable}


def error_from_response(response: requests.Response) -> ServiceError:
    """The named error for a TorchServe error answer, keeping its message."""
    try:
        body = response.json()
        message = body.get("message") or response.text
        kind = body.get("type")
    except ValueError:
        message, kind = (response.text or response.reason or "").strip(), None
    cls = _BY_STATUS.get(response.status_code, ServiceError)
    text = f"TorchServe {response.status_code}"
    if kind:
        text += f" {kind}"
    return cls(f"{text}: {message}")


class ManagementClient:
    """TorchServe's management API at ``base_url`` (e.g. ``http://127.0.0.1:8081``)."""

    def __init__(self, base_url: str, token: Token = None, *, timeout_s: float = 30.0,
                 session: requests.Session | None = None):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._session = session or requests.Session()

    # -- transport ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self._token() if callable(self._token) else self._token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method: str, path: str, *, params=None, timeout_s=None):
        url = f"{self.base_url}{path}"
        for attempt in (1, 2):
            try:
                r = self._session.request(method, url, params=params, headers=self._headers(),
                                          timeout=timeout_s or self.timeout_s)
            except requests.RequestException as exc:
                raise Unavailable(f"TorchServe management API at {self.base_url}: {exc}") from None
            if r.status_code < 400:
                if not r.content:
                    return None
                try:
                    return r.json()
                except ValueError:
                    return r.text
            # A renewed key: a token function gives the new one; try once more.
            if (attempt == 1 and callable(self._token) and r.status_code == 400
                    and "InvalidKeyException" in r.text):
                continue
            raise error_from_response(r)

    # -- API ------------------------------------------------------------------------------

    def register(self, url_or_path: str, *, initial_workers: int, batch_size: int | None = None,
                 max_batch_delay_ms: int | None = None, synchronous: bool = False,
                 response_timeout_s: int | None = None) -> str:
        """Register an archive (a file name in TorchServe's model store, or an allowed URL).

        Returns TorchServe's status message. An already registered version raises
        AlreadyExists.
        """
        params = {"url": str(url_or_path), "initial_workers": int(initial_workers),
                  "synchronous": "true" if synchronous else "false"}
        if batch_size is not None:
            params["batch_size"] = int(batch_size)
        if max_batch_delay_ms is not None:
            params["max_batch_delay"] = int(max_batch_delay_ms)
        if response_timeout_s is not None:
            params["response_timeout"] = int(response_timeout_s)
        body = self._request("POST", "/models", params=params,
                             timeout_s=None if not synchronous else max(self.timeout_s, 300))
        return _status(body)

    def set_default(self, name: str, version) -> str:
        return _status(self._request("PUT", f"/models/{_q(name)}/{_q(version)}/set-default"))

    def describe(self, name: str, version=None) -> list[dict]:
        """Entries of ``GET /models/{name}[/{version}]``; version ``"all"`` lists every one.

        Without a version TorchServe describes the default version only.
        """
        path = f"/models/{_q(name)}" + (f"/{_q(version)}" if version is not None else "")
        body = self._request("GET", path)
        return body if isinstance(body, list) else [body]

    def list_models(self, page_size: int = 100) -> list[dict]:
        """Every registered model (``modelName``, ``modelUrl`` of the default version)."""
        models, token, seen = [], None, set()
        while True:
            params = {"limit": page_size}
            if token is not None:
                params["next_page_token"] = token
            body = self._request("GET", "/models", params=params) or {}
            page = body.get("models", [])
            models.extend(page)
            token = body.get("nextPageToken")
            if not page or token is None or token in seen:
                return models
            seen.add(token)

    def unregister(self, name: str, version) -> str:
        return _status(self._request("DELETE", f"/models/{_q(name)}/{_q(version)}"))

    def scale(self, name: str, version, min_workers: int, *, max_workers: int | None = None,
              synchronous: bool = False) -> str:
        params = {"min_worker": int(min_workers),
                  "synchronous": "true" if synchronous else "false"}
        if max_workers is not None:
            params["max_worker"] = int(max_workers)
        return _status(self._request("PUT", f"/models/{_q(name)}/{_q(version)}", params=params))

    def close(self) -> None:
        self._session.close()


def _q(part) -> str:
    return quote(str(part), safe="")


def _status(body) -> str:
    if isinstance(body, dict):
        return str(body.get("status", json.dumps(body)))
    return "" if body is None else str(body)
