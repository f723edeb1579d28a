"""Test-only helpers: broken archives, waits, held gRPC streams. The builders the benchmarks
share (specs, bundles, images, free ports) are in ``testkit.builders``, re-exported here for the
tests that import them from this module."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from testkit.builders import SPECS, TEXTS, free_port, make_bundle, random_image

__all__ = ["SPECS", "TEXTS", "free_port", "make_bundle", "random_image",
           "broken_archive_copy", "wait_for", "HeldWatches", "engine_params", "control_process"]


def broken_archive_copy(good: Path, target: Path, weights: bytes | None = None, **manifest_model) -> None:
    """Copy an archive with weights that no longer fit its spec: its worker cannot load.

    ``weights``: the bytes of the copy's weights.pt (default: a state_dict of parameters
    the spec does not have). ``manifest_model`` overrides MANIFEST's model fields (modelName, modelVersion). The
    copy appears at once (written beside, then renamed), as the model store's writes do:
    serving replicas watch the store.
    """
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(target).with_name(f".{Path(target).name}.partial")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(partial, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "weights.pt" and weights is not None:
                data = weights
            elif item.filename == "weights.pt":
                buf = io.BytesIO()
                torch.save({"nonsense": torch.zeros(1)}, buf)
                data = buf.getvalue()
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"].update(manifest_model)
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    os.replace(partial, target)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    """``predicate()``'s first truthy value; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def control_process(root: Path, store_root: Path, *, env: dict | None = None, launcher: list[str] | None = None,
                    log_name: str = "control.log"):
    """``python -m service.control`` as a subprocess over ``root`` (its database, run dirs, data
    root and state dir) and the model store ``store_root``, without the caller's ``MODELCTL_*``
    variables but with ``env``; ``launcher`` replaces ``[python, -m, service.control]``. Yields
    ``(process, port, log path)`` once its log says it is ready; SIGTERM (then SIGKILL) at the end."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCTL_")}
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    log = root / log_name
    cmd = [*(launcher or [sys.executable, "-m", "service.control"]), "--port", str(port),
           "--db", str(root / "control.db"), "--runs-dir", str(root / "runs"), "--data-root", str(root),
           "--model-store", str(store_root), "--state-dir", str(root / "state"), "--management-port", str(free_port())]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        def serving():
            assert proc.poll() is None, log.read_text()
            return "ready: control API on" in log.read_text()

        wait_for(serving, 90, "the control service", poll=0.2)
        yield proc, port, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HeldWatches:
    """``n`` gRPC health ``Watch`` streams on ``target``, opened without a token and never
    read (what froze the control API in issue 12), over ``channels`` connections."""

    def __init__(self, target: str, n: int, *, channels: int = 4):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                          for _ in range(channels)]
        self.calls = [health_pb2_grpc.HealthStub(self._channels[i % channels]).Watch(health_pb2.HealthCheckRequest())
                      for i in range(n)]

    def refused(self) -> list:
        return [c for c in self.calls if c.done()]

    def settle(self, open_streams: int, timeout_s: float = 20.0) -> list:
        """Wait until all but ``open_streams`` have ended, and the open ones have their
        answer's headers; returns the ended calls (each RESOURCE_EXHAUSTED, asserted)."""
        import grpc

        wait_for(lambda: len(self.refused()) >= len(self.calls) - open_streams, timeout_s,
                 f"{len(self.calls) - open_streams} refused Watch streams")
        for call in self.calls:
            call.initial_metadata()  # the headers: an accepted stream has its first answer sent
        time.sleep(0.2)
        refused = self.refused()
        assert len(refused) == len(self.calls) - open_streams, (len(refused), open_streams)
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (call.code(), call.details())
            assert "MODELCTL_MAX_OPEN_STREAMS" in call.details()
            assert dict(call.trailing_metadata() or ()).get("retry-after"), call.trailing_metadata()
        return refused

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "HeldWatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_params(*engines: str) -> list:
    """Fixture params over serving engines, each marked with its engine's test tier: the tiers
    ``torchserve`` and ``native`` (pyproject.toml) are named after the engines, so a module whose
    fixture serves on both runs each half in its own tier."""
    return [pytest.param(engine, marks=getattr(pytest.mark, engine)) for engine in engines]
