"""The control service starts, validates and stores run specs without importing torch (issue 14, 5).

``python -m service.control`` runs in a subprocess under an import guard that ends the
process (exit 97, the importing stack on stderr) at the first import of torch or
torchvision. Through its API it takes specs of every kind (a classifier from a family
spec and from a stored base, a U-Net on a built-in and on an images/ + masks/ directory,
a distill run whose teacher is checked against its archive, features and token RNNs),
refuses bad ones with the trainer's own messages, and stores them in its SQLite job
store; the trainer a job starts is its own process, which imports torch.

The torch-free names the spec validates against (service/training/catalog.py,
service/models/configs.py) are checked here against the torch registries keyed by them.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import load_token
from service.control.api.client import ControlClient
from service.control.api.messages import struct_to_dict
from service.control.jobs import intake
from service.control.jobs.jobstore import JobStore
from service.errors import ServiceError
from service.modelstore import ModelStore
from service.training.run_spec import Policy
from tests.helpers import control_process, make_bundle

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
TORCH_EXIT = 97
#: Runs ``python -m service.control`` (its arguments: this script's) in a process that dies
#: at the first import of torch or torchvision, naming the import and its stack.
GUARD = f"""
import importlib.abc, os, runpy, sys, traceback

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            sys.stderr.write(f"torch imported: {{name}}\\n" + "".join(traceback.format_stack()))
            sys.stderr.flush()
            os._exit({TORCH_EXIT})

sys.meta_path.insert(0, NoTorch())
sys.argv[0] = "python -m service.control"
runpy.run_module("service.control", run_name="__main__", alter_sys=True)
"""

IMAGE = {"type": "image", "channels": 1, "size": 16, "resize": None}
#: Accepted specs, each a different path through validation.
SPECS = {
    "classifier": {"model": {"family": "cnn", "config": {"channels": [4]}, "input": IMAGE},
                   "dataset": {"source": "builtin:digits", "train_size": 50}, "output": {"name": "digits-cnn"},
                   "hyperparameters": {"epochs": 1, "optimizer": "adamw", "lr": 0.01}},
    "base": {"base": "m", "dataset": "builtin:digits", "task": "multiclass"},
    "unet-builtin": {"model": {"family": "unet", "config": {"depth": 2, "base_channels": 4}, "input": IMAGE},
                     "dataset": "builtin:fashion-scenes", "output": {"name": "scenes"}},
    "unet-masks-dir": {"model": {"family": "unet", "config": {"channels": [4, 8, 16]}, "input": IMAGE},
                       "dataset": "seg", "output": {"name": "seg", "version": 3}},
    "distill": {"task": "distill", "teacher": "t:1", "base": "m", "dataset": "builtin:digits",
                "distill": {"temperature": 2, "alpha": 0.5}, "output": {"name": "student"}},
    "rnn-features": {"model": {"family": "rnn", "config": {"cell": "gru", "input_size": 8}},
                     "dataset": "builtin:digits-seq", "output": {"name": "seq"},
                     "hyperparameters": {"optimizer": "sgd", "momentum": 0.5}},
    "rnn-tokens": {"model": {"family": "rnn", "config": {"vocab_size": 500}},
                   "dataset": "builtin:rotten-tomatoes", "output": {"name": "reviews"}},
}
#: Refused specs -> the start of the message (the trainer's own validation, or the teacher check).
REFUSED = {
    "unknown task": ({"model": {"family": "cnn"}, "dataset": "builtin:digits", "task": "nope",
                      "output": {"name": "x"}}, "task: unknown task 'nope'"),
    "unknown optimizer": ({"base": "m", "dataset": "builtin:digits", "hyperparameters": {"optimizer": "lbfgs"}},
                          "hyperparameters.optimizer: unknown value 'lbfgs'"),
    "unet for multiclass": ({"model": {"family": "unet", "input": IMAGE}, "dataset": "builtin:digits",
                             "task": "multiclass", "output": {"name": "x"}}, "model.task: family 'unet'"),
    "teacher of another input": ({"task": "distill", "teacher": "l:1", "base": "m", "dataset": "builtin:digits"},
                                 "teacher: l:1 takes input"),
}


def expected_spec(data: dict, root: Path, store: ModelStore) -> dict:
    """The spec as this process (torch loaded) validates and stores it."""
    return intake.validate(data, Policy((root,)), store).to_dict()


@pytest.fixture(scope="module")
def guarded_control(tmp_path_factory):
    """``python -m service.control`` under the torch guard, over a store holding the base
    ``m`` and the teachers ``t`` (a classifier of m's input) and ``l`` (an LSTM)."""
    root = tmp_path_factory.mktemp("no-torch")
    store = ModelStore(root / "store")
    store.write("m", make_bundle("cnn"))
    store.write("t", make_bundle("cnn", seed=1))
    store.write("l", make_bundle("lstm"))
    for sub in ("images", "masks"):
        (root / "seg" / sub).mkdir(parents=True)
    token = load_token(root / "state", environ={}, create=True)
    with control_process(root, store.root, launcher=[sys.executable, "-c", GUARD]) as (proc, port, _log):
        with ControlClient(f"127.0.0.1:{port}", token=token, timeout_s=60) as client:
            yield client, proc, store, root


def test_the_control_service_validates_and_stores_specs_without_torch(guarded_control):
    client, proc, store, root = guarded_control
    created = {}
    for what, data in SPECS.items():
        job = client.create_job(data)
        created[what] = job.id
        assert intake.whole_numbers(struct_to_dict(job.spec)) == expected_spec(data, root, store), what
    for what, (data, message) in REFUSED.items():
        with pytest.raises(ServiceError) as err:
            client.create_job(data)
        assert err.value.grpc_code == "INVALID_ARGUMENT", (what, err.value)
        assert err.value.message.startswith(message), (what, err.value.message)
    for job_id in created.values():  # the first job's trainer (its own process, with torch) is stopped
        client.cancel_job(job_id)
    assert {j.id for j in client.list_jobs().jobs} == set(created.values())
    assert proc.poll() is None, (root / "control.log").read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (root / "control.log").read_text()
    assert "torch imported" not in (root / "control.log").read_text()

    jobs = JobStore(root / "control.db")  # what the service stored, read back from its SQLite
    try:
        for what, job_id in created.items():
            assert jobs.get(job_id).spec == expected_spec(SPECS[what], root, store), what
    finally:
        jobs.close()
    assert intake.validate(SPECS["unet-masks-dir"], Policy((root,)), store).dataset_kind == "masks"


def test_the_guard_ends_a_process_that_imports_torch(tmp_path):
    """The guard the test above relies on does catch an import of torch."""
    guard = GUARD.replace('runpy.run_module("service.control", run_name="__main__", alter_sys=True)',
                          "import service.models.cnn")
    result = subprocess.run([sys.executable, "-c", guard], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == TORCH_EXIT, result.stderr
    assert "torch imported: torch" in result.stderr and "service/models/cnn.py" in result.stderr


# ---- the torch-free names against the torch registries keyed by them ---------------------------------
def test_the_catalog_names_the_torch_registries():
    from service.models import spec as model_spec
    from service.models.rnn import CELLS
    from service.training import catalog
    from service.training.datasets import BUILTINS
    from service.training.optim import OPTIMIZERS
    from service.training.tasks import TASKS

    assert tuple(TASKS) == tuple(catalog.TASK_METRICS) == model_spec.TASKS
    for name, task in TASKS.items():
        assert (task.metric_name, task.mode) == dataclasses.astuple(catalog.TASK_METRICS[name])
    assert tuple(OPTIMIZERS) == catalog.OPTIMIZER_NAMES
    assert {name: b.description for name, b in BUILTINS.items()} == catalog.BUILTIN_DATASETS
    assert tuple(CELLS) == ("rnn", "gru", "lstm")


def test_a_family_builds_with_the_functions_it_names():
    from service.models import FAMILIES, cnn, mobilenet, resnet, rnn, unet

    modules = {"cnn": cnn, "resnet": resnet, "mobilenet_v2": mobilenet, "rnn": rnn, "unet": unet}
    for name, family in FAMILIES.items():
        builder = family.builder.partition(":")[2]
        assert family.build is getattr(modules[name], builder), name
        assert (family.load_pretrained is None) == (name not in ("resnet", "mobilenet_v2")), name
    assert FAMILIES["resnet"].load_pretrained is resnet.load_resnet_pretrained


@pytest.mark.parametrize("package", ["service.models", "service.modelstore", "service.inference"])
def test_every_name_a_package_exports_lazily_resolves(package):
    module = __import__(package, fromlist=["__all__"])
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def test_is_masks_dir(tmp_path):
    from service.training.catalog import is_masks_dir

    assert not is_masks_dir(tmp_path)
    (tmp_path / "train" / "images").mkdir(parents=True)
    assert not is_masks_dir(tmp_path)
    (tmp_path / "train" / "masks").mkdir()
    assert is_masks_dir(tmp_path)
