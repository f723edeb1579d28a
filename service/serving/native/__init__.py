"""The native serving engine: OIP v2 and TorchServe-compatible REST and gRPC in one process.

Rooms: :mod:`.runner` (the torch thread per device, adaptive batching), :mod:`.models`
(registered versions behind TorchServe's management interface), :mod:`.dataplane`
(admission and predict, shared by both protocols), :mod:`.oip` (OIP v2 tensors),
:mod:`.rest` and :mod:`.grpc_api` (the wire), :mod:`.engine` (the composition).
Nothing is imported here: ``import service.serving.native`` stays cheap.
"""
