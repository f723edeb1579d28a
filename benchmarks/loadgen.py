"""Load generators outside Python for `make bench`: ``wrk`` (HTTP/1.1) and ``h2load`` (HTTP/2, gRPC).

Neither tool knows what a right answer is, so every run is checked from the server's side:
the engine's own ``modelctl_requests_total{outcome="ok"}`` (on the metrics exporter) must grow
by what the tool says it completed (:func:`requests_ok`), and ``modelctl_batch_size`` says how
the requests were batched (:func:`batch_stats`). h2load in particular counts an HTTP 200 whose
trailers carry a gRPC error as a success; the counter does not.

* :func:`write_wrk_script`: a Lua script posting pre-built requests round robin (raw bodies,
  each with its own headers), printing one ``WRKJSON {...}`` line at the end (requests,
  errors by kind, latency percentiles in microseconds);
* :func:`run_wrk`: a warm-up run, then the measured one;
* :func:`grpc_frame`: one gRPC message as it goes on the wire (compressed flag 0, 4-byte
  big-endian length, the serialised message): h2load posts it as the request body;
* :func:`run_h2load`: a timed run (``-D``, after ``--warm-up-time``); latency percentiles from
  its per-request ``--log-file``;
* :func:`tree_memory`: RSS (and PSS) summed over a process and all its descendants.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psutil
import requests

#: apt packages of the two tools (``make bench`` installs them where missing).
APT = {"wrk": "wrk", "h2load": "nghttp2-client"}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# ---- wrk ----------------------------------------------------------------------------------
_LUA = r'''-- written by benchmarks/loadgen.py: posts pre-built requests round robin
local files = {%(files)s}
local extra = {%(extra)s}
local path = %(path)s
local common = {%(common)s}
local reqs = {}
local i = 0

function init(args)
  for k, f in ipairs(files) do
    local h = assert(io.open(f, "rb"))
    local body = h:read("*a")
    h:close()
    local headers = {}
    for name, value in pairs(common) do headers[name] = value end
    for name, value in pairs(extra[k]) do headers[name] = value end
    reqs[k] = wrk.format("POST", path, headers, body)
  end
end

function request()
  i = i %% #reqs + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
'''


def _lua_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string literal for ASCII text


def write_wrk_script(directory: Path, path: str, bodies: list[tuple[bytes, dict[str, str]]],
                     common_headers: dict[str, str]) -> Path:
    """A wrk script posting ``bodies`` (each ``(bytes, its own headers)``) to ``path`` round robin,
    with ``common_headers`` on every request. The bodies go to files beside the script."""
    directory.mkdir(parents=True, exist_ok=True)
    files, extra = [], []
    for i, (body, headers) in enumerate(bodies):
        f = directory / f"body-{i}.bin"
        f.write_bytes(body)
        files.append(_lua_str(str(f.resolve())))
        extra.append("{" + ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in headers.items()) + "}")
    script = directory / "post.lua"
    script.write_text(_LUA % {
        "files": ", ".join(files), "extra": ", ".join(extra), "path": _lua_str(path),
        "common": ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in common_headers.items())})
    return script


def run_wrk(base_url: str, script: Path, connections: int, duration_s: float, warm_s: float = 0.0,
            threads: int = 1) -> dict:
    """``connections`` keep-alive connections (closed loop: each sends its next request when the
    answer is in), ``threads`` wrk threads; a ``warm_s`` run first (if any), then ``duration_s``
    measured."""
    def once(seconds: float) -> dict:
        cmd = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", "60s", "-s", str(script), base_url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        found = re.search(r"^WRKJSON (\{.*\})$", proc.stdout, re.MULTILINE)
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
        return json.loads(found.group(1))

    if warm_s > 0:
        once(warm_s)
    raw = once(duration_s)
    wall = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {"img_s": raw["requests"] / wall, "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "n": raw["requests"], "wall_s": wall, "errors": errors, "raw": raw, "tool": "wrk"}


# ---- h2load (gRPC) ---------------------------------------------------------------------------
def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def run_h2load(url: str, frame_file: Path, token: str, clients: int, duration_s: float,
               warm_s: float = 0.0) -> dict:
    """``clients`` HTTP/2 connections, one stream each (``-m 1``: closed loop), posting the gRPC
    frame in ``frame_file`` to ``url`` (``http://host:port/pkg.Service/Method``) for ``duration_s``
    after ``warm_s``. Latency percentiles come from h2load's per-request log."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log_file = Path(tmp) / "requests.tsv"
        warm = ["--warm-up-time", str(round(warm_s))] if round(warm_s) > 0 else []
        cmd = ["h2load", "-c", str(clients), "-m", "1", "-t", "1", "-D", str(max(1, round(duration_s))), *warm,
               f"--data={frame_file}",
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-H", f"authorization: Bearer {token}", f"--log-file={log_file}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + warm_s + 120)
        out = proc.stdout
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {out[-1500:]} {proc.stderr[-1500:]}")
        counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", out)
        status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        if not counts or not status:
            raise RuntimeError(f"h2load's report not understood: {out[-1500:]}")
        rows = [line.split("\t") for line in log_file.read_text().splitlines() if line.strip()]
    total, started, done, ok, failed, errored, timeout = map(int, counts.groups())
    lat_ms = np.asarray([int(r[2]) / 1000 for r in rows if r[1] == "200"], dtype=float)
    if lat_ms.size == 0:
        raise RuntimeError(f"h2load: no successful request: {out[-1500:]}")
    starts = sorted(int(r[0]) for r in rows)
    span = (max(int(r[0]) + int(r[2]) for r in rows) - starts[0]) / 1e6
    return {"img_s": len(lat_ms) / span, "p50_ms": float(np.percentile(lat_ms, 50)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "n": int(len(lat_ms)), "wall_s": span,
            "errors": failed + errored + timeout + (len(rows) - len(lat_ms)),
            "h2load": {"total": total, "done": done, "succeeded": ok, "failed": failed, "errored": errored,
                       "timeout": timeout, "logged": len(rows), "status_2xx": int(status.group(1))},
            "tool": "h2load"}


# ---- the server's side: its own counters ---------------------------------------------------
def scrape(exporter_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exporter: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(exporter_url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def requests_ok(samples: dict, model: str, engine: str) -> float:
    return _sum(samples, "modelctl_requests_total", model=model, engine=engine, outcome="ok")


def requests_not_ok(samples: dict, model: str, engine: str) -> float:
    return _sum(samples, "modelctl_requests_total", model=model, engine=engine) - requests_ok(samples, model, engine)


def batch_stats(before: dict, after: dict, model: str, engine: str, singles: int = 0) -> dict:
    """Batches run between two scrapes, the requests in them, and their mean size, from the
    ``modelctl_batch_size`` histogram, with the count per bucket (``le`` bounds: a bucket holds
    the sizes above the bound before it). ``singles``: batches of 1 to take off (check calls
    sent one at a time inside the window)."""
    def delta(name, **labels):
        return _sum(after, name, model=model, engine=engine, **labels) - _sum(before, name, model=model,
                                                                              engine=engine, **labels)

    buckets = sorted({dict(ls)["le"] for (n, ls) in after if n == "modelctl_batch_size_bucket"},
                     key=lambda b: float(b))
    ones = min((delta("modelctl_batch_size_bucket", le=b) for b in buckets if float(b) >= 1), default=0)
    singles = int(min(singles, ones))  # a check call that joined a batch is no single batch
    batches = delta("modelctl_batch_size_count") - singles
    reqs = delta("modelctl_batch_size_sum") - singles
    cumulative = {b: delta("modelctl_batch_size_bucket", le=b) - (singles if float(b) >= 1 else 0)
                  for b in buckets}
    per_bucket, previous = {}, 0.0
    for b in buckets:
        per_bucket[b] = cumulative[b] - previous
        previous = cumulative[b]
    return {"batches": batches, "requests": reqs, "mean": reqs / batches if batches else 0.0,
            "buckets": {b: int(n) for b, n in per_bucket.items() if n}}


def stage_means_ms(before: dict, after: dict, model: str, engine: str) -> dict[str, float]:
    """Mean milliseconds per request of each stage of ``modelctl_request_latency_seconds`` between
    two scrapes (``request``: the whole predict call of the request's batch, on the device)."""
    stages = {dict(ls).get("stage") for (n, ls) in after if n == "modelctl_request_latency_seconds_count"}
    out = {}
    for stage in sorted(s for s in stages if s):
        count = (_sum(after, "modelctl_request_latency_seconds_count", model=model, engine=engine, stage=stage)
                 - _sum(before, "modelctl_request_latency_seconds_count", model=model, engine=engine, stage=stage))
        total = (_sum(after, "modelctl_request_latency_seconds_sum", model=model, engine=engine, stage=stage)
                 - _sum(before, "modelctl_request_latency_seconds_sum", model=model, engine=engine, stage=stage))
        if count:
            out[stage] = 1000.0 * total / count
    return out


# ---- memory -------------------------------------------------------------------------------------
def tree_memory(pid: int) -> dict:
    """RSS and PSS (bytes) summed over ``pid`` and every descendant, with each process's RSS."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    each = []
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            info = p.memory_full_info()
            name = p.name()
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
        each.append({"pid": p.pid, "name": name, "cmd": cmd[:120], "rss": info.rss, "pss": getattr(info, "pss", 0)})
    return {"rss": rss, "pss": pss, "processes": each}


# ---- who else used the CPU -------------------------------------------------------------------------
class OthersCpu:
    """CPU seconds used by processes that are not this one or its descendants, sampled every
    ``every_s`` from /proc (psutil): how busy the machine was with other work during each phase
    of the benchmark. :meth:`mark` closes a phase: (its others' CPU s, its wall s)."""

    def __init__(self, every_s: float = 2.0):
        import threading

        self.every_s = every_s
        self._last: dict[tuple[int, float], float] = {}
        self._others = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="others-cpu", daemon=True)
        self._phase_start: tuple[float, float] | None = None
        self.phases: dict[str, dict] = {}

    def start(self) -> "OthersCpu":
        import time

        self._sample()
        self._phase_start = (time.monotonic(), 0.0)
        self._thread.start()
        return self

    def _sample(self) -> None:
        import os

        procs = {}
        for p in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
            info = p.info
            if info["cpu_times"] is None:
                continue
            procs[info["pid"]] = info
        me = os.getpid()
        ours = {me}
        changed = True
        while changed:  # descendants of this process, by parent pid
            changed = False
            for pid, info in procs.items():
                if pid not in ours and info["ppid"] in ours:
                    ours.add(pid)
                    changed = True
        with self._lock:
            seen = {}
            for pid, info in procs.items():
                key = (pid, info["create_time"])
                t = info["cpu_times"]
                total = t.user + t.system
                if pid not in ours and key in self._last:
                    self._others += max(0.0, total - self._last[key])
                seen[key] = total
            self._last = seen

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a missed sample only loses precision
                pass

    def mark(self, phase: str) -> dict:
        import os
        import time

        with self._lock:
            now, others = time.monotonic(), self._others
        t0, o0 = self._phase_start
        wall = now - t0
        cores = os.cpu_count() or 1
        self.phases[phase] = {"wall_s": wall, "others_cpu_s": others - o0,
                              "others_share": (others - o0) / (wall * cores) if wall > 0 else 0.0}
        self._phase_start = (now, others)
        return self.phases[phase]

    def stop(self) -> None:
        self._stop.set()
