"""Starting a run from the command line: validate, then train here or under torchrun.

``python -m service.training run SPEC`` and ``modelctl finetune run SPEC`` both call
:func:`run_command`. It validates the spec before anything else. With
``hyperparameters.nproc > 1`` and not yet under torchrun, it re-launches itself as
``python -m torch.distributed.run --standalone --nproc-per-node N -m service.training run
…`` and forwards SIGTERM / SIGINT to it; otherwise it runs the recipe in the foreground.

Exit codes: 0 finished (or already finished), 128 + signal number when stopped by a
signal (no archive), the workers' code under torchrun otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

from service import signals
from service.modelstore import ModelStore
from service.rundir import TRAINER_MODULE, trainer_argv
from service.training import distributed
from service.training.run_spec import Policy, RunSpec

logger = logging.getLogger("service.training")

RUNS_DIR_ENV = "MODELCTL_RUNS_DIR"
STORE_ENV = "MODELCTL_MODEL_STORE"


def default_run_dir(spec: RunSpec, environ=None) -> Path:
    """``$MODELCTL_RUNS_DIR`` (default ``.modelctl/runs``) / ``<output name>-<spec digest>``:
    the same spec started again lands in the same directory, and so resumes."""
    environ = os.environ if environ is None else environ
    root = Path(environ.get(RUNS_DIR_ENV) or Path.cwd() / ".modelctl" / "runs")
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"{spec.output.name}-{digest}"


def default_store(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(STORE_ENV) or Path.cwd() / "model_store")


def add_run_arguments(parser) -> None:
    """The arguments of a ``run`` command (shared by both entry points)."""
    parser.add_argument("spec", help="run spec, JSON or YAML")
    parser.add_argument("--run-dir", default=None,
                        help="checkpoints and events; the same dir resumes [$MODELCTL_RUNS_DIR/<name>-<spec digest>]")
    parser.add_argument("--store", default=None, help="model store [$MODELCTL_MODEL_STORE, ./model_store]")
    parser.add_argument("--data-root", action="append", default=None,
                        help="a directory datasets may be read from (repeatable) [$MODELCTL_DATA_ROOTS, .]")


def run_command(spec_path: Path | str, *, run_dir=None, store=None, data_roots=None) -> int:
    """Validate the spec and run it (here, or under torchrun); return the exit code."""
    policy = Policy.from_env(data_roots)
    spec = RunSpec.from_file(spec_path, policy)
    run_dir = Path(run_dir) if run_dir else default_run_dir(spec)
    store_root = Path(store) if store else default_store()
    if spec.hyperparameters.nproc > 1 and not distributed.under_torchrun():
        return _relaunch(spec, Path(spec_path), run_dir, store_root, policy)
    if distributed.under_torchrun() and os.environ.get("RANK", "0") != "0":
        logging.getLogger("service.training").setLevel(logging.WARNING)
    from service.training.recipe import StopRequest, run_finetune

    stop = StopRequest().install()
    try:
        outcome = run_finetune(spec, run_dir, ModelStore(store_root), policy, stop=stop)
    finally:
        stop.restore()
    if outcome.status == "stopped":
        return 128 + int(outcome.signum or signal.SIGTERM)
    if outcome.status == "finished" and outcome.archive is not None:
        print(f"wrote {outcome.archive.name} version {outcome.archive.version}: {outcome.archive.path} "
              f"(test {outcome.metrics['metric']} {outcome.metrics['test_metric']:.4f}, "
              f"validation {outcome.metrics['val_metric']:.4f})", flush=True)
    elif outcome.status == "already_finished":
        print(f"run {run_dir} already finished: {outcome.metrics.get('name')} version "
              f"{outcome.metrics.get('version')}; use another --run-dir for a new run", flush=True)
    return 0


def _relaunch(spec: RunSpec, spec_path: Path, run_dir: Path, store: Path, policy: Policy) -> int:
    nproc = spec.hyperparameters.nproc
    args = trainer_argv(run_dir.resolve(), spec=spec_path.resolve(), store=store.resolve(),
                        data_roots=policy.data_roots)
    command = distributed.torchrun_command(nproc, args, TRAINER_MODULE)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logger.info("starting %d processes under torchrun", nproc)
    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    with signals.handling(forward):
        code = proc.wait()
    if received:
        logger.warning("stopped by %s: no archive written; start again with --run-dir %s to resume",
                       signal.Signals(received[0]).name, run_dir)
        return 128 + received[0]
    return code
