"""The run directory's contract (service/rundir.py): events, result.json, the error line,
the trainer's command line. Runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service import rundir
from service.rundir import EVENTS_FILE, RESULT_FILE, RUN_SPEC_FILE, EventLog, EventTail

pytestmark = pytest.mark.unit


def test_rundir_imports_no_torch():
    code = "import sys, service.rundir; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_events_written_are_read_back_once_each_in_order(tmp_path):
    log = EventLog(tmp_path / EVENTS_FILE)
    tail = EventTail(tmp_path / EVENTS_FILE)
    assert tail.read_new() == [] and log.read() == [] and rundir.latest_epoch(tmp_path) is None
    start = log.append("start", epochs=2)
    first = log.append("epoch", epoch=1, epochs=2, train_loss=0.5)
    assert tail.read_new() == [start, first]
    second = log.append("epoch", epoch=2, epochs=2, train_loss=0.25)
    done = log.append("done", name="m", version=1)
    assert tail.read_new() == [second, done] and tail.read_new() == []
    assert log.read() == [start, first, second, done]
    assert rundir.latest_epoch(tmp_path) == second


def test_a_partial_last_line_waits_for_its_end(tmp_path):
    path = tmp_path / EVENTS_FILE
    log, tail = EventLog(path), EventTail(path)
    first = log.append("epoch", epoch=1)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"event": "epoch", "epo')  # a line being written (or cut by a kill)
    assert tail.read_new() == [first]
    assert log.read() == [first] and rundir.latest_epoch(tmp_path) == first  # readers skip it
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('ch": 2, "time": "t2"}\n')
    assert tail.read_new() == [{"event": "epoch", "epoch": 2, "time": "t2"}]
    assert rundir.latest_epoch(tmp_path)["epoch"] == 2


def test_a_resume_rewrites_the_epochs_and_a_follower_sees_each_event_once(tmp_path):
    path = tmp_path / EVENTS_FILE
    log, tail = EventLog(path), EventTail(path)
    start = log.append("start")
    e1 = log.append("epoch", epoch=1)
    log.append("epoch", epoch=2)  # past the checkpoint: dropped on resume
    assert len(tail.read_new()) == 3
    history = [{k: v for k, v in e1.items() if k != "event"}, {"epoch": 3, "time": "t3"}]
    log.reconcile(history)
    assert [e.get("epoch") for e in log.read()] == [None, 1, 3] and log.read()[0] == start
    assert tail.read_new() == [{"event": "epoch", "epoch": 3, "time": "t3"}]


def test_result_round_trip_carries_the_facts_the_control_plane_decides_on(tmp_path):
    assert rundir.read_result(tmp_path) is None
    lineage = {"task": "multiclass", "parent": "m:1", "dataset": {"sha256": "d" * 64},
               "distill": {"teacher": "t:2", "metric": "accuracy", "teacher_val_metric": 0.9},
               "metrics": {"metric": "accuracy", "val_metric": 0.8, "val_loss": 0.6, "parent_val_metric": 0.7,
                           "test_metric": 0.75, "test_loss": 0.65, "test_count": 100}}
    record = rundir.result_record(name="m", version=2, path=tmp_path / "2.mar", epochs=3, run_id="r", lineage=lineage)
    assert rundir.write_result(tmp_path, record) == tmp_path / RESULT_FILE
    back = rundir.read_result(tmp_path)
    assert back == json.loads(json.dumps(record)) and rundir.has_run_facts(back)
    assert (back["task"], back["parent"], back["dataset_sha256"]) == ("multiclass", "m:1", "d" * 64)
    assert (back["val_metric"], back["parent_val_metric"], back["test_count"]) == (0.8, 0.7, 100)
    assert back["distill"]["teacher_val_metric"] == 0.9 and back["path"] == str(tmp_path / "2.mar")
    assert list(tmp_path.iterdir()) == [tmp_path / RESULT_FILE]  # no temporary file left
    (tmp_path / RESULT_FILE).write_text("{not json")
    assert rundir.read_result(tmp_path) is None


def test_an_older_result_is_completed_from_the_lineage_its_figures_first():
    old = {"name": "m", "version": 2, "epochs": 3, "metric": "accuracy", "val_metric": 0.5, "parent_val_metric": 0.4}
    assert not rundir.has_run_facts(old)
    lineage = {"task": "mse", "parent": "m:1", "dataset": {"sha256": "e" * 64},
               "metrics": {"metric": "mse", "val_metric": 0.8, "parent_val_metric": None}}
    run = rundir.complete_result(old, lineage)
    assert rundir.has_run_facts(run)
    assert (run["task"], run["parent"], run["dataset_sha256"]) == ("mse", "m:1", "e" * 64)
    assert (run["metric"], run["val_metric"]) == ("mse", 0.8)  # the lineage's
    assert run["parent_val_metric"] == 0.4 and "distill" not in run  # the lineage has none: the result's


def test_error_line_round_trip_and_the_log_of_the_last_attempt(tmp_path):
    line = rundir.error_line("hyperparameters.batch_size: must be >= 1")
    assert rundir.error_message(line) == "hyperparameters.batch_size: must be >= 1"
    assert rundir.error_message("  " + line + "\n") == "hyperparameters.batch_size: must be >= 1"
    assert rundir.error_message("an error: elsewhere in the line") is None
    log = tmp_path / "train.log"
    log.write_text(rundir.attempt_header("j1", 1, "python -m service.training run …") + line + "\n"
                   + rundir.attempt_header("j1", 2, "python -m service.training run …") + "epoch 1/2\n")
    assert not rundir.ended_with_error(log)  # the first attempt's error is not the last one's
    assert rundir.last_attempt_lines(log) == ["epoch 1/2"]
    with open(log, "a") as fh:
        fh.write("Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: boom\n")
    assert rundir.ended_with_error(log) and rundir.failure_message(log) == "RuntimeError: boom"
    with open(log, "a") as fh:
        fh.write(rundir.error_line("it broke") + "\n")
    assert rundir.failure_message(log) == "it broke"
    assert not rundir.ended_with_error(tmp_path / "absent.log") and rundir.failure_message(tmp_path / "absent.log") is None


def test_the_trainer_prints_its_error_line(tmp_path):
    """The entry point's refusal is the line the scheduler parses."""
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"nonsense": True}))
    proc = subprocess.run([sys.executable, "-m", rundir.TRAINER_MODULE, *rundir.trainer_argv(tmp_path / "run", spec=spec)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (tmp_path / "train.log").write_text(proc.stdout + proc.stderr)
    message = rundir.failure_message(tmp_path / "train.log")
    assert message and rundir.error_line(message) in proc.stderr.splitlines()


def test_trainer_argv_names_the_spec_run_dir_store_and_data_roots(tmp_path):
    run_dir = tmp_path / "runs" / "j1"
    argv = rundir.trainer_argv(run_dir, store=tmp_path / "store", data_roots=[tmp_path / "a", "/b"])
    assert argv == ["run", str(run_dir / RUN_SPEC_FILE), "--run-dir", str(run_dir), "--store", str(tmp_path / "store"),
                    "--data-root", str(tmp_path / "a"), "--data-root", "/b"]
    assert rundir.trainer_argv("/r", spec="/s.yaml") == ["run", "/s.yaml", "--run-dir", "/r"]  # the default store
    command = [sys.executable, "-m", rundir.TRAINER_MODULE, *argv]
    assert rundir.names_run_dir(command, run_dir) and not rundir.names_run_dir(command, tmp_path / "runs" / "j2")
    assert not rundir.names_run_dir(["python", "-m", "other", *argv], run_dir)


def test_both_runners_and_the_relaunch_use_trainer_argv(tmp_path, monkeypatch):
    from service.control.runners.kubernetes import K8sSettings, Layout, trainer_command
    from service.control.runners.local import LocalRunner

    run_dir = tmp_path / "j1"
    local = LocalRunner(model_store=tmp_path / "store", data_roots=[tmp_path / "data"], python="py")
    assert local.command(run_dir) == ["py", "-m", "service.training",
                                      *rundir.trainer_argv(run_dir, store=tmp_path / "store",
                                                           data_roots=[tmp_path / "data"])]
    settings = K8sSettings(image="img", python="py", model_store="/store", data_roots=("/data",))
    assert trainer_command(str(run_dir), settings, Layout(1, 1, 0), "n") == [
        "py", "-m", "service.training", *rundir.trainer_argv(str(run_dir), store="/store", data_roots=["/data"])]
    multi = trainer_command(str(run_dir), settings, Layout(2, 2, 0), "n")
    assert multi[-len(rundir.trainer_argv(str(run_dir), store="/store", data_roots=["/data"])) - 2:] == [
        "-m", "service.training", *rundir.trainer_argv(str(run_dir), store="/store", data_roots=["/data"])]


def test_the_relaunch_under_torchrun_uses_trainer_argv(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from service.training import run_command as launch

    started = []

    class FakeProc:
        def __init__(self, command, env):
            started.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", FakeProc)
    spec = SimpleNamespace(hyperparameters=SimpleNamespace(nproc=2))
    policy = SimpleNamespace(data_roots=(tmp_path / "data",))
    assert launch._relaunch(spec, tmp_path / "s.json", tmp_path / "run", tmp_path / "store", policy) == 0
    (command,) = started
    argv = rundir.trainer_argv(tmp_path / "run", spec=tmp_path / "s.json", store=tmp_path / "store",
                               data_roots=[tmp_path / "data"])
    assert "--nproc-per-node=2" in command and command[-len(argv) - 2:] == ["-m", "service.training", *argv]
