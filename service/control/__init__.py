"""The control service: the ``modelctl.v1.ModelControl`` gRPC API over fine-tuning jobs and
deployments.

Modules (imported lazily by callers; importing this package imports nothing else):

* ``config``: :class:`ControlConfig` (``MODELCTL_*`` variables, CLI overrides);
* ``store``: the SQLite job store, its state machine and the deployment history;
* ``runner``: runners (``RUNNERS``; ``local``: a process group per run);
* ``events``: following a run's ``events.jsonl``;
* ``scheduler``: bounded concurrency, following, settling, resuming jobs;
* ``deployer``: deploy policies, deployment to TorchServe, rollback;
* ``speed``: deploy-if-faster's speed check (a subprocess; only it imports torch);
* ``specs``: run specs from the API, validated by the trainer's own rules;
* ``plane``: :class:`ControlPlane`, everything above composed, without gRPC;
* ``messages``: Python values <-> ``modelctl.v1`` messages;
* ``server``: the servicer, the error interceptor, ``create_server``, ``ControlService``;
* ``serve``: the control service beside TorchServe (``modelctl serve``), or alone;
* ``client``: :class:`ControlClient`; ``display``: text for the CLI.
"""
