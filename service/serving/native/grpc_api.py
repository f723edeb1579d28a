"""The native engine's gRPC protocol: OIP v2 and TorchServe's inference API, on one grpc.aio server.

Services:

* ``inference.GRPCInferenceService`` (OIP v2, the proto in ``protos/oip/v2``): ServerLive,
  ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer with typed contents or
  ``raw_input_contents``; answers carry ``raw_output_contents`` (what Triton answers);
* ``org.pytorch.serve.grpc.inference.InferenceAPIsService``: Ping, Predictions, and
  StreamPredictions (one message), with TorchServe's messages and our statuses;
* ``grpc.health.v1.Health`` (SERVING when every registered version is READY; per model and
  ``model/version`` too) and server reflection: open, without a token.

Open streams are bounded per kind by ``max_open_streams`` (``MODELCTL_MAX_OPEN_STREAMS``,
:mod:`service.grpc_streams`); one more is RESOURCE_EXHAUSTED with a retry-after.

Every other call wants ``authorization: Bearer <API token>``. The server and its interceptors
are :mod:`service.grpc_server`'s: ``AuthInterceptor`` checks the token, ``ErrorInterceptor``
turns the named errors of :mod:`service.errors` into statuses, in one place (a
RESOURCE_EXHAUSTED carries ``retry-after`` and ``grpc-retry-pushback-ms``; a request that
does not parse is INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import logging

from grpc import aio

from service import grpc_server
from service._gen import inference_pb2, inference_pb2_grpc
from service._gen.oip.v2 import open_inference_grpc_pb2 as pb
from service._gen.oip.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from service.errors import InvalidInput, NotFound, Unavailable
from service.serving.health import ReadinessHealthServicer
from service.serving.native import oip
from service.serving.native.dataplane import DataPlane

log = logging.getLogger(__name__)

OIP_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TORCHSERVE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
OPEN_SERVICES = grpc_server.OPEN_SERVICES

#: InferTensorContents' field per datatype.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 over gRPC; translation only (the data plane decides)."""

    def __init__(self, plane: DataPlane, server_version: str):
        self.plane = plane
        self.server_version = server_version

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request, context):
        try:  # an unknown model or version is not ready (Triton answers the same)
            return pb.ModelReadyResponse(ready=self.plane.version(request.name, request.version or None).ready)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="modelctl", version=self.server_version,
                                         extensions=["binary_tensor_data", "model_repository_health"])

    async def ModelMetadata(self, request, context):
        entry = self.plane.version(request.name, request.version or None)
        if not entry.ready:
            raise Unavailable(f"{entry.name} version {entry.version} is not ready ({entry.state.lower()})")
        io = oip.model_io(entry.predictor)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name, versions=[v.version for v in self.plane.models.versions() if v.name == entry.name],
            platform="pytorch_modelctl",
            inputs=[tensor(name=n, datatype=d, shape=list(s)) for n, d, s in io.inputs],
            outputs=[tensor(name=n, datatype=d, shape=list(s)) for n, d, s in io.outputs],
            properties={"version": entry.version, "family": entry.predictor.spec.family,
                        "task": entry.predictor.spec.task})

    async def ModelInfer(self, request, context):
        entry = self.plane.version(request.model_name, request.model_version or None)
        if not entry.ready:
            raise Unavailable(f"{entry.name} version {entry.version} is not ready ({entry.state.lower()})")
        io = oip.model_io(entry.predictor)
        tensors = _inputs(request, io)
        payload = oip.to_payload(io, tensors)
        k = _parameter(request.parameters.get(oip.TOP_K)) if oip.TOP_K in request.parameters else None
        wanted = [o.name for o in request.outputs] or None
        answer = await self.plane.predict(entry.name, entry.version, payload, k=k, nbytes=request.ByteSize())
        outs = oip.to_outputs(io, answer, entry.predictor.labels, wanted)
        response = pb.ModelInferResponse(model_name=answer["model"], model_version=answer["version"], id=request.id)
        for t in outs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(oip.to_raw(t))
        return response


def _parameter(p):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _inputs(request, io: oip.ModelIO | None = None) -> list[oip.Tensor]:
    """The request's input tensors. ``io``: the model's; each input's name and datatype are
    checked against it, and its shape against ``io.max_elements``, before any element is
    copied or decoded."""
    max_elements = io.max_elements if io is not None else 0
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                           "with raw_input_contents every input has one")
    out = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if io is not None:
            oip.check_input(io, t.name, t.datatype)
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(f"input {t.name!r} has both contents and raw_input_contents")
            out.append(oip.from_raw(t.name, t.datatype, shape, raw[i], max_elements))
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            oip.check_shape(t.name, t.datatype, shape)  # names the bad datatype
            raise InvalidInput(f"input {t.name!r}: {t.datatype} has no typed contents; use raw_input_contents")
        contents = getattr(t.contents, field)
        count = oip.check_shape(t.name, t.datatype, shape, max_elements)
        if len(contents) != count:
            raise InvalidInput(f"input {t.name!r}: {len(contents)} elements where shape {shape} declares {count}")
        if t.datatype == "BYTES":
            out.append(oip.Tensor(t.name, t.datatype, shape, list(contents)))
        else:
            out.append(oip.from_json(t.name, t.datatype, shape, list(contents), max_elements))
    return out


class PredictionsServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """TorchServe's inference API: its messages, our statuses."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(
            health=json.dumps({"status": "Healthy" if self.plane.ready() else "Unhealthy"}))

    async def Predictions(self, request, context):
        payload = dict(request.input)
        answer = await self.plane.predict(request.model_name, request.model_version or None, payload,
                                          nbytes=request.ByteSize())
        return inference_pb2.PredictionResponse(prediction=json.dumps(answer).encode())

    async def StreamPredictions(self, request, context):
        yield await self.Predictions(request, context)

    async def StreamPredictions2(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.Predictions(request, context)


def create_grpc_server(settings, plane: DataPlane, readiness_fn, *, token, server_version: str = "",
                       port: int | None = None, host: str | None = None,
                       health_poll_s: float = 2.0) -> tuple[aio.Server, int]:
    """Build (not start) the server inside the running loop; returns ``(server, bound_port)``."""
    spec = grpc_server.ServerSpec("native gRPC API", (OIP_SERVICE, TORCHSERVE_SERVICE), token,
                                  settings.max_open_streams, retry_after_s=settings.retry_after_s,
                                  max_message_bytes=settings.max_request_size_bytes, lenient_requests=True,
                                  log_level=logging.DEBUG)
    server, streams = grpc_server.aio_server(spec)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(plane, server_version), server)
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(PredictionsServicer(plane), server)
    health_servicer = ReadinessHealthServicer(readiness_fn, services=(OIP_SERVICE, TORCHSERVE_SERVICE),
                                              poll_s=health_poll_s)
    grpc_server.serve_health_and_reflection(server, spec, health_servicer)
    bound = grpc_server.bind(server, spec, settings.host if host is None else host,
                             settings.grpc_inference_port if port is None else port)
    server._modelctl_health = health_servicer
    server._modelctl_streams = streams  # the open streams (tests)
    return server, bound
