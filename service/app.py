"""The control service composed with serving: beside TorchServe (``modelctl serve``), or
alone in front of a TorchServe that runs already (``python -m service.control``).

:class:`ServingWithControl` is :class:`~service.serving.torchserve.supervisor.Serving` plus the control
API: its port is bound before TorchServe starts (a taken port fails at once), the job
scheduler starts once the store's versions are READY, and one line says that everything
is ready. Stopping stops the control service first (running trainers get SIGTERM and are
resumed by the next start), then TorchServe. One operator API token (service/auth.py)
guards the control API and the inference APIs alike.
"""

from __future__ import annotations

import logging

from service.auth import ApiToken, load_token
from service.control.settings import ControlConfig
from service.control.jobs.plane import ControlPlane
from service.control.api.servicer import ControlService
from service.control.jobs.jobstore import TRANSITIONS
from service.metrics.jobs import JobMetricsCollector
from service.serving.torchserve.supervisor import Serving

log = logging.getLogger(__name__)

STATES = tuple(TRANSITIONS)


class ControlBeside:
    """The control API beside an engine's serving (mixed into either engine's class)."""

    def __init__(self, settings, control: ControlConfig, *, api_token: ApiToken | None = None):
        api_token = api_token or load_token(settings.state_dir, create=True)
        super().__init__(settings, api_token=api_token)
        self.control = ControlService(control, ControlPlane(control, settings, self._require_mgmt,
                                                            locks=self.model_locks),
                                      token=api_token)

    def endpoints(self) -> dict[str, str]:
        return {**super().endpoints(), "control": self.control.target}

    def start(self):
        self.control.bind()
        return super().start()  # ends in wait_ready, which starts the control service

    def _after_workers_settled(self) -> None:
        """The job scheduler starts once the store's versions are READY (or settled);
        its job metrics join the instance's Prometheus endpoint."""
        if not self.control.plane.started:
            self.control.start()
            if self.exporter is not None:
                jobs = self.control.plane.jobs
                self.exporter.registry.register(
                    JobMetricsCollector(lambda: jobs.list(limit=1_000_000), STATES))

    def stop(self) -> None:
        try:
            self.control.stop()
        finally:
            super().stop()


class ServingWithControl(ControlBeside, Serving):
    """TorchServe's engine with the control API (``modelctl serve``)."""


def with_control(engine: str) -> type:
    """The class of ``modelctl serve`` for ``engine``: its serving plus the control API."""
    from service.serving.engines import serving_class

    base = serving_class(engine)
    if base is Serving:
        return ServingWithControl
    return type(f"{base.__name__}WithControl", (ControlBeside, base), {})


def standalone_management(settings):
    """A ManagementClient of the TorchServe described by ``settings`` (running already; its
    key is re-read from key_file.json, so renewed keys work)."""
    from service.serving.torchserve.management import ManagementClient
    from service.serving.torchserve.process import TorchServeProcess

    torchserve = TorchServeProcess(settings)
    client = ManagementClient(torchserve.management_url, lambda: torchserve.tokens.management)
    return lambda: client


def standalone_service(control: ControlConfig, settings, *,
                       api_token: ApiToken | None = None) -> ControlService:
    """The control service alone, deploying to the TorchServe of ``settings``. Its token:
    ``api_token``, else the environment's, else the one in the state dir (generated there
    when missing)."""
    token = api_token or load_token(settings.state_dir, create=True)
    return ControlService(control, ControlPlane(control, settings, standalone_management(settings)),
                          token=token)
