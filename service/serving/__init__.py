"""``modelctl serve``: TorchServe's config, its process, real readiness, the gRPC gateway.

Modules:

* ``settings``: :class:`ServeSettings` (``MODELCTL_*`` variables, CLI overrides);
* ``config``: ``config.properties`` rendering (pure);
* ``torchserve``: :class:`TorchServeProcess`, one TorchServe as a child process group;
* ``management``: :class:`ManagementClient` over TorchServe's REST management API;
* ``store_scan``: model store scanning and registration;
* ``readiness``: readiness from worker status of every registered version;
* ``gateway``: the public gRPC inference endpoint in front of TorchServe's own;
* ``supervisor``: :class:`Serving`, everything above composed.

Submodules are imported lazily by the caller: importing this package pulls in neither
grpc nor requests.
"""
