"""The native engine's REST protocol: OIP v2 and TorchServe's ``/predictions``, as a bare ASGI app.

Routes (every one wants ``Authorization: Bearer <API token>`` except ``/v2/health/*``):

* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 or 503 (no token: probes);
* ``GET /v2``: server metadata;
* ``GET /v2/models/{m}[/versions/{v}]``: model metadata; ``…/ready``: 200 when ready, else
  503 (404 for an unknown model);
* ``POST /v2/models/{m}[/versions/{v}]/infer``: JSON tensors, or the binary tensor
  extension (``Inference-Header-Content-Length``) in the request and, where asked
  (``binary_data_output`` or an output's ``binary_data``), in the answer;
* ``POST /predictions/{m}[/{v}]``: TorchServe's inference API (raw body, JSON body or
  multipart fields; ``X-Top-K`` header or a ``k`` field), the same answers and statuses;
  ``GET /ping``.

Errors carry the statuses of :mod:`service.errors`: OIP routes answer ``{"error": message}``,
TorchServe's routes ``{"code", "type", "message"}``. 429 comes with ``Retry-After``.

Bounds: a body over ``max_request_size_bytes`` gets 413 before it is read (by its
Content-Length) or as soon as it passes the limit (chunked); a body's declared length is
taken from the replica's byte budget before it is read, 429 when it does not fit.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import unquote

from service.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from service.serving.native import oip
from service.serving.native.dataplane import DataPlane

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
TOP_K_HEADER = "x-top-k"
SERVER_NAME = "modelctl"

_SEG = r"([^/]+)"
_MODEL = re.compile(rf"^/v2/models/{_SEG}(?:/versions/{_SEG})?(/ready|/infer)?/?$")
_PREDICT = re.compile(rf"^/predictions/{_SEG}(?:/{_SEG})?/?$")


class RestApp:
    """ASGI application over a :class:`DataPlane`."""

    def __init__(self, plane: DataPlane, settings, token, *, server_version: str = ""):
        self.plane = plane
        self.settings = settings
        self.token = token
        self.server_version = server_version
        self.max_body = settings.max_request_size_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        oip_route = path == "/v2" or path.startswith("/v2/")
        try:
            status, body, headers = await self._route(scope, receive, path, method)
        except ServiceError as exc:
            status, body, headers = self._error(exc, oip_route)
        except Exception:  # a bug: 500, and the server stays up
            log.exception("REST %s %s failed", method, path)
            status, body, headers = self._error(ServiceError("internal error"), oip_route)
        # A declared length: one write for the body, no chunked terminator after it.
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _error(self, exc: ServiceError, oip_route: bool):
        body = {"error": exc.message} if oip_route else exc.to_dict()
        headers = [(b"content-type", b"application/json")]
        if isinstance(exc, ResourceExhausted):
            headers.append((b"retry-after", str(self.settings.retry_after_s).encode()))
        if isinstance(exc, Unauthenticated):
            headers.append((b"www-authenticate", b"Bearer"))
        return exc.http_status, json.dumps(body).encode(), headers

    # -- routing --------------------------------------------------------------------------

    async def _route(self, scope, receive, path: str, method: str):
        if path in ("/v2/health/live", "/v2/health/ready"):
            ok = self.plane.live() if path.endswith("live") else self.plane.ready()
            return _json(200 if ok else 503, {"live" if path.endswith("live") else "ready": ok})
        headers = _headers(scope)
        self.token.check(headers.get("authorization"))
        if path in ("/v2", "/v2/"):
            _method(method, "GET")
            return _json(200, {"name": SERVER_NAME, "version": self.server_version,
                               "extensions": ["binary_tensor_data", "model_repository_health"]})
        if path == "/ping":
            _method(method, "GET")
            return _json(200 if self.plane.ready() else 503,
                         {"status": "Healthy" if self.plane.ready() else "Unhealthy"})
        m = _MODEL.match(path)
        if m:
            name, version, action = unquote(m.group(1)), _opt(m.group(2)), m.group(3)
            if action == "/infer":
                _method(method, "POST")
                return await self._infer(scope, receive, headers, name, version)
            _method(method, "GET")
            entry = self.plane.version(name, version)
            if action == "/ready":
                return _json(200 if entry.ready else 503, {"name": name, "ready": entry.ready})
            return _json(200, self._metadata(entry))
        m = _PREDICT.match(path)
        if m:
            _method(method, "POST", "PUT")
            return await self._predictions(scope, receive, headers, unquote(m.group(1)), _opt(m.group(2)))
        raise NotFound(f"no route {method} {path}")

    def _metadata(self, entry) -> dict:
        if not entry.ready:
            raise Unavailable(f"{entry.name} version {entry.version} is not ready ({entry.state.lower()})")
        versions = [v.version for v in self.plane.models.versions() if v.name == entry.name]
        return {"name": entry.name, "versions": versions, "platform": "pytorch_modelctl",
                **oip.model_io(entry.predictor).metadata(),
                "parameters": {"version": entry.version, "family": entry.predictor.spec.family,
                               "task": entry.predictor.spec.task, "labels": entry.predictor.labels}}

    # -- bodies ---------------------------------------------------------------------------

    async def _body(self, receive, headers):
        """The body, read within the size limit and the byte budget; (bytes, admission)."""
        declared = headers.get("content-length")
        if declared is not None:
            size = _decimal(declared)
            if size is None:
                raise InvalidInput("Content-Length is not a number")
            if size > self.max_body:
                raise PayloadTooLarge(f"request body of {_short(declared)} bytes; the limit is {self.max_body} "
                                      "(max_request_size_bytes)")
            declared = size
        reserved = self.plane.reserve_bytes(declared if declared is not None else self.max_body)
        try:
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise InvalidInput("the client went away before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(f"request body over the limit of {self.max_body} bytes "
                                          "(max_request_size_bytes)")
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
            return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), reserved
        except BaseException:
            reserved.release()
            raise

    async def _infer(self, scope, receive, headers, name, version):
        body, reserved = await self._body(receive, headers)
        try:
            entry = self.plane.version(name, version)
            if not entry.ready:
                raise Unavailable(f"{entry.name} version {entry.version} is not ready ({entry.state.lower()})")
            io = oip.model_io(entry.predictor)
            request, inputs, json_bytes = _parse_infer(body, headers.get(HEADER_LENGTH), io)
            payload = oip.to_payload(io, inputs, json_bytes=json_bytes)
            params = request.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidInput("'parameters' must be an object")
            outputs_req = request.get("outputs")
            wanted, binary = _wanted_outputs(outputs_req, params)
        except BaseException:
            reserved.release()
            raise
        answer = await self.plane.predict(name, version, payload, k=oip.parse_top_k(params), reserved=reserved)
        tensors = oip.to_outputs(io, answer, entry.predictor.labels, wanted)
        head: dict[str, Any] = {"model_name": answer["model"], "model_version": answer["version"]}
        if isinstance(request.get("id"), str):
            head["id"] = request["id"]
        blobs, outs = [], []
        for t in tensors:
            desc: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            if binary(t.name):
                raw = oip.to_raw(t)
                desc["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                desc["data"] = oip.to_json_data(t)
            outs.append(desc)
        head["outputs"] = outs
        text = json.dumps(head).encode()
        if not blobs:
            return 200, text, [(b"content-type", b"application/json")]
        return 200, b"".join([text, *blobs]), [
            (b"content-type", b"application/octet-stream"),
            (HEADER_LENGTH.encode(), str(len(text)).encode())]

    async def _predictions(self, scope, receive, headers, name, version):
        body, reserved = await self._body(receive, headers)
        try:
            payload = _torchserve_payload(body, headers.get("content-type", ""))
            k = headers.get(TOP_K_HEADER)
        except BaseException:
            reserved.release()
            raise
        answer = await self.plane.predict(name, version, payload, k=k, reserved=reserved)
        return _json(200, answer)


# ---- helpers -------------------------------------------------------------------------------

def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope["headers"]:
        k = key.decode("latin-1").lower()
        if k == "authorization" and k in out:
            raise Unauthenticated("more than one Authorization header")
        out[k] = value.decode("latin-1")
    return out


def _method(method: str, *allowed: str) -> None:
    if method not in allowed:
        err = InvalidInput(f"method {method} not allowed here (allowed: {', '.join(allowed)})")
        err.http_status = 405
        raise err


def _opt(part: str | None) -> str | None:
    return unquote(part) if part else None


def _decimal(text: str) -> int | None:
    """A header's non-negative decimal number (ASCII digits, blanks around), else None.

    ``str.isdigit`` alone takes a superscript (a latin-1 header byte 0xB2 is ``²``) for a
    digit, and ``int`` refuses more than 4300 digits: either was a 500. Leading zeros are
    dropped; a number of more than 19 digits is returned as ``2**63``, beyond any body."""
    text = text.strip(" \t")
    if not text or not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else 1 << 63


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _json(status: int, body) -> tuple[int, bytes, list]:
    return status, json.dumps(body).encode(), [(b"content-type", b"application/json")]


def _parse_infer(body: bytes, header_length: str | None, io: oip.ModelIO | None = None):
    """The request's JSON part, its input tensors, and whether BYTES came as JSON text.

    ``io``: the model's; each input's name and datatype are checked against it, and its shape
    against ``io.max_elements``, before its data is decoded."""
    max_elements = io.max_elements if io is not None else 0
    if header_length is not None:
        n = _decimal(header_length)
        if n is None:
            raise InvalidInput(f"{HEADER_LENGTH} is not a number")
        if n > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {_short(header_length.strip())}, beyond the body's "
                               f"{len(body)} bytes")
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, memoryview(b"")
    try:
        request = json.loads(head, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"the inference request is not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(request, dict):
        raise InvalidInput("the inference request must be a JSON object")
    _check_depth(request)
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    tensors, pos, json_bytes = [], 0, False
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise InvalidInput(f"input {i} is not an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"input {i} needs a 'name' and a 'datatype' (strings)")
        if io is not None:
            oip.check_input(io, name, datatype)
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0")
            if pos + size > len(rest):
                raise InvalidInput(f"input {name!r}: binary_data_size {size} goes beyond the body "
                                   f"({len(rest) - pos} bytes left)")
            tensors.append(oip.from_raw(name, datatype, shape, rest[pos:pos + size], max_elements))
            pos += size
        else:
            if "data" not in t:
                raise InvalidInput(f"input {name!r} has neither 'data' nor a binary_data_size")
            tensors.append(oip.from_json(name, datatype, shape, t["data"], max_elements))
            json_bytes = json_bytes or datatype == "BYTES"
    if pos != len(rest):
        raise InvalidInput(f"{len(rest) - pos} bytes of binary data after the last input's")
    return request, tensors, json_bytes


#: Deepest JSON nesting an inference request may have (a tensor of 8 dimensions inside the
#: request's own 3 levels needs 11). Python's JSON reader refuses depths past the
#: interpreter's recursion limit, but that limit is process-wide (torch.compile raises it),
#: so the bound is checked here, on the parsed value, without recursion.
MAX_JSON_DEPTH = 32


def _check_depth(value) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidInput(f"the inference request is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))


def _wanted_outputs(outputs_req, params: dict):
    """(names asked for or None, binary(name) -> bool)."""
    default_binary = params.get("binary_data_output") is True
    if outputs_req is None:
        return None, lambda name: default_binary
    if not isinstance(outputs_req, list):
        raise InvalidInput("'outputs' must be a list")
    names, binary = [], {}
    for i, o in enumerate(outputs_req):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput(f"output {i} needs a 'name'")
        p = o.get("parameters") or {}
        names.append(o["name"])
        binary[o["name"]] = p.get("binary_data", default_binary) is True if isinstance(p, dict) else default_binary
    return names, lambda name: binary.get(name, default_binary)


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _torchserve_payload(body: bytes, content_type: str) -> dict[str, Any]:
    """TorchServe's request inputs: a multipart body's fields, or the body as ``body``."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return parse_multipart(body, content_type)
    return {"body": body}


_DISPOSITION_NAME = re.compile(r'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name; InvalidInput for a malformed one."""
    m = _BOUNDARY.search(content_type)
    if not m:
        raise InvalidInput("multipart/form-data without a boundary")
    delimiter = b"--" + m.group(1).encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 3 or not parts[-1].startswith(b"--"):
        raise InvalidInput("malformed multipart/form-data body: no closing boundary")
    fields: dict[str, bytes] = {}
    for part in parts[1:-1]:
        if not part.startswith(b"\r\n") or not part.endswith(b"\r\n"):
            raise InvalidInput("malformed multipart/form-data part")
        head, sep, value = part[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise InvalidInput("malformed multipart/form-data part: no blank line after its headers")
        name = None
        for line in head.split(b"\r\n"):
            key, _, val = line.decode("latin-1").partition(":")
            if key.strip().lower() == "content-disposition":
                found = _DISPOSITION_NAME.search(val)
                name = found.group(1) if found else None
        if name is None:
            raise InvalidInput("multipart/form-data part without a field name")
        fields[name] = value
    if not fields:
        raise InvalidInput("multipart/form-data body without fields")
    return fields
