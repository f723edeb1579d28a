"""The control service: the ``modelctl.v1.ModelControl`` gRPC API over fine-tuning jobs and
deployments.

Sub-packages (imported lazily by callers; importing this package imports nothing else):

* ``settings``: :class:`ControlConfig` (``MODELCTL_*`` variables, CLI overrides);
* ``api/``: the edge: ``servicer`` (typed methods, translation only; ``create_server``,
  ``ControlService``), ``messages`` (Python values <-> ``modelctl.v1``), ``client``
  (:class:`ControlClient`), ``display`` (text for the CLI);
* ``jobs/``: orchestration: ``plane`` (:class:`ControlPlane`, everything composed, without
  gRPC), ``scheduler`` (bounded concurrency, following, settling, resuming), ``jobstore``
  (the SQLite job store and its state machine), ``intake`` (run specs from the API, validated
  by the trainer's own rules);
* ``runners/``: where a run's trainer process lives: ``local`` (a process group per run, its
  ``containment``) and ``kubernetes`` (a batch/v1 Job per run).

Deployment (policies, the deployer and its history, the desired state, the speed check,
converging) is its own room, :mod:`service.deploy`; the composition root of ``modelctl
serve`` is :mod:`service.app`.
"""
