"""``modelctl serve`` composed: TorchServe, the store registered, the gateway, readiness.

    Serving(ServeSettings.from_env(...)).run_forever()

``start()`` loads the operator's API token (:mod:`service.auth`; generated into the state
dir when none is given), starts TorchServe and the REST proxy in front of it, registers
every archive of the model store that passes the archive check (latest version default;
service/modelstore/check.py), starts the public gRPC gateway
(both check the token) and waits (up to
``startup_timeout_s``) until every worker is READY; then it logs one INFO line naming
the endpoints, or one WARNING naming the versions that are not ready. From then on it
converges on the model store's desired state every ``sync_interval_s``
(:mod:`service.serving.converge`): new archives are registered and defaults follow the
deployments, so every replica sharing the store serves the same versions. ``run_forever()``
blocks until SIGINT/SIGTERM, renewing TorchServe's keys before they expire, and then
stops everything.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from datetime import datetime, timezone

from service.auth import ApiToken, load_token
from service.errors import Unavailable
from service.metrics.exporter import MetricsExporter, QueueDepthCollector
from service.serving import readiness
from service.serving.converge import Converger, ConvergeThread, ModelLocks
from service.serving.torchserve.gateway import GatewayThread
from service.serving.torchserve.management import ManagementClient
from service.serving.readiness import ModelReadiness
from service.serving.settings import ServeSettings
from service.serving.store_scan import (
    RefusedArchivesCollector,
    precheck_store,
    refused_archives,
    register_store,
    scan_model_store,
)
from service.serving.torchserve.process import TorchServeProcess

log = logging.getLogger(__name__)

#: Renew a TorchServe key when it has less than this many seconds left.
_RENEW_BEFORE_S = 5 * 60


class Serving:
    def __init__(self, settings: ServeSettings, *, api_token: ApiToken | None = None):
        self.settings = settings
        #: The operator's token every public API checks (loaded at start unless given).
        self.api_token = api_token
        self.torchserve = TorchServeProcess(settings, api_token=api_token)
        self.mgmt: ManagementClient | None = None
        self.gateway: GatewayThread | None = None
        self.exporter: MetricsExporter | None = None
        self.registered: list[tuple[str, int]] = []
        self.expected: list[tuple[str, int]] = []
        self.report: list[ModelReadiness] = []
        #: Per-model locks shared with whatever deploys through this instance.
        self.model_locks = ModelLocks()
        self.converger = Converger(settings, self._require_mgmt, self.model_locks)
        self._converge_thread: ConvergeThread | None = None
        self._stop = threading.Event()

    def _require_mgmt(self) -> ManagementClient:
        if self.mgmt is None:
            raise Unavailable("TorchServe is not running")
        return self.mgmt

    # -- endpoints ---------------------------------------------------------------------

    @property
    def grpc_port(self) -> int:
        return self.gateway.port if self.gateway and self.gateway.port else \
            self.settings.grpc_inference_port

    def endpoints(self) -> dict[str, str]:
        host = self.settings.host
        return {
            "rest": f"{self.torchserve.inference_url}/predictions/<model>[/<version>]",
            "grpc": f"{host}:{self.grpc_port}",
            "management": self.torchserve.management_url,
            "metrics": f"{self.torchserve.metrics_url}/metrics",
            "exporter": f"http://{host}:{self.settings.exporter_port}/metrics",
        }

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> list[ModelReadiness]:
        """Start everything; returns the readiness report after waiting for workers."""
        try:
            self.expected = [(n, v) for n, vs in
                             scan_model_store(self.settings.model_store).items() for v in vs]
            if self.api_token is None:
                self.api_token = load_token(self.settings.state_dir, create=True)
            self.torchserve.api_token = self.api_token
            # The archive check of every archive (service/modelstore/check.py) runs while
            # TorchServe starts; registration below finds its cached results.
            threading.Thread(target=precheck_store, args=(self.settings.model_store,),
                             name="modelctl-archive-check", daemon=True).start()
            self.torchserve.start()
            self.mgmt = ManagementClient(self.torchserve.management_url,
                                         lambda: self.torchserve.tokens.management)
            self.registered = register_store(self.mgmt, self.settings)
            # An archive the archive check refused is never registered: not one to wait for.
            refused = refused_archives(self.settings.model_store)
            self.expected = [key for key in self.expected if key not in refused]
            self.gateway = GatewayThread(
                self.settings, self.torchserve.grpc_inference_target, self.readiness,
                token=self.api_token, upstream_key=self.torchserve.inference_key,
                fresh_upstream_key=lambda: self.torchserve.tokens.inference)
            self.gateway.start()
            self.exporter = MetricsExporter(
                self.settings.host, self.settings.exporter_port, self.torchserve.metrics_dir,
                collectors=[QueueDepthCollector(lambda: self.mgmt),
                            RefusedArchivesCollector(self.settings.model_store)])
            self.exporter.start()
            report = self.wait_ready()
            self._converge_thread = ConvergeThread(self.converger, self.settings.sync_interval_s)
            self._converge_thread.start()
            return report
        except BaseException:
            self.stop()
            raise

    def readiness(self) -> list[ModelReadiness]:
        """Current readiness of every registered version (for the health service)."""
        return readiness.check(self._require_mgmt())

    def wait_ready(self, timeout_s: float | None = None) -> list[ModelReadiness]:
        """Wait until every archive of the store is ready; log the outcome once."""
        timeout_s = self.settings.startup_timeout_s if timeout_s is None else timeout_s
        self.report = readiness.wait_until_ready(self.mgmt, self.expected, timeout_s)
        self._after_workers_settled()
        not_ready = [r for r in self.report if not r.ready]
        endpoints = ", ".join(f"{k} {v}" for k, v in self.endpoints().items())
        if not not_ready:
            log.info("serving %d model version(s), every worker READY: %s",
                     len(self.report), endpoints)
        else:
            log.warning("not ready after %.0fs: %s (logs: %s); endpoints: %s", timeout_s,
                        readiness.summary(not_ready), self.torchserve.log_path, endpoints)
        return self.report

    def _after_workers_settled(self) -> None:
        """Hook: start what needs the registered workers (the control service does)."""

    def stop(self) -> None:
        """Stop the gateway, then TorchServe (and every worker). Idempotent."""
        self._stop.set()
        if self._converge_thread is not None:
            self._converge_thread.stop()
            self._converge_thread = None
        if self.exporter is not None:
            self.exporter.stop()
            self.exporter = None
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.mgmt is not None:
            self.mgmt.close()
            self.mgmt = None
        self.torchserve.stop()

    def renew_tokens_if_due(self, now: datetime | None = None) -> list[str]:
        """Renew the inference and management keys that expire within 5 minutes.

        TorchServe's keys expire (``token_expiration_min``) and are not renewed by
        TorchServe itself; a renewed key is a new key in key_file.json. Clients do not
        notice: the proxy is reloaded with the new inference key, and the gateway reads it.
        """
        now = now or datetime.now(timezone.utc)
        try:
            data = json.loads(self.torchserve.key_file.read_text())
        except (OSError, ValueError):
            return []
        renewed = []
        for kind in ("management", "inference"):
            expires = _parse_time((data.get(kind) or {}).get("expiration time"))
            if expires is not None and (expires - now).total_seconds() < _RENEW_BEFORE_S:
                self.torchserve.renew_token(kind)
                renewed.append(kind)
                log.info("renewed TorchServe's %s key (key_file.json: %s)", kind,
                         self.torchserve.key_file)
        return renewed

    def run_forever(self) -> None:
        """Start, block until SIGINT/SIGTERM (or TorchServe or the REST proxy dies), stop
        everything."""
        previous = {}

        def _on_signal(signum, _frame):
            log.info("received %s; stopping", signal.Signals(signum).name)
            self._stop.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, _on_signal)
        try:
            self._stop.clear()
            self.start()
            while not self._stop.wait(30.0):
                if not self.torchserve.running():
                    log.error("TorchServe exited; end of %s:\n%s", self.torchserve.log_path,
                              self.torchserve.log_tail())
                    break
                proxy = self.torchserve.proxy
                if proxy is not None and not proxy.running():
                    log.error("the REST proxy (nginx) exited; end of %s:\n%s", proxy.error_log,
                              proxy.log_tail())
                    break
                try:
                    self.renew_tokens_if_due()
                except Exception as exc:
                    log.warning("could not renew TorchServe keys: %s", exc)
                try:  # a renewal whose reload failed, or a key renewed by someone else
                    self.torchserve.sync_proxy_key()
                except Exception as exc:
                    log.warning("could not hand TorchServe's inference key to the proxy: %s", exc)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __enter__(self) -> "Serving":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_time(text) -> datetime | None:
    """TorchServe's ``2026-11-28T11:09:43.827878349Z`` (nanoseconds) as an aware datetime."""
    if not text:
        return None
    try:
        main, _, frac = str(text).rstrip("Z").partition(".")
        value = datetime.fromisoformat(main).replace(tzinfo=timezone.utc)
        if frac:
            value = value.replace(microsecond=int(frac[:6].ljust(6, "0")))
        return value
    except ValueError:
        return None
