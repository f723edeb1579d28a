"""Bounds set by the operator, through the control API (issue 12, point 4).

A real control service (``python -m service.control``, a subprocess, its own SQLite and
model store; no TorchServe behind it) takes hostile run specs: a YAML alias bomb is
InvalidSpec in milliseconds and its RSS barely moves; errors never echo more than a few
hundred characters; names and versions are matched in full. DeployModel with more workers
than the operator's maximum is INVALID_ARGUMENT; checked in process against a management
client that records every call (nothing reaches TorchServe, so no worker is started), it is
tests/test_bounds_unit.py.

The in-process bounds (the policy's settings and ceilings, the .npz headers, the parsed
spec's size and depth) are in tests/test_limits.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from service import spectext
from service.auth import load_token
from service.control.api.client import ControlClient
from service.errors import ServiceError
from service.modelstore import ModelStore
from tests.helpers import control_process, make_bundle

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parent.parent
CNN = {"family": "cnn", "config": {"channels": [4]},
       "input": {"type": "image", "channels": 1, "size": 8, "resize": None}}
#: Longest error message a hostile spec may get: the field, the text, the allowed values.
MAX_MESSAGE = 600


BOMB_PLACES = ("model: {family: cnn}\ndataset: builtin:digits\nhyperparameters: {epochs: %s}\n",
               "model: {family: cnn, config: {channels: %s}}\ndataset: builtin:digits\n",
               "model: {family: cnn}\ndataset: builtin:digits\ntask: %s\n",
               "model: {family: cnn}\ndataset: {source: %s}\n",
               "base: m\ndataset: builtin:digits\noutput: {name: %s}\n")


def alias_bomb(template: str = BOMB_PLACES[0], levels: int = 9) -> str:
    """A run spec of about 300 bytes whose value at ``%s`` a walk expands to 9**levels
    strings: each anchor is a list of nine aliases of the one before."""
    names = "abcdefghijklmnopqrstuvwxyz"
    anchors = ["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]"
                                         for i in range(1, levels)]
    return template % ("[" + ", ".join(anchors) + "]")


def rpc_error(call) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        call()
    return err.value


# ---- a control service -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """``python -m service.control`` with MODELCTL_MAX_DEPLOY_WORKERS=2 and MODELCTL_MAX_EPOCHS=5,
    over a store holding ``m`` version 1."""
    root = tmp_path_factory.mktemp("bounds")
    store = ModelStore(root / "store")
    store.write("m", make_bundle("cnn"))
    token = load_token(root / "state", environ={}, create=True)
    env = {"MODELCTL_MAX_DEPLOY_WORKERS": "2", "MODELCTL_MAX_EPOCHS": "5"}
    with control_process(root, store.root, env=env) as (proc, port, _log):
        with ControlClient(f"127.0.0.1:{port}", token=token, timeout_s=60) as client:
            yield client, proc, store, root


def test_an_alias_bomb_is_invalid_spec_in_milliseconds_and_the_rss_holds(control):
    client, proc, _, _ = control
    # warm up: the first spec imports the run spec's modules (not torch: tests/test_spec_no_torch.py),
    # which is not what is measured
    err = rpc_error(lambda: client.create_job("model: {family: cnn}\ndataset: builtin:digits\nnope: 1\n"))
    assert err.grpc_code == "INVALID_ARGUMENT" and "nope: unknown key" in err.message
    rss = psutil.Process(proc.pid).memory_info().rss
    for template in BOMB_PLACES:
        text = alias_bomb(template)
        assert len(text) < 400
        start = time.perf_counter()
        err = rpc_error(lambda: client.create_job(text))
        elapsed = time.perf_counter() - start
        assert err.grpc_code == "INVALID_ARGUMENT", err
        assert "YAML aliases are not accepted" in err.message and len(err.message) < MAX_MESSAGE, err.message
        assert elapsed < 1.0, f"{template}: {elapsed:.3f}s"  # a few ms of work; the rest is gRPC on a busy machine
    grown = psutil.Process(proc.pid).memory_info().rss - rss
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB"
    assert client.list_jobs().jobs == []


def test_errors_echo_a_bounded_part_of_the_input(control):
    client, _, _, _ = control
    huge = "x" * 50_000
    cases = {
        "a long unknown key": {"model": CNN, "dataset": "builtin:digits", huge: 1},
        "a long list at an integer": {"model": CNN, "dataset": "builtin:digits",
                                      "hyperparameters": {"epochs": list(range(5000))}},
        "a long name": {"model": CNN, "dataset": "builtin:digits", "output": {"name": huge}},
        "a long base": {"base": huge, "dataset": "builtin:digits"},
        "a long family": {"model": {**CNN, "family": huge}, "dataset": "builtin:digits", "output": {"name": "n"}},
        "a long task": {"model": CNN, "dataset": "builtin:digits", "task": huge},
        "a long source": {"model": CNN, "dataset": "builtin:" + huge, "output": {"name": "n"}},
        "a deep value": {"model": CNN, "dataset": "builtin:digits",
                         "hyperparameters": {"lr": json.loads("[" * 30 + "]" * 30)}},
    }
    for what, spec in cases.items():
        err = rpc_error(lambda: client.create_job(spec))
        assert err.grpc_code == "INVALID_ARGUMENT", (what, err)
        assert len(err.message) < MAX_MESSAGE, (what, len(err.message), err.message[:300])
    # as text too: a 20-digit-thousands integer, a long key, deep nesting, too much text
    for text in ("epochs: " + "9" * 5000, f"{huge[:60000]}: 1", "a: " + "[" * 5000,
                 "a: 1\n" * (spectext.MAX_SPEC_CHARS // 5 + 1)):
        err = rpc_error(lambda: client.create_job(text))
        assert err.grpc_code == "INVALID_ARGUMENT" and len(err.message) < MAX_MESSAGE, (text[:40], err)
    err = rpc_error(lambda: client.get_job(huge))
    assert err.grpc_code == "NOT_FOUND" and len(err.message) < MAX_MESSAGE
    err = rpc_error(lambda: client.list_jobs(page_token=huge))
    assert err.grpc_code == "INVALID_ARGUMENT" and len(err.message) < MAX_MESSAGE


def test_names_and_versions_are_matched_in_full(control):
    client, _, store, _ = control
    for spec, needle in (({"base": "m:²", "dataset": "builtin:digits"}, "version must be an integer >= 1, got '²'"),
                         ({"base": "m:١", "dataset": "builtin:digits"}, "got '١'"),  # an Arabic-Indic one
                         ({"base": "m\n", "dataset": "builtin:digits"}, "'m\\n' is not a valid model name"),
                         ({"model": CNN, "dataset": "builtin:digits", "output": {"name": "n\n"},
                           "hyperparameters": {"epochs": 1}},
                          "'n\\n' is not a valid model name")):
        err = rpc_error(lambda: client.create_job(spec))
        assert err.grpc_code == "INVALID_ARGUMENT" and needle in err.message, (spec, err)
    err = rpc_error(lambda: client.create_job("base: 'm:²'\ndataset: builtin:digits\n"))
    assert err.grpc_code == "INVALID_ARGUMENT" and "got '²'" in err.message
    for name in ("m\n", "m\r", "m/../m", "m "):
        err = rpc_error(lambda: client.list_models(name))
        assert err.grpc_code == "INVALID_ARGUMENT" and "is not a valid model name" in err.message, (name, err)
    err = rpc_error(lambda: client.list_jobs(page_token="²"))
    assert err.grpc_code == "INVALID_ARGUMENT" and "page_token" in err.message
    # a file named with a non-ASCII digit is not a version of the store (it crashed the listing)
    (store.root / "m" / "².mar").write_bytes(b"")
    assert [v.version for v in client.list_models("m").versions] == [1]


def test_the_operators_run_bounds_reach_the_control_api(control):
    client, _, _, _ = control
    spec = {"model": CNN, "dataset": "builtin:digits", "output": {"name": "n"}, "hyperparameters": {"epochs": 6}}
    err = rpc_error(lambda: client.create_job(spec))
    assert err.grpc_code == "INVALID_ARGUMENT"
    assert "hyperparameters.epochs: must be between 1 and 5 (this service's limit), got 6" in err.message


def test_deploy_workers_above_the_maximum_is_invalid_argument(control):
    client, _, store, _ = control
    for call in (lambda: client.deploy("m", 1, workers=3), lambda: client.rollback("m", 1, workers=3),
                 lambda: client.deploy("m", 1, workers=-1),
                 lambda: client.create_job({"base": "m", "dataset": "builtin:digits"}, deploy="deploy", workers=3)):
        err = rpc_error(call)
        assert err.grpc_code == "INVALID_ARGUMENT", err
        assert "must be from 1 to 2 (this service's limit, MODELCTL_MAX_DEPLOY_WORKERS)" in err.message, err.message
    # within the bound it goes on to TorchServe, which is not there (nor its key file)
    err = rpc_error(lambda: client.deploy("m", 1, workers=2))
    assert err.grpc_code in ("UNAVAILABLE", "FAILED_PRECONDITION") and "TorchServe" in err.message, err
    assert store.desired("m") is None and client.list_jobs().jobs == []


