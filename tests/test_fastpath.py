"""The fast serving path: batched preprocessing, the bf16 agreement check and its lineage,
the worker honouring it, channels_last and torch.compile, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.io import ImageReadMode, decode_image

from service.errors import InvalidArgument, InvalidSpec
from service.handlers.torchserve import TorchServeHandler, warm_up_sizes
from service.inference import Predictor, RuntimeOptions, check_precision, resolve_runtime
from service.inference.fastpath import cpu_has_native_bf16, native_precisions
from service.models import image_eval_transform, load_model
from service.modelstore import ModelBundle, ModelStore
from service.inference.options import MODEL_CONFIG_FILE, ServingOptions
from tests.helpers import make_bundle, random_image

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def _decode(data: bytes, channels: int) -> torch.Tensor:
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode)


# ---- batched preprocessing ------------------------------------------------------------
@pytest.mark.parametrize("kind, channels_last", [("resnet", False), ("resnet", True), ("cnn", False)])
def test_batched_preprocessing_equals_per_image(kind, channels_last):
    bundle = make_bundle(kind)
    inp = bundle.spec.input
    runtime = RuntimeOptions("fp32", channels_last=channels_last)
    predictor = Predictor(bundle, runtime=runtime)
    # Three sizes shared by several images (batched per size) and two seen once (alone).
    sizes = [(48, 64), (48, 64), (90, 70), (48, 64), (33, 41), (90, 70), (120, 80)]
    raw = [random_image(inp.channels, h, w, "jpeg" if i % 2 else "png", seed=i) for i, (h, w) in enumerate(sizes)]
    decoded = [_decode(data, inp.channels) for data in raw]
    transform = image_eval_transform(inp)
    expected = torch.stack([transform(img) for img in decoded])
    batched = predictor.preprocess(decoded)
    assert batched.shape == expected.shape and batched.dtype == torch.float32
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    if channels_last:
        assert batched.is_contiguous(memory_format=torch.channels_last)
    same = predictor.preprocess([decoded[0], decoded[1], decoded[3]])  # one size: one batch
    torch.testing.assert_close(same, expected[[0, 1, 3]], atol=1e-5, rtol=1e-5)
    # And the answers through predict() are the fp32 forward of the per-image tensors.
    answer = predictor.predict([{f"x{i}": data for i, data in enumerate(raw)}]).outputs[0]
    model = load_model(bundle.spec, bundle.state_dict)
    with torch.no_grad():
        probs = torch.softmax(model(expected), 1)
    for i, pred in enumerate(answer["predictions"]):
        for entry in pred["top_k"]:
            assert entry["probability"] == pytest.approx(probs[i, entry["index"]].item(), abs=1e-5)


def test_multilabel_and_regression_answers_in_one_transfer():
    for task in ("multilabel", "regression"):
        bundle = make_bundle("lstm")
        spec = bundle.spec.to_dict() | {"task": task}
        from service.models import ModelSpec

        bundle = ModelBundle(ModelSpec.from_dict(spec), bundle.state_dict, bundle.labels)
        predictor = Predictor(bundle, name="m", version="1")
        torch.manual_seed(1)
        seqs = [torch.randn(n, 8).tolist() for n in (4, 9)]
        answer = predictor.predict([{"body": json.dumps({"inputs": seqs, "k": 2}).encode()}]).outputs[0]
        model = load_model(bundle.spec, bundle.state_dict)
        for pred, seq in zip(answer["predictions"], seqs):
            with torch.no_grad():
                out = model(torch.tensor([seq]), torch.tensor([len(seq)]))[0]
            if task == "regression":
                assert pred["values"] == pytest.approx(out.tolist(), abs=1e-5)
            else:
                probs = torch.sigmoid(out)
                assert [e["index"] for e in pred["top_k"]] == torch.topk(probs, 2).indices.tolist()
                assert pred["positive"] == [bundle.labels[j] for j in range(len(probs)) if probs[j] >= 0.5]


# ---- the agreement check -------------------------------------------------------------
def _near_tie_bundle(gap: float, inputs: list[torch.Tensor]) -> ModelBundle:
    """The CNN with a head whose classes 0 and 1 differ by ``gap`` (relative) in weight.

    Logits of both classes are large and nearly equal: fp32 resolves the difference, bf16
    (8 bits of mantissa) rounds both rows to the same weights when ``gap`` is far below
    1/256, and its top-1 then disagrees with fp32's wherever fp32 picks class 1. The
    difference is made orthogonal to the mean feature vector of ``inputs``, so that fp32
    picks either class about equally often. Classes 2.. never win.
    """
    base = make_bundle("cnn")
    model = load_model(base.spec, base.state_dict)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    predictor = Predictor(base, runtime=RuntimeOptions("fp32"))
    with torch.no_grad():
        features = model[:-1](predictor.collate(inputs)[0])  # everything but the head
        mean = features.mean(dim=0)
        g = torch.Generator().manual_seed(0)
        direction = torch.randn(head.in_features, generator=g)
        direction -= (direction @ mean) / (mean @ mean) * mean
        w0 = 4.0 + torch.rand(head.in_features, generator=g)
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[:2] = 0.0
        head.weight[0] = w0
        head.weight[1] = w0 + gap * w0.norm() / direction.norm() * direction
    return ModelBundle(base.spec, model.state_dict(), base.labels)


def _held_out(n: int = 120, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8, generator=g) for _ in range(n)]


def _confident(bundle: ModelBundle, n: int = 120) -> list[torch.Tensor]:
    """Held-out images whose fp32 top-1 wins by a wide margin (bf16 cannot flip them)."""
    predictor = Predictor(bundle, runtime=RuntimeOptions("fp32"))
    pool = _held_out(600, seed=1)
    logits = predictor.forward(pool)
    top2 = torch.topk(logits, 2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]) / logits.abs().amax(dim=1)
    keep = torch.nonzero(margin > 0.1).flatten()[:n].tolist()
    assert len(keep) == n
    return [pool[i] for i in keep]


@pytest.fixture(scope="module")
def checks():
    agree = make_bundle("cnn")
    held_out = _held_out()
    flips = _near_tie_bundle(1e-4, held_out)
    return {
        "agree": (agree, check_precision(agree, _confident(agree), "bf16")),
        "flips": (flips, check_precision(flips, held_out, "bf16")),
    }


def test_check_accepts_bf16_when_top1_agrees(checks):
    bundle, check = checks["agree"]
    assert check.samples == 120 and check.agreed == 120
    assert check.passed and check.agreement == 1.0 and check.threshold == 0.99
    assert check.precision == "bf16" and check.device_type == "cpu"
    assert 0 < check.max_abs_prob_diff < 0.05  # bf16 really ran: the probabilities moved


def test_check_rejects_bf16_when_it_flips_answers(checks):
    _, check = checks["flips"]
    assert not check.passed
    assert check.agreement < 0.99
    # The fp32 answers are split between the two tied classes; bf16 cannot tell them apart.
    assert 0.2 < check.agreement < 0.9


def test_check_refuses_too_few_inputs_or_a_loose_threshold():
    bundle = make_bundle("cnn")
    with pytest.raises(InvalidArgument, match="at least 100"):
        check_precision(bundle, _held_out(20), "bf16")
    with pytest.raises(InvalidArgument, match="threshold"):
        check_precision(bundle, _held_out(), "bf16", threshold=0.9)


def _unpack(path: Path, target: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(target)
    return target


@pytest.fixture(scope="module")
def archived(checks, tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpath")
    store = ModelStore(root / "store")
    out = {}
    for key, (bundle, check) in checks.items():
        options = ServingOptions(precision="bf16", channels_last=True, precision_check=check.to_dict())
        info = store.write(f"m-{key}", bundle, options=options)
        out[key] = (store, info, _unpack(info.path, root / f"unpacked-{key}"))
    return out


@pytest.mark.parametrize("key, passed", [("agree", True), ("flips", False)])
def test_lineage_records_the_check(archived, checks, key, passed):
    store, info, unpacked = archived[key]
    check = checks[key][1].to_dict()
    for lineage in (store.lineage(info.name, info.version), ModelBundle.load(unpacked).lineage):
        serving = lineage["serving"]
        assert serving["precision"] == "bf16" and serving["channels_last"] is True
        assert serving["precision_check"] == check
        assert serving["precision_check"]["passed"] is passed
    config = (unpacked / "model-config.yaml").read_text()
    assert "precision: bf16" in config and "channels_last: true" in config


def test_store_refuses_reduced_precision_without_a_check_for_these_weights(tmp_path, checks):
    with pytest.raises(InvalidSpec, match="precision_check"):
        ServingOptions(precision="bf16")
    with pytest.raises(InvalidSpec, match="precision"):
        ServingOptions(precision="int8")
    _, check = checks["agree"]
    other = make_bundle("cnn", seed=5)
    with pytest.raises(InvalidSpec, match="other weights"):
        ModelStore(tmp_path).write("x", other, options=ServingOptions(precision="bf16", precision_check=check.to_dict()))


def _conv_output_dtypes(predictor: Predictor, images: list[bytes]) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    conv = next(m for m in predictor.model.modules() if isinstance(m, nn.Conv2d))
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    try:
        answer = predictor.predict([{"x": data} for data in images])
    finally:
        handle.remove()
    assert all(isinstance(o, dict) for o in answer.outputs)
    return seen


def _worker(unpacked: Path) -> TorchServeHandler:
    """Our TorchServe handler, initialised as a worker does, on an unpacked archive."""
    context = SimpleNamespace(
        system_properties={"model_dir": str(unpacked), "gpu_id": None, "batch_size": 4},
        manifest={"model": {"modelName": "m", "modelVersion": "1"}},
        model_name="m",
    )
    handler = TorchServeHandler()
    handler.initialize(context)
    return handler


def test_worker_runs_bf16_only_when_the_lineage_says_it_passed(archived):
    images = [random_image(1, 16 + i, 16, seed=i) for i in range(3)]
    passed = _worker(archived["agree"][2]).predictor
    failed = _worker(archived["flips"][2]).predictor
    assert failed.runtime.precision == "fp32"
    assert any("refused" in note and "agreement" in note for note in failed.runtime_notes)
    assert _conv_output_dtypes(failed, images) == {torch.float32}
    if cpu_has_native_bf16():
        assert passed.runtime.precision == "bf16"
        assert _conv_output_dtypes(passed, images) == {torch.bfloat16}  # autocast ran
    else:  # a CPU without native bf16 serves fp32 even with a passed check, and says why
        assert passed.runtime.precision == "fp32"
        assert any("no native bf16" in note for note in passed.runtime_notes)
    for predictor in (passed, failed):
        assert predictor.runtime.channels_last
        conv = next(m for m in predictor.model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_resolve_runtime_refuses_what_the_check_does_not_cover(checks):
    bundle, check = checks["agree"]
    sd = bundle.state_dict
    good = {"serving": {"precision": "bf16", "precision_check": check.to_dict()}}
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_runtime(good, sd, "cpu", "image")[0].precision == expected
    other_weights = make_bundle("cnn", seed=3).state_dict
    runtime, notes = resolve_runtime(good, other_weights, "cpu", "image")
    assert runtime.precision == "fp32" and "other weights" in notes[0]
    on_gpu = {"serving": {"precision": "bf16", "precision_check": check.to_dict() | {"device_type": "cuda"}}}
    assert resolve_runtime(on_gpu, sd, "cpu", "image")[0].precision == "fp32"
    fp16 = {"serving": {"precision": "fp16", "precision_check": check.to_dict() | {"precision": "fp16"}}}
    runtime, notes = resolve_runtime(fp16, sd, "cpu", "image")
    assert runtime.precision == "fp32" and "no native fp16" in notes[0]
    assert "fp16" not in native_precisions("cpu")
    lying = {"serving": {"precision": "bf16", "precision_check": check.to_dict() | {"agreement": 0.95}}}
    assert resolve_runtime(lying, sd, "cpu", "image")[0].precision == "fp32"
    seq = {"serving": {"channels_last": True, "compile": True}}
    runtime, notes = resolve_runtime(seq, make_bundle("lstm").state_dict, "cpu", "sequence")
    assert not runtime.channels_last and not runtime.compile and notes
    assert resolve_runtime({}, sd, "cpu", "image")[0] == RuntimeOptions()


def test_old_archives_and_default_options_serve_fp32(tmp_path):
    store = ModelStore(tmp_path)
    info = store.write("plain", make_bundle("cnn"))
    serving = info.lineage["serving"]
    assert serving == {"batch_size": 8, "max_batch_delay_ms": 5, "precision": "fp32", "channels_last": False,
                       "compile": False, "precision_check": None}
    predictor = Predictor(ModelBundle.load(_unpack(info.path, tmp_path / "u")))
    assert predictor.runtime == RuntimeOptions() and not predictor.runtime_notes
    # A compiled model gets longer than TorchServe's default 120 s to load.
    assert "startupTimeout" not in ServingOptions().to_yaml()
    assert "startupTimeout: 900" in ServingOptions(compile=True).to_yaml()


@pytest.mark.parametrize("name", ["cnn", "lstm", "text"])
def test_the_options_write_what_archives_before_issue_14_hold(name, tmp_path):
    # service.inference.options took ServingOptions out of the model store: the options an
    # archive of 0b5d150 recorded give its model-config.yaml and serving record byte for byte,
    # and the store writes them the same way today.
    old = ROOT / "tests" / "fixtures" / "archives-0b5d150" / "store" / name
    with zipfile.ZipFile(old / "1.mar") as mar:
        old_yaml = mar.read(MODEL_CONFIG_FILE).decode()
    old_serving = json.loads((old / "1.json").read_text())["serving"]
    options = ServingOptions(**{k: v for k, v in old_serving.items() if k != "precision_check"})
    assert options.to_yaml() == old_yaml and options.lineage() == old_serving
    kind = {"cnn": "cnn", "lstm": "lstm", "text": "gru-text"}[name]
    info = ModelStore(tmp_path).write(name, make_bundle(kind), options=options)
    with zipfile.ZipFile(info.path) as mar:
        assert mar.read(MODEL_CONFIG_FILE).decode() == old_yaml
    assert info.lineage["serving"] == old_serving


def test_a_zero_batch_delay_is_refused_where_torchserve_would_stall():
    # TorchServe 0.12 with maxBatchDelay 0 and batchSize > 1 waits about 100 ms per batch
    # (measured side by side in BENCHMARKS.md); a batch of one never waits.
    with pytest.raises(InvalidSpec, match="max_batch_delay_ms.*use 1 or more"):
        ServingOptions(batch_size=8, max_batch_delay_ms=0)
    assert "maxBatchDelay: 0" in ServingOptions(batch_size=1, max_batch_delay_ms=0).to_yaml()
    assert "maxBatchDelay: 1" in ServingOptions(batch_size=8, max_batch_delay_ms=1).to_yaml()


# ---- torch.compile ---------------------------------------------------------------------
def test_compiled_channels_last_answers_match_eager_and_cache_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    bundle = make_bundle("cnn")
    eager = Predictor(bundle, runtime=RuntimeOptions("fp32"))
    compiled = Predictor(bundle, runtime=RuntimeOptions("fp32", channels_last=True, compile=True), max_batch=4)
    assert warm_up_sizes(8, compiled=True) == [1, 2, 4, 8] and warm_up_sizes(6, compiled=True) == [1, 2, 4, 6]
    assert warm_up_sizes(8, compiled=False) == [1, 8]
    took = compiled.warm_up(warm_up_sizes(4, compiled=True))
    assert sorted(took) == [1, 2, 4]
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    # 7 items: a chunk of 4 and one of 3 (padded to 4); then 3 alone (padded too).
    images = [random_image(1, 20, 20 + i, seed=i) for i in range(7)]
    a = eager.predict([{"x": d} for d in images]).outputs
    b = compiled.predict([{"x": d} for d in images]).outputs
    assert compiled.predict([{"x": d} for d in images[:3]]).items == 3
    assert counters["stats"]["unique_graphs"] == graphs, "a request compiled a new graph"
    for x, y in zip(a, b):
        px = {e["index"]: e["probability"] for e in x["predictions"][0]["top_k"]}
        py = {e["index"]: e["probability"] for e in y["predictions"][0]["top_k"]}
        assert px.keys() == py.keys()
        assert list(px.values()) == pytest.approx(list(py.values()), abs=1e-4)
    assert any((tmp_path / "inductor").rglob("*")), "nothing cached on disk"


# ---- the dashboard ---------------------------------------------------------------------
DASHBOARD = ROOT / "k8s" / "dashboards" / "modelctl.json"
PROMQL_WORDS = {"sum", "by", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg", "count",
                "without", "on", "ignoring", "le", "clamp_min", "or", "and", "unless", "topk", "time",
                "vector", "scalar", "label_replace", "max_over_time", "avg_over_time", "delta", "deriv",
                "model", "version", "stage", "outcome", "state", "gpu", "name", "job", "job_id", "bool",
                "offset", "group_left", "group_right", "sort_desc", "absent", "count_over_time", "abs"}


def _exposed_sample_names(tmp_path: Path) -> set[str]:
    """Every sample name the service's own collectors expose: handler, GPU, queue, jobs."""
    from prometheus_client import CollectorRegistry

    from service.metrics.exporter import QueueDepthCollector
    from service.metrics.gpu import GpuCollector
    from service.metrics.handler import HandlerMetrics
    from service.metrics.jobs import JobMetricsCollector
    from service.rundir import EVENTS_FILE

    registry = CollectorRegistry()
    metrics = HandlerMetrics.create(registry)
    metrics.observe_batch("m", "1", {"preprocess": 0.01, "inference": 0.02, "postprocess": 0.0}, 0.03, [200])
    metrics.in_flight.labels("m", "1", "torchserve").set(0)
    names = {s.name for family in registry.collect() for s in family.samples}
    (tmp_path / EVENTS_FILE).write_text(json.dumps({"event": "epoch", "train_loss": 0.5, "val_metric": 0.8}) + "\n")
    jobs = [SimpleNamespace(id="job-1", state="RUNNING", output_model="m", run_dir=str(tmp_path),
                            started_at=1.0, finished_at=None),
            SimpleNamespace(id="job-2", state="SUCCEEDED", output_model="m", run_dir="", started_at=1.0,
                            finished_at=50.0)]
    collectors = (GpuCollector(), QueueDepthCollector(lambda: None),
                  JobMetricsCollector(lambda: jobs, ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]))
    for collector in collectors:
        for family in collector.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
    return names


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhd]?", w)}


def test_dashboard_panels_query_metrics_that_exist(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    exposed = _exposed_sample_names(tmp_path)
    assert {"modelctl_finetune_jobs", "modelctl_finetune_epoch_loss"} <= exposed  # the job collector ran
    titles = " ".join(p["title"].lower() for p in panels)
    for needle in ("p50", "p99", "throughput", "gpu utilisation", "gpu memory", "queue", "jobs"):
        assert needle in titles, needle
    for panel in panels:
        targets = panel.get("targets") or []
        assert targets, panel["title"]
        for target in targets:
            names = _metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            for name in names:
                assert name in exposed, (panel["title"], name, "is not exposed by any collector")
    assert any("histogram_quantile(0.99" in t["expr"] and "modelctl_request_latency_seconds_bucket" in t["expr"]
               for p in panels for t in p["targets"])
