"""The native engine's registered model versions, behind TorchServe's management interface.

:class:`NativeModels` answers the calls that :class:`service.serving.torchserve.management.ManagementClient`
answers for TorchServe (``register``, ``set_default``, ``describe``, ``list_models``,
``scale``, ``unregister``), with the same entries and the same errors. So everything that
drives an engine through that interface drives this one unchanged: registration of the
store (:func:`service.deploy.store_scan.register_store`), convergence on
``deployment.json`` (:mod:`service.deploy.converge`), readiness
(:mod:`service.deploy.readiness`) and the control API's deployer.

A version is loaded on its device's torch thread (:class:`~.runner.DeviceRunner`): the
archive is read without unpacking (weights with ``weights_only=True``), the predictor is
built, and warmed up (and compiled, where the archive asks) at every batch size it will run.
Only then is it READY. ``workers`` is recorded, and readiness holds to it as with
TorchServe, but a version runs as one copy on one device: the device thread batches its
requests, and more copies on the same cores would only compete.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import AlreadyExists, InvalidArgument, NotFound, ServiceError
from service.serving.native.runner import DeviceRunner, Lane

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"


@dataclass
class Version:
    name: str
    version: str
    path: Path
    runner: DeviceRunner
    lane: Lane
    min_workers: int
    state: str = LOADING
    error: str = ""
    #: Seconds the load took (archive read, build, warm-up), once READY.
    load_s: float = 0.0
    registered_at: float = field(default_factory=time.monotonic)

    @property
    def predictor(self):
        return self.lane.predictor

    @property
    def ready(self) -> bool:
        return self.state == READY

    def entry(self) -> dict:
        """TorchServe's ``describe`` entry for this version."""
        if self.state == FAILED:
            workers = []
        else:
            status = "READY" if self.state == READY else "UNLOADING"  # TorchServe's word while loading
            workers = [{"id": f"{self.name}-{self.version}-{i}", "status": status, "pid": os.getpid(),
                        "gpu": self.runner.device.startswith("cuda"), "device": self.runner.device}
                       for i in range(max(1, self.min_workers))]
        queued = self.runner.queued(self.lane)
        return {"modelName": self.name, "modelVersion": self.version, "modelUrl": self.path.name,
                "minWorkers": self.min_workers, "maxWorkers": self.min_workers,
                "batchSize": self.lane.max_batch, "maxBatchDelay": round(self.lane.wait_cap_s * 1000),
                "workers": workers, "engine": "native",
                "loadError": self.error,
                "jobQueueStatus": {"pendingRequests": queued}}


class NativeModels:
    """Registered versions of one native engine, placed on its device runners."""

    def __init__(self, settings, runners: list[DeviceRunner], *, on_loaded=None):
        self.settings = settings
        self.runners = runners
        self._versions: dict[tuple[str, str], Version] = {}
        self._defaults: dict[str, str] = {}
        self._lock = threading.RLock()
        #: Called (on the device thread) with each Version once it is READY: metrics hooks.
        self.on_loaded = on_loaded

    # -- looking up -----------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> Version:
        """The version asked for, or the model's default; NotFound naming what is missing."""
        with self._lock:
            if version in (None, ""):
                default = self._defaults.get(name)
                if default is None:
                    raise NotFound(f"Model not found in model store: {name}")
                version = default
            found = self._versions.get((name, str(version)))
            if found is None:
                if not any(n == name for n, _ in self._versions):
                    raise NotFound(f"Model not found in model store: {name}")
                raise NotFound(f"Model version: {version} does not exist for model: {name}")
            return found

    def versions(self) -> list[Version]:
        with self._lock:
            return list(self._versions.values())

    def default_of(self, name: str) -> str | None:
        with self._lock:
            return self._defaults.get(name)

    # -- TorchServe's management interface ------------------------------------------------

    def register(self, url_or_path: str, *, initial_workers: int, batch_size: int | None = None,
                 max_batch_delay_ms: int | None = None, synchronous: bool = False,
                 response_timeout_s: int | None = None) -> str:
        """Register an archive: a link name in ``settings.archive_dir`` (what
        :func:`~service.deploy.store_scan.checked_link` returns) or a path. Its load runs on
        a device thread; ``synchronous`` waits for it."""
        path = Path(url_or_path)
        if not path.is_absolute():
            path = Path(self.settings.archive_dir) / path
        if not path.is_file():
            raise NotFound(f"archive {url_or_path} not found")
        name, version = _manifest_name_version(path)
        with self._lock:
            if (name, version) in self._versions:
                raise AlreadyExists(f"Model version {version} is already registered for model {name}")
            runner = min(self.runners, key=lambda r: sum(v.runner is r for v in self._versions.values()))
            lane = Lane((name, version), max_batch=batch_size or 1)
            entry = Version(name, version, path, runner, lane, min_workers=int(initial_workers))
            self._versions[(name, version)] = entry
            self._defaults.setdefault(name, version)
        runner.add_lane(lane)
        future = runner.call(lambda: self._load(entry))
        if synchronous:
            future.result()
            if entry.state == FAILED:
                raise ServiceError(f"{name} version {version} failed to load: {entry.error}")
        return f"Model \"{name}\" Version: {version} registered with {initial_workers} initial workers"

    def set_default(self, name: str, version) -> str:
        self.get(name, str(version))
        with self._lock:
            self._defaults[name] = str(version)
        return f"Default version successfully updated for model \"{name}\" to \"{version}\""

    def describe(self, name: str, version=None) -> list[dict]:
        with self._lock:
            if version == "all":
                found = [v for (n, _), v in self._versions.items() if n == name]
                if not found:
                    raise NotFound(f"Model not found in model store: {name}")
                return [v.entry() for v in sorted(found, key=lambda v: _version_key(v.version))]
            return [self.get(name, None if version is None else str(version)).entry()]

    def list_models(self, page_size: int = 100) -> list[dict]:
        with self._lock:
            return [{"modelName": name, "modelUrl": self._versions[(name, default)].path.name}
                    for name, default in sorted(self._defaults.items())]

    def scale(self, name: str, version, min_workers: int, *, max_workers: int | None = None,
              synchronous: bool = False) -> str:
        if int(min_workers) < 0:
            raise InvalidArgument(f"min_worker must be >= 0, got {min_workers}")
        entry = self.get(name, str(version))
        entry.min_workers = int(min_workers)
        return "Processing worker updates..."

    def unregister(self, name: str, version) -> str:
        entry = self.get(name, str(version))
        with self._lock:
            if self._defaults.get(name) == entry.version and any(
                    n == name and v != entry.version for n, v in self._versions):
                raise InvalidArgument(f"Cannot remove default version {entry.version} for model {name}")
            del self._versions[(name, entry.version)]
            if self._defaults.get(name) == entry.version:
                del self._defaults[name]
        from service.errors import Unavailable

        for request in entry.runner.remove_lane(entry.lane):
            request.deliver(Unavailable(f"{name} version {entry.version} was unregistered"))
        entry.runner.call(lambda: _release(entry))
        log.info("unregistered %s version %s", name, entry.version)
        return f"Model \"{name}\" unregistered"

    def close(self) -> None:
        """Nothing to close (the ManagementClient interface has it)."""

    # -- loading (on the device thread) ---------------------------------------------------

    def _load(self, entry: Version) -> None:
        from service.inference import Predictor
        from service.inference.fastpath import configure_compile_cache
        from service.inference.predictor import warm_up_sizes
        from service.models.bundle import ModelBundle

        start = time.perf_counter()
        try:
            bundle = ModelBundle.from_archive(entry.path)
            serving = bundle.lineage.get("serving") or {}
            if serving.get("compile"):
                configure_compile_cache(Path(self.settings.state_dir) / "compile-cache")
            predictor = Predictor(bundle, entry.runner.device, name=entry.name, version=entry.version)
            batch = int(serving.get("batch_size") or 1)
            took = predictor.warm_up(warm_up_sizes(batch, predictor.runtime.compile))
        except Exception as exc:
            entry.state, entry.error = FAILED, f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            log.error("%s version %s could not be loaded on %s: %s", entry.name, entry.version,
                      entry.runner.device, entry.error)
            return
        for note in predictor.runtime_notes:
            log.info("%s version %s: %s", entry.name, entry.version, note)
        entry.lane.max_batch = max(took) if took else batch
        entry.lane.wait_cap_s = max(float(serving.get("max_batch_delay_ms") or 0),
                                    float(self.settings.batch_wait_cap_ms)) / 1000
        entry.lane.predictor = predictor
        entry.load_s = time.perf_counter() - start
        entry.state = READY
        log.info("loaded %s version %s (%s) on %s; %s; warm-up %s; ready in %.2fs", entry.name, entry.version,
                 predictor.spec.family, entry.runner.device, predictor.runtime.to_dict(),
                 {n: round(s, 3) for n, s in took.items()}, entry.load_s)
        if self.on_loaded is not None:
            self.on_loaded(entry)


def _release(entry: Version) -> None:
    entry.lane.predictor = None
    entry.state = FAILED
    entry.error = "unregistered"
    if entry.runner.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _manifest_name_version(path: Path) -> tuple[str, str]:
    """(modelName, modelVersion) from the archive's MANIFEST (what TorchServe registers by)."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json")).get("model") or {}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"archive {path.name} has no readable MANIFEST: {exc}") from None
    name, version = model.get("modelName"), model.get("modelVersion")
    if not name or not version:
        raise InvalidArgument(f"archive {path.name}: its MANIFEST names no model or version")
    return str(name), str(version)


def _version_key(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)
