"""A trainer killed or stopped as a process: SIGKILL after the first epoch then a resume to one
archive, and SIGTERM stopping at a safe point without an archive. The rest of the trainer is
tests/test_training.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from service.modelstore import ModelBundle, ModelStore
from service.rundir import CHECKPOINT_FILE, EVENTS_FILE
from tests.test_training import _start, _write, make_spec

pytestmark = pytest.mark.faults


def _wait_for_epoch(proc: subprocess.Popen, events: Path, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if events.is_file() and any(json.loads(line).get("event") == "epoch" and json.loads(line)["epoch"] >= epoch
                                    for line in events.read_text().splitlines() if line.strip()):
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before epoch {epoch}"
        time.sleep(0.01)
    raise AssertionError(f"no epoch {epoch} event within {timeout}s")


SLOW_DIGITS = {"source": "builtin:digits", "train_size": 800}  # small batches: about 0.3 s per epoch


def _killed_after_the_first_epoch(tmp_path: Path, roots, **spec) -> list[str]:
    """A 3-epoch run of ``spec`` started as a process and SIGKILLed once epoch 1 is logged;
    the arguments that start it again."""
    spec_file = _write(tmp_path, make_spec(dataset=SLOW_DIGITS, epochs=3, batch_size=8, **spec))
    args = ["-m", "service.training", "run", str(spec_file), "--run-dir", str(tmp_path / "run"),
            "--store", str(tmp_path / "store"), "--data-root", str(roots)]
    proc = _start(args, tmp_path, "first.log")
    _wait_for_epoch(proc, tmp_path / "run" / EVENTS_FILE, 1)
    proc.kill()
    proc.wait(timeout=30)
    return args


def test_sigkill_after_the_first_epoch_then_resume(tmp_path, roots):
    args = _killed_after_the_first_epoch(tmp_path, roots, name="resumed")
    store = ModelStore(tmp_path / "store")
    assert store.versions("resumed") == []
    done = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)["epoch"]
    assert 1 <= done < 3

    second = _start(args, tmp_path, "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    events = [json.loads(line) for line in (tmp_path / "run" / EVENTS_FILE).read_text().splitlines()]
    assert [e["from_epoch"] for e in events if e["event"] == "resume"] == [done]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert store.versions("resumed") == [1]
    lineage = store.lineage("resumed", 1)
    assert lineage["metrics"]["epochs_run"] == 3
    assert [h["epoch"] for h in lineage["metrics"]["history"]] == [1, 2, 3]
    assert f"resuming {tmp_path / 'run'} from epoch {done}" in (tmp_path / "second.log").read_text()


def test_sigterm_stops_at_a_safe_point_and_writes_no_archive(tmp_path, roots):
    spec = _write(tmp_path, make_spec(dataset=SLOW_DIGITS, name="stopped", epochs=20, batch_size=8))
    proc = _start(["-m", "service.cli", "finetune", "run", str(spec), "--run-dir", str(tmp_path / "run"),
                   "--store", str(tmp_path / "store"), "--data-root", str(roots)], tmp_path, "run.log")
    _wait_for_epoch(proc, tmp_path / "run" / EVENTS_FILE, 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    log = (tmp_path / "run.log").read_text()
    assert "stopped by SIGTERM" in log and "no archive written" in log
    assert not (tmp_path / "store" / "stopped").exists() or ModelStore(tmp_path / "store").versions("stopped") == []
    events = [json.loads(line) for line in (tmp_path / "run" / EVENTS_FILE).read_text().splitlines()]
    assert events[-1]["event"] == "stopped" and events[-1]["epoch"] < 20
    assert torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)["epoch"] == events[-1]["epoch"]


def test_the_weight_average_resumes_from_the_checkpoint(tmp_path, roots):
    """SIGKILL after epoch 1 of an ``ema_decay`` run: the resumed run goes on from the
    checkpoint's average (its update count carries on), not from a fresh copy of the model."""
    args = _killed_after_the_first_epoch(tmp_path, roots, name="averaged", ema_decay=0.99, keep="last")
    first = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    done, steps = first["epoch"], first["ema"]["updates"]
    assert 1 <= done < 3 and steps > 0 and steps % done == 0

    second = _start(args, tmp_path, "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    last = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert last["ema"]["updates"] == steps // done * 3
    archived = ModelStore(tmp_path / "store").get("averaged", 1).path
    weights = ModelBundle.from_archive(archived).state_dict
    assert all(torch.equal(weights[k], v) for k, v in last["ema"]["module"].items())
