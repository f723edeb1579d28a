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
(:mod:`service.deploy.converge`): new archives are registered and defaults follow the
deployments, so every replica sharing the store serves the same versions. ``run_forever()``
blocks until SIGINT/SIGTERM, renewing TorchServe's keys before they expire, and then
stops everything.

Supervision (``run_forever``): every ``liveness_interval_s`` (1 s) it looks whether
TorchServe (its launcher, which ends with the Java frontend), nginx and the gateway's
thread still run, which costs no request. One that died is logged with why (exit code or
signal; for TorchServe the JVM's out-of-memory line from ``torchserve.log``) and restarted
with backoff (1 s, doubling to 30 s, from 1 s again after 60 s up;
:mod:`service.serving.torchserve.liveness`), and ``modelctl_component_restarts_total
{component}`` counts it. TorchServe is restarted alone, behind the running proxy (which
answers 503 meanwhile), with new keys (the management client, which the converger and the
control API's deployer reach through :meth:`Serving._require_mgmt`, is a new one) and the
store registered again (:func:`register_store`); nginx or the gateway alone. Readiness
(:meth:`Serving.readiness`, the gateway's health) is false from the death until every
version that was READY before it is READY again. More than ``restart_limit`` restarts of
one component within ``restart_window_s`` and it gives up: everything stops and
:attr:`Serving.failure` says why (``modelctl serve`` exits 1), so that what runs it
restarts it whole. Every 2 s it also reads the workers' pids from the management API: a
worker that died (its pid vanished; TorchServe starts another) is logged with its model,
version, pid and what TorchServe's log says about its end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from datetime import datetime, timezone

from prometheus_client import Counter

from service import signals
from service.auth import ApiToken, load_token
from service.errors import ServiceError, Unavailable
from service.metrics.exporter import MetricsExporter, QueueDepthCollector
from service.deploy import readiness
from service.deploy.converge import Converger, ConvergeThread, ModelLocks
from service.serving.torchserve.gateway import GatewayThread
from service.serving.torchserve.liveness import (
    COMPONENTS,
    Restarts,
    RestartPolicy,
    WorkerWatch,
    describe_exit,
    oom_line,
    read_tail,
    worker_death_cause,
)
from service.serving.torchserve.management import ManagementClient
from service.deploy.readiness import ModelReadiness
from service.serving.settings import ServeSettings
from service.deploy.store_scan import (
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
#: Seconds between two looks at TorchServe's keys in run_forever.
_KEY_LOOK_S = 30.0
#: Seconds between two looks at the workers' pids (more often while recovering).
_WORKER_LOOK_S = 2.0
#: How each component is named in the log.
_NAMES = {"torchserve": "TorchServe (the Java frontend)", "nginx": "nginx (the REST proxy)",
          "gateway": "the gRPC gateway"}


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
        policy = RestartPolicy(limit=settings.restart_limit, window_s=settings.restart_window_s)
        #: Restart bookkeeping per component (backoff, the give-up rule).
        self.restarts = {c: Restarts(c, policy) for c in COMPONENTS}
        #: ``modelctl_component_restarts_total{component}`` (created with the exporter).
        self.restart_counter = None
        #: Components that died and whose serving is not whole again -> when they died.
        #: Readiness is false while this is not empty.
        self._recovering: dict[str, float] = {}
        #: The versions that must be READY again before recovery ends.
        self._wanted_back: set[tuple[str, str]] = set()
        self._worker_watch = WorkerWatch()
        self._last_report: list[ModelReadiness] | None = None
        self._last_worker_look = float("-inf")
        #: Why run_forever ended other than by a signal or stop() (None: it did not).
        self.failure: str | None = None

    def _require_mgmt(self) -> ManagementClient:
        """The management client of the TorchServe running now (a new one after each
        restart, with the new keys); Unavailable while there is none."""
        mgmt = self.mgmt
        if mgmt is None:
            raise Unavailable("TorchServe is not running")
        return mgmt

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
            self.gateway = self._new_gateway()
            self.gateway.start()
            self.exporter = MetricsExporter(
                self.settings.host, self.settings.exporter_port, self.torchserve.metrics_dir,
                collectors=[QueueDepthCollector(lambda: self.mgmt),
                            RefusedArchivesCollector(self.settings.model_store)])
            self.restart_counter = Counter(
                "modelctl_component_restarts", "Restarts by modelctl serve of a component that "
                "died (torchserve: the Java frontend, nginx, gateway).", ["component"],
                registry=self.exporter.registry)
            for component in COMPONENTS:
                self.restart_counter.labels(component)  # 0 from the start
            self.exporter.start()
            report = self.wait_ready()
            self._converge_thread = ConvergeThread(self.converger, self.settings.sync_interval_s)
            self._converge_thread.start()
            return report
        except BaseException:
            self.stop()
            raise

    def _new_gateway(self) -> GatewayThread:
        return GatewayThread(
            self.settings, self.torchserve.grpc_inference_target, self.readiness,
            token=self.api_token, upstream_key=self.torchserve.inference_key,
            fresh_upstream_key=lambda: self.torchserve.tokens.inference)

    def readiness(self) -> list[ModelReadiness]:
        """Current readiness of every registered version (for the health service).

        After a component died, every version is reported not ready until every version
        that was READY before is READY again (Unavailable while none is registered yet)."""
        report = readiness.check(self._require_mgmt())
        recovering = dict(self._recovering)
        if recovering:
            why = f"serving again once every worker is READY after {_died_text(recovering)}"
            if not report:
                raise Unavailable(why)
            report = [dataclasses.replace(r, ready=False, reason=f"{r.reason}; {why}")
                      for r in report]
        return report

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
        """Start, supervise until SIGINT/SIGTERM (or until restarts loop: :attr:`failure`),
        stop everything."""
        with signals.stopping(self._stop, log):
            try:
                self._stop.clear()
                self.failure = None
                self.start()
                last_key_look = time.monotonic()
                while not self._stop.wait(self.settings.liveness_interval_s):
                    reason = self.supervise()
                    if reason is not None:
                        self.failure = reason
                        log.error("giving up: %s; modelctl serve stops everything and exits "
                                  "non-zero, to be restarted whole", reason)
                        break
                    if time.monotonic() - last_key_look >= _KEY_LOOK_S and self.torchserve.running():
                        last_key_look = time.monotonic()
                        self._look_at_keys()
            finally:
                self.stop()

    def _look_at_keys(self) -> None:
        try:
            self.renew_tokens_if_due()
        except Exception as exc:
            log.warning("could not renew TorchServe keys: %s", exc)
        try:  # a renewal whose reload failed, or a key renewed by someone else
            self.torchserve.sync_proxy_key()
        except Exception as exc:
            log.warning("could not hand TorchServe's inference key to the proxy: %s", exc)

    # -- supervision ---------------------------------------------------------------------

    def supervise(self, now: float | None = None) -> str | None:
        """One liveness look: log and schedule what died, restart what is due, watch the
        workers. Returns why to give up (restarts loop), else None."""
        now = time.monotonic() if now is None else now
        for component, cause in self._deaths().items():
            book = self.restarts[component]
            if book.recent(now) >= book.policy.limit:
                log.error("%s died (%s)", _NAMES[component], cause)
                return book.give_up_message()
            due = book.died(now)
            if not self._recovering:
                self._wanted_back = self._ready_keys()
            self._recovering.setdefault(component, now)
            log.error("%s died (%s); restarting it in %.0fs", _NAMES[component], cause, due - now)
        for component in COMPONENTS:
            book = self.restarts[component]
            if book.due is None or now < book.due:
                continue
            if not book.attempt(now):
                return book.give_up_message()
            if self.restart_counter is not None:
                self.restart_counter.labels(component).inc()
            try:
                self._restart(component)
            except Exception as exc:
                due = book.failed(time.monotonic())
                log.error("restarting %s failed: %s; next try in %.0fs", _NAMES[component],
                          getattr(exc, "message", None) or exc, due - time.monotonic())
            else:
                book.up(time.monotonic())
                log.warning("restarted %s (restart %d of at most %d within %.0fs)",
                            _NAMES[component], book.recent(now), book.policy.limit,
                            book.policy.window_s)
        self._watch_workers(time.monotonic())
        return None

    def _deaths(self) -> dict[str, str]:
        """Components that died since the last look (and are not waiting for a restart):
        component -> why, in words."""
        dead: dict[str, str] = {}
        ts, books = self.torchserve, self.restarts
        if books["torchserve"].due is None and not ts.running():
            cause = describe_exit(ts.returncode)
            oom = oom_line(read_tail(ts.log_path))
            dead["torchserve"] = f"{cause}; {ts.log_path}: {oom}" if oom else \
                f"{cause}; its log: {ts.log_path}"
        proxy = ts.proxy
        # While TorchServe is down, its restart brings the proxy back too if it must.
        if (books["nginx"].due is None and "torchserve" not in dead and books["torchserve"].due is None
                and proxy is not None and not proxy.running()):
            tail = proxy.log_tail(3).replace("\n", " | ")
            dead["nginx"] = f"{describe_exit(proxy.returncode)}; end of {proxy.error_log}: {tail or '(empty)'}"
        if books["gateway"].due is None and self.gateway is not None and not self.gateway.alive():
            dead["gateway"] = self.gateway.died or "its thread ended"
        return dead

    def _restart(self, component: str) -> None:
        if component == "torchserve":
            self._restart_torchserve()
        elif component == "nginx":
            proxy = self.torchserve.proxy
            proxy.stop(timeout=2)  # its workers that outlived the master hold the port
            proxy.start(self.torchserve.tokens.inference)
        elif component == "gateway":
            if self.gateway is not None:
                self.gateway.stop(grace=0)  # frees the port of a dead gateway
            self.gateway = self._new_gateway()
            self.gateway.start()

    def _restart_torchserve(self) -> None:
        """TorchServe again behind the running proxy: new keys, a new management client,
        the store registered again; the converger pauses meanwhile."""
        if self._converge_thread is not None:
            self._converge_thread.stop()
            self._converge_thread = None
        old, self.mgmt = self.mgmt, None
        if old is not None:
            old.close()
        self._worker_watch.reset()
        ts = self.torchserve
        ts.stop(timeout=5, keep_proxy=True)  # what is left of its group: the workers
        ts.start()
        mgmt = ManagementClient(ts.management_url, lambda: ts.tokens.management)
        self.registered = register_store(mgmt, self.settings)
        self.mgmt = mgmt
        self._converge_thread = ConvergeThread(self.converger, self.settings.sync_interval_s)
        self._converge_thread.start()

    def _ready_keys(self) -> set[tuple[str, str]]:
        report = self._last_report if self._last_report is not None else self.report
        return {r.key for r in report if r.ready}

    def _watch_workers(self, now: float) -> None:
        """Log workers that died; end a recovery once every wanted version is READY."""
        interval = 0.0 if self._recovering else _WORKER_LOOK_S
        mgmt = self.mgmt
        if now - self._last_worker_look < interval or mgmt is None or not self.torchserve.running():
            return
        self._last_worker_look = now
        try:
            report = readiness.check(mgmt)
        except ServiceError as exc:
            log.debug("worker look skipped: %s", exc.message)
            return
        self._last_report = report
        deaths = self._worker_watch.update(report, alive=_pid_alive)
        if deaths:
            text = read_tail(self.torchserve.log_path)
            for d in deaths:
                log.warning("a worker of %s version %s died (pid %d; TorchServe starts another; "
                            "its exit status is TorchServe's to read, not ours). TorchServe's log: %s",
                            d.name, d.version, d.pid, worker_death_cause(text, d))
        if self._recovering and all(self.restarts[c].due is None for c in self._recovering):
            self._end_recovery(report, now)

    def _end_recovery(self, report: list[ModelReadiness], now: float) -> None:
        by_key = {r.key: r for r in report}
        waiting = [k for k in sorted(self._wanted_back) if not (k in by_key and by_key[k].ready)]
        died = _died_text(self._recovering)
        since = min(self._recovering.values())
        restarted = max((self.restarts[c].up_since or since) for c in self._recovering)
        if not waiting:
            others = [r for r in report if not r.ready]
            if others:  # versions that were not READY before either
                log.info("serving again: every version READY before is READY again, %.1fs after "
                         "%s; still not ready: %s", now - since, died, readiness.summary(others))
            else:
                log.info("serving again: every worker READY, %.1fs after %s", now - since, died)
        elif now - restarted > self.settings.startup_timeout_s:
            log.warning("not ready %.0fs after the restart that followed %s: %s (logs: %s); "
                        "readiness follows each version from now on", now - restarted, died,
                        readiness.summary(by_key.get(k) or _missing(k) for k in waiting),
                        self.torchserve.log_path)
        else:
            return
        self._recovering.clear()
        self._wanted_back = set()

    def __enter__(self) -> "Serving":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _died_text(recovering: dict[str, float]) -> str:
    return " and ".join(f"{c} died" for c in sorted(recovering, key=recovering.get))


def _missing(key: tuple[str, str]) -> ModelReadiness:
    return ModelReadiness(name=key[0], version=key[1], is_default=False, workers=0,
                          ready_workers=0, ready=False, reason="not registered")


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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
