"""``modelctl serve --engine native``: every archive of the store in one process, no Java.

    NativeServing(ServeSettings.from_env(engine="native")).run_forever()

What it shares with the TorchServe engine, unchanged: the store scan and the archive check
before every registration (:func:`~service.deploy.store_scan.register_store`), convergence
on ``deployment.json`` (:class:`~service.deploy.converge.Converger`), readiness from the
models' real state (:mod:`service.deploy.readiness`), the operator's API token
(:mod:`service.auth`), the control API deploying to it (its deployer drives
:class:`~.models.NativeModels` through TorchServe's management interface), and the metric
names (with ``engine="native"``).

Threads: one asyncio loop (``modelctl-io``) speaks REST (uvicorn, :mod:`.rest`) and gRPC
(grpc.aio, :mod:`.grpc_api`) and never touches torch; one thread per device owns torch
(:mod:`.runner`): CPU, or each ``cuda:{i}``. When a device thread dies, the process ends
(non-zero), to be restarted whole by whatever supervises it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

from service import signals
from service.auth import ApiToken, load_token
from service import environ
from service.errors import Unavailable
from service.metrics.exporter import MetricsExporter, QueueDepthCollector
from service.metrics.handler import HandlerMetrics
from service.deploy import readiness
from service.deploy.converge import Converger, ConvergeThread, ModelLocks
from service.serving.native.dataplane import DataPlane
from service.serving.native.models import NativeModels
from service.serving.native.runner import DeviceRunner
from service.deploy.readiness import ModelReadiness
from service.deploy.store_scan import (
    RefusedArchivesCollector,
    refused_archives,
    register_store,
    scan_model_store,
)

log = logging.getLogger(__name__)

ENGINE = "native"


def devices() -> list[str]:
    """``cuda:{i}`` for every visible GPU, else ``cpu`` (torch's own count, no CUDA init)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def torch_threads(n_devices: int) -> int:
    """Intra-op threads per device thread: ``MODELCTL_TORCH_THREADS``, else the cores shared."""
    return environ.torch_threads(default=max(1, (os.cpu_count() or 1) // max(1, n_devices)))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (a taken port fails here, at once, naming it).

    The protocol is named (``IPPROTO_TCP``, not 0): asyncio sets ``TCP_NODELAY`` on an
    accepted connection only when its socket says it is TCP, and accepted sockets inherit the
    listening socket's protocol. Without it, the response's last small write (the chunked
    terminator) waited for the client's delayed ACK: about 40 ms on every REST call.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot bind the REST port {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class NativeServing:
    """The native engine, with the lifecycle of :class:`service.serving.torchserve.supervisor.Serving`."""

    engine = ENGINE

    def __init__(self, settings, *, api_token: ApiToken | None = None):
        self.settings = settings
        self.api_token = api_token
        self.models: NativeModels | None = None
        self.plane: DataPlane | None = None
        self.exporter: MetricsExporter | None = None
        self.metrics: HandlerMetrics | None = None
        self.registered: list[tuple[str, int]] = []
        self.expected: list[tuple[str, int]] = []
        self.report: list[ModelReadiness] = []
        self.model_locks = ModelLocks()
        self.converger = Converger(settings, self._require_mgmt, self.model_locks)
        self._converge_thread: ConvergeThread | None = None
        self._runners: list[DeviceRunner] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io_thread: threading.Thread | None = None
        self._uvicorn = None
        self._grpc = None
        self.rest_port: int | None = None
        self.grpc_port: int | None = None
        self._stop = threading.Event()
        #: Why run_forever ended other than by a signal (None: a signal or stop()).
        self.failure: str | None = None
        self.started_at: float | None = None

    def _require_mgmt(self) -> NativeModels:
        if self.models is None:
            raise Unavailable("the native engine is not running")
        return self.models

    @property
    def mgmt(self) -> NativeModels | None:
        return self.models

    # -- endpoints ------------------------------------------------------------------------

    def endpoints(self) -> dict[str, str]:
        host = self.settings.host
        rest = f"http://{host}:{self.rest_port or self.settings.inference_port}"
        return {"rest": f"{rest}/v2/models/<model>/infer and {rest}/predictions/<model>[/<version>]",
                "grpc": f"{host}:{self.grpc_port or self.settings.grpc_inference_port}",
                "exporter": f"http://{host}:{self.settings.exporter_port}/metrics"}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> list[ModelReadiness]:
        self.started_at = time.monotonic()
        try:
            self.expected = [(n, v) for n, vs in scan_model_store(self.settings.model_store).items() for v in vs]
            if self.api_token is None:
                self.api_token = load_token(self.settings.state_dir, create=True)
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            rest_sock = bind(self.settings.host, self.settings.inference_port)
            names = devices()
            threads = torch_threads(len(names))
            self._runners = [DeviceRunner(d, threads=threads) for d in names]
            for runner in self._runners:
                runner.start()
            self.exporter = MetricsExporter(
                self.settings.host, self.settings.exporter_port, None,
                collectors=[QueueDepthCollector(lambda: self.models),
                            RefusedArchivesCollector(self.settings.model_store)])
            self.metrics = HandlerMetrics.create(self.exporter.registry, engine=ENGINE)
            self.models = NativeModels(self.settings, self._runners, on_loaded=self._attach_metrics)
            self.plane = DataPlane(self.models, self.settings)
            self._start_io(rest_sock)
            self.exporter.start()
            self.registered = register_store(self.models, self.settings)
            refused = refused_archives(self.settings.model_store)
            self.expected = [key for key in self.expected if key not in refused]
            report = self.wait_ready()
            self.plane.starting = False
            self._converge_thread = ConvergeThread(self.converger, self.settings.sync_interval_s)
            self._converge_thread.start()
            return report
        except BaseException:
            self.stop()
            raise

    def _attach_metrics(self, entry) -> None:
        metrics = self.metrics

        def on_batch(batch, result, took):
            statuses = [getattr(o, "http_status", 200) for o in result.outputs]
            metrics.observe_batch(entry.name, entry.version, result.timings, took, statuses)

        entry.lane.on_batch = on_batch

    def _start_io(self, rest_sock: socket.socket) -> None:
        import uvicorn

        from service import __version__
        from service.serving.native.grpc_api import create_grpc_server
        from service.serving.native.rest import RestApp

        app = RestApp(self.plane, self.settings, self.api_token, server_version=__version__)
        config = uvicorn.Config(app, http="httptools", loop="none", lifespan="off", log_level="warning",
                                access_log=False, timeout_keep_alive=75, server_header=False)
        self._uvicorn = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main():
            try:
                self._grpc, self.grpc_port = create_grpc_server(
                    self.settings, self.plane, self.readiness, token=self.api_token, server_version=__version__)
                await self._grpc.start()
                self.rest_port = rest_sock.getsockname()[1]
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            serve = asyncio.ensure_future(self._uvicorn.serve(sockets=[rest_sock]))
            while not self._uvicorn.started and not serve.done():
                await asyncio.sleep(0.01)
            if serve.done() and serve.exception() is not None:
                errors.append(serve.exception())
            ready.set()
            await serve

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(main())
            except BaseException:
                log.exception("the native engine's I/O loop failed")
            finally:
                if not self._stop.is_set():
                    self.failure = self.failure or "the REST/gRPC I/O loop ended"
                    self._stop.set()

        self._io_thread = threading.Thread(target=run, name="modelctl-io", daemon=True)
        self._io_thread.start()
        if not ready.wait(30) or errors:
            raise errors[0] if errors else Unavailable("the REST and gRPC servers did not start within 30s")

    def readiness(self) -> list[ModelReadiness]:
        """Every registered version's readiness, and, during start-up, the store's versions
        not registered yet (not ready), so that health says NOT_SERVING until all are."""
        report = readiness.check(self._require_mgmt())
        if self.plane is None or not self.plane.starting:
            return report
        known = {r.key for r in report}
        return report + [ModelReadiness(name=n, version=str(v), is_default=False, workers=0, ready_workers=0,
                                        ready=False, reason="not registered yet")
                         for n, v in self.expected if (n, str(v)) not in known]

    def wait_ready(self, timeout_s: float | None = None) -> list[ModelReadiness]:
        timeout_s = self.settings.startup_timeout_s if timeout_s is None else timeout_s
        self.report = readiness.wait_until_ready(self.models, self.expected, timeout_s)
        self._after_workers_settled()
        not_ready = [r for r in self.report if not r.ready]
        endpoints = ", ".join(f"{k} {v}" for k, v in self.endpoints().items())
        took = time.monotonic() - (self.started_at or time.monotonic())
        if not not_ready:
            log.info("native engine serving %d model version(s), every one READY in %.1fs: %s",
                     len(self.report), took, endpoints)
        else:
            log.warning("native engine not ready after %.0fs: %s; endpoints: %s", timeout_s,
                        readiness.summary(not_ready), endpoints)
        return self.report

    def _after_workers_settled(self) -> None:
        """Hook: start what needs the models loaded (the control service does)."""

    def stop(self) -> None:
        self._stop.set()
        if self._converge_thread is not None:
            self._converge_thread.stop()
            self._converge_thread = None
        if self._loop is not None and self._io_thread is not None:
            async def shutdown():
                if self._grpc is not None:
                    health_servicer = getattr(self._grpc, "_modelctl_health", None)
                    if health_servicer is not None:
                        await health_servicer.close()
                    await self._grpc.stop(2.0)
                if self._uvicorn is not None:
                    self._uvicorn.should_exit = True

            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(15)
            except Exception:
                log.exception("stopping the REST/gRPC servers failed")
            self._io_thread.join(15)
            self._loop.close()
            self._loop = self._io_thread = None
            self._grpc = self._uvicorn = None
        if self.exporter is not None:
            self.exporter.stop()
            self.exporter = None
        for runner in self._runners:
            runner.stop()
        self._runners = []
        self.models = None

    def run_forever(self) -> None:
        """Start, block until SIGINT/SIGTERM or a dead device thread or I/O loop, stop."""
        with signals.stopping(self._stop, log):
            try:
                self._stop.clear()
                self.start()
                while not self._stop.wait(1.0):
                    dead = [r for r in self._runners if not r.alive()]
                    if dead:
                        self.failure = f"the torch thread of {dead[0].device} died: {dead[0].died!r}"
                        break
                if self.failure:
                    log.error("native engine ends: %s", self.failure)
            finally:
                self.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
