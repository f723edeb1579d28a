"""Real Open Inference Protocol (OIP) v2 clients for the tests: NVIDIA's ``tritonclient``.

The tests of the native engine talk to it the way a user would, with the stock client
(``tritonclient[http,grpc]==2.73.0``, installed by ``make setup``), through these helpers:

    client = grpc_client("127.0.0.1:8081", token)     # or http_client("127.0.0.1:8080", token)
    result = infer_images(client, "resnet", [jpeg_bytes, png_bytes], top_k=3)
    result.as_numpy(LABELS)                            # BYTES [N, k] -> object array of bytes

Every call of a client made with a token sends ``authorization: Bearer <token>`` (a
tritonclient plugin, on every call); ``token=None`` sends no authorization.

Why the gRPC client runs in a worker process
--------------------------------------------
``tritonclient.grpc`` ships its own generated ``grpc_service_pb2`` for the proto package
``inference``, and ``service/_gen/oip/v2/open_inference_grpc_pb2`` (the engine's, generated
from the protocol's own proto) defines the same symbols in the same package. Protobuf keeps
one default descriptor pool per process, so whichever of the two is imported second fails:
``TypeError: Couldn't build proto file into descriptor pool: duplicate symbol
'inference.ServerLiveRequest'`` (any protobuf version; tests/test_oip_client.py checks it).
The engine's modules are imported by the engine's own tests, so ``grpc_client`` returns a
:class:`GrpcClient` whose calls run ``tritonclient.grpc`` in one spawned worker process
(started on first use, same venv, same protobuf 7.36.2) and come back as a
:class:`GrpcInferResult` (``as_numpy``, ``get_output``, ``get_response`` as JSON dicts). Errors
come back as tritonclient's own ``InferenceServerException`` (``status()`` e.g.
``"StatusCode.UNAUTHENTICATED"``). ``tritonclient.http`` and ``tritonclient.utils`` import no
protobuf and run in the test process; ``http_client`` returns the real
``tritonclient.http.InferenceServerClient`` (importing it imports gevent but monkey-patches
nothing; a client object is not thread-safe: one per thread).

This module must never import ``service._gen.oip`` at its top level: the gRPC worker imports
it (by its own name) in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np

# --- The engine's tensor contract ------------------------------------------------------------
# service/serving/native defines the same names (the engine's own constants); a test asserts
# that the two agree. Change both together.

#: Image input: BYTES [N], one encoded JPEG/PNG per element.
IMAGES = "images"
#: Sequence input: FP32 [N, T, F] or INT64 [N, T] (token ids).
SEQUENCES = "sequences"
#: Optional true lengths of the sequences: INT64 [N].
LENGTHS = "lengths"
#: Text input: BYTES [N], one UTF-8 string per element.
TEXTS = "texts"
#: Request parameter: how many classes per item (int).
TOP_K = "top_k"
#: Outputs: BYTES [N, k] class labels, FP32 [N, k] probabilities, INT64 [N, k] class indices.
LABELS = "labels"
PROBABILITIES = "probabilities"
CLASSES = "classes"
OUTPUTS = (LABELS, PROBABILITIES, CLASSES)

#: (name, array, OIP datatype) of one input tensor.
InputSpec = tuple[str, np.ndarray, str]


# --- Clients ---------------------------------------------------------------------------------


def _bearer_plugin(token: str):
    from tritonclient._plugin import InferenceServerClientPlugin

    class BearerToken(InferenceServerClientPlugin):
        def __call__(self, request):
            request.headers["authorization"] = f"Bearer {token}"

    return BearerToken()


def http_client(url: str, token: str | None = None, **kwargs: Any):
    """The real ``tritonclient.http.InferenceServerClient`` for ``url`` ("host:port", no scheme;
    ``ssl=True`` etc. go through ``kwargs``), sending the bearer token on every call."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, **kwargs)
    if token is not None:
        client.register_plugin(_bearer_plugin(token))
    return client


def grpc_client(url: str, token: str | None = None, **kwargs: Any) -> GrpcClient:
    """A ``tritonclient.grpc.InferenceServerClient`` for ``url`` ("host:port"), run in a worker
    process (see the module docstring), sending the bearer token on every call."""
    return GrpcClient(url, token, **kwargs)


class GrpcClient:
    """``tritonclient.grpc.InferenceServerClient`` behind a process boundary.

    Offers the calls the tests need with tritonclient's names and arguments; ``headers`` on
    a call are added to the token's. ``workers`` > 1 lets that many calls run at once.
    """

    def __init__(self, url: str, token: str | None = None, workers: int = 1, **kwargs: Any):
        self.url = url
        self._config = (url, token, tuple(sorted(kwargs.items())))
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    # the worker ------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._workers, mp_context=multiprocessing.get_context("spawn")
                )
                _POOLS.add(self._pool)
            pool = self._pool
        outcome = pool.submit(_grpc_worker_call, self._config, method, args, kwargs).result()
        if outcome[0] == "error":
            from tritonclient.utils import InferenceServerException

            _, msg, status, debug_details = outcome
            raise InferenceServerException(msg, status=status, debug_details=debug_details)
        return outcome[1]

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            _POOLS.discard(pool)
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # tritonclient's calls --------------------------------------------------------------------
    def is_server_live(self, headers: dict | None = None) -> bool:
        return self._call("is_server_live", headers=headers)

    def is_server_ready(self, headers: dict | None = None) -> bool:
        return self._call("is_server_ready", headers=headers)

    def is_model_ready(self, model_name: str, model_version: str = "", headers: dict | None = None) -> bool:
        return self._call("is_model_ready", model_name, model_version, headers=headers)

    def get_server_metadata(self, headers: dict | None = None) -> dict:
        return self._call("get_server_metadata", headers=headers, as_json=True)

    def get_model_metadata(self, model_name: str, model_version: str = "", headers: dict | None = None) -> dict:
        return self._call("get_model_metadata", model_name, model_version, headers=headers, as_json=True)

    def infer(
        self,
        model_name: str,
        inputs: Sequence[InputSpec],
        model_version: str = "",
        outputs: Iterable[str] | None = None,
        parameters: dict | None = None,
        headers: dict | None = None,
        client_timeout: float | None = None,
    ) -> GrpcInferResult:
        response, arrays = self._call(
            "infer", model_name, list(inputs), model_version=model_version,
            outputs=list(outputs) if outputs is not None else None, parameters=parameters,
            headers=headers, client_timeout=client_timeout,
        )
        return GrpcInferResult(response, arrays)

    def request_bytes(
        self,
        model_name: str,
        inputs: Sequence[InputSpec],
        model_version: str = "",
        outputs: Iterable[str] | None = None,
        parameters: dict | None = None,
    ) -> bytes:
        """The serialized ``ModelInferRequest`` tritonclient would send (no server needed)."""
        return self._call(
            "request_bytes", model_name, list(inputs), model_version=model_version,
            outputs=list(outputs) if outputs is not None else None, parameters=parameters,
        )


class GrpcInferResult:
    """What ``tritonclient.grpc.InferResult`` gives, brought back from the worker process:
    ``as_numpy(name)`` (None when absent), ``get_output(name)`` and ``get_response()`` as the
    JSON dicts of ``get_response(as_json=True)`` (int64 values are strings there)."""

    def __init__(self, response: dict, arrays: dict[str, np.ndarray]):
        self._response = response
        self._arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)

    def get_output(self, name: str, as_json: bool = True) -> dict | None:
        for output in self._response.get("outputs", []):
            if output.get("name") == name:
                return output
        return None

    def get_response(self, as_json: bool = True) -> dict:
        return self._response


_POOLS: set[ProcessPoolExecutor] = set()


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS):
        pool.shutdown(wait=False, cancel_futures=True)


# --- Requests --------------------------------------------------------------------------------


def infer(
    client,
    model: str,
    inputs: Sequence[InputSpec],
    version: str = "",
    parameters: dict | None = None,
    outputs: Iterable[str] | None = None,
    headers: dict | None = None,
):
    """One ModelInfer of ``inputs`` with either client; the tensors go as binary data (http:
    the binary tensor extension; grpc: ``raw_input_contents``). The ``InferResult``
    (:class:`GrpcInferResult` for gRPC)."""
    if isinstance(client, GrpcClient):
        return client.infer(model, inputs, model_version=version, outputs=outputs,
                            parameters=parameters, headers=headers)
    import tritonclient.http as httpclient

    tensors = []
    for name, array, datatype in inputs:
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        tensors.append(tensor)
    requested = (
        [httpclient.InferRequestedOutput(name, binary_data=True) for name in outputs]
        if outputs is not None else None
    )
    return client.infer(model, tensors, model_version=version, outputs=requested,
                        parameters=parameters, headers=headers)


def _top_k(top_k: int | None) -> dict | None:
    return {TOP_K: int(top_k)} if top_k is not None else None


def images_input(images: Sequence[bytes]) -> InputSpec:
    """The ``images`` tensor: BYTES [N], one encoded image per element."""
    return IMAGES, np.array([bytes(b) for b in images], dtype=np.object_), "BYTES"


def texts_input(texts: Sequence[str | bytes]) -> InputSpec:
    """The ``texts`` tensor: BYTES [N], UTF-8."""
    data = [t.encode() if isinstance(t, str) else bytes(t) for t in texts]
    return TEXTS, np.array(data, dtype=np.object_), "BYTES"


def sequences_inputs(array, lengths=None) -> list[InputSpec]:
    """``sequences`` (FP32 [N, T, F], or INT64 [N, T] for integer arrays) and optionally
    ``lengths`` (INT64 [N])."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.integer):
        specs = [(SEQUENCES, array.astype(np.int64), "INT64")]
    else:
        specs = [(SEQUENCES, array.astype(np.float32), "FP32")]
    if lengths is not None:
        specs.append((LENGTHS, np.asarray(lengths, dtype=np.int64), "INT64"))
    return specs


def infer_images(client, model: str, images: Sequence[bytes], version: str = "",
                 top_k: int | None = None, headers: dict | None = None):
    """Classify encoded images (JPEG/PNG bytes) through the ``images`` input."""
    return infer(client, model, [images_input(images)], version=version,
                 parameters=_top_k(top_k), headers=headers)


def infer_fp32(client, model: str, array, lengths=None, version: str = "",
               top_k: int | None = None, headers: dict | None = None):
    """Classify FP32 sequences [N, T, F] through ``sequences`` (+ ``lengths`` if given)."""
    specs = sequences_inputs(np.asarray(array, dtype=np.float32), lengths)
    return infer(client, model, specs, version=version, parameters=_top_k(top_k), headers=headers)


def infer_texts(client, model: str, texts: Sequence[str | bytes], version: str = "",
                top_k: int | None = None, headers: dict | None = None):
    """Classify texts through the ``texts`` input."""
    return infer(client, model, [texts_input(texts)], version=version,
                 parameters=_top_k(top_k), headers=headers)


# --- The gRPC worker process -----------------------------------------------------------------

_WORKER_CLIENTS: dict = {}


def _grpc_worker_call(config: tuple, method: str, args: tuple, kwargs: dict):
    """Runs in the worker process only: never imports service._gen.oip."""
    import tritonclient.grpc as grpcclient
    from google.protobuf.json_format import MessageToDict
    from tritonclient.grpc._utils import _get_inference_request
    from tritonclient.utils import InferenceServerException

    def tensors(specs):
        out = []
        for name, array, datatype in specs:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            out.append(tensor)
        return out

    def requested(names):
        return [grpcclient.InferRequestedOutput(n) for n in names] if names is not None else None

    try:
        if method == "request_bytes":
            model, specs = args
            request = _get_inference_request(
                model_name=model, inputs=tensors(specs), model_version=kwargs["model_version"],
                request_id="", outputs=requested(kwargs["outputs"]), sequence_id=0,
                sequence_start=False, sequence_end=False, priority=0, timeout=None,
                parameters=kwargs["parameters"],
            )
            return ("ok", request.SerializeToString())

        client = _WORKER_CLIENTS.get(config)
        if client is None:
            url, token, extra = config
            client = grpcclient.InferenceServerClient(url, **dict(extra))
            if token is not None:
                client.register_plugin(_bearer_plugin(token))
            _WORKER_CLIENTS[config] = client

        if method == "infer":
            model, specs = args
            result = client.infer(
                model, tensors(specs), model_version=kwargs["model_version"],
                outputs=requested(kwargs["outputs"]), parameters=kwargs["parameters"],
                headers=kwargs["headers"], client_timeout=kwargs["client_timeout"],
            )
            response = result.get_response()
            arrays = {o.name: result.as_numpy(o.name) for o in response.outputs}
            return ("ok", (MessageToDict(response, preserving_proto_field_name=True), arrays))
        if method in ("get_server_metadata", "get_model_metadata"):
            return ("ok", getattr(client, method)(*args, **kwargs))
        if method in ("is_server_live", "is_server_ready", "is_model_ready"):
            return ("ok", getattr(client, method)(*args, **kwargs))
        raise ValueError(f"oip_clients: no gRPC call {method!r}")
    except InferenceServerException as e:
        return ("error", e.message(), e.status(), e.debug_details())
