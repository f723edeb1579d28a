"""The soak's verdict without a server (benchmarks/soak.py): growth after the warm-up, failed
requests and replaced workers. The shortened soak itself is tests/test_soak.py."""

from __future__ import annotations

import pytest

from benchmarks import soak

pytestmark = pytest.mark.unit


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
