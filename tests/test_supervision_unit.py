"""Supervision's rules without servers (service/serving/torchserve/liveness.py): the backoff, the
restart limit, the settings, how exits and TorchServe's log lines read, a vanished worker, and
a gateway whose event loop died. One real modelctl serve killed piece by piece is
tests/test_supervision.py."""

from __future__ import annotations

import pytest

from service.auth import ApiToken
from service.errors import InvalidArgument
from service.deploy.readiness import ModelReadiness
from service.serving.settings import ServeSettings
from service.serving.torchserve.gateway import GatewayThread
from service.serving.torchserve.liveness import (
    RestartPolicy,
    Restarts,
    WorkerDeath,
    WorkerWatch,
    describe_exit,
    oom_line,
    worker_death_cause,
)
from tests.test_serving import settings_for
from tests.test_supervision import _until

pytestmark = pytest.mark.unit


def test_backoff_doubles_to_30s_and_starts_again_after_a_stable_minute():
    book = Restarts("nginx", RestartPolicy(limit=100, window_s=600))
    now, delays = 0.0, []
    for _ in range(7):  # dies again right after each restart
        due = book.died(now)
        delays.append(due - now)
        assert book.attempt(due)
        book.up(due)
        now = due + 1
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    book.died(now + 59)  # up 60 s: from 1 s again
    book.up(now + 60)
    assert book.died(now + 60 + 60) - (now + 120) == 1
    # A restart that fails waits twice as long before the next try.
    fresh = Restarts("gateway")
    assert fresh.died(0) == 1 and fresh.attempt(1)
    assert fresh.failed(1.5) == 3.5 and fresh.attempt(3.5)
    assert fresh.failed(4) == 8


def test_more_than_limit_restarts_within_the_window_give_up():
    book = Restarts("torchserve", RestartPolicy(limit=3, window_s=100))
    for t in (0, 10, 20):
        book.died(t)
        assert book.attempt(t + 1)
    book.died(30)
    assert not book.attempt(31), "a 4th restart within 100 s"
    assert book.total == 3 and "more than 3 restarts within 100s" in book.give_up_message()
    assert "MODELCTL_RESTART_LIMIT" in book.give_up_message()
    assert book.attempt(102), "the first restart has left the window"
    never = Restarts("nginx", RestartPolicy(limit=0))
    never.died(0)
    assert not never.attempt(1), "restart_limit 0: never restart"


def test_restart_settings(tmp_path):
    s = ServeSettings.from_env({"MODELCTL_RESTART_LIMIT": "3", "MODELCTL_RESTART_WINDOW_S": "60",
                                "MODELCTL_LIVENESS_INTERVAL_S": "0.5"}, model_store=tmp_path)
    assert (s.restart_limit, s.restart_window_s, s.liveness_interval_s) == (3, 60.0, 0.5)
    d = ServeSettings(model_store=tmp_path)
    assert (d.restart_limit, d.restart_window_s, d.liveness_interval_s) == (5, 600.0, 1.0)
    with pytest.raises(InvalidArgument, match="MODELCTL_RESTART_LIMIT: restart_limit must be >= 0"):
        ServeSettings.from_env({"MODELCTL_RESTART_LIMIT": "-1"})
    with pytest.raises(InvalidArgument, match="liveness_interval_s must be > 0"):
        ServeSettings(liveness_interval_s=0)


def test_exits_and_the_jvm_out_of_memory_line():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "exit status unknown"
    old = "Terminating due to java.lang.OutOfMemoryError: Java heap space (an earlier run)\n"
    run = ("\n===== modelctl: starting TorchServe at 2026-12-07 00:00:00: torchserve --start\n"
           "2026-12-07T00:00:01,000 [INFO ] main org.pytorch.serve.ModelServer - started\n")
    assert oom_line(old + run) is None, "only the current run counts"
    oom = "Terminating due to java.lang.OutOfMemoryError: Java heap space"
    assert oom_line(old + run + oom + "\n===== modelctl: TorchServe's frontend ended\n") == oom


# The lines TorchServe 0.12 wrote when a worker of echo 1 was SIGKILLed (torchserve.log).
WORKER_LOG = """\
===== modelctl: starting TorchServe at 2026-12-07 00:30:00: torchserve --start
2026-12-07T00:30:13,569 [INFO ] W-40615-echo_1-stdout MODEL_LOG - [PID]32404
2026-12-07T00:30:13,570 [DEBUG] W-40615-echo_1 org.pytorch.serve.wlm.WorkerThread - W-40615-echo_1 State change null -> WORKER_STARTED
2026-12-07T00:30:13,600 [INFO ] W-40616-mirror_1-stdout MODEL_LOG - [PID]32405
2026-12-07T00:30:13,990 [INFO ] epollEventLoopGroup-5-1 org.pytorch.serve.wlm.WorkerThread - 40615 Worker disconnected. WORKER_MODEL_LOADED
2026-12-07T00:30:13,994 [DEBUG] W-40615-echo_1 org.pytorch.serve.wlm.WorkerThread - Backend worker monitoring thread interrupted or backend worker process died., responseTimeout:120sec
java.lang.InterruptedException: null
2026-12-07T00:30:14,019 [DEBUG] W-40615-echo_1 org.pytorch.serve.wlm.WorkerThread - W-40615-echo_1 State change WORKER_MODEL_LOADED -> WORKER_STOPPED
2026-12-07T00:30:18,684 [INFO ] W-40615-echo_1-stdout MODEL_LOG - [PID]32488
2026-12-07T00:30:19,000 [INFO ] epollEventLoopGroup-5-1 org.pytorch.serve.wlm.WorkerThread - 40615 Worker disconnected. WORKER_STOPPED
"""


def test_what_torchserve_says_about_a_dead_worker():
    cause = worker_death_cause(WORKER_LOG, WorkerDeath("echo", "1", 32404))
    assert "40615 Worker disconnected. WORKER_MODEL_LOADED" in cause
    assert "backend worker process died" in cause and "-> WORKER_STOPPED" in cause
    assert "WORKER_STOPPED\n" not in cause and "19,000" not in cause, "the next worker's lines are not its"
    assert "does not name" in worker_death_cause(WORKER_LOG, WorkerDeath("echo", "1", 1))
    assert "says nothing" in worker_death_cause(WORKER_LOG, WorkerDeath("mirror", "1", 32405))


def _r(name, version, pids, min_workers=1):
    return ModelReadiness(name=name, version=version, is_default=True, workers=len(pids),
                          ready_workers=len(pids), ready=True, reason="", pids=tuple(pids),
                          min_workers=min_workers)


def test_a_vanished_worker_pid_is_a_death_unless_scaled_or_unregistered():
    watch = WorkerWatch()
    assert watch.update([_r("a", "1", [10]), _r("b", "1", [20, 21], 2), _r("c", "1", [30])]) == []
    deaths = watch.update([_r("a", "1", [11]),  # replaced: 10 died
                           _r("b", "1", [20], 1)])  # scaled down; c unregistered
    assert deaths == [WorkerDeath("a", "1", 10)]
    assert watch.update([_r("a", "1", [])], alive=lambda pid: pid == 11) == [], "11 still runs"
    watch.reset()
    assert watch.update([_r("a", "1", [12])]) == []


def test_a_gateway_whose_loop_died_is_seen_and_its_port_freed(tmp_path):
    settings = settings_for(tmp_path, tmp_path / "state")
    token = ApiToken("t" * 32, "test")
    gateway = GatewayThread(settings, "127.0.0.1:1", lambda: [], token=token)
    port = gateway.start()
    assert gateway.alive() and gateway.died is None

    def crash():
        raise SystemExit("simulated crash")

    gateway._loop.call_soon_threadsafe(crash)
    assert _until(lambda: not gateway.alive(), 10)
    assert gateway.died == "its event loop raised SystemExit('simulated crash')"
    gateway.stop()
    again = GatewayThread(settings, "127.0.0.1:1", lambda: [], token=token)
    try:
        assert again.start() == port  # the dead one's port is free
    finally:
        again.stop()
    assert again.died is None, "stop() is not a death"
