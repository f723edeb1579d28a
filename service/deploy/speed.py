"""The speed check of deploy-if-faster: two versions of a model, side by side, in a subprocess.

``python -m service.deploy.speed --store DIR --name NAME --new V --serving S`` loads both
archives of the model store into :class:`service.inference.Predictor` on the serving
device, each with its own serving options (precision, channels_last, compile: what a worker
would run, :func:`service.inference.fastpath.resolve_runtime`), warms both up, then measures
in alternating rounds (new then serving, serving then new, ...), so that a noisy machine
slows both alike:

* batch 1: ``B1_CALLS`` requests of one input each, one at a time; the p50 is the median
  of every call of every round;
* batch 8: ``B8_CALLS`` requests of 8 inputs each; a round's throughput is inputs answered
  per second, and the result is the median over the rounds.

A request is :meth:`Predictor.predict` on a fixed, seeded sample input of the model's input
spec (a PNG of its size for an image model, token ids or features for a sequence model):
decode, preprocess, forward and top-k, the path a request takes in a worker. It prints one
JSON line and exits 0, or prints why on stderr and exits 1.

Why a subprocess: the control service then never imports torch, its gRPC threads never run
a forward, torch's thread pool belongs to the measuring process alone, and a check that
runs over its time (``MODELCTL_SPEED_CHECK_TIMEOUT_S``) or the service's stop is ended by
killing that process. :func:`run_speed_check` is the control service's side; it runs no
torch. The number of rounds is bounded (``MODELCTL_SPEED_CHECK_ROUNDS``), and so is each
round's work (the constants below); the child also stops starting rounds past its
``--budget-s``, keeping at least one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from service.environ import torch_threads

#: Where the speed check may run (MODELCTL_SPEED_CHECK_DEVICE).
SPEED_CHECK_DEVICES = ("auto", "cpu", "cuda")

log = logging.getLogger(__name__)

#: Requests of one input per version and round.
B1_CALLS = 10
#: Requests of a batch of 8 per version and round.
B8_CALLS = 3
BATCH = 8
#: Requests of each size run once, untimed, after the predictor's own warm-up.
WARM_CALLS = 2
#: Share of the timeout the child may spend before it stops starting rounds; the rest is
#: for loading, warm-up and the last round.
_BUDGET_SHARE = 0.6


class SpeedCheckInterrupted(Exception):
    """The check was ended because the control service stops (not a result)."""


@dataclass(frozen=True)
class SpeedCheck:
    """What one speed check found (field meanings: the proto's ``SpeedCheck``)."""

    device: str = ""
    new_p50_ms_b1: float = 0.0
    serving_p50_ms_b1: float = 0.0
    new_throughput_b8: float = 0.0
    serving_throughput_b8: float = 0.0
    unit: str = "img/s"
    rounds: int = 0
    margin: float = 0.0
    error: str = ""
    seconds: float = 0.0
    #: torch's intra-op threads in the measuring process (MODELCTL_TORCH_THREADS, as a worker).
    threads: int = 0
    #: The runtime each version ran with ({"precision", "channels_last", "compile"}), and
    #: what resolve_runtime refused (notes).
    new_runtime: dict | None = None
    serving_runtime: dict | None = None

    @property
    def measured(self) -> bool:
        return not self.error and self.rounds > 0

    @property
    def faster(self) -> bool:
        """Lower batch-1 p50 and higher batch-8 throughput, each by more than the margin."""
        return (self.measured
                and self.new_p50_ms_b1 < self.serving_p50_ms_b1 * (1 - self.margin)
                and self.new_throughput_b8 > self.serving_throughput_b8 * (1 + self.margin))

    def to_dict(self) -> dict:
        return {**asdict(self), "faster": self.faster}

    @classmethod
    def from_dict(cls, data: dict) -> "SpeedCheck":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """``p50 2.10 ms vs 3.40 ms, 1650 vs 1210 img/s at batch 8`` (new vs serving)."""
        if not self.measured:
            return f"speed not measured ({self.error or 'no rounds'})"
        return (f"p50 {self.new_p50_ms_b1:.2f} ms vs {self.serving_p50_ms_b1:.2f} ms, "
                f"{self.new_throughput_b8:.0f} vs {self.serving_throughput_b8:.0f} {self.unit} at batch {BATCH}")


# ---- the control service's side (no torch) -------------------------------------------------------
def run_speed_check(store_root: Path | str, name: str, new: int, serving: int, *, device: str = "auto",
                    rounds: int = 5, margin: float = 0.05, timeout_s: float = 300.0,
                    cancel: threading.Event | None = None, python: str | None = None) -> SpeedCheck:
    """Measure ``new`` against ``serving`` in a subprocess; a SpeedCheck with ``error`` set
    when either is not in the store, the process failed, or it ran past ``timeout_s`` (it is
    then killed). Raises
    SpeedCheckInterrupted when ``cancel`` is set meanwhile (the process is killed)."""
    from service.auth import scrubbed_env
    from service.modelstore.store import ModelStore

    if cancel is not None and cancel.is_set():
        raise SpeedCheckInterrupted("the control service is stopping")
    store = ModelStore(store_root)
    missing = [v for v in (new, serving) if not store.path(name, v).is_file()]
    if missing:  # said at once, not after a process has loaded torch
        return SpeedCheck(error=f"{name} version {missing[0]} is not in the model store", margin=margin)
    cmd = [python or sys.executable, "-m", "service.deploy.speed", "--store", str(store_root), "--name", name,
           "--new", str(int(new)), "--serving", str(int(serving)), "--device", device, "--rounds", str(int(rounds)),
           "--budget-s", f"{timeout_s * _BUDGET_SHARE:.3f}"]
    env = scrubbed_env(os.environ)  # never the API token
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True, close_fds=True)
    out = err = b""
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    raise SpeedCheckInterrupted("the control service is stopping") from None
                if time.monotonic() - start > timeout_s:
                    return SpeedCheck(error=f"timed out after {timeout_s:g} s (MODELCTL_SPEED_CHECK_TIMEOUT_S)",
                                      margin=margin, seconds=time.monotonic() - start)
    finally:
        if proc.returncode is None:
            _kill(proc)
    took = time.monotonic() - start
    if proc.returncode != 0:
        lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        return SpeedCheck(error=f"the measuring process failed: {why[:300]}", margin=margin, seconds=took)
    try:
        data = json.loads(out.decode("utf-8", "replace").strip().splitlines()[-1])
        return SpeedCheck.from_dict({**data, "margin": margin, "seconds": took})
    except (ValueError, IndexError, TypeError) as exc:
        return SpeedCheck(error=f"the measuring process printed no result ({exc})", margin=margin, seconds=took)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and anything it started
    except ProcessLookupError:
        pass
    proc.communicate()


# ---- the measuring process (torch) ---------------------------------------------------------------
def sample_payload(spec) -> dict:
    """One request's payload for a model of ``spec``: a seeded PNG of its input size, or a
    sequence of 16 steps (features, or token ids below its vocabulary size)."""
    import torch
    from torchvision.io import encode_png

    g = torch.Generator().manual_seed(0)
    if spec.modality == "image":
        side = spec.input.resize or spec.input.size
        pixels = torch.randint(0, 256, (spec.input.channels, side, side), dtype=torch.uint8, generator=g)
        return {"body": encode_png(pixels).numpy().tobytes()}
    steps = min(16, spec.input.max_length)
    if spec.sequence_kind == "features":
        values = torch.rand((steps, spec.config.input_size), generator=g).tolist()
    else:
        values = torch.randint(1, max(2, spec.config.vocab_size), (steps,), generator=g).tolist()
    return {"body": json.dumps({"inputs": values}).encode()}


def _device(choice: str) -> str:
    import torch

    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda:0"
    if choice == "cuda":
        raise RuntimeError("speed_check_device is cuda, but this process sees no GPU")
    return "cpu"


class _Side:
    """One version under test: its predictor, its payload, and what was measured."""

    def __init__(self, store_root: Path, name: str, version: int, device: str):
        from service.inference.predictor import Predictor, warm_up_sizes
        from service.modelstore import ModelBundle, ModelStore

        path = ModelStore(store_root).path(name, version)
        if not path.is_file():
            raise FileNotFoundError(f"{name} version {version} is not in the model store")
        bundle = ModelBundle.from_archive(path)  # weights_only: pickled code is refused
        self.predictor = Predictor(bundle, device, name=name, version=str(version), max_batch=BATCH)
        self.predictor.warm_up(warm_up_sizes(BATCH, self.predictor.runtime.compile))
        self.payload = sample_payload(bundle.spec)
        self.unit = "img/s" if bundle.spec.modality == "image" else "seq/s"
        for size in (1, BATCH):
            for _ in range(WARM_CALLS):
                self._call(size)
        self.latencies: list[float] = []
        self.throughputs: list[float] = []

    def _call(self, size: int) -> None:
        result = self.predictor.predict([self.payload] * size)
        failed = next((o for o in result.outputs if not isinstance(o, dict)), None)
        if failed is not None:
            raise RuntimeError(f"{self.predictor.name} version {self.predictor.version} refused its sample "
                               f"input: {getattr(failed, 'message', failed)}")

    def round(self) -> None:
        for _ in range(B1_CALLS):
            t0 = time.perf_counter()
            self._call(1)
            self.latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(B8_CALLS):
            self._call(BATCH)
        self.throughputs.append(B8_CALLS * BATCH / (time.perf_counter() - t0))

    def runtime(self) -> dict:
        return {**self.predictor.runtime.to_dict(), "notes": list(self.predictor.runtime_notes)}


def measure(store_root: Path | str, name: str, new: int, serving: int, *, device: str = "auto",
            rounds: int = 5, budget_s: float = 180.0) -> dict:
    """Both versions side by side (see the module's docstring); the result as a dict."""
    import torch

    threads = torch_threads()  # as a serving worker sets it
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.monotonic()
    where = _device(device)
    sides = {"new": _Side(Path(store_root), name, new, where), "serving": _Side(Path(store_root), name, serving, where)}
    done = 0
    for r in range(max(1, rounds)):
        if done and time.monotonic() - start > budget_s:
            break
        for key in (("new", "serving") if r % 2 == 0 else ("serving", "new")):
            sides[key].round()
        done += 1
    out = {"device": where, "rounds": done, "unit": sides["new"].unit, "threads": torch.get_num_threads()}
    for key, side in sides.items():
        out[f"{key}_p50_ms_b1"] = statistics.median(side.latencies) * 1000.0
        out[f"{key}_throughput_b8"] = statistics.median(side.throughputs)
        out[f"{key}_runtime"] = side.runtime()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.deploy.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--new", required=True, type=int)
    parser.add_argument("--serving", required=True, type=int)
    parser.add_argument("--device", choices=SPEED_CHECK_DEVICES, default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=180.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        result = measure(args.store, args.name, args.new, args.serving, device=args.device, rounds=args.rounds,
                         budget_s=args.budget_s)
    except Exception as exc:  # noqa: BLE001 - reported to the control service as the check's error
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
