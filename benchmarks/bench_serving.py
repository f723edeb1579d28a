"""`make bench`: our serving path against plain PyTorch and stock TorchServe, in one run.

    python -m benchmarks.bench_serving [--out BENCHMARKS.md] [--work-dir .modelctl/bench]
                                       [--stock-pythonpath DIR] [--quick]
                                       [--skip trainer b c compile native replica new-version]

Same ResNet-18 weights and the same JPEG inputs everywhere, on this machine:

* (a) in-process PyTorch, decode + forward: a plain fp32 eager loop (torchvision.io decode,
  the shared eval transform per image, stack, forward, softmax, top-5), and our predictor in
  the fastest configuration that passes the bf16 agreement check (each candidate measured);
* (b) our handler in a real TorchServe (service.serving), over REST, through the nginx proxy
  that checks the API token (the public port); with 1 worker, also directly to TorchServe's
  loopback port, to show what the proxy costs;
* (c) TorchServe's stock ``image_classifier`` handler on the same weights (an eager model
  file + state_dict, TorchServe's convention), over REST. Its base class imports captum, which
  is not a dependency of ours: ``make bench`` installs it into a directory used only by
  that TorchServe (``--stock-pythonpath``).

* (d) the native engine (issue 11): ``modelctl serve --no-control --engine native`` as its own
  process, serving the same archive as (b), driven by load tools outside Python: ``wrk`` over
  REST (OIP v2 with the binary tensor extension, the main row; TorchServe's /predictions) and
  ``h2load`` over gRPC (OIP ModelInfer, a pre-serialised frame), at concurrency 1, 8 and 32;
  every run is checked from the server's side (answers against the in-process forward before
  and after, the engine's own request counter against the tool's count; see
  :func:`checked_run` and benchmarks/loadgen.py). The Python client of (b) and (c) beside it,
  and wrk against (b) and (c) too, so that (d) and (c) are compared under the same tool.
  Then a replica of each engine serving the three demo archives (start to every model READY,
  RSS summed over every process), and a new ResNet-18 version's latency on the native engine.

Concurrency 1 and 8: in process, batch 1 and batch 8; over REST, 1 and 8 client threads
sending one JPEG per request. The load generator runs on the same 2 cores as the server.
Also: trainer samples/s (service.training's train_one_epoch) against a minimal hand-written
loop on the same model and data, and the time from a new version's archive being written to
its first answer through service.serving.

The table is written between the serving-bench markers of BENCHMARKS.md (the rest of the
file is kept) and, raw, to <work-dir>/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

from service.predict_client import read_token
from service.handlers.torchserve import warm_up_sizes
from service.inference import Predictor, RuntimeOptions, check_precision
from service.inference.fastpath import native_precisions
from service.models import ModelSpec, build_model, image_eval_transform
from service.modelstore import ModelBundle, ModelStore
from service.inference.options import ServingOptions
from service.serving.settings import ServeSettings
from service.modelstore.check import ALLOW_FOREIGN_ENV
from service.deploy.store_scan import link_archive
from service.serving.torchserve.supervisor import Serving
from benchmarks import loadgen
from benchmarks.report import replace_section

#: The repo root: default paths of the output and the work directory.
ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench")
START, END = "<!-- serving-bench:start -->", "<!-- serving-bench:end -->"
MODEL = "resnet18"
STOCK = "stock-resnet18"
SPEC = {"family": "resnet", "num_classes": 1000, "config": {"arch": "resnet18", "pretrained": None},
        "input": {"type": "image", "channels": 3, "size": 224, "resize": 256}}
BATCH = 8
#: TorchServe batching for (b) and (c): up to 8 requests, waiting at most 1 ms for more. Not 0:
#: TorchServe 0.12 then waits about 100 ms for every batch (measured; see BENCHMARKS.md).
MAX_BATCH_DELAY_MS = 1


# ---- inputs and weights -----------------------------------------------------------------
def photo_jpegs(n: int, seed: int, size=(375, 500)) -> list[bytes]:
    """``n`` JPEGs (quality 90) of one size: random crops, scales and flips of the two
    photographs scikit-learn ships (china.jpg, flower.jpg). One size, as a camera sends."""
    import sklearn.datasets as skd
    import torchvision.transforms.v2.functional as F
    from torchvision.io import decode_jpeg, encode_jpeg, read_file

    photos = [decode_jpeg(read_file(str(Path(skd.__file__).parent / "images" / name)))
              for name in ("china.jpg", "flower.jpg")]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = photos[i % 2]
        _, H, W = img.shape
        s = float(torch.empty(1).uniform_(0.35, 1.0, generator=g))
        h, w = int(H * s), int(min(W, H * s * size[1] / size[0]))
        y = int(torch.randint(0, H - h + 1, (1,), generator=g))
        x = int(torch.randint(0, W - w + 1, (1,), generator=g))
        crop = F.resize(img[:, y:y + h, x:x + w], list(size), antialias=True)
        if (i // 2) % 2:
            crop = crop.flip(-1)
        out.append(encode_jpeg(crop.contiguous(), quality=90).numpy().tobytes())
    return out


def resnet18_bundle(seed: int = 0) -> ModelBundle:
    """ResNet-18, 1000 classes, seeded random initialisation (no trained weights are
    available offline); the same tensors go to every path."""
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict(SPEC)
    model = build_model(spec).eval()
    return ModelBundle(spec, model.state_dict(), [f"class-{i}" for i in range(1000)])


# ---- statistics -------------------------------------------------------------------------
def summary(latencies_s: list[float], images: int, wall_s: float) -> dict:
    ms = np.asarray(latencies_s) * 1000.0
    return {"img_s": images / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "n": len(latencies_s), "wall_s": wall_s}


def timed_loop(fn, batches: list, min_iters: int, max_s: float, warm: int = 2) -> dict:
    """Call ``fn(batch)`` over ``batches`` round robin; latency per call, images per second."""
    for i in range(warm):
        fn(batches[i % len(batches)])
    lat, images, start = [], 0, time.perf_counter()
    i = 0
    while i < min_iters or (time.perf_counter() - start < max_s and i < 10 * min_iters):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        fn(batch)
        lat.append(time.perf_counter() - t)
        images += len(batch)
        i += 1
        if time.perf_counter() - start > max_s and i >= min_iters // 2:
            break
    return summary(lat, images, time.perf_counter() - start)


# ---- (a) in process ---------------------------------------------------------------------
class PlainLoop:
    """What a user writes: decode with torchvision.io, the eval transform per image, stack,
    fp32 eager forward, softmax, top-5, tolist."""

    def __init__(self, bundle: ModelBundle):
        from service.models import load_model

        self.model = load_model(bundle.spec, bundle.state_dict).eval()
        self.transform = image_eval_transform(bundle.spec.input)

    @torch.inference_mode()
    def __call__(self, jpegs: list[bytes]):
        from torchvision.io import ImageReadMode, decode_image

        x = torch.stack([self.transform(decode_image(torch.frombuffer(bytearray(j), dtype=torch.uint8),
                                                     ImageReadMode.RGB)) for j in jpegs])
        probs = torch.softmax(self.model(x), dim=1)
        values, indices = torch.topk(probs, 5, dim=1)
        return values.tolist(), indices.tolist()


def predictor_fn(predictor: Predictor):
    def run(jpegs: list[bytes]):
        result = predictor.predict([{"body": j} for j in jpegs])
        assert all(isinstance(o, dict) for o in result.outputs), result.outputs
        return result
    return run


def in_process(bundle, jpegs, checks, quick: bool, try_compile: bool = True) -> dict:
    """(a): the plain loop, every candidate configuration, and the fastest passing one."""
    b1 = [[j] for j in jpegs]
    b8 = [jpegs[i:i + BATCH] for i in range(0, len(jpegs) - BATCH + 1, BATCH)]
    out = {"plain": {}, "candidates": [], "fast": {}}
    plain = PlainLoop(bundle)
    out["plain"]["c1"] = timed_loop(plain, b1, 40 if quick else 120, 8 if quick else 20)
    out["plain"]["c8"] = timed_loop(plain, b8, 8 if quick else 24, 8 if quick else 20)
    log.info("(a) plain fp32 loop: %s", out["plain"])
    allowed = ["fp32"] + [p for p, c in checks.items() if c["passed"] and p in native_precisions("cpu")]
    candidates = [RuntimeOptions(p, cl) for p in allowed for cl in (False, True)]
    screened = []
    for rt in candidates:  # eager candidates: a short screen at batch 8
        pred = Predictor(bundle, runtime=rt)
        r = timed_loop(predictor_fn(pred), b8, 6 if quick else 10, 6 if quick else 10)
        screened.append((r["img_s"], rt))
        out["candidates"].append({**rt.to_dict(), "img_s_b8": r["img_s"], "compile_s": 0.0})
        log.info("(a) candidate %s: %.1f img/s at batch 8", rt.to_dict(), r["img_s"])
    best_ips, best_rt = max(screened, key=lambda t: t[0])
    if not try_compile:
        fast = Predictor(bundle, runtime=best_rt)
        fast.warm_up([1, BATCH])
        return _measure_fast(out, fast, best_rt, b1, b8, quick)
    # Compile the best eager configuration (compiling every candidate would not fit the budget).
    crt = RuntimeOptions(best_rt.precision, best_rt.channels_last, compile=True)
    t = time.perf_counter()
    cpred = Predictor(bundle, runtime=crt)
    took = cpred.warm_up(warm_up_sizes(BATCH, compiled=True))  # what the TorchServe worker compiles
    compile_s = time.perf_counter() - t
    r = timed_loop(predictor_fn(cpred), b8, 6 if quick else 10, 6 if quick else 10)
    out["candidates"].append({**crt.to_dict(), "img_s_b8": r["img_s"], "compile_s": compile_s,
                              "compile_s_per_size": took})
    log.info("(a) candidate %s: %.1f img/s at batch 8 after %.0f s of compiling", crt.to_dict(), r["img_s"],
             compile_s)
    if r["img_s"] > best_ips:
        best_rt, fast = crt, cpred
    else:
        fast = Predictor(bundle, runtime=best_rt)
        fast.warm_up([1, BATCH])
    return _measure_fast(out, fast, best_rt, b1, b8, quick)


def _measure_fast(out, fast, best_rt, b1, b8, quick) -> dict:
    out["fast"]["runtime"] = best_rt.to_dict()
    out["fast"]["c1"] = timed_loop(predictor_fn(fast), b1, 40 if quick else 120, 8 if quick else 20)
    out["fast"]["c8"] = timed_loop(predictor_fn(fast), b8, 8 if quick else 24, 8 if quick else 20)
    log.info("(a) fastest passing %s: %s", best_rt.to_dict(), out["fast"])
    return out


# ---- REST load --------------------------------------------------------------------------
def rest_load(url: str, token: str, jpegs: list[bytes], concurrency: int, requests_n: int, max_s: float,
              check=None) -> dict:
    """``concurrency`` client threads, each posting one JPEG per request, ``requests_n`` in all
    (or until ``max_s``); latency per request."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/jpeg"}
    lock, lat, errors = threading.Lock(), [], []
    counter = iter(range(10 ** 9))
    stop_at = [0.0]

    def worker():
        session = requests.Session()
        while True:
            with lock:
                i = next(counter)
            if i >= requests_n or time.perf_counter() > stop_at[0]:
                return
            t = time.perf_counter()
            r = session.post(url, data=jpegs[i % len(jpegs)], headers=headers, timeout=120)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            if check is not None:
                check(r.json())
            with lock:
                lat.append(dt)

    # warm-up: a few requests at the same concurrency
    stop_at[0] = time.perf_counter() + 60
    warm_n = requests_n
    requests_n = 2 * concurrency
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: worker(), range(concurrency)))
    lat.clear()
    counter, requests_n = iter(range(10 ** 9)), warm_n
    start = time.perf_counter()
    stop_at[0] = start + max_s
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: worker(), range(concurrency)))
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return summary(lat, len(lat), wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_settings(store: Path, state: Path, workers: int = 1, engine: str = "torchserve") -> ServeSettings:
    return ServeSettings(workers_per_model=workers, engine=engine,
        model_store=store, state_dir=state, inference_port=free_port(), management_port=free_port(),
        metrics_port=free_port(), grpc_inference_port=free_port(), grpc_management_port=free_port(),
        ts_grpc_inference_port=free_port(), exporter_port=free_port(), ts_inference_port=free_port(),
        worker_port_base=random.randint(20000, 40000), startup_timeout_s=900)


def rest_phase(settings: ServeSettings, name: str, jpegs: list[bytes], quick: bool, check, *,
               url: str | None = None, token: str | None = None) -> dict:
    """c=1 and c=8 over REST: by default the public port (nginx, the API token); ``url`` and
    ``token`` name another endpoint (TorchServe's loopback port and its inference key)."""
    url = url or f"http://127.0.0.1:{settings.inference_port}/predictions/{name}"
    token = token or read_token(settings.state_dir)
    return {
        "c1": rest_load(url, token, jpegs, 1, 40 if quick else 150, 10 if quick else 25, check),
        "c8": rest_load(url, token, jpegs, 8, 80 if quick else 320, 10 if quick else 30, check),
    }


def ours_in_torchserve(work: Path, bundle, jpegs, runtime: dict, checks: dict, quick: bool, cache_dir: Path,
                       workers: int = 1, new_versions: bool = True) -> dict:
    """(b) with ``workers`` workers (each gets 2 // workers torch threads: service.serving's
    rule); with ``new_versions``, then the time from a job's SUCCEEDED to the first answer."""
    tag = f"ours-w{workers}"
    store = ModelStore(work / f"store-{tag}")
    precision = runtime["precision"]
    options = ServingOptions(batch_size=BATCH, max_batch_delay_ms=MAX_BATCH_DELAY_MS, precision=precision,
                             channels_last=runtime["channels_last"], compile=runtime["compile"],
                             precision_check=checks.get(precision, {}).get("record") if precision != "fp32" else None)
    store.write(MODEL, bundle, version=1, options=options)
    settings = serve_settings(store.root, work / f"state-{tag}", workers)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # workers inherit it: (a)'s compiled graphs
    from service.control.settings import ControlConfig
    from service.app import ServingWithControl

    shutil.rmtree(work / "control", ignore_errors=True)
    control = ControlConfig(port=free_port(), db_path=work / "control" / "control.db", runs_dir=work / "control" / "runs",
                            data_roots=(work,), max_concurrent_jobs=1, poll_s=0.1, deploy_timeout_s=300)
    serving = ServingWithControl(settings, control)  # `modelctl serve`: TorchServe and the control API
    t = time.perf_counter()
    report = serving.start()
    load_s = time.perf_counter() - t
    try:
        if not all(r.ready for r in report):
            raise RuntimeError(f"our model did not load: {report}; see {serving.torchserve.log_path}")
        worker_runtime = _logged_runtime(serving.torchserve.log_path)
        out = {"workers": workers, "load_s": load_s, "worker_log": worker_runtime}

        def check(answer):
            assert answer["model"] == MODEL and len(answer["predictions"][0]["top_k"]) == 5

        out.update(rest_phase(settings, MODEL, jpegs, quick, check))
        log.info("(b) ours in TorchServe, %d worker(s): %s", workers, out)
        if loadgen.have("wrk"):
            script = wrk_scripts(work, tag, read_token(settings.state_dir), jpegs, MODEL)["predictions"]
            out["wrk"] = wrk_phase(f"http://127.0.0.1:{settings.inference_port}", script, quick)
        if new_versions:
            # The same model, the same TorchServe, right after: TorchServe's own loopback port
            # with its inference key, without the proxy. The difference is what nginx costs.
            out["direct"] = rest_phase(
                settings, MODEL, jpegs, quick, check,
                url=f"{serving.torchserve.ts_inference_url}/predictions/{MODEL}",
                token=serving.torchserve.tokens.inference)
            log.info("(b) the same, directly to TorchServe (no proxy): %s", out["direct"])
            out["job"] = job_to_first_answer(serving, settings)
            log.info("fine-tune job: %s", out["job"])
            out["new_version"] = new_version_latency(serving, settings, store, jpegs[0])
            log.info("new version: %s", out["new_version"])
        return out
    finally:
        serving.stop()
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _logged_runtime(log_path: Path) -> str:
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if "loaded " in line and "warm-up" in line]
    return lines[-1].split("- ", 1)[-1][:300] if lines else ""


def job_to_first_answer(serving, settings: ServeSettings) -> dict:
    """A real fine-tune job through the control API (a small CNN on builtin:digits, deploy
    policy "deploy"): the time from its SUCCEEDED, as a watcher sees it, to the first answer
    by the version it wrote. The deploy policy registers the new version and waits for its
    workers to be READY before the job is SUCCEEDED, so that time is one request."""
    from sklearn.datasets import load_digits
    from torchvision.io import encode_png

    from service._gen.modelctl.v1 import control_pb2 as pb
    from service.control.api.client import ControlClient

    spec = {"model": {"family": "cnn", "config": {"channels": [8, 16]},
                      "input": {"type": "image", "channels": 1, "size": 8, "resize": None}},
            "dataset": {"source": "builtin:digits", "train_size": 300, "val_size": 100},
            "output": {"name": "bench-digits"}, "hyperparameters": {"epochs": 2, "batch_size": 32, "lr": 0.01}}
    digit = torch.from_numpy(np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)).unsqueeze(0)
    png = encode_png(digit).numpy().tobytes()
    client = ControlClient(serving.control.target, token=serving.api_token)
    t_create = time.perf_counter()
    job = client.create_job(spec, deploy="deploy")
    marks, final = {}, None
    for update in client.watch(job.id, timeout_s=600):
        state = pb.JobState.Name(update.job.state)
        marks.setdefault(state, time.perf_counter())
        final = update.job
    t_succeeded = marks.get("JOB_STATE_SUCCEEDED")
    if t_succeeded is None:
        raise RuntimeError(f"the fine-tune job did not succeed: {final}")
    token = read_token(settings.state_dir)
    url = f"http://127.0.0.1:{settings.inference_port}/predictions/{final.output_model}"
    tries = 0
    while True:
        tries += 1
        r = requests.post(url, data=png, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        if r.status_code == 200 and r.json().get("version") == str(final.result_version):
            break
        time.sleep(0.01)
    t_answer = time.perf_counter()
    finished = final.finished_at.ToDatetime().timestamp()
    started = final.started_at.ToDatetime().timestamp()
    return {"succeeded_to_first_answer_s": t_answer - t_succeeded, "requests": tries,
            "create_to_succeeded_s": t_succeeded - t_create, "job_run_s": finished - started,
            "deploy_outcome": pb.DeployOutcome.Name(final.deploy_outcome), "version": final.result_version}


def new_version_latency(serving, settings: ServeSettings, store: ModelStore, jpeg: bytes,
                        bundle: ModelBundle | None = None) -> dict:
    """Archive written (what a job does just before it is SUCCEEDED) -> registered (worker
    READY) -> default -> first answer by the new version. The new version is written as the
    trainer writes one: default serving options (fp32 eager). ``serving``: either engine (its
    ``mgmt`` is TorchServe's management API or the native engine's NativeModels)."""
    new = bundle if bundle is not None else resnet18_bundle(seed=1)
    t0 = time.perf_counter()
    info = store.write(MODEL, new, version=2)
    t_written = time.perf_counter()
    url = link_archive(settings, MODEL, info.version)
    serving.mgmt.register(url, initial_workers=1, synchronous=True, response_timeout_s=120)
    t_registered = time.perf_counter()
    serving.mgmt.set_default(MODEL, info.version)
    t_default = time.perf_counter()
    token = read_token(settings.state_dir)
    predict = f"http://127.0.0.1:{settings.inference_port}/predictions/{MODEL}"
    while True:
        r = requests.post(predict, data=jpeg, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        if r.status_code == 200 and r.json().get("version") == str(info.version):
            break
        time.sleep(0.01)
    t_answer = time.perf_counter()
    return {"archive_write_s": t_written - t0, "register_ready_s": t_registered - t_written,
            "set_default_s": t_default - t_registered, "first_answer_s": t_answer - t_default,
            "written_to_first_answer_s": t_answer - t_written}


# ---- (c) stock TorchServe ----------------------------------------------------------------
STOCK_MODEL_FILE = '''"""ResNet-18 as TorchServe's eager-model convention wants it: one class in the file."""
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=1000)
'''


def build_stock_archive(work: Path, bundle: ModelBundle, store: Path) -> Path:
    src = work / "stock-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "stock_resnet18.py").write_text(STOCK_MODEL_FILE)
    torch.save({k: v.contiguous() for k, v in bundle.state_dict.items()}, src / "resnet18.pth")
    (src / "index_to_name.json").write_text(json.dumps({str(i): name for i, name in enumerate(bundle.labels)}))
    (src / "model-config.yaml").write_text(f"batchSize: {BATCH}\nmaxBatchDelay: {MAX_BATCH_DELAY_MS}\n"
                                           "responseTimeout: 120\n")
    out = store / STOCK
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run([str(archiver), "--model-name", STOCK, "--version", "1",
                    "--model-file", str(src / "stock_resnet18.py"), "--serialized-file", str(src / "resnet18.pth"),
                    "--handler", "image_classifier", "--extra-files", str(src / "index_to_name.json"),
                    "--config-file", str(src / "model-config.yaml"), "--export-path", str(out)], check=True)
    (out / f"{STOCK}.mar").rename(out / "1.mar")
    return out / "1.mar"


def stock_in_torchserve(work: Path, bundle, jpegs, quick: bool, pythonpath: str | None, workers: int = 1) -> dict:
    """(c) with ``workers`` workers. The stock handler leaves torch's threads alone (2 here);
    with 2 workers, OMP_NUM_THREADS=1 gives it the same layout as ours (1 thread each)."""
    tag = f"stock-w{workers}"
    build_stock_archive(work, bundle, work / f"store-{tag}")
    settings = serve_settings(work / f"store-{tag}", work / f"state-{tag}", workers)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "MPLBACKEND", "OMP_NUM_THREADS", ALLOW_FOREIGN_ENV)}
    os.environ[ALLOW_FOREIGN_ENV] = "1"  # the stock handler: refused by the archive check otherwise
    if pythonpath:  # absolute: workers run in their own directory
        pythonpath = str(Path(pythonpath).resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, saved["PYTHONPATH"]]))
    os.environ["MPLBACKEND"] = "Agg"
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    serving = Serving(settings)
    try:
        t = time.perf_counter()
        report = serving.start()
        load_s = time.perf_counter() - t
        if not all(r.ready for r in report):
            tail = serving.torchserve.log_tail(60)
            text = serving.torchserve.log_path.read_text(errors="replace")
            reason = ("captum is not importable: install it with `make bench`" if "named 'captum'" in text
                      else f"see {serving.torchserve.log_path}")
            return {"error": f"the stock handler did not load ({reason}): {report}", "log_tail": tail[-3000:]}

        def check(answer):
            assert isinstance(answer, dict) and len(answer) == 5, answer  # {label: probability}

        out = {"workers": workers, "load_s": load_s}
        out.update(rest_phase(settings, STOCK, jpegs, quick, check))
        log.info("(c) stock image_classifier, %d worker(s): %s", workers, out)
        if loadgen.have("wrk"):
            script = wrk_scripts(work, tag, read_token(settings.state_dir), jpegs, STOCK)["predictions"]
            out["wrk"] = wrk_phase(f"http://127.0.0.1:{settings.inference_port}", script, quick)
        return out
    finally:
        serving.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- (d) the native engine, and wrk/h2load against every engine ----------------------------
SERVE_PORTS = ("inference_port", "ts_inference_port", "management_port", "metrics_port", "grpc_inference_port",
               "grpc_management_port", "ts_grpc_inference_port", "exporter_port")
#: Concurrency levels of the native engine's runs (closed loop: each client waits for its answer).
NATIVE_LEVELS = (1, 8, 32)


def tool_seconds(quick: bool) -> tuple[float, float]:
    """(measured, warm-up) seconds of one wrk or h2load run."""
    return (4.0, 1.0) if quick else (15.0, 3.0)


class ServeProcess:
    """``modelctl serve --no-control`` (a serving replica) as its own process, either engine, on
    free ports: what a deployment runs. :meth:`start` returns the seconds from the process's
    start to every model of the store READY: for the native engine, each model's OIP
    ``/v2/models/{m}/ready`` answering 200; for TorchServe, every model with its workers READY in
    TorchServe's management API (what ``modelctl serve`` itself waits for)."""

    def __init__(self, work: Path, store: Path, engine: str, tag: str, env: dict | None = None):
        self.engine, self.store = engine, Path(store)
        self.state = work / f"state-{tag}"
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        self.ports = {name: free_port() for name in SERVE_PORTS}
        self.env = dict(os.environ)
        self.env.update({f"MODELCTL_{k.upper()}": str(v) for k, v in self.ports.items()})
        self.env.update({"MODELCTL_ENGINE": engine, "MODELCTL_MODEL_STORE": str(self.store),
                         "MODELCTL_STATE_DIR": str(self.state), "MODELCTL_STARTUP_TIMEOUT_S": "900",
                         "MODELCTL_WORKER_PORT_BASE": str(random.randint(20000, 40000))})
        self.env.update(env or {})
        self.log_path = work / f"serve-{tag}.log"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, object] = {}
        self._token: str | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference_port']}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference_port']}"

    @property
    def exporter(self) -> str:
        return f"http://127.0.0.1:{self.ports['exporter_port']}/metrics"

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = read_token(self.state)
        return self._token

    def start(self, models: list[str], timeout_s: float = 900) -> float:
        cmd = [str(Path(sys.executable).parent / "modelctl"), "serve", "--no-control"]
        with open(self.log_path, "wb") as out:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(cmd, cwd=self.state, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        last = "not started"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"modelctl serve ({self.engine}) exited ({self.proc.returncode}) while starting; "
                                   f"see {self.log_path}")
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"modelctl serve ({self.engine}) not ready in {timeout_s:.0f} s ({last}); "
                                   f"see {self.log_path}")
            try:
                missing = self._not_ready(models)
                if not missing:
                    took = time.perf_counter() - t0
                    self.tree()
                    return took
                last = f"not READY: {', '.join(missing)}"
            except Exception as exc:  # noqa: BLE001 - not up yet: the token, a port
                last = f"{type(exc).__name__}: {str(exc)[:200]}"
            time.sleep(0.05)

    def _not_ready(self, models: list[str]) -> list[str]:
        if self.engine == "native":
            headers = {"Authorization": f"Bearer {self.token}"}
            return [m for m in models
                    if requests.get(f"{self.rest}/v2/models/{m}/ready", headers=headers, timeout=5).status_code != 200]
        from service.deploy import readiness
        from service.serving.torchserve.management import ManagementClient

        mgmt = ManagementClient(f"http://127.0.0.1:{self.ports['management_port']}",
                                lambda: read_token(self.state, "management"), timeout_s=5)
        try:
            ready = {r.name for r in readiness.check(mgmt) if r.ready}
        finally:
            mgmt.close()
        return [m for m in models if m not in ready]

    def tree(self) -> dict:
        """The memory of the process and every descendant (and remember them all, for stop)."""
        import psutil

        mem = loadgen.tree_memory(self.proc.pid)
        for p in mem["processes"]:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(p["pid"], psutil.Process(p["pid"]))
        return mem

    def stop(self) -> None:
        import psutil

        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log.warning("modelctl serve (%s) did not stop in 60 s; killing it", self.engine)
                self.proc.kill()
                self.proc.wait(10)

        def alive():
            out = []
            for p in self.seen.values():
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
            return out

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and alive():
            time.sleep(0.2)
        for p in alive():
            with contextlib.suppress(psutil.Error):
                log.warning("killing leftover %s (pid %d)", p.name(), p.pid)
                p.kill()
        self.proc = None


def oip_grpc_request(jpeg: bytes):
    """OIP v2 ModelInferRequest: input ``images`` BYTES [1] in raw_input_contents (a 4-byte
    little-endian length, then the JPEG)."""
    from service._gen.oip.v2 import open_inference_grpc_pb2 as pb

    return pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(jpeg)) + jpeg])


def oip_rest_body(jpeg: bytes) -> tuple[bytes, int]:
    """OIP v2 REST with the binary tensor extension: (body, Inference-Header-Content-Length)."""
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4 + len(jpeg)}}]}).encode()
    return head + struct.pack("<I", len(jpeg)) + jpeg, len(head)


class Reference:
    """The in-process forward that served answers are compared with: a Predictor on the same
    weights with the served precision and memory format, eager (the served one may be
    compiled; compiling again here would cost a minute), every class's probability."""

    def __init__(self, bundle: ModelBundle, runtime: dict, jpegs: list[bytes]):
        pred = Predictor(bundle, runtime=RuntimeOptions(runtime["precision"], runtime["channels_last"]))
        self.jpegs = jpegs
        self.probs = []
        for j in jpegs:
            answer = pred.predict([{"body": j}], [1000]).outputs[0]
            p = np.zeros(1000)
            for e in answer["predictions"][0]["top_k"]:
                p[e["index"]] = e["probability"]
            self.probs.append(p)

    def compare(self, i: int, classes, probs, how: str) -> str | None:
        """None when the served top-5 agrees with the in-process forward: each of its
        probabilities within 2% (+1e-4) of the in-process one of the same class, and its top-1
        among the in-process top 3 (bf16 ties may reorder); else what differs."""
        ref = self.probs[i]
        top3 = set(np.argsort(-ref)[:3].tolist())
        classes, probs = [int(c) for c in classes], [float(q) for q in probs]
        if len(classes) != 5:
            return f"{how}: {len(classes)} classes, not 5"
        if classes[0] not in top3:
            return f"{how}: top-1 {classes[0]} not in the in-process top 3 {sorted(top3)}"
        for c, q in zip(classes, probs):
            if abs(q - ref[c]) > 0.02 * ref[c] + 1e-4:
                return f"{how}: class {c} p={q:.5f}, in process {ref[c]:.5f}"
        return None

    def check(self, server: ServeProcess) -> list[str]:
        """A few real calls over gRPC (the generated stub) and REST (OIP, binary extension),
        each compared with the in-process forward; the problems found."""
        import grpc

        from service._gen.oip.v2 import open_inference_grpc_pb2_grpc as pb_grpc

        problems = []
        meta = [("authorization", f"Bearer {server.token}")]
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i, j in enumerate(self.jpegs):
                try:
                    resp = stub.ModelInfer(oip_grpc_request(j), metadata=meta, timeout=60)
                    out = {o.name: raw for o, raw in zip(resp.outputs, resp.raw_output_contents)}
                    problem = self.compare(i, np.frombuffer(out["classes"], "<i8"),
                                           np.frombuffer(out["probabilities"], "<f4"), f"gRPC input {i}")
                except Exception as exc:  # noqa: BLE001 - a failed call is a problem to report
                    problem = f"gRPC input {i}: {type(exc).__name__}: {str(exc)[:200]}"
                if problem:
                    problems.append(problem)
        for i, j in enumerate(self.jpegs):
            body, n = oip_rest_body(j)
            try:
                r = requests.post(f"{server.rest}/v2/models/{MODEL}/infer", data=body, timeout=60,
                                  headers={"Authorization": f"Bearer {server.token}",
                                           "Inference-Header-Content-Length": str(n)})
                if r.status_code != 200:
                    problem = f"REST input {i}: {r.status_code} {r.text[:200]}"
                else:
                    out = {o["name"]: o["data"] for o in r.json()["outputs"]}
                    problem = self.compare(i, out["classes"], out["probabilities"], f"REST input {i}")
            except Exception as exc:  # noqa: BLE001
                problem = f"REST input {i}: {type(exc).__name__}: {str(exc)[:200]}"
            if problem:
                problems.append(problem)
        return problems


def checked_run(server: ServeProcess, ref: Reference, concurrency: int, warm, run) -> dict:
    """``warm()``, then ``run()`` between two reads of the engine's own counters, with answers
    checked against the in-process forward before and after (the calls of the check after the
    run are taken off the counter). ``verified`` says that no call
    failed (the tool's errors, the counter's failed outcomes, the checks) and that the engine
    answered between the tool's completed count and that plus the clients still in flight
    when the tool stopped."""
    warm()
    problems = ref.check(server)  # queued behind whatever the warm-up left in flight
    time.sleep(0.2)  # the engine counts a batch just after answering it
    before = loadgen.scrape(server.exporter)
    r = run()
    problems += ref.check(server)  # behind the run's last requests: once answered, those are done
    time.sleep(0.2)
    after = loadgen.scrape(server.exporter)
    checked = 2 * len(ref.jpegs)  # the calls of one check (gRPC and REST), counted in the window
    ok = loadgen.requests_ok(after, MODEL, "native") - loadgen.requests_ok(before, MODEL, "native") - checked
    bad = loadgen.requests_not_ok(after, MODEL, "native") - loadgen.requests_not_ok(before, MODEL, "native")
    r.update({"counter_ok": int(ok), "counter_not_ok": int(bad), "check_problems": problems[:5],
              "batch": loadgen.batch_stats(before, after, MODEL, "native", singles=checked),
              "engine_ms": loadgen.stage_means_ms(before, after, MODEL, "native")})
    why = []
    if r["errors"]:
        why.append(f"{r['errors']} errors by the tool")
    if bad:
        why.append(f"{int(bad)} failed outcomes in the engine's counter")
    if not r["n"] <= ok <= r["n"] + concurrency:
        why.append(f"the engine answered {int(ok)} where the tool completed {r['n']}")
    if problems:
        why.append(f"{len(problems)} checked calls wrong: {problems[0]}")
    r["verified"] = not why
    r["why_not_verified"] = "; ".join(why)
    if why:
        log.warning("run not verified: %s", r["why_not_verified"])
    return r


def wrk_scripts(work: Path, tag: str, token: str, jpegs: list[bytes], model: str) -> dict[str, Path]:
    """The wrk scripts of one server: ``predictions`` (raw JPEG to /predictions/<m>) and ``oip``
    (OIP v2 binary extension to /v2/models/<m>/infer), the API token on every request."""
    auth = {"Authorization": f"Bearer {token}"}
    oip_bodies = []
    for j in jpegs:
        body, n = oip_rest_body(j)
        oip_bodies.append((body, {"Inference-Header-Content-Length": str(n),
                                  "Content-Type": "application/octet-stream"}))
    return {
        "predictions": loadgen.write_wrk_script(work / f"wrk-{tag}-predictions", f"/predictions/{model}",
                                                [(j, {"Content-Type": "image/jpeg"}) for j in jpegs], auth),
        "oip": loadgen.write_wrk_script(work / f"wrk-{tag}-oip", f"/v2/models/{model}/infer", oip_bodies, auth),
    }


def wrk_phase(base_url: str, script: Path, quick: bool, levels=(1, 8)) -> dict:
    """wrk at each concurrency (TorchServe paths: /predictions through the public port)."""
    seconds, warm = tool_seconds(quick)
    out = {}
    for c in levels:
        try:
            loadgen.run_wrk(base_url, script, c, warm)
            out[f"c{c}"] = loadgen.run_wrk(base_url, script, c, seconds)
        except Exception as exc:  # noqa: BLE001 - a row not measured says why
            out[f"c{c}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log.info("wrk c=%d %s: %s", c, script.parent.name, out[f"c{c}"])
    return out


def native_engine(work: Path, bundle: ModelBundle, jpegs: list[bytes], runtime: dict, checks: dict, quick: bool,
                  cache_dir: Path) -> dict:
    """(d): ``modelctl serve --no-control --engine native`` serving the same ResNet-18 archive
    as (b) (same serving options), as its own process. wrk over REST (OIP binary extension, the
    main row; TorchServe's /predictions), h2load over gRPC (OIP ModelInfer), each at c=1, 8, 32
    and each run checked (:func:`checked_run`); then the Python client of (b) and (c)."""
    shutil.rmtree(work / "store-native-w1", ignore_errors=True)
    store = ModelStore(work / "store-native-w1")
    precision = runtime["precision"]
    options = ServingOptions(batch_size=BATCH, max_batch_delay_ms=MAX_BATCH_DELAY_MS, precision=precision,
                             channels_last=runtime["channels_last"], compile=runtime["compile"],
                             precision_check=checks.get(precision, {}).get("record") if precision != "fp32" else None)
    store.write(MODEL, bundle, version=1, options=options)
    server = ServeProcess(work, store.root, "native", "native-w1", env={"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)})
    ref = Reference(bundle, runtime, jpegs[:3])
    seconds, warm = tool_seconds(quick)
    out: dict = {"runs": {"oip": {}, "predictions": {}, "grpc": {}}}
    try:
        out["load_s"] = server.start([MODEL])
        log.info("(d) native engine READY in %.1f s", out["load_s"])
        out["initial_check"] = ref.check(server)
        scripts = wrk_scripts(work, "native", server.token, jpegs, MODEL)
        frame = work / "grpc-frame.bin"
        frame.write_bytes(loadgen.grpc_frame(oip_grpc_request(jpegs[0]).SerializeToString()))
        grpc_url = f"http://{server.grpc_target}/inference.GRPCInferenceService/ModelInfer"
        for c in NATIVE_LEVELS:
            for kind in ("oip", "predictions", "grpc"):
                if kind == "predictions" and c == 32:
                    continue
                if kind == "grpc":
                    def warm_fn(c=c):
                        loadgen.run_h2load(grpc_url, frame, server.token, c, warm)

                    def run_fn(c=c):
                        return loadgen.run_h2load(grpc_url, frame, server.token, c, seconds)
                else:
                    def warm_fn(c=c, kind=kind):
                        loadgen.run_wrk(server.rest, scripts[kind], c, warm)

                    def run_fn(c=c, kind=kind):
                        return loadgen.run_wrk(server.rest, scripts[kind], c, seconds)
                try:
                    r = checked_run(server, ref, c, warm_fn, run_fn)
                except Exception as exc:  # noqa: BLE001 - a row not measured says why
                    r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                out["runs"][kind][f"c{c}"] = r
                log.info("(d) %s c=%d: %s", kind, c, {k: v for k, v in r.items() if k != "raw"})

        def check(answer):
            assert answer["model"] == MODEL and len(answer["predictions"][0]["top_k"]) == 5

        url = f"{server.rest}/predictions/{MODEL}"
        out["python"] = {
            "c1": rest_load(url, server.token, jpegs, 1, 40 if quick else 150, 10 if quick else 25, check),
            "c8": rest_load(url, server.token, jpegs, 8, 80 if quick else 320, 10 if quick else 30, check)}
        log.info("(d) Python client, /predictions: %s", out["python"])
    finally:
        server.stop()
    return out


def native_new_version_child(work: str, cache_dir: str, v1: ModelBundle, v2: ModelBundle, options: dict,
                             jpeg: bytes) -> dict:
    """In a fresh process (spawned: its main thread never runs torch, as in ``modelctl serve``):
    the native engine in process over a store holding (b)'s version 1, then
    :func:`new_version_latency` with the bundle ``v2``, as for (b)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from service.serving.native.engine import NativeServing

    work = Path(work)
    shutil.rmtree(work / "store-native-nv-w1", ignore_errors=True)
    store = ModelStore(work / "store-native-nv-w1")
    store.write(MODEL, v1, version=1, options=ServingOptions(**options))
    settings = serve_settings(store.root, work / "state-native-nv-w1", 1, engine="native")
    serving = NativeServing(settings)
    t = time.perf_counter()
    report = serving.start()
    load_s = time.perf_counter() - t
    try:
        if not all(r.ready for r in report):
            return {"error": f"version 1 did not load: {report}"}
        return {"load_s": load_s, **new_version_latency(serving, settings, store, jpeg, bundle=v2)}
    finally:
        serving.stop()


def native_new_version(work: Path, cache_dir: Path, bundle: ModelBundle, runtime: dict, checks: dict,
                       jpeg: bytes) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    precision = runtime["precision"]
    options = {"batch_size": BATCH, "max_batch_delay_ms": MAX_BATCH_DELAY_MS, "precision": precision,
               "channels_last": runtime["channels_last"], "compile": runtime["compile"],
               "precision_check": checks.get(precision, {}).get("record") if precision != "fp32" else None}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(native_new_version_child, str(work), str(cache_dir), bundle, resnet18_bundle(seed=1),
                           options, jpeg).result(timeout=900)


def replica_footprint(work: Path, jpegs: list[bytes], rounds: int, cache_dir: Path) -> dict:
    """The three demo archives (service/demo.py: ResNet-18, a CNN, an LSTM; default serving
    options) served by a replica of each engine, ``modelctl serve --no-control``, started
    ``rounds`` times in turn: seconds from the process's start to every model READY, then one
    answer from each model, then the RSS (and PSS) summed over every process of the replica
    (TorchServe: the ``modelctl serve`` process with the gRPC gateway, TorchServe's launcher,
    its Java frontend, a worker per model, nginx), the median of 5 readings over 2 s."""
    from service.demo import DEMO_SPECS, _inputs, digit_png, digits_samples, ensure_archives

    src = work / "store-demo-w1"
    shutil.rmtree(src, ignore_errors=True)
    ensure_archives(ModelStore(src))
    models = sorted(DEMO_SPECS)
    images, _ = digits_samples(1)
    bodies = {"demo-resnet18": (jpegs[0], "image/jpeg"), "demo-cnn": (digit_png(images[0]), "image/png"),
              "demo-lstm": (_inputs("demo-lstm", images)["body"], "application/json")}
    out: dict = {"models": models, "rounds": []}
    for i in range(rounds):
        for engine in ("torchserve", "native"):
            store = work / f"store-demo-{engine}-r{i}-w1"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(src, store)
            server = ServeProcess(work, store, engine, f"demo-{engine}-r{i}-w1",
                                  env={"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)})
            try:
                ready_s = server.start(models)
                for m in models:
                    body, ctype = bodies[m]
                    r = requests.post(f"{server.rest}/predictions/{m}", data=body, timeout=60,
                                      headers={"Authorization": f"Bearer {server.token}", "Content-Type": ctype})
                    if r.status_code != 200:
                        raise RuntimeError(f"{engine}: {m} answered {r.status_code} {r.text[:200]}")
                time.sleep(2.0)
                samples = []
                for _ in range(5):
                    samples.append(server.tree())
                    time.sleep(0.5)
                samples.sort(key=lambda s: s["rss"])
                mid = samples[len(samples) // 2]
                row = {"engine": engine, "round": i, "ready_s": ready_s, "rss": mid["rss"], "pss": mid["pss"],
                       "processes": [{k: p[k] for k in ("name", "cmd", "rss")} for p in mid["processes"]]}
            except Exception as exc:  # noqa: BLE001 - a row not measured says why
                row = {"engine": engine, "round": i, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            finally:
                server.stop()
            out["rounds"].append(row)
            log.info("replica %s round %d: %s", engine, i, {k: v for k, v in row.items() if k != "processes"})
    for engine in ("torchserve", "native"):
        rows = [r for r in out["rounds"] if r["engine"] == engine and "rss" in r]
        if rows:
            out[engine] = {"ready_s": float(np.median([r["ready_s"] for r in rows])),
                           "rss": float(np.median([r["rss"] for r in rows])),
                           "pss": float(np.median([r["pss"] for r in rows]))}
    return out


# ---- the trainer ----------------------------------------------------------------------------
def trainer_vs_minimal(quick: bool) -> dict:
    """train_one_epoch of service.training against a minimal loop: same model (ResNet-18,
    10 classes, 3x32x32), same data (Fashion-MNIST, as the trainer's dataset prepares it), same
    batches (one DataLoader, same seed), same optimiser (AdamW)."""
    from service.training.datasets import ImageDataset, LoadContext, image_collate, load_fashion_mnist
    from service.training.recipe import train_one_epoch

    n = 1024 if quick else 3072
    raw = load_fashion_mnist(LoadContext(None, "multiclass"))
    spec = ModelSpec.from_dict({"family": "resnet", "num_classes": 10, "config": {"arch": "resnet18"},
                                "input": {"type": "image", "channels": 3, "size": 32, "resize": None}})
    data = ImageDataset(raw.x[:n], torch.as_tensor(raw.y[:n]), 3, image_eval_transform(spec.input))
    # Materialise the batches once: both loops then time the training step, not the loader.
    g = torch.Generator().manual_seed(0)
    loader = list(torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=g,
                                              collate_fn=image_collate))

    def fresh():
        torch.manual_seed(0)
        model = build_model(spec).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def minimal(model, opt):
        criterion = torch.nn.CrossEntropyLoss()
        start = time.perf_counter()
        for (x,), y in loader:
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    def trainer(model, opt):
        result = train_one_epoch(model, torch.nn.CrossEntropyLoss(), opt, loader, torch.device("cpu"),
                                 autocast=contextlib.nullcontext)
        return result["seconds"]

    # Warm up both once on a few batches, then alternate: minimal, trainer, minimal, trainer.
    runs = {"minimal": [], "trainer": []}
    for name, fn in (("minimal", minimal), ("trainer", trainer)) * 2:
        model, opt = fresh()
        runs[name].append(fn(model, opt))
    best = {k: min(v) for k, v in runs.items()}
    return {"samples": n, "minimal_samples_s": n / best["minimal"], "trainer_samples_s": n / best["trainer"],
            "ratio": best["minimal"] / best["trainer"], "seconds": runs}


# ---- the report ---------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, native "
            f"{'/'.join(native_precisions('cpu'))}; torch {torch.__version__}, Python {platform.python_version()}")


def _row(label: str, r: dict | None) -> str:
    if not r or "c1" not in r:
        return f"| {label} | n/a | | | n/a | | |"
    c1, c8 = r["c1"], r["c8"]
    return (f"| {label} | {c1['img_s']:.1f} | {c1['p50_ms']:.1f} | {c1['p99_ms']:.1f} | "
            f"{c8['img_s']:.1f} | {c8['p50_ms']:.1f} | {c8['p99_ms']:.1f} |")


def render(res: dict) -> str:
    a, b, c = res["a"], res.get("b"), res.get("c")
    rt = a["fast"]["runtime"]
    cfg = f"{rt['precision']}{', channels_last' if rt['channels_last'] else ''}{', compiled' if rt['compile'] else ''}"
    run = ("A `--quick` smoke run (few requests: not figures to judge by)" if res.get("quick")
           else "One run of `make bench`")
    lines = [START, "## Serving (`make bench`)", "",
             f"{run} ({res['seconds'] / 60:.1f} min), {res['date']}: `{res.get('command', '')}`. "
             f"Machine: {res['machine']}. "
             f"Load average before the run: {res['load_before']}, after: {res.get('load_after', '?')}. The load "
             "generator shares the 2 cores with the server (and with anything else running on the machine).", "",
             *busy_lines(res),
             f"ResNet-18 (1000 classes, seeded random weights), 224x224 crops of 375x500 JPEGs "
             f"({res['inputs']} inputs, the same bytes on every path). Concurrency 1 / 8: in process, batch 1 / 8; "
             f"over REST, 1 / 8 client threads with one JPEG per request, TorchServe batching up to {BATCH} "
             f"with a {MAX_BATCH_DELAY_MS} ms batch delay. Latency per image in process is its batch's latency.",
             "", "| path | c=1 img/s | c=1 p50 ms | c=1 p99 ms | c=8 img/s | c=8 p50 ms | c=8 p99 ms |",
             "|---|---|---|---|---|---|---|",
             _row("(a) in-process plain fp32 eager loop", a["plain"]),
             _row(f"(a) in-process, our predictor, fastest passing: {cfg}", a["fast"]),
             _row(f"(b) our handler in TorchServe, REST ({cfg}), 1 worker x 2 threads", b),
             _row(f"(b) our handler in TorchServe, REST ({cfg}), 2 workers x 1 thread", res.get("b2")),
             _row("(c) stock `image_classifier` in TorchServe, REST (fp32 eager), 1 worker x 2 threads", c),
             _row("(c) stock `image_classifier` in TorchServe, REST (fp32 eager), 2 workers x 1 thread",
                  res.get("c2")), ""]
    for key in ("c", "c2"):
        if res.get(key) and "error" in res[key]:
            lines += [f"({key}) did not run: {res[key]['error']}", ""]
    lines += proxy_cost_lines(b)
    lines += native_lines(res)
    lines += ["Candidates of (a), screened at batch 8 (compile: only the best eager one, for the batch sizes the worker compiles: 1, 2, 4, 8):", "",
              "| precision | channels_last | compile | img/s at batch 8 | compile s |", "|---|---|---|---|---|"]
    for cand in a["candidates"]:
        lines.append(f"| {cand['precision']} | {cand['channels_last']} | {cand['compile']} | "
                     f"{cand['img_s_b8']:.1f} | {cand['compile_s']:.0f} |")
    lines += ["", "Agreement checks (top-1 against fp32, held-out JPEG crops, recorded in the archive's lineage):", "",
              "| precision | inputs | agreement | passed |", "|---|---|---|---|"]
    for p, chk in res["checks"].items():
        lines.append(f"| {p} | {chk['samples']} | {chk['agreement']:.2%} | {chk['passed']} |")
    t = res["trainer"]
    nv = (b or {}).get("new_version") or {}
    lines += ["", "### Targets", "", "| target | measured | |", "|---|---|---|"]
    for name, value, ok in targets(res):
        lines.append(f"| {name} | {value} | {'-' if ok is None else 'PASS' if ok else '**MISS**'} |")
    lines += ["", f"Trainer: {t['trainer_samples_s']:.0f} samples/s with train_one_epoch, "
              f"{t['minimal_samples_s']:.0f} with a minimal loop (ResNet-18 at 3x32x32, Fashion-MNIST, "
              f"{t['samples']} samples, batch 64, AdamW; best of two epochs each)." if t.get("samples") else
              "Trainer: not measured in this run (`--skip trainer`)."]
    job = (b or {}).get("job") or {}
    if job:
        lines += ["", f"Fine-tune job through the control API (CNN on builtin:digits, deploy policy `deploy`): "
                  f"created to SUCCEEDED {job['create_to_succeeded_s']:.1f} s (trainer subprocess, 2 epochs, "
                  f"archive, deployment with READY workers); SUCCEEDED to the first answer by version "
                  f"{job['version']}: {job['succeeded_to_first_answer_s'] * 1000:.0f} ms "
                  f"({job['requests']} request(s))."]
    if nv:
        lines += ["", f"ResNet-18 new version without the control API: archive written in {nv['archive_write_s']:.2f} s; then registered with a READY "
                  f"worker after {nv['register_ready_s']:.2f} s, default after {nv['set_default_s']:.2f} s more, "
                  f"first answer by it {nv['first_answer_s']:.2f} s later: "
                  f"{nv['written_to_first_answer_s']:.2f} s from archive to first answer."]
    loads = [f"{name} {res[k]['load_s']:.0f} s" for k, name in
             (("b", "ours 1 worker"), ("b2", "ours 2 workers"), ("c", "stock 1 worker"), ("c2", "stock 2 workers"))
             if res.get(k) and "load_s" in res[k]]
    if loads:
        lines += ["", f"TorchServe start to every worker READY (compilation from the on-disk cache included): "
                  f"{', '.join(loads)}."]
    lines.append(END)
    return "\n".join(lines)


def _cell(r: dict | None) -> list[str]:
    """img/s, p50, p99 of one run; a run whose answers were not all verified is marked †."""
    if not r:
        return ["", "", ""]
    if "img_s" not in r:
        return ["n/a", "", ""]
    mark = "" if r.get("verified", True) else " †"
    return [f"{r['img_s']:.1f}{mark}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}"]


def _row_levels(label: str, tool: str, r: dict | None, levels=("c1", "c8", "c32")) -> str:
    cells = [label, tool]
    for lv in levels:
        cells += _cell((r or {}).get(lv))
    return "| " + " | ".join(cells) + " |"


def _layout_best(res: dict, keys: tuple[str, ...], level: str, sub: str = "wrk") -> tuple[str | None, dict | None]:
    """Of the TorchServe layouts ``keys``, the one with the most img/s at ``level`` under ``sub``."""
    found = [(k, res[k][sub][level]) for k in keys
             if res.get(k) and isinstance(res[k].get(sub), dict) and "img_s" in res[k][sub].get(level, {})]
    return max(found, key=lambda kv: kv[1]["img_s"]) if found else (None, None)


LAYOUT = {"b": "1 worker", "b2": "2 workers", "c": "1 worker", "c2": "2 workers"}


def native_lines(res: dict) -> list[str]:
    d = res.get("d")
    if not d:
        return []
    if "runs" not in d:
        return ["### Native engine (d)", "", f"(d) did not run: {d.get('error', 'no runs')}", "",
                res.get("gpu_note", "GPU: not measured."), ""]
    a = res["a"]["fast"]
    runs = d.get("runs", {})
    seconds, _ = tool_seconds(res.get("quick", False))
    lines = ["### Native engine (d) and the same load tools on every path", "",
             "(d) is `modelctl serve --no-control --engine native` as its own process, serving the same "
             "ResNet-18 archive as (b) (same serving options, batch up to 8), on the same 2 cores. Load from "
             f"tools outside Python, closed loop (each client sends its next request when its answer is in), "
             f"{seconds:.0f} s measured after a warm-up run: `wrk` (1 thread, c keep-alive connections) over "
             "REST, `h2load` (1 thread, c HTTP/2 connections, one stream each) over gRPC. OIP REST posts the "
             "binary tensor extension (`images` BYTES [1], `Inference-Header-Content-Length`), /predictions the "
             "raw JPEG; both cycle through the 64 JPEGs. h2load posts one pre-serialised gRPC frame "
             "(`ModelInferRequest` with `raw_input_contents`: one of the JPEGs). Every request carries "
             "`Authorization: Bearer <API token>`. (b) and (c) rows with wrk go through TorchServe's public "
             "port (nginx checks the token) to /predictions. In-process (a) runs batch 1 for c=1 and batch 8 "
             "for c=8; c=32 is compared with batch 8 too (the archive's largest batch).", "",
             "| path | tool | c=1 img/s | c=1 p50 ms | c=1 p99 ms | c=8 img/s | c=8 p50 ms | c=8 p99 ms | "
             "c=32 img/s | c=32 p50 ms | c=32 p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|",
             _row_levels("(a) in process, our predictor, fastest passing", "batch 1 / 8", a),
             _row_levels("(d) native, OIP REST (binary extension)", "wrk", runs.get("oip")),
             _row_levels("(d) native, OIP gRPC ModelInfer", "h2load", runs.get("grpc")),
             _row_levels("(d) native, /predictions (raw JPEG)", "wrk", runs.get("predictions")),
             _row_levels("(d) native, /predictions (raw JPEG)", "Python client (8 threads at c=8)", d.get("python"))]
    for key, what in (("b", "(b) ours in TorchServe"), ("b2", "(b) ours in TorchServe"),
                      ("c", "(c) stock in TorchServe"), ("c2", "(c) stock in TorchServe")):
        if res.get(key) and isinstance(res[key].get("wrk"), dict):
            lines.append(_row_levels(f"{what}, {LAYOUT[key]}, /predictions via nginx", "wrk", res[key]["wrk"]))
    lines += ["", "† a run whose answers were not all verified (see below).", ""]
    lines += ["Each (d) run is checked from the server's side: a few real calls over gRPC (the generated stub) "
              "and OIP REST before and after it, each compared with the in-process forward (top-5 probabilities "
              "within 2%); the engine's own `modelctl_requests_total{engine=\"native\",outcome=\"ok\"}` must grow "
              "by what the tool completed (up to c more: requests in flight when the tool stopped), with no other "
              "outcome; `modelctl_batch_size` gives the batches.", "",
              "| run | completed (tool) | engine ok | engine not ok | errors (tool) | checks | mean batch | "
              "batches by size (≤ bucket: count) | engine ms per request: predict (decode, forward) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("oip", "grpc", "predictions"):
        for lv, r in runs.get(kind, {}).items():
            if "error" in r:
                lines.append(f"| {kind} {lv} | not run: {r['error'][:150]} | | | | | | | |")
                continue
            bt = r.get("batch", {})
            buckets = ", ".join(f"≤{float(k):g}: {n}" for k, n in bt.get("buckets", {}).items())
            checks = "ok" if not r.get("check_problems") else f"**{len(r['check_problems'])} wrong**"
            em = r.get("engine_ms", {})
            stages = ", ".join(f"{em[k]:.1f}" for k in ("preprocess", "inference") if k in em)
            engine = f"{em['request']:.1f} ({stages})" if "request" in em else ""
            lines.append(f"| {kind} {lv} | {r['n']} | {r['counter_ok']} | {r['counter_not_ok']} | {r['errors']} | "
                         f"{checks} | {bt.get('mean', 0):.2f} | {buckets} | {engine} |")
    lines.append("")
    fp = res.get("replica") or {}
    if fp.get("error"):
        lines += [f"Replica memory and start: not measured ({fp['error'][:300]}).", ""]
    if fp.get("rounds"):
        lines += [f"Replica of the three demo archives ({', '.join(fp['models'])}: service/demo.py, default "
                  "serving options): `modelctl serve --no-control` of each engine, started in turn. Start: from "
                  "the process's start to every model READY. Memory: after one answer from each model, RSS "
                  "summed over the process and every descendant (TorchServe path: the `modelctl serve` "
                  "process with the gRPC gateway, TorchServe's launcher, the Java frontend with its fixed "
                  "512 MiB heap, one worker per model, nginx), median of 5 readings; PSS beside it (shared "
                  "pages split between the processes that share them).", "",
                  "| engine | round | start → every model READY s | RSS MiB | PSS MiB | processes |",
                  "|---|---|---|---|---|---|"]
        for r in fp["rounds"]:
            if "error" in r:
                lines.append(f"| {r['engine']} | {r['round']} | not run: {r['error'][:150]} | | | |")
                continue
            procs = ", ".join(f"{_role(p)} {p['rss'] / 2**20:.0f}" for p in r["processes"])
            lines.append(f"| {r['engine']} | {r['round']} | {r['ready_s']:.1f} | {r['rss'] / 2**20:.0f} | "
                         f"{r['pss'] / 2**20:.0f} | {procs} |")
        lines.append("")
    nv = res.get("native_new_version") or {}
    if "written_to_first_answer_s" in nv:
        lines += [f"ResNet-18 new version on the native engine (in a fresh process, the same calls as for (b) on "
                  f"its management interface): archive written in {nv['archive_write_s']:.2f} s; registered and "
                  f"READY after {nv['register_ready_s']:.2f} s, default after {nv['set_default_s']:.2f} s more, "
                  f"first answer by it {nv['first_answer_s']:.2f} s later: {nv['written_to_first_answer_s']:.2f} s "
                  "from archive to first answer.", ""]
    elif nv.get("error"):
        lines += [f"ResNet-18 new version on the native engine: not measured ({nv['error'][:200]}).", ""]
    lines += [res.get("gpu_note", "GPU: not measured."), ""]
    return lines


def _role(p: dict) -> str:
    name, cmd = p["name"], p["cmd"]
    if name == "java":
        return "frontend"
    if "model_service_worker" in cmd:
        return "worker"
    if name.startswith("nginx"):
        return "nginx"
    if "modelctl" in cmd and "serve" in cmd:
        return "modelctl serve"
    if "torchserve" in cmd:
        return "launcher"
    return name


def native_targets(res: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 11's targets for the native engine (d), each with what was measured."""
    d = res.get("d")
    if not d:
        return []
    a = res["a"]["fast"]
    runs = d.get("runs", {})
    out: list[tuple[str, str, bool | None]] = []

    def get(kind, lv):
        r = runs.get(kind, {}).get(lv)
        return r if r and "img_s" in r else None

    def unverified(*rs):
        return "" if all(r.get("verified", True) for r in rs) else " (run not verified)"

    for kind, name in (("oip", "REST (OIP, wrk)"), ("grpc", "gRPC (h2load)")):
        r = get(kind, "c1")
        if r:
            added = r["p50_ms"] - a["c1"]["p50_ms"]
            out.append((f"(d) c=1 p50 added over (a) batch 1 ≤ 2 ms, {name}",
                        f"{added:+.1f} ms ({r['p50_ms']:.1f} vs {a['c1']['p50_ms']:.1f}){unverified(r)}",
                        added <= 2.0 and r.get("verified", True)))
    for kind, name, bound in (("grpc", "gRPC (h2load)", 0.9), ("oip", "REST (OIP, wrk)", 0.85)):
        r = get(kind, "c8")
        if r:
            ratio = r["img_s"] / a["c8"]["img_s"]
            out.append((f"(d) c=8 ≥ {bound} × (a) batch 8, {name}",
                        f"{ratio:.3f}× ({r['img_s']:.1f} vs {a['c8']['img_s']:.1f} img/s){unverified(r)}",
                        ratio >= bound and r.get("verified", True)))
    for kind, name in (("oip", "REST (OIP, wrk)"), ("grpc", "gRPC (h2load)")):
        r = get(kind, "c32")
        if r:
            ratio = r["img_s"] / a["c8"]["img_s"]
            out.append((f"(d) c=32 ≥ 0.95 × (a) batch 8, {name}",
                        f"{ratio:.3f}× ({r['img_s']:.1f} vs {a['c8']['img_s']:.1f} img/s){unverified(r)}",
                        ratio >= 0.95 and r.get("verified", True)))
            out.append((f"(d) c=32 p99 ≤ 250 ms, {name}", f"{r['p99_ms']:.0f} ms{unverified(r)}",
                        r["p99_ms"] <= 250 and r.get("verified", True)))
    for lv in ("c8", "c1"):
        r = get("oip", lv)
        ck, cr = _layout_best(res, ("c", "c2"), lv)
        if r and cr:
            t = r["img_s"] / cr["img_s"]
            p = r["p99_ms"] / cr["p99_ms"]
            level = lv[1:]
            out.append((f"(d) ≥ 3 × (c) throughput at c={level} (wrk both; OIP REST vs stock /predictions, "
                        f"stock {LAYOUT[ck]})", f"{t:.2f}× ({r['img_s']:.1f} vs {cr['img_s']:.1f} img/s)"
                        f"{unverified(r)}", t >= 3.0 and r.get("verified", True)))
            out.append((f"(d) p99 ≤ 0.4 × (c) p99 at c={level} (same runs)",
                        f"{p:.2f}× ({r['p99_ms']:.0f} vs {cr['p99_ms']:.0f} ms){unverified(r)}",
                        p <= 0.4 and r.get("verified", True)))
    fp = res.get("replica") or {}
    if fp.get("native") and fp.get("torchserve"):
        n, t = fp["native"], fp["torchserve"]
        r = n["rss"] / t["rss"]
        out.append(("(d) replica RSS ≤ 0.6 × the TorchServe path's (3 demo archives)",
                    f"{r:.2f}× ({n['rss'] / 2**20:.0f} vs {t['rss'] / 2**20:.0f} MiB)", r <= 0.6))
        s = n["ready_s"] / t["ready_s"]
        out.append(("(d) start to every model READY ≤ 0.5 × TorchServe's (same archives)",
                    f"{s:.2f}× ({n['ready_s']:.1f} vs {t['ready_s']:.1f} s)", s <= 0.5))
    nv = res.get("native_new_version") or {}
    if "written_to_first_answer_s" in nv:
        s = nv["written_to_first_answer_s"]
        ts = ((res.get("b") or {}).get("new_version") or {}).get("written_to_first_answer_s")
        beside = f" (TorchServe path: {ts:.2f} s)" if ts is not None else ""
        out.append(("(d) new ResNet-18 version: archive written → first answer ≤ 1 s", f"{s:.2f} s{beside}", s <= 1.0))
    py, oip1 = d.get("python", {}).get("c1"), get("oip", "c1")
    if py and "p50_ms" in py:
        out.append(("(not a target) (d) Python client /predictions c=1 p50 added over (a) batch 1",
                    f"{py['p50_ms'] - a['c1']['p50_ms']:+.1f} ms", None))
    if oip1 and res.get("gpu_note"):
        out.append(("(not a target) GPU", "not measured (no GPU on this machine)", None))
    return out


def proxy_cost_lines(b: dict | None) -> list[str]:
    """(b) through nginx (the public port, API token checked) against TorchServe's loopback
    port, same model and TorchServe, measured one after the other."""
    direct = (b or {}).get("direct")
    if not direct or "c1" not in b or "c1" not in direct:
        return []
    d1 = b["c1"]["p50_ms"] - direct["c1"]["p50_ms"]
    d8 = b["c8"]["p50_ms"] - direct["c8"]["p50_ms"]
    r8 = b["c8"]["img_s"] / direct["c8"]["img_s"]
    return ["### What the REST proxy costs", "",
            "(b) with 1 worker, through the public port (nginx checks the API token, then forwards to "
            "TorchServe with its inference key) and, right after, directly to TorchServe's loopback port "
            "with its key: the same model, the same TorchServe, the same requests.", "",
            "| path | c=1 img/s | c=1 p50 ms | c=1 p99 ms | c=8 img/s | c=8 p50 ms | c=8 p99 ms |",
            "|---|---|---|---|---|---|---|",
            _row("through nginx (public port, API token)", b),
            _row("directly to TorchServe (loopback, its key)", direct), "",
            f"Proxy cost: p50 {d1:+.2f} ms at c=1 and {d8:+.2f} ms at c=8; throughput at c=8 "
            f"{r8:.3f}× of direct.", ""]


def _best(res: dict, keys: tuple[str, ...]) -> tuple[str, dict] | tuple[None, None]:
    """The layout of ``keys`` with the most img/s at c=8."""
    found = [(k, res[k]) for k in keys if res.get(k) and "c8" in res[k]]
    return max(found, key=lambda kv: kv[1]["c8"]["img_s"]) if found else (None, None)


def targets(res: dict) -> list[tuple[str, str, bool | None]]:
    a, b = res["a"], res.get("b") or {}
    bk, bb = _best(res, ("b", "b2"))
    ck, cb = _best(res, ("c", "c2"))
    layout = {"b": "1 worker", "b2": "2 workers", "c": "1 worker", "c2": "2 workers"}
    out = []
    if bb:
        r = bb["c8"]["img_s"] / a["fast"]["c8"]["img_s"]
        out.append((f"(b) ≥ 0.9 × fastest (a) at c=8 (ours, {layout[bk]})", f"{r:.2f}×", r >= 0.9))
    if "c1" in b:
        d = b["c1"]["p50_ms"] - a["fast"]["c1"]["p50_ms"]
        out.append(("(b) latency overhead over (a) at c=1 ≤ 3 ms (p50, 1 worker)", f"{d:+.1f} ms", d <= 3.0))
    if bb and cb:
        r = bb["c8"]["img_s"] / cb["c8"]["img_s"]
        out.append((f"(b)/(c) throughput ≥ 2.5 at c=8 (each at its best: ours {layout[bk]}, stock {layout[ck]})",
                    f"{r:.2f}×", r >= 2.5))
        p = bb["c8"]["p99_ms"] / cb["c8"]["p99_ms"]
        out.append(("(b) p99 ≤ 0.4 × (c) p99 at c=8 (same layouts)", f"{p:.2f}×", p <= 0.4))
    if "c1" in b and res.get("c") and "c1" in res["c"]:
        p1 = b["c1"]["p99_ms"] / res["c"]["c1"]["p99_ms"]
        out.append(("(b) p99 ≤ 0.4 × (c) p99 at c=1 (1 worker each)", f"{p1:.2f}×", p1 <= 0.4))
    if res["trainer"].get("samples"):
        t = res["trainer"]["ratio"]
        out.append(("trainer ≥ 0.95 × minimal loop", f"{t:.3f}×", t >= 0.95))
    job = b.get("job")
    if job:
        s = job["succeeded_to_first_answer_s"]
        out.append(("new version serving ≤ 5 s after the job's SUCCEEDED", f"{s:.2f} s", s <= 5.0))
    direct = b.get("direct")
    if direct and "c1" in b and "c1" in direct:
        d = b["c1"]["p50_ms"] - direct["c1"]["p50_ms"]
        out.append(("(not a target) REST proxy (nginx, token check) p50 cost at c=1", f"{d:+.2f} ms", None))
    nv = b.get("new_version")
    if nv:
        s = nv["written_to_first_answer_s"]
        out.append(("(not a target) ResNet-18 archive written → first answer (TorchServe path)", f"{s:.2f} s", None))
    return out + native_targets(res)


def busy_lines(res: dict) -> list[str]:
    """How much of the machine other work took during each phase (a lower bound: processes that
    lived less than a 2 s sample are missed)."""
    phases = res.get("others_cpu") or {}
    if not phases:
        return []
    cores = os.cpu_count() or 1
    parts = [f"{name} {p['others_share']:.0%}" for name, p in phases.items() if p["wall_s"] >= 1]
    total_wall = sum(p["wall_s"] for p in phases.values())
    total = sum(p["others_cpu_s"] for p in phases.values()) / (total_wall * cores) if total_wall else 0.0
    quiet = total < 0.05
    return [f"Other work on the machine during the run (CPU time of every process outside the benchmark's "
            f"own tree, sampled every 2 s, as a share of the {cores} cores): {total:.0%} over the run; by "
            f"phase: {', '.join(parts)}. "
            + ("The machine was essentially the benchmark's own." if quiet else
               "**The machine was busy with other work: every figure below is lower (throughput) or higher "
               "(latency) than on an idle machine, by an amount that differs between phases; ratios between "
               "phases measured at different times carry that difference.**"), ""]


def _guarded(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": why}``: a phase that fails leaves the others' figures."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.exception("%s failed", fn.__name__)
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def gpu_note() -> str:
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"GPU present ({names}) but not measured: every figure here is the CPU's."
    return ("GPU: not measured. This machine has no GPU (torch.cuda.is_available() is False) and none was "
            "lent to this run; every figure is the CPU's.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".modelctl" / "bench")
    parser.add_argument("--stock-pythonpath", default=None,
                        help="directory holding captum (and matplotlib) for the stock handler only")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, not for the table)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["trainer", "b", "c", "compile", "native", "replica", "new-version"],
                        help="native: the native engine's runs (d); replica: the memory and start of a "
                             "replica of each engine; new-version: the native engine's new-version latency")
    parser.add_argument("--held-out", type=int, default=400, help="inputs of the agreement check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    work = args.work_dir
    cache_dir = work / "inductor-cache"  # kept across runs, like a state dir's
    for sub in work.glob("st*-*-w*"):  # stores and states of an earlier run
        shutil.rmtree(sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                 "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "quick": args.quick,
                 "command": "python -m benchmarks.bench_serving " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "gpu_note": gpu_note()}
    others = loadgen.OthersCpu().start()
    jpegs = photo_jpegs(32 if args.quick else 64, seed=0)
    held_out = photo_jpegs(args.held_out, seed=1)
    res["inputs"] = len(jpegs)
    bundle = resnet18_bundle()

    res["trainer"] = trainer_vs_minimal(args.quick) if "trainer" not in args.skip else \
        {"trainer_samples_s": 0, "minimal_samples_s": 0, "ratio": 0, "samples": 0}
    log.info("trainer: %s", res["trainer"])
    others.mark("trainer")

    checks = {}
    for precision in ("bf16",):
        t = time.perf_counter()
        check = check_precision(bundle, held_out, precision, channels_last=True)
        checks[precision] = {**check.to_dict(), "record": check.to_dict(), "seconds": time.perf_counter() - t}
        log.info("agreement check %s: %.2f%% (%s)", precision, 100 * check.agreement, check.passed)
    res["checks"] = checks
    others.mark("agreement check")

    res["a"] = in_process(bundle, jpegs, checks, args.quick, try_compile="compile" not in args.skip)
    others.mark("(a)")
    runtime = res["a"]["fast"]["runtime"]
    if "b" not in args.skip:
        res["b"] = ours_in_torchserve(work, bundle, jpegs, runtime, checks, args.quick, cache_dir, workers=1)
        res["b2"] = ours_in_torchserve(work, bundle, jpegs, runtime, checks, args.quick, cache_dir, workers=2,
                                       new_versions=False)
        others.mark("(b)")
    if "c" not in args.skip:
        res["c"] = stock_in_torchserve(work, bundle, jpegs, args.quick, args.stock_pythonpath, workers=1)
        res["c2"] = stock_in_torchserve(work, bundle, jpegs, args.quick, args.stock_pythonpath, workers=2)
        others.mark("(c)")
    if "native" not in args.skip:
        missing = [tool for tool in ("wrk", "h2load") if not loadgen.have(tool)]
        if missing:
            res["d"] = {"error": f"{' and '.join(missing)} not installed (apt: "
                                 f"{' '.join(loadgen.APT[t] for t in missing)}; `make bench` installs them as root)"}
        else:
            res["d"] = _guarded(native_engine, work, bundle, jpegs, runtime, checks, args.quick, cache_dir)
        others.mark("(d)")
        if "new-version" not in args.skip:
            res["native_new_version"] = _guarded(native_new_version, work, cache_dir, bundle, runtime, checks,
                                                 jpegs[0])
            log.info("(d) new version: %s", res["native_new_version"])
            others.mark("(d) new version")
    if "replica" not in args.skip:
        res["replica"] = _guarded(replica_footprint, work, jpegs, 1 if args.quick else 2, cache_dir)
        others.mark("replicas")
    others.stop()
    res["others_cpu"] = others.phases
    res["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["seconds"] = time.perf_counter() - started
    for chk in res["checks"].values():
        chk.pop("record", None)
    (work / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    section = render(res)
    if not args.quick:
        replace_section(args.out, START, END, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
