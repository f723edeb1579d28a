"""Memory stays flat under load (issue 7, 5c), shortened: ``benchmarks/soak.py``'s own code.

The real ``modelctl serve --no-control`` (TorchServe's Java frontend and Python workers, nginx,
the gRPC gateway) serves a small ResNet-18 and an LSTM; 8 client threads send valid requests
over REST and gRPC for 90 s, every answer checked against the model run in this process. The
RSS of the frontend and of each worker (median of 10 s of samples) may not grow by 5% or more
after a 45 s warm-up, and no request may fail. The frontend's heap is fixed and touched at start
(``ServeSettings.frontend_heap_mb``; left to grow, G1 grew it in steps under load, by 25 MB
at once a minute in, and failed this test), so its live heap is judged apart: the heap still used
after a full collection (``jcmd``; the median of 5) may grow by less than 5% or 10 MiB. ``make soak`` runs the
same for 10 minutes and writes the figure into BENCHMARKS.md.
"""

from __future__ import annotations

from collections import Counter

from benchmarks import soak
from service.serving.settings import ServeSettings

DURATION_S, WARMUP_S = soak.TEST_DURATION_S, soak.TEST_WARMUP_S
HEAP_MB = ServeSettings.frontend_heap_mb  # the default, which soak.start_stack leaves alone


def test_frontend_and_workers_memory_stays_flat_under_load_at_concurrency_8(tmp_path):
    stack, bundles = soak.start_stack(tmp_path / "soak")
    try:
        # the JVM runs with the heap config.properties gives it (ServeSettings.frontend_heap_mb)
        frontend = [pid for pid, role in stack.processes().items() if role == "frontend"]
        assert len(frontend) == 1
        flags = soak.jcmd(frontend[0], "VM.flags")
        assert "-XX:+AlwaysPreTouch" in flags and "-XX:+ExitOnOutOfMemoryError" in flags
        assert f"-XX:InitialHeapSize={HEAP_MB * 2**20}" in flags and f"-XX:MaxHeapSize={HEAP_MB * 2**20}" in flags
        result = soak.run_soak(stack, bundles, duration_s=DURATION_S, warmup_s=WARMUP_S, concurrency=8,
                               interval_s=2.0)
    finally:
        stack.stop()
    stats = result.stats()
    for s in stats:
        print(f"{s.label:32} {soak.mb(s.baseline):>5} MB -> {soak.mb(s.end):>5} MB (max {soak.mb(s.peak)}) "
              f"{s.growth_pct:+.1f}%")
        if s.judged:  # the whole series, shown when the test fails
            print("  " + " ".join(f"{t:.0f}:{soak.mb(sample.get(s.pid))}" for t, sample in result.samples))
    # every part of the stack was found and sampled through the whole run
    roles = Counter(s.role for s in stats)
    assert roles["frontend"] == 1 and roles["worker"] == 2 and roles["gateway"] == 1, roles
    assert roles["nginx master"] == 1 and roles["nginx worker"] >= 1, roles
    assert {s.label for s in stats if s.role == "worker"} == {f"worker {m}" for m in soak.MODELS}
    assert result.driven_s >= DURATION_S and len(result.samples) >= DURATION_S / 2
    assert all(s.baseline and s.end for s in stats)
    # the load: every kind of request answered right, none failed
    ok, errors = result.load.totals()
    assert errors == 0, result.load.first_errors
    assert min(result.load.ok.values()) >= 100, result.load.ok
    # the property
    for s in stats:
        if s.judged:
            assert s.growth_pct < soak.GROWTH_LIMIT_PCT, (s.label, s.baseline, s.end)
    # the frontend's live heap (after a full collection) was measured at both ends, within bounds
    live = result.live_growth()
    assert live is not None, result.live
    print(f"live Java heap {live[0]:.1f} MiB -> {live[1]:.1f} MiB ({live[2]:+.1f}%)")
    assert 20 < live[0] < HEAP_MB and soak.live_heap_holds(live[0], live[1])
    assert result.failures() == []
    text = soak.section(result, {"command": "pytest tests/test_soak.py", "date": "today", "cpu": "cpu",
                                 "ram_gb": 1.0, "load_before": "0", "load_after": "0", "jvm": "-"})
    assert text.startswith(soak.START) and text.endswith(soak.END) and "the property holds" in text
    # SIGTERM to `modelctl serve` stopped all of it: nothing had to be killed, nothing is left
    assert stack.killed == [] and len(stack.seen) >= 7 and stack.survivors() == []


def _live(start_mb, end_mb, pid=1):
    return [(10.0, {pid: {"committed_mb": 512.0, "used_mb": start_mb}}),
            (20.0, {pid: {"committed_mb": 512.0, "used_mb": 90.0}}),  # in between: not judged
            (30.0, {pid: {"committed_mb": 512.0, "used_mb": end_mb}})]


def _result(samples, roles, *, errors=0, warmup_s=10.0, live=None):
    load = soak.Load()
    for kind in soak.KINDS:
        load.ok[kind] = 5
    load.errors[soak.KINDS[0]] = errors
    labels = {pid: f"{role} {pid}" for pid, role in roles.items()}
    return soak.SoakResult(duration_s=30, warmup_s=warmup_s, concurrency=8, interval_s=10, samples=samples,
                           roles=roles, labels=labels, load=load, driven_s=30, cpu_s={}, machine_busy_s=0.0,
                           client_cpu_s=0.0, live=_live(60.0, 61.0) if live is None else live)


def test_the_verdict_judges_growth_after_warm_up_failures_and_replaced_workers():
    """The judging, on made-up samples (pid -> RSS): the soak test above only ever sees
    the property hold."""
    roles = {1: "frontend", 2: "worker", 3: "gateway"}
    flat = [(0.0, {1: 100, 2: 100, 3: 100}), (10.0, {1: 200, 2: 200, 3: 200}), (20.0, {1: 209, 2: 200, 3: 900}),
            (30.0, {1: 209, 2: 201, 3: 900})]
    assert _result(flat, roles).failures() == []  # growth before the warm-up, and the gateway's, are not judged
    stats = {s.pid: s for s in _result(flat, roles).stats()}
    assert (stats[1].baseline, stats[1].end, stats[1].peak) == (200, 209, 209)
    assert round(stats[1].growth_pct, 1) == 4.5 and stats[3].growth_pct == 350.0
    grown = flat[:-1] + [(30.0, {1: 210, 2: 201, 3: 900})]
    assert [f for f in _result(grown, roles).failures() if "grew 5.0%" in f]
    assert [f for f in _result(flat, roles, errors=1).failures() if "requests failed" in f]
    # ends are medians of the last 10 s: a swing in the last sample is no growth, a level is
    dense = [(float(t), {1: 200, 2: 200, 3: 100}) for t in range(0, 31, 2)]
    swing = dense[:-1] + [(30.0, {1: 260, 2: 200, 3: 100})]
    assert _result(swing, roles).failures() == []
    assert {s.pid: s.peak for s in _result(swing, roles).stats()}[1] == 260
    level = [(t, {1: 260 if t > 20 else 200, 2: 200, 3: 100}) for t, _ in dense]
    assert [f for f in _result(level, roles).failures() if "frontend 1 (pid 1) grew 30.0%" in f]
    # the live heap: 5% or 10 MiB, whichever is more; measured at both ends, or a failure
    assert _result(flat, roles, live=_live(60.0, 69.9)).failures() == []
    assert [f for f in _result(flat, roles, live=_live(60.0, 70.0)).failures()
            if "live Java heap grew 16.7%" in f and "limit +10.0 MiB" in f]
    assert _result(flat, roles, live=_live(300.0, 314.9)).failures() == []
    assert [f for f in _result(flat, roles, live=_live(300.0, 315.0)).failures() if "limit +15.0 MiB" in f]
    unmeasured = [(10.0, {1: {"error": "no such process"}}), (30.0, {1: {"used_mb": 60.0}})]
    assert [f for f in _result(flat, roles, live=unmeasured).failures()
            if "live Java heap was not measured" in f and "no such process" in f]
    replaced = flat[:-1] + [(30.0, {1: 209, 4: 200, 3: 900})]
    failures = _result(replaced, roles | {4: "worker"}).failures()
    assert any("pid 2" in f and "replaced" in f for f in failures)
    assert any("pid 4" in f and "replaced" in f for f in failures)

