"""`make soak`: memory under a long steady load (issue 7, 5c), with its figures in BENCHMARKS.md.

    python -m benchmarks.soak [--duration 600] [--warmup S] [--concurrency 8] [--interval 2]
                              [--out BENCHMARKS.md] [--work-dir .modelctl/soak] [--no-report]

Starts the real product, ``modelctl serve --no-control``, as its own process: TorchServe (the
Java frontend and one Python worker per model), nginx in front of REST (it checks the API
token) and the gRPC gateway (a thread of the ``modelctl serve`` process). It serves a small
ResNet-18 (tests/helpers.py's ``resnet`` spec, 64 px) and a small LSTM (the ``lstm`` spec),
archived into a fresh model store by the real model store code.

``--concurrency`` client threads (in this process) then send valid requests without pause for
``--duration`` seconds, in turn: a PNG or JPEG of varying size over REST (through nginx, with
the token), the same over gRPC (through the gateway), a float sequence of varying length over
REST as JSON, the same over gRPC. Every answer is checked against the model run in this
process (labels, top-k, probabilities within 1e-3): a wrong answer counts as an error, like a
non-200 status, a gRPC error or a timeout.

Every ``--interval`` seconds the resident set size (RSS, from /proc through psutil) of every
process of the stack is read. The baseline of a process is the median of its samples in the
first 10 s after the warm-up (``--warmup``, default 20% of the run, at most 60 s): what it
holds when load has been steady for a while; its end figure is the median of its samples in
the last 10 s. Medians of 10 s, because the JVM's RSS swings for a few seconds (seen: +27 MB
for 15 s, then back, and +25 MB for a few samples with the heap fixed): such a swing at the
last sample is no growth, a level that lasts 10 s is. Per process: RSS at the end of the
warm-up, at the end, the highest single sample after the warm-up, and growth = (end -
baseline) / baseline.

The frontend's heap is fixed and touched at start (``ServeSettings.frontend_heap_mb``), so
its RSS holds the whole heap from the start and cannot show a leak of Java objects. Its live
heap is measured apart (:func:`live_heap`, with ``jcmd``): at the warm-up end, every
``LIVE_EVERY_S`` and at the end, under load.

Exit status 1 when the Java frontend or any worker grew by 5% or more, when the frontend's
live heap grew by 5% or 10 MiB (whichever is more) or was not measured, when any request
failed, when a frontend or worker process was replaced during the run (TorchServe restarts a
dead worker under a new pid), or when the stack died. nginx and the gateway are reported
but not judged. The section between the ``soak`` markers of BENCHMARKS.md is rewritten (the
rest of the file is kept); every sample goes to <work-dir>/results.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import requests
import torch
from torchvision.io import ImageReadMode, decode_image

from service._gen import inference_pb2, inference_pb2_grpc
from service.predict_client import read_token
from service.models import image_eval_transform, load_model
from service.modelstore import ModelStore
from service.inference.options import ServingOptions
from service.deploy import readiness
from service.serving.torchserve.management import ManagementClient
from benchmarks.report import cpu_model, replace_section
from testkit.builders import free_port, make_bundle, random_image

#: The repo root: default paths of the output and the work directory.
ROOT = Path(__file__).resolve().parent.parent

START, END = "<!-- soak:start -->", "<!-- soak:end -->"
log = logging.getLogger("soak")

#: Served models: name -> tests/helpers.py spec.
IMAGE_MODEL, SEQ_MODEL = "soak-resnet", "soak-lstm"
MODELS = {IMAGE_MODEL: "resnet", SEQ_MODEL: "lstm"}
#: TorchServe batching: up to 8 requests (the client's concurrency), 5 ms to fill a batch.
BATCH_SIZE, MAX_BATCH_DELAY_MS = 8, 5
#: The bound of issue 7, 5c, on the growth of the frontend and of every worker.
GROWTH_LIMIT_PCT = 5.0
#: The live Java heap (after a full collection, under load) of the frontend may grow by less
#: than GROWTH_LIMIT_PCT or this much, whichever is more: two collections a minute apart under
#: the same load found 55 and 61 MiB (requests in flight), and 30 within 30 s ranged from 54
#: to 67 MiB; each measure is the median of LIVE_REPEATS. Over 10 minutes (about 100,000
#: requests) a leak of 100 bytes a request passes it.
LIVE_HEAP_SLACK_MB = 10.0
#: Full collections whose median is one measure of the live heap (about 1 s each).
LIVE_REPEATS = 5
#: Seconds between two measures of the live heap after the warm-up.
LIVE_EVERY_S = 60.0
#: Roles whose growth is judged; the others are reported only.
JUDGED = ("frontend", "worker")
KINDS = ("rest-image", "grpc-image", "rest-sequence", "grpc-sequence")
TOLERANCE = 1e-3
#: Seconds of samples whose median is the RSS at the warm-up end, and at the end.
WINDOW_S = 10.0
TOP_K = 3
#: tests/test_soak.py: the same check, shorter.
TEST_DURATION_S, TEST_WARMUP_S = 90.0, 45.0


def default_warmup(duration_s: float) -> float:
    return min(60.0, 0.2 * duration_s)


# ---- the stack: `modelctl serve` in its own process ------------------------------------
@dataclass
class Stack:
    proc: subprocess.Popen
    state_dir: Path
    env: dict[str, str]
    rest_url: str
    grpc_target: str
    management_url: str
    token: str = ""
    log_path: Path | None = None
    #: Every process seen in the stack, so that stop() can make sure none survives (psutil's
    #: Process knows its start time: a pid reused by another process is not taken for it).
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    #: What stop() had to kill (SIGKILL): "name (pid)".
    killed: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> dict[int, str]:
        """pid -> role of every live process of the stack: ``gateway`` (the ``modelctl
        serve`` process itself), ``launcher`` (TorchServe's Python launcher), ``frontend``
        (Java), ``worker``, ``nginx master``, ``nginx worker``; anything else by name."""
        try:
            root = psutil.Process(self.proc.pid)
            children = root.children(recursive=True)
        except psutil.Error:
            return {}
        out = {self.proc.pid: "gateway"}
        self.seen.setdefault(root.pid, root)
        for p in children:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                name, cmd = p.name(), " ".join(p.cmdline())
            except psutil.Error:
                continue
            if name == "java":
                role = "frontend"
            elif "model_service_worker" in cmd:
                role = "worker"
            elif name.startswith("nginx"):
                role = "nginx master" if "master" in cmd else "nginx worker"
            elif "torchserve" in cmd:
                role = "launcher"
            else:
                role = name
            out[p.pid] = role
            self.seen.setdefault(p.pid, p)
        return out

    def survivors(self) -> list[psutil.Process]:
        """The processes of the stack that are still running (zombies aside)."""
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def worker_models(self) -> dict[int, str]:
        """Worker pid -> model name, from TorchServe's management API."""
        mgmt = ManagementClient(self.management_url, lambda: read_token(self.state_dir, "management"))
        try:
            return {pid: r.name for r in readiness.check(mgmt) for pid in r.pids}
        finally:
            mgmt.close()

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to ``modelctl serve`` (it stops the gateway, nginx and TorchServe);
        SIGKILL to whatever of the stack is left after ``timeout_s``."""
        self.processes()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("modelctl serve did not stop in %.0f s; killing it", timeout_s)
                self.killed.append(f"modelctl serve ({self.proc.pid})")
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.survivors():
            time.sleep(0.2)
        for p in self.survivors():
            try:
                log.warning("killing leftover %s (pid %d)", p.name(), p.pid)
                self.killed.append(f"{p.name()} ({p.pid})")
                p.kill()
            except psutil.Error:
                pass


def write_store(root: Path) -> dict:
    """The soak models, archived by the real model store; name -> bundle."""
    store = ModelStore(root)
    options = ServingOptions(batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS)
    bundles = {name: make_bundle(kind) for name, kind in MODELS.items()}
    for name, bundle in bundles.items():
        store.write(name, bundle, options=options)
    return bundles


def start_stack(work: Path, startup_timeout_s: float = 240.0) -> tuple[Stack, dict]:
    """``modelctl serve --no-control`` on free ports over a fresh store in ``work``; returns
    once a valid request of every model has been answered over REST and gRPC."""
    work.mkdir(parents=True, exist_ok=True)
    bundles = write_store(work / "store")
    ports = {name: free_port() for name in (
        "inference_port", "ts_inference_port", "management_port", "metrics_port", "grpc_inference_port",
        "grpc_management_port", "ts_grpc_inference_port", "exporter_port")}
    env = dict(os.environ)
    env.update({f"MODELCTL_{k.upper()}": str(v) for k, v in ports.items()})
    env.update({"MODELCTL_MODEL_STORE": str(work / "store"), "MODELCTL_STATE_DIR": str(work / "state"),
                "MODELCTL_WORKER_PORT_BASE": str(random.Random(time.time_ns()).randint(20000, 40000)),
                "MODELCTL_STARTUP_TIMEOUT_S": str(startup_timeout_s)})
    log_path = work / "serve.log"
    cmd = [str(Path(sys.executable).parent / "modelctl"), "serve", "--no-control"]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    stack = Stack(proc, work / "state", env, f"http://127.0.0.1:{ports['inference_port']}",
                  f"127.0.0.1:{ports['grpc_inference_port']}",
                  f"http://127.0.0.1:{ports['management_port']}", log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        last = "not started"
        probe = Requests(bundles, seed=99, n=1)
        while True:
            if not stack.alive():
                raise RuntimeError(f"modelctl serve exited ({proc.returncode}) while starting; "
                                   f"end of {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not answer within {startup_timeout_s:.0f} s ({last}); "
                                   f"end of {log_path}:\n{_tail(log_path)}")
            try:
                stack.token = stack.token or read_token(stack.state_dir)
                client = Client(stack, probe, timeout_s=10)
                try:
                    problems = [p for kind in KINDS if (p := client.send(kind, 0)) is not None]
                finally:
                    client.close()
                if not problems:
                    return stack, bundles
                last = problems[0]
            except Exception as exc:  # noqa: BLE001 - not up yet: the token, a port, a model
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(1.0)
    except BaseException:
        stack.stop()
        raise


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- the requests, and what each must be answered ----------------------------------------
@dataclass
class Item:
    model: str
    #: REST: body and headers; gRPC: the inputs map.
    body: bytes
    headers: dict[str, str]
    inputs: dict[str, bytes]
    #: Softmax of the model run in this process on the same input.
    expected: torch.Tensor
    labels: list[str]


class Requests:
    """``n`` images (PNG and JPEG, 40 to 160 px a side) and ``n`` sequences (1 to 64 steps),
    each with the answer the model gives in this process."""

    def __init__(self, bundles: dict, seed: int = 0, n: int = 24):
        rng = random.Random(seed)
        image_bundle, seq_bundle = bundles[IMAGE_MODEL], bundles[SEQ_MODEL]
        image_model = load_model(image_bundle.spec, image_bundle.state_dict)
        seq_model = load_model(seq_bundle.spec, seq_bundle.state_dict)
        transform = image_eval_transform(image_bundle.spec.input)
        channels = image_bundle.spec.input.channels
        features = seq_bundle.spec.config.input_size
        self.images: list[Item] = []
        self.sequences: list[Item] = []
        with torch.no_grad():
            for i in range(n):
                fmt = "png" if i % 2 == 0 else "jpeg"
                data = random_image(channels, rng.randint(40, 160), rng.randint(40, 160), fmt, seed=seed * 1000 + i)
                pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
                probs = torch.softmax(image_model(transform(pixels).unsqueeze(0)), 1)[0]
                self.images.append(Item(IMAGE_MODEL, data, {"Content-Type": f"image/{fmt}", "X-Top-K": str(TOP_K)},
                                        {"img": data, "k": str(TOP_K).encode()}, probs, image_bundle.labels))
                seq = [[round(rng.uniform(-2, 2), 4) for _ in range(features)]
                       for _ in range(rng.randint(1, seq_bundle.spec.input.max_length))]
                probs = torch.softmax(seq_model(torch.tensor([seq]), torch.tensor([len(seq)])), 1)[0]
                body = json.dumps({"inputs": [seq], "k": TOP_K}).encode()
                self.sequences.append(Item(SEQ_MODEL, body, {"Content-Type": "application/json"},
                                           {"data": body}, probs, seq_bundle.labels))

    def item(self, kind: str, i: int) -> Item:
        pool = self.images if kind.endswith("image") else self.sequences
        return pool[i % len(pool)]


def check_answer(answer: dict, item: Item) -> str | None:
    """None when ``answer`` is the model's; else what is wrong."""
    try:
        preds = answer["predictions"]
        if answer.get("model") != item.model or len(preds) != 1:
            return f"answer for {answer.get('model')!r} with {len(preds)} predictions"
        top = preds[0]["top_k"]
        if len(top) != TOP_K:
            return f"{len(top)} labels instead of {TOP_K}"
        if float(item.expected.max()) - top[0]["probability"] > TOLERANCE:
            return f"top-1 {top[0]['index']}, expected {int(item.expected.argmax())}"
        for entry in top:
            if entry["label"] != item.labels[entry["index"]]:
                return f"label {entry['label']!r} for index {entry['index']}"
            if abs(entry["probability"] - float(item.expected[entry["index"]])) > TOLERANCE:
                return (f"probability {entry['probability']:.5f} for index {entry['index']}, expected "
                        f"{float(item.expected[entry['index']]):.5f}")
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        return f"malformed answer ({type(exc).__name__}: {exc}): {str(answer)[:200]}"
    return None


class Client:
    """One client thread's connections: a keep-alive HTTP session, one gRPC channel."""

    def __init__(self, stack: Stack, reqs: Requests, timeout_s: float = 60.0):
        self.stack, self.reqs, self.timeout_s = stack, reqs, timeout_s
        self.session = requests.Session()
        self.channel = grpc.insecure_channel(stack.grpc_target)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self.auth = f"Bearer {stack.token}"

    def close(self) -> None:
        self.session.close()
        self.channel.close()

    def send(self, kind: str, i: int) -> str | None:
        """Send request ``i`` of ``kind``; None when answered right, else what went wrong."""
        item = self.reqs.item(kind, i)
        try:
            if kind.startswith("rest"):
                resp = self.session.post(f"{self.stack.rest_url}/predictions/{item.model}", data=item.body,
                                         headers={"Authorization": self.auth, **item.headers},
                                         timeout=self.timeout_s)
                if resp.status_code != 200:
                    return f"HTTP {resp.status_code}: {resp.text[:200]}"
                answer = resp.json()
            else:
                reply = self.stub.Predictions(
                    inference_pb2.PredictionsRequest(model_name=item.model, input=item.inputs),
                    metadata=[("authorization", self.auth)], timeout=self.timeout_s)
                answer = json.loads(reply.prediction)
        except grpc.RpcError as exc:
            return f"gRPC {exc.code().name}: {(exc.details() or '')[:200]}"
        except (requests.RequestException, ValueError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        wrong = check_answer(answer, item)
        return f"wrong answer: {wrong}" if wrong else None


# ---- load and sampling --------------------------------------------------------------------
@dataclass
class Load:
    """What the client threads did (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    first_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def record(self, kind: str, problem: str | None, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)
            if problem is None:
                self.ok[kind] += 1
            else:
                self.errors[kind] += 1
                if len(self.first_errors) < 20:
                    self.first_errors.append(f"{kind}: {problem}")

    def totals(self) -> tuple[int, int]:
        with self.lock:
            return sum(self.ok.values()), sum(self.errors.values())


def drive(stack: Stack, reqs: Requests, load: Load, stop: threading.Event, counter) -> None:
    client = Client(stack, reqs)
    try:
        while not stop.is_set():
            i = next(counter)
            kind = KINDS[i % len(KINDS)]
            start = time.perf_counter()
            try:
                problem = client.send(kind, i // len(KINDS))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request, the thread goes on
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            load.record(kind, problem, time.perf_counter() - start)
    finally:
        client.close()


@dataclass
class ProcStats:
    pid: int
    role: str
    label: str
    baseline: int | None  # bytes, median of the first WINDOW_S after the warm-up
    end: int | None  # bytes, median of the last WINDOW_S
    peak: int | None  # highest sample at or after the warm-up
    first_seen_s: float
    last_seen_s: float

    @property
    def judged(self) -> bool:
        return self.role in JUDGED

    @property
    def growth_pct(self) -> float | None:
        if not self.baseline or self.end is None:
            return None
        return 100.0 * (self.end - self.baseline) / self.baseline

    @property
    def peak_growth_pct(self) -> float | None:
        if not self.baseline or self.peak is None:
            return None
        return 100.0 * (self.peak - self.baseline) / self.baseline


@dataclass
class SoakResult:
    duration_s: float
    warmup_s: float
    concurrency: int
    interval_s: float
    #: (seconds since the load started, {pid: rss bytes})
    samples: list[tuple[float, dict[int, int]]]
    roles: dict[int, str]
    labels: dict[int, str]
    load: Load
    driven_s: float
    #: pid -> (user + system CPU seconds) at the end, for the stack's processes
    cpu_s: dict[int, float]
    machine_busy_s: float  # every core's busy time over the run
    client_cpu_s: float
    stack_died: str | None = None
    pids_after: dict[int, str] = field(default_factory=dict)
    #: (seconds since the load started, {frontend pid: live_heap()}), all under load: at the
    #: warm-up end, every LIVE_EVERY_S, at the end. First against last is judged.
    live: list[tuple[float, dict[int, dict]]] = field(default_factory=list)

    def live_series(self) -> list[tuple[float, float]]:
        """(seconds, live heap MiB) of the frontend, where it was measured."""
        return [(t, h["used_mb"]) for t, by_pid in self.live for h in by_pid.values() if "used_mb" in h]

    def live_growth(self) -> tuple[float, float, float] | None:
        """(live heap at the warm-up end, at the end (MiB), growth %) of the frontend, or
        None when either was not measured."""
        if len(self.live) < 2:
            return None
        first, last = (next((h for h in by_pid.values() if "used_mb" in h), None)
                       for _, by_pid in (self.live[0], self.live[-1]))
        if first is None or last is None:
            return None
        return (first["used_mb"], last["used_mb"],
                100.0 * (last["used_mb"] - first["used_mb"]) / first["used_mb"])

    def stats(self) -> list[ProcStats]:
        out = []
        order = {"frontend": 0, "worker": 1, "gateway": 2, "nginx master": 3, "nginx worker": 4, "launcher": 5}
        for pid, role in sorted(self.roles.items(), key=lambda kv: (order.get(kv[1], 9), self.labels[kv[0]])):
            seen = [(t, s[pid]) for t, s in self.samples if pid in s]
            after = [(t, rss) for t, rss in seen if t >= self.warmup_s]
            first = [rss for t, rss in after if t < after[0][0] + WINDOW_S] if after else []
            last = [rss for t, rss in seen if t > seen[-1][0] - WINDOW_S] if seen else []
            out.append(ProcStats(pid, role, self.labels[pid], _median(first), _median(last),
                                 max(rss for _, rss in after) if after else None,
                                 seen[0][0] if seen else 0.0, seen[-1][0] if seen else 0.0))
        return out

    def failures(self) -> list[str]:
        """Why the property does not hold (empty: it does)."""
        out = []
        if self.stack_died:
            out.append(self.stack_died)
        ok, errors = self.load.totals()
        if errors:
            out.append(f"{errors} of {ok + errors} requests failed, e.g. {self.load.first_errors[:3]}")
        for kind in KINDS:
            if not self.load.ok[kind]:
                out.append(f"no {kind} request answered")
        stats = self.stats()
        for role in JUDGED:
            if not any(s.role == role for s in stats):
                out.append(f"no {role} process found")
        end = self.samples[-1][0] if self.samples else 0.0
        for s in stats:
            if not s.judged:
                continue
            if s.baseline is None or s.first_seen_s > self.warmup_s or s.last_seen_s < end:
                out.append(f"{s.label} (pid {s.pid}) did not live through the run "
                           f"(seen {s.first_seen_s:.0f}-{s.last_seen_s:.0f} s of {end:.0f} s): replaced")
            elif s.growth_pct >= GROWTH_LIMIT_PCT:
                out.append(f"{s.label} (pid {s.pid}) grew {s.growth_pct:.1f}% after the warm-up "
                           f"({mb(s.baseline)} -> {mb(s.end)} MB), limit {GROWTH_LIMIT_PCT:.0f}%")
        live = self.live_growth()
        if live is None and not self.stack_died:
            out.append(f"the frontend's live Java heap was not measured: {self.live}")
        if live is not None and not live_heap_holds(live[0], live[1]):
            out.append(f"the frontend's live Java heap grew {live[2]:.1f}% after the warm-up "
                       f"({live[0]:.1f} -> {live[1]:.1f} MiB after a full collection), limit "
                       f"+{live_heap_limit_mb(live[0]):.1f} MiB")
        workers = {pid for pid, role in self.roles.items() if role == "worker"}
        if self.pids_after and set(self.pids_after) != workers:
            out.append(f"TorchServe's workers at the end {self.pids_after} are not the ones sampled "
                       f"{sorted(workers)}")
        return out


def live_heap_limit_mb(baseline_mb: float) -> float:
    """How much the frontend's live heap may grow: GROWTH_LIMIT_PCT of it or
    LIVE_HEAP_SLACK_MB, whichever is more."""
    return max(baseline_mb * GROWTH_LIMIT_PCT / 100, LIVE_HEAP_SLACK_MB)


def live_heap_holds(start_mb: float, end_mb: float) -> bool:
    """Whether the frontend's live heap stayed within its bound (live_heap_limit_mb)."""
    return end_mb - start_mb < live_heap_limit_mb(start_mb)


def _median(values: list[int]) -> int | None:
    return int(np.median(values)) if values else None


def mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _cpu_s(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def jcmd(pid: int, command: str) -> str:
    """``jcmd <pid> <command>`` (the JDK's own diagnostic tool); raises on failure."""
    proc = subprocess.run(["jcmd", str(pid), command], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr or proc.stdout).strip()[:300])
    return proc.stdout


def java_heap(pid: int) -> dict:
    """The Java heap's committed and used size (MiB), from ``jcmd GC.heap_info``; or
    ``{"error": ...}``."""
    import re

    try:
        match = re.search(r"total (\d+)K, used (\d+)K", jcmd(pid, "GC.heap_info"))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if not match:
        return {"error": "no heap sizes in jcmd's answer"}
    return {"committed_mb": int(match.group(1)) / 1024, "used_mb": int(match.group(2)) / 1024}


def live_heap(pid: int, repeats: int = LIVE_REPEATS) -> dict:
    """The frontend's live Java heap: ``repeats`` times ``jcmd GC.run`` (a full collection:
    with a fixed heap it frees nothing back to the OS) and :func:`java_heap`; the median of
    what stayed used (``used_mb``) and every value (``samples_mb``). With the heap fixed and
    touched at start (``ServeSettings.frontend_heap_mb``), RSS no longer shows what the heap
    holds, so a leak of Java objects shows here: the heap still used after a full collection.
    Under load one such value swings with the requests in flight (seen: 54 to 67 MiB within
    30 s), their median far less."""
    samples = []
    for _ in range(repeats):
        try:
            jcmd(pid, "GC.run")
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)}
        heap = java_heap(pid)
        if "error" in heap:
            return heap
        samples.append(heap["used_mb"])
    return {"committed_mb": heap["committed_mb"], "used_mb": float(np.median(samples)),
            "samples_mb": [round(v, 1) for v in samples]}


def jvm_flags(pid: int) -> str:
    """The frontend JVM's collector and heap bounds as it runs (``jcmd VM.flags``)."""
    import re

    try:
        text = jcmd(pid, "VM.flags")
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    flags = dict(re.findall(r"-XX:\+?(\w+)(?:=(\S+))?", text))
    gc = next((name[3:] for name in flags if name.startswith("Use") and name.endswith("GC")), "?")
    size = {k: f"{int(v) / 2**20:.0f} MiB" for k, v in flags.items()
            if k in ("InitialHeapSize", "MaxHeapSize") and v.isdigit()}
    return (f"{gc}, initial heap {size.get('InitialHeapSize', '?')}, maximum heap "
            f"{size.get('MaxHeapSize', '?')}")


class Progress:
    """One live status line on a terminal (rewritten in place), else a line every 30 s."""

    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and stream.isatty()
        self.last = 0.0

    def update(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.monotonic() - self.last >= 30:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = time.monotonic()


def run_soak(stack: Stack, bundles: dict, *, duration_s: float, warmup_s: float, concurrency: int = 8,
             interval_s: float = 2.0, progress: Progress | None = None) -> SoakResult:
    """Load the stack for ``duration_s`` and sample the RSS of its processes."""
    progress = progress or Progress(enabled=False)
    reqs = Requests(bundles)
    models = stack.worker_models()
    labels: dict[int, str] = {}
    roles: dict[int, str] = {}
    samples: list[tuple[float, dict[int, int]]] = []
    load = Load()
    stop = threading.Event()
    counter = itertools.count()
    threads = [threading.Thread(target=drive, args=(stack, reqs, load, stop, counter), name=f"soak-client-{i}",
                                daemon=True) for i in range(concurrency)]
    me = psutil.Process()
    client_cpu0 = sum(me.cpu_times()[:2])
    busy0 = _busy_s()
    cpu_s: dict[int, float] = {}
    live: list[tuple[float, dict[int, dict]]] = []
    died = None
    # jcmd attaches to the JVM, which then keeps an attach listener thread: first here, before
    # the load, so that both RSS windows see it; then for every measure of the live heap.
    for pid in (p for p, r in stack.processes().items() if r == "frontend"):
        java_heap(pid)
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while True:
            now = time.monotonic() - t0
            rss = {}
            for pid, role in stack.processes().items():
                try:
                    rss[pid] = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                if pid not in roles:
                    roles[pid] = role
                    if role == "worker" and pid not in models:
                        models = stack.worker_models()
                    labels[pid] = {"frontend": "TorchServe frontend (Java)",
                                   "gateway": "modelctl serve (gRPC gateway)",
                                   "launcher": "torchserve launcher (Python)"}.get(
                        role, f"worker {models.get(pid, '?')}" if role == "worker" else role)
                if (c := _cpu_s(pid)) is not None:
                    cpu_s[pid] = c
            samples.append((now, rss))
            ok, errors = load.totals()
            judged = "  ".join(f"{labels[p].split(' ')[-1] if roles[p] == 'worker' else roles[p]} "
                               f"{mb(rss[p])} MB" for p in rss if roles[p] in JUDGED)
            phase = "warm-up" if now < warmup_s else "steady"
            progress.update(f"[soak] {now:5.0f}/{duration_s:.0f} s {phase}  {ok} answered, {errors} failed, "
                            f"{ok / max(now, 1e-9):.0f}/s  {judged}")
            if not stack.alive():
                died = f"modelctl serve exited ({stack.proc.returncode}) after {now:.0f} s"
                break
            if now >= duration_s or (now >= warmup_s and (not live or now >= live[-1][0] + LIVE_EVERY_S)):
                # the live heap under load (LIVE_REPEATS full collections, a few seconds; the
                # RSS samples catch up after), first at the start of the baseline window
                live.append((now, {p: live_heap(p) for p in rss if roles[p] == "frontend"}))
            if now >= duration_s:
                break
            time.sleep(max(0.0, min(interval_s, duration_s - now, t0 + len(samples) * interval_s - time.monotonic())))
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    driven = time.monotonic() - t0
    busy = _busy_s() - busy0
    client_cpu = sum(me.cpu_times()[:2]) - client_cpu0
    pids_after = {}
    if died is None:
        try:
            pids_after = stack.worker_models()
        except Exception as exc:  # noqa: BLE001 - the management API not answering is a finding
            died = f"TorchServe's management API did not answer at the end: {exc}"
    ok, errors = load.totals()
    progress.update(f"[soak] done: {driven:.0f} s, {ok} answered, {errors} failed, {ok / driven:.1f}/s", final=True)
    return SoakResult(duration_s, warmup_s, concurrency, interval_s, samples, roles, labels, load, driven,
                      cpu_s, busy, client_cpu, died, pids_after, live)


# ---- the report -----------------------------------------------------------------------------
def jvm_options(state_dir: Path) -> str:
    """The JVM options TorchServe was given (config.properties' ``vmargs``)."""
    from service.serving.torchserve.config import parse_properties

    try:
        props = parse_properties((state_dir / "config.properties").read_text())
    except OSError:
        return "?"
    return props.get("vmargs", "(none)")


def curve(result: SoakResult, points: int = 10) -> tuple[list[str], list[list[str]]]:
    """RSS (MB) of every process at ``points`` moments of the run (and its start and end)."""
    stats = result.stats()
    if not result.samples:
        return [], []
    end = result.samples[-1][0]
    marks = sorted({0.0, result.warmup_s, *(end * i / points for i in range(1, points + 1))})
    rows, used = [], set()
    for mark in marks:
        i = min(range(len(result.samples)), key=lambda j: abs(result.samples[j][0] - mark))
        if i in used:
            continue
        used.add(i)
        t, sample = result.samples[i]
        rows.append([f"{t:.0f}" + (" (warm-up end)" if mark == result.warmup_s else "")] +
                    [mb(sample.get(s.pid)) for s in stats])
    return [s.label for s in stats], rows


def section(result: SoakResult, meta: dict) -> str:
    stats = result.stats()
    ok, errors = result.load.totals()
    lat = np.asarray(result.load.latencies or [0.0]) * 1000
    failures = result.failures()
    stack_cpu = sum(result.cpu_s.values()) - meta.get("stack_cpu_before", 0.0)
    other = max(0.0, result.machine_busy_s - stack_cpu - result.client_cpu_s)
    cores = os.cpu_count() or 1
    lines = [START, "## Memory under a 10-minute soak (`make soak`)", "",
             f"One run of `{meta['command']}`, {meta['date']}: {result.driven_s:.0f} s of load at "
             f"concurrency {result.concurrency}, RSS of every process of the stack sampled every "
             f"{result.interval_s:.0f} s ({len(result.samples)} samples). Baseline: the median of each "
             f"process's samples in the {WINDOW_S:.0f} s after a {result.warmup_s:.0f} s warm-up under the "
             f"same load; end: the median of its last {WINDOW_S:.0f} s. Machine: {meta['cpu']}, "
             f"{cores} cores, {meta['ram_gb']:.0f} GiB RAM. The load generator shares the cores with the "
             f"server, and so did other work on this machine: load average {meta['load_before']} before "
             f"the run and {meta['load_after']} after; over the run the cores were busy "
             f"{result.machine_busy_s / (cores * result.driven_s) * 100:.0f}% of the time, of which the "
             f"stack {stack_cpu / (cores * result.driven_s) * 100:.0f}%, the client "
             f"{result.client_cpu_s / (cores * result.driven_s) * 100:.0f}% and other processes "
             f"{other / (cores * result.driven_s) * 100:.0f}%. The throughput below is therefore this "
             "machine's at that time, not what the stack does on idle cores.", "",
             f"The stack is `modelctl serve --no-control`, its own process: TorchServe 0.12 (the Java "
             f"frontend, JVM: {meta['jvm']}; one Python worker per model), nginx in front of REST "
             "(it checks the API token) and the gRPC gateway (a thread of the `modelctl serve` process). "
             f"Models: ResNet-18 at 64 px (`{IMAGE_MODEL}`) and a 2-layer LSTM (`{SEQ_MODEL}`), "
             f"tests/helpers.py's `resnet` and `lstm` specs, batches of up to {BATCH_SIZE} "
             f"({MAX_BATCH_DELAY_MS} ms). Requests in turn: a PNG or JPEG of 40 to 160 px a side over "
             "REST (through nginx, with the token) and over gRPC (through the gateway), a sequence of 1 "
             f"to 64 steps as JSON over REST and over gRPC; every answer (top {TOP_K}) checked against "
             f"the model run in the client process (probabilities within {TOLERANCE:g}).", "",
             "| process | pid | RSS at warm-up end (MB) | at the end (MB) | highest sample after warm-up (MB) "
             f"| growth | judged (< {GROWTH_LIMIT_PCT:.0f}%) |",
             "|---|---|---|---|---|---|---|"]
    for s in stats:
        growth = "-" if s.growth_pct is None else f"{s.growth_pct:+.1f}%"
        peak = "-" if s.peak_growth_pct is None else f" ({s.peak_growth_pct:+.1f}%)"
        verdict = ("yes: " + ("holds" if s.growth_pct is not None and s.growth_pct < GROWTH_LIMIT_PCT
                               else "FAILS")) if s.judged else "no (reported)"
        lines.append(f"| {s.label} | {s.pid} | {mb(s.baseline)} | {mb(s.end)} | {mb(s.peak)}{peak} | "
                     f"{growth} | {verdict} |")
    by_kind = ", ".join(f"{k} {result.load.ok[k]}" for k in KINDS)
    lines += ["",
              f"Requests answered right: {ok} ({by_kind}); failed: {errors}. Throughput "
              f"{ok / result.driven_s:.1f} requests/s; latency p50 {np.percentile(lat, 50):.0f} ms, "
              f"p99 {np.percentile(lat, 99):.0f} ms.",
              "",
              "Verdict: " + ("the property holds: the frontend and every worker grew by less than "
                             f"{GROWTH_LIMIT_PCT:.0f}% after the warm-up, the frontend's live heap stayed "
                             "within its bound, no request failed and no process was replaced." if not failures else "**the property does not hold**: " +
                             "; ".join(failures)),
              ""]
    header, rows = curve(result)
    if rows:
        lines += ["RSS (MB) over the run:", "",
                  "| s | " + " | ".join(header) + " |",
                  "|---|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    live = result.live_growth()
    if live is not None:
        limit = live_heap_limit_mb(live[0])
        lines += [f"The frontend's heap is fixed and touched at start (`-Xms` = `-Xmx`, "
                  "`-XX:+AlwaysPreTouch`: ServeSettings.frontend_heap_mb), so its RSS includes the whole "
                  "heap from the first sample and cannot show what the heap holds. What it holds is "
                  "measured apart: the heap still used after a full collection (`jcmd GC.run`, then "
                  f"`GC.heap_info`; the median of {LIVE_REPEATS} in a row), under the same load, at the "
                  "warm-up end and at the end: "
                  f"{live[0]:.1f} MiB, then {live[1]:.1f} MiB ({live[2]:+.1f}%); every {LIVE_EVERY_S:.0f} s "
                  "in between (s: MiB): " + ", ".join(f"{t:.0f}: {v:.1f}" for t, v in result.live_series()) +
                  ". Judged: it may grow by less "
                  f"than {GROWTH_LIMIT_PCT:.0f}% or {LIVE_HEAP_SLACK_MB:.0f} MiB, whichever is more "
                  f"(+{limit:.1f} MiB here): " + ("holds." if live_heap_holds(live[0], live[1]) else "FAILS."), ""]
    else:
        lines += [f"The frontend's live Java heap was not measured ({result.live or 'no measure taken'}).", ""]
    lines += [f"The same check with {TEST_DURATION_S:.0f} s of load and a {TEST_WARMUP_S:.0f} s warm-up is "
              "`tests/test_soak.py`.", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the baseline (default: 20%% of --duration, at most 60)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".modelctl" / "soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warmup = default_warmup(args.duration) if args.warmup is None else args.warmup
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model(),
            "ram_gb": psutil.virtual_memory().total / 2**30,
            "command": "make soak" if os.environ.get("MAKELEVEL") else f"python -m benchmarks.soak {argv_text}".strip(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    log.info("starting modelctl serve in %s", work)
    stack, bundles = start_stack(work)
    try:
        frontend = [p for p, r in stack.processes().items() if r == "frontend"]
        # before the load: jcmd attaches to the JVM
        meta["jvm"] = (f"config.properties vmargs `{jvm_options(stack.state_dir)}`, so "
                       f"{jvm_flags(frontend[0]) if frontend else 'no frontend found'}")
        meta["stack_cpu_before"] = sum(c for p in stack.processes() if (c := _cpu_s(p)) is not None)
        log.info("serving (REST %s, gRPC %s); %d s of load at concurrency %d, warm-up %.0f s",
                 stack.rest_url, stack.grpc_target, args.duration, args.concurrency, warmup)
        result = run_soak(stack, bundles, duration_s=args.duration, warmup_s=warmup,
                          concurrency=args.concurrency, interval_s=args.interval, progress=Progress())
    finally:
        stack.stop()
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    failures = result.failures()
    for s in result.stats():
        print(f"{s.label:32} pid {s.pid:>7}  warm-up end {mb(s.baseline):>5} MB  end {mb(s.end):>5} MB  "
              f"max {mb(s.peak):>5} MB  growth {'-' if s.growth_pct is None else f'{s.growth_pct:+.1f}%'}")
    live = result.live_growth()
    print("frontend live Java heap after a full collection: " +
          (f"warm-up end {live[0]:.1f} MiB  end {live[1]:.1f} MiB  growth {live[2]:+.1f}%" if live
           else f"not measured ({result.live})"))
    out_json = work / "results.json"
    out_json.write_text(json.dumps({
        "meta": meta, "warmup_s": warmup, "duration_s": result.driven_s, "ok": result.load.ok,
        "errors": result.load.errors, "first_errors": result.load.first_errors,
        "processes": {str(p): {"role": r, "label": result.labels[p]} for p, r in result.roles.items()},
        "samples": [{"t": round(t, 2), "rss": {str(p): v for p, v in s.items()}} for t, s in result.samples],
        "live_heap": [{"t": round(t, 2), "heap": {str(p): h for p, h in v.items()}} for t, v in result.live],
        "failures": failures}, indent=1) + "\n")
    if not args.no_report:
        replace_section(args.out, START, END, section(result, meta))
        log.info("wrote %s and %s", args.out, out_json)
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
