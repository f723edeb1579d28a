"""Bad input, fuzzed: over 1000 generated bad payloads against one real TorchServe, REST and gRPC.

One TorchServe (a tiny image CNN and a tiny float-sequence LSTM, one worker each) and the
real gRPC gateway serve the whole module. The generator and the campaign are in
``tests/fuzzing.py``; ``make fuzz`` runs the same campaign for BENCHMARKS.md.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import requests
import torch
from PIL import Image, PngImagePlugin
from torchvision.io import ImageReadMode, decode_image

from service._gen import inference_pb2, inference_pb2_grpc
from service.errors import InvalidInput, PayloadTooLarge
from service.inference import decode
from tests import fuzzing
from tests.fuzzing import IMAGE_MODEL, SEQ_MODEL, generate, run_campaign, start_server

#: Small counts for the determinism check: every category, a fraction of the cases.
SMALL = {category: 12 for category in fuzzing.CATEGORIES} | {"oversize_body": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("fuzz"))
    try:
        yield s
    finally:
        s.serving.stop()


def _fingerprint(cases):
    return [(c.category, c.kind, c.transport, c.model, c.body, sorted(c.headers.items()), sorted(c.inputs.items()))
            for c in cases]


def test_generator_is_seeded_deterministic_and_covers_every_category():
    a, dropped_a = generate(seed=5, counts=SMALL)
    b, dropped_b = generate(seed=5, counts=SMALL)
    c, _ = generate(seed=6, counts=SMALL)
    assert _fingerprint(a) == _fingerprint(b) and dropped_a == dropped_b
    assert _fingerprint(a) != _fingerprint(c)
    full, _ = generate()
    assert len(full) >= 1000
    per = Counter((case.category, case.transport) for case in full)
    for category in fuzzing.CATEGORIES:
        assert per[(category, "rest")] and per[(category, "grpc")], category
    kinds = {case.kind for case in full}
    assert {"png_huge_header", "jpeg_huge_header", "truncated", "bitflip", "header_k", "json_k",
            "grpc_input_k", "over_max_request_size"} <= kinds


def test_a_thousand_bad_payloads_get_4xx_and_the_workers_survive(server):
    cases, dropped = generate()
    result = run_campaign(server, cases, threads=4, timeout_s=30, checkpoints=4, dropped=dropped)
    summary = result.summary()
    print(json.dumps(summary, indent=1))
    assert summary["inputs"] >= 1000
    failures = result.failures()
    assert not failures, f"{len(failures)} bad answers, e.g.:\n" + "\n".join(
        f"{o.case.describe()}: {o.status} {o.message[:200]!r}" for o in failures[:25])
    # the workers TorchServe started are the ones still serving: none died on the way
    assert result.restarts() == []
    assert len(result.checkpoints) == 4
    for mark in result.checkpoints:
        assert mark["failures"] == [], mark  # a valid request per model and transport succeeded
        assert mark["workers"] == result.workers_before
    assert all(ready for ready, pids in result.workers_before.values() if pids)
    by_kind = {}
    for o in result.outcomes:
        by_kind.setdefault((o.case.category, o.case.kind, o.case.transport), set()).add(o.status)
    # the statuses that say why
    assert by_kind[("oversize_body", "over_max_request_size", "rest")] == {"HTTP 413"}
    assert by_kind[("oversize_body", "over_max_request_size", "grpc")] == {"RESOURCE_EXHAUSTED"}
    assert by_kind[("decompression_bomb", "png_huge_header", "rest")] == {"HTTP 413"}
    assert by_kind[("decompression_bomb", "too_many_images", "rest")] == {"HTTP 413"}
    for o in result.outcomes:
        if o.case.category == "decompression_bomb":
            assert "limit" in o.message, o.case.describe()
        if o.case.category == "bad_k":  # NaN or a 4400-digit k: refused by the JSON reader already
            assert any(why in o.message for why in ("k must", "not a finite number", "digits")), (
                o.case.describe(), o.message)
    assert summary["max_seconds"] < 30


def _rest(server, model, body, headers):
    return requests.post(f"{server.rest_url}/predictions/{model}", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.token}", **headers})


def test_body_over_max_request_size_is_413_and_the_server_stays_up(server):
    limit = server.settings.max_request_size_bytes
    config = (server.settings.state_dir / "config.properties").read_text()
    assert f"max_request_size={limit}" in config.splitlines()
    doc = json.dumps({"inputs": [[[0.5] * fuzzing.FEATURES] * 3], "k": 1}).encode()
    # valid JSON padded with blanks to just under the limit: answered
    under = doc + b" " * (limit - 1024 - len(doc))
    ok = _rest(server, SEQ_MODEL, under, {"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text
    over = doc + b" " * (limit + 1 - len(doc))
    resp = _rest(server, SEQ_MODEL, over, {"Content-Type": "application/json"})
    assert resp.status_code == 413
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predictions(inference_pb2.PredictionsRequest(model_name=SEQ_MODEL, input={"data": over}),
                             metadata=[("authorization", f"Bearer {server.token}")], timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details()
    assert fuzzing.Sender(server, 30).valid_requests() == []


def test_pixel_budget_counts_every_image_of_a_request(server):
    """Two valid 6000x6000 PNGs (36 M pixels each, under the per-image limit) in one
    request: refused before either is decoded, and fast."""
    img = fuzzing._cached_gray_png(6000, 6000)
    start = time.perf_counter()
    resp = requests.post(f"{server.rest_url}/predictions/{IMAGE_MODEL}", timeout=60,
                         files={"a": ("a", img), "b": ("b", img)},
                         headers={"Authorization": f"Bearer {server.token}"})
    assert resp.status_code == 413, resp.text
    assert "72000000 pixels together" in resp.json()["message"]
    assert time.perf_counter() - start < 10


# ---- in process: the PNG check keeps the pixels of valid PNGs ----------------------------
def _pil_png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _adam7_png(pixels: np.ndarray) -> bytes:
    """An interlaced RGB PNG (Pillow writes none), built pass by pass."""
    import zlib

    h, w, _ = pixels.shape
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                           (1, 0, 2, 2), (0, 1, 1, 2)):
        sub = pixels[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    return fuzzing.build_png([(b"IHDR", fuzzing.ihdr(w, h, 8, 2, interlace=1)), (b"IDAT", zlib.compress(raw)),
                              (b"IEND", b"")])


def test_checked_pngs_decode_to_the_same_pixels_as_torchvision():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "ancillary chunks are dropped")
    info.add_itxt("iTXt", "compressed", zip=True)
    samples = {
        "rgb": _pil_png(rgb),
        "rgba": _pil_png(Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8))),
        "gray+alpha": _pil_png(Image.fromarray(rng.integers(0, 256, (33, 47, 2), dtype=np.uint8), "LA")),
        "gray": _pil_png(Image.fromarray(rng.integers(0, 256, (33, 47), dtype=np.uint8))),
        "1-bit": _pil_png(Image.fromarray(rng.integers(0, 2, (33, 47), dtype=np.uint8) * 255).convert("1")),
        "palette+tRNS": _pil_png(rgb.convert("P", palette=Image.ADAPTIVE, colors=16), transparency=3),
        "2-bit palette": _pil_png(rgb.convert("P", palette=Image.ADAPTIVE, colors=4), bits=2),
        "16-bit": _pil_png(Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16))),
        "text chunks": _pil_png(rgb, pnginfo=info),
        "interlaced": _adam7_png(rng.integers(0, 256, (13, 11, 3), dtype=np.uint8)),
    }
    for name, data in samples.items():
        for mode, channels in ((ImageReadMode.GRAY, 1), (ImageReadMode.RGB, 3)):
            expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
            assert torch.equal(decode.decode_image_bytes(data, channels), expected), (name, channels)


def test_png_limits_are_checked_before_libpng_sees_them():
    # wider than libpng's row limit, yet few pixels: refused with the limit named
    with pytest.raises(PayloadTooLarge, match="1000000 pixels"):
        decode.decode_image_bytes(fuzzing.gray_png(1_000_001, 1), 1)
    assert decode.decode_image_bytes(fuzzing.gray_png(1_000_000, 1), 1).shape == (1, 1, 1_000_000)
    good = fuzzing.gray_png(20, 10)
    ihdr_end = 33
    idat = good[ihdr_end:-12]
    with pytest.raises(InvalidInput, match="CRC mismatch in chunk IDAT"):
        decode.decode_image_bytes(good[:ihdr_end] + idat[:-1] + bytes([idat[-1] ^ 1]) + good[-12:], 1)
    with pytest.raises(InvalidInput, match="no IEND"):
        decode.decode_image_bytes(good[:-12], 1)


# ---- weights that need pickled code: refused where the worker loads them ----------------
class _Payload:
    """Pickles as a call to os.system: if anything unpickled it with code allowed, the
    marker file would appear."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_archive_whose_weights_need_pickled_code_is_refused_by_the_real_worker(server, tmp_path):
    from service.errors import AlreadyExists
    from service.modelstore import ModelStore
    from service.serving import readiness
    from service.serving.store_scan import link_archive
    from tests.helpers import broken_archive_copy

    marker = tmp_path / "pickled-code-ran"
    buf = io.BytesIO()
    torch.save({"rnn.weight_ih_l0": torch.zeros(32, 4), "payload": _Payload(marker)}, buf)
    store = ModelStore(server.settings.model_store)
    name = "fuzz-pickled"
    broken_archive_copy(store.path(SEQ_MODEL, 1), store.root / name / "1.mar", weights=buf.getvalue(),
                        modelName=name)
    mgmt = server.serving.mgmt
    try:
        # the replica registers new archives of the store by itself; where it does not
        # (yet), register it as it would
        deadline = time.monotonic() + 10
        while (name, "1") not in {r.key for r in readiness.check(mgmt)}:
            if time.monotonic() > deadline:
                try:
                    mgmt.register(link_archive(server.settings, name, 1), initial_workers=1,
                                  response_timeout_s=server.settings.response_timeout_s, synchronous=False)
                except AlreadyExists:
                    pass
                break
            time.sleep(0.5)
        report = readiness.wait_until_ready(mgmt, [(name, 1)], timeout_s=90)
        entry = next(r for r in report if r.key == (name, "1"))
        assert not entry.ready and "crash-looping" in entry.reason, entry
        logs = server.settings.state_dir / "logs"
        text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        assert "weights.pt needs pickled code to load (posix.system)" in text
        assert not marker.exists()
        # the other models keep serving
        assert fuzzing.Sender(server, 30).valid_requests() == []
    finally:
        (store.root / name / "1.mar").unlink(missing_ok=True)  # so that it is not registered again
        try:
            mgmt.unregister(name, 1)
        except Exception:  # noqa: BLE001 - not registered at all: nothing to undo
            pass
