"""The TorchServe engine: TorchServe (Java frontend, Python workers running
``service.handlers.torchserve``) with nginx in front for REST and our gateway for gRPC.

Rooms: :mod:`.process` (one TorchServe as a child process group), :mod:`.config`
(``config.properties``), :mod:`.proxy` (nginx: the token, 413, 429), :mod:`.gateway` (the
public gRPC endpoint: the token, statuses, admission), :mod:`.management` (TorchServe's
management API client) and :mod:`.supervisor` (the composition: ``Serving``). What both
engines share lives one level up, in :mod:`service.serving`.
"""
