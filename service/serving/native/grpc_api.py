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

Every other call wants ``authorization: Bearer <API token>``. :class:`StatusInterceptor` checks
it and turns the named errors of :mod:`service.errors` into statuses, in one place; a
RESOURCE_EXHAUSTED carries ``retry-after`` and ``grpc-retry-pushback-ms``.
"""

from __future__ import annotations

import json
import logging

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service._gen import inference_pb2, inference_pb2_grpc
from service._gen.oip.v2 import open_inference_grpc_pb2 as pb
from service._gen.oip.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from service.errors import InvalidInput, NotFound, ResourceExhausted, ServiceError, Unavailable, grpc_status
from service.grpc_streams import AioStreamLimitInterceptor, StreamLimit
from service.serving.health import ReadinessHealthServicer
from service.serving.native import oip
from service.serving.native.dataplane import DataPlane

log = logging.getLogger(__name__)

OIP_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TORCHSERVE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name
OPEN_SERVICES = {health.SERVICE_NAME, reflection.SERVICE_NAME,
                 "grpc.reflection.v1.ServerReflection"}

#: InferTensorContents' field per datatype.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class StatusInterceptor(aio.ServerInterceptor):
    """The token check and the error-to-status mapping of every call (health and reflection
    are open)."""

    def __init__(self, token, retry_after_s: int):
        self.token = token
        self.retry_after_s = retry_after_s

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        service = details.method.lstrip("/").split("/", 1)[0]
        check = None if service in OPEN_SERVICES else self.token.check_metadata
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    if check is not None:
                        check(metadata)
                    _decoded(request)
                    return await inner(request, context)
                except ServiceError as exc:
                    await self._abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                try:
                    if check is not None:
                        check(metadata)
                    _decoded(request)
                    async for item in _aiter(inner_stream(request, context)):
                        yield item
                except ServiceError as exc:
                    await self._abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if check is None:
            return handler
        # Client- and bidi-streaming calls of closed services: checked before anything runs.
        try:
            check(metadata)
        except ServiceError as exc:
            return _refusing_handler(handler, exc)
        return handler

    async def _abort(self, context, exc: ServiceError):
        if isinstance(exc, ResourceExhausted):
            context.set_trailing_metadata((("retry-after", str(self.retry_after_s)),
                                           ("grpc-retry-pushback-ms", str(self.retry_after_s * 1000))))
        await context.abort(grpc_status(exc), exc.message)


class _Undecodable:
    """A request message that did not parse (what :func:`_lenient` hands on instead)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    """``deserializer``, but a message that does not parse comes out as :class:`_Undecodable`
    rather than raising inside grpc (which answers UNKNOWN and logs a traceback)."""
    if deserializer is None:
        return None

    def parse(data):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever the parser raises
            return _Undecodable(exc)

    return parse


def _decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidInput(f"the request is not a valid message ({type(request.error).__name__}: "
                           f"{str(request.error)[:200]})")


async def _aiter(result):
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:  # a coroutine returning an iterable
        for item in await result:
            yield item


def _refusing_handler(handler, exc: ServiceError):
    async def refuse(request_or_iterator, context):
        await context.abort(grpc_status(exc), exc.message)

    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    async def refuse_stream(request_iterator, context):
        await context.abort(grpc_status(exc), exc.message)
        yield  # pragma: no cover

    return grpc.stream_stream_rpc_method_handler(refuse_stream, request_deserializer=handler.request_deserializer,
                                                 response_serializer=handler.response_serializer)


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
    max_bytes = settings.max_request_size_bytes
    streams = StreamLimit(settings.max_open_streams, server="native gRPC", retry_after_s=settings.retry_after_s)
    server = aio.server(  # the stream bound first: a refused stream never reaches the handlers
        interceptors=[AioStreamLimitInterceptor(streams, open_services=OPEN_SERVICES, token=token),
                      StatusInterceptor(token, settings.retry_after_s)],
        options=[("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes),
                 ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(plane, server_version), server)
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(PredictionsServicer(plane), server)
    health_servicer = ReadinessHealthServicer(readiness_fn, services=(OIP_SERVICE, TORCHSERVE_SERVICE),
                                              poll_s=health_poll_s)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([OIP_SERVICE, TORCHSERVE_SERVICE, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME], server)
    host = settings.host if host is None else host
    port = settings.grpc_inference_port if port is None else port
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise Unavailable(f"cannot bind the gRPC server to {address}")
    server._modelctl_health = health_servicer
    server._modelctl_streams = streams  # the open streams (tests)
    return server, bound
