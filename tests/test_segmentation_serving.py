"""Serving segmentation models (issue 13, section 4): a mask per image at the image's own size.

Two small unet archives, built without training (seeded, their batch-norm statistics and
head biases perturbed so that the masks are not constant): ``seg`` (4 classes, background
first) and ``seg-bin`` (one class: a binary mask). They are written by the real model store
and served by each engine in turn (the module's fixture is parametrized): a real TorchServe
with its gRPC gateway, then the native engine. Clients: ``requests`` and TorchServe's gRPC
stub (:class:`service.predict_client.PredictionClient`) on both; NVIDIA's ``tritonclient`` (OIP v2,
HTTP and gRPC; tests/oip_clients.py) on the native engine.

Every served mask is compared with an in-process forward of the same weights, written out
here: decode, :func:`service.models.image_eval_transform`, the model in fp32, bilinear
up-sampling of the logits to the ORIGINAL image size, then argmax (``torch.ge(sigmoid, 0.5)``
for the binary model). A pixel may differ only where the decision is a near-tie (top-two
logits within 1e-4: a batch's forward may round differently from a single image's). The
predictor in process, without a server, is tests/test_segmentation_serving_unit.py.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_png, encode_jpeg, encode_png

from service.predict_client import PredictionClient, read_token
from service.models import ModelSpec, build_model, image_eval_transform, load_model
from service.modelstore import ModelBundle, ModelStore
from service.inference.options import ServingOptions
from service.serving.engines import serving_class
from tests import oip_clients
from tests.helpers import engine_params
from tests.test_serving import settings_for

SPECS = {
    "seg": {"family": "unet", "num_classes": 4, "config": {"depth": 2, "base_channels": 8},
            "input": {"type": "image", "channels": 1, "size": 32, "resize": None}},
    "seg-bin": {"family": "unet", "num_classes": 1, "config": {"depth": 2, "base_channels": 8},
                "input": {"type": "image", "channels": 1, "size": 32, "resize": None}},
}
LABELS = {"seg": ["background", "a", "b", "c"], "seg-bin": ["object"]}
#: Top-two logits closer than this may be decided either way by two correct forwards.
TIE = 1e-4


def image(height: int, width: int, seed: int, fmt: str = "png", channels: int = 1) -> bytes:
    """A smooth grayscale image (coarse noise, up-sampled): masks of a few regions."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, channels, max(2, height // 6), max(2, width // 6)), generator=g)
    pixels = (F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
              .clamp(0, 1)[0] * 255).round().to(torch.uint8)
    encoded = encode_png(pixels) if fmt == "png" else encode_jpeg(pixels, quality=92)
    return encoded.numpy().tobytes()


def make_unet(name: str, seed: int = 0, **overrides) -> ModelBundle:
    """A built, untrained unet whose masks are not constant: its head biases are moved so that
    every class wins somewhere on a calibration image (the binary one: half its pixels)."""
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict({**SPECS[name], **overrides})
    model = build_model(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    with torch.no_grad():
        x = torch.stack([_transformed(spec, image(48, 48, seed=900 + i)) for i in range(3)])
        logits = model(x)
        if spec.num_classes == 1:
            model.head.bias -= logits.median()
        else:
            model.head.bias -= logits.mean(dim=(0, 2, 3))
    return ModelBundle(spec, model.state_dict(), list(LABELS[name]))


def _transformed(spec: ModelSpec, data: bytes) -> torch.Tensor:
    mode = ImageReadMode.GRAY if spec.input.channels == 1 else ImageReadMode.RGB
    return image_eval_transform(spec.input)(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode))


def reference(bundle: ModelBundle, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-process forward: up-sampled logits (C, H, W) at the image's size, and its mask."""
    model = load_model(bundle.spec, bundle.state_dict)
    x = _transformed(bundle.spec, data).unsqueeze(0)
    height, width = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape[-2:]
    with torch.no_grad():
        up = F.interpolate(model(x).float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    if bundle.spec.num_classes == 1:
        return up, torch.ge(torch.sigmoid(up[0]), 0.5).long()
    return up, up.argmax(dim=0)


def assert_same_mask(got: np.ndarray, bundle: ModelBundle, data: bytes) -> None:
    up, expected = reference(bundle, data)
    got = torch.from_numpy(np.asarray(got, dtype=np.int64))
    assert got.shape == expected.shape
    differ = got != expected
    if bundle.spec.num_classes == 1:
        margin = up[0].abs()
    else:
        top2 = up.topk(2, dim=0).values
        margin = top2[0] - top2[1]
    assert int(differ.sum()) <= 3 and bool((margin[differ] < TIE).all()), (
        f"{int(differ.sum())} pixels differ, margins {margin[differ].tolist()[:5]}")


def png_pixels(text: str) -> np.ndarray:
    """A served mask's pixels, read by torchvision's PNG decoder (not ours)."""
    decoded = decode_png(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
    assert decoded.dtype == torch.uint8 and decoded.shape[0] == 1  # 8-bit, one channel
    return decoded[0].numpy()


def assert_prediction(pred: dict, bundle: ModelBundle, data: bytes) -> np.ndarray:
    """One image's JSON answer: its mask (as the in-process forward), size, fractions, labels."""
    assert "top_k" not in pred
    height, width = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape[-2:]
    assert (pred["height"], pred["width"]) == (height, width)
    mask = png_pixels(pred["mask"])
    assert mask.shape == (height, width)
    assert_same_mask(mask, bundle, data)
    assert pred["labels"] == bundle.labels
    assert list(pred["class_fraction"]) == bundle.labels
    counts = np.bincount(mask.reshape(-1), minlength=max(2, len(bundle.labels)))
    if bundle.spec.num_classes == 1:
        assert set(np.unique(mask)) <= {0, 1}
        assert pred["class_fraction"]["object"] == pytest.approx(counts[1] / mask.size, abs=1e-12)
    else:
        fractions = [pred["class_fraction"][label] for label in bundle.labels]
        assert fractions == pytest.approx((counts / mask.size).tolist(), abs=1e-12)
        assert sum(fractions) == pytest.approx(1.0, abs=1e-9)
    return mask


def unet_bundles() -> dict[str, ModelBundle]:
    """The two unets of SPECS, seeded: what both engines serve, and what the in-process tests
    (tests/test_segmentation_serving_unit.py) predict with."""
    return {name: make_unet(name, seed=1) for name in SPECS}


@pytest.fixture(scope="module")
def bundles():
    return unet_bundles()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The archive of a short real segmentation run (the recipe on builtin:fashion-scenes,
    one epoch of 96 scenes), read back from its model store: what a fine-tune serves."""
    from service.training.recipe import run_finetune
    from service.training.run_spec import Policy, RunSpec

    root = tmp_path_factory.mktemp("seg-run")
    policy = Policy((root,))
    spec = RunSpec.from_dict({
        "model": {"family": "unet", "config": {"channels": [8, 16]},
                  "input": {"type": "image", "channels": 1, "size": 64, "resize": None}},
        "dataset": {"source": "builtin:fashion-scenes", "train_size": 96, "val_size": 16, "test_size": 16},
        "hyperparameters": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "output": {"name": "scenes"}}, policy)
    outcome = run_finetune(spec, root / "run", root / "store", policy)
    assert outcome.status == "finished" and outcome.metrics["metric"] == "mean_iou"
    return ModelBundle.from_archive(outcome.archive.path)


# ---- served by each engine ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=engine_params("torchserve", "native"))
def served(tmp_path_factory, request, bundles, trained):
    engine = request.param
    root = tmp_path_factory.mktemp(f"seg-{engine}")
    store = ModelStore(root / "store")
    bundles = {**bundles, "scenes": trained}
    for name, bundle in bundles.items():
        store.write(name, bundle, options=ServingOptions(batch_size=4, max_batch_delay_ms=20))
    settings = settings_for(root / "store", root / "state", engine=engine, startup_timeout_s=120)
    serving = serving_class(engine)(settings)
    report = serving.start()
    try:
        assert all(r.ready for r in report) and len(report) == 3, report
        token = read_token(settings.state_dir)
        yield {"engine": engine, "settings": settings, "token": token, "bundles": bundles,
               "client": PredictionClient(rest_url=f"http://127.0.0.1:{settings.inference_port}",
                                          grpc_target=f"127.0.0.1:{settings.grpc_inference_port}", token=token)}
    finally:
        serving.stop()


def _rest_raw(served, name, body, headers=None):
    s = served["settings"]
    return requests.post(f"http://127.0.0.1:{s.inference_port}/predictions/{name}", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {served['token']}", **(headers or {})})


def _assert_still_serving(served):
    data = image(40, 50, seed=11)
    pred = served["client"].rest("seg", {"x": data})["predictions"][0]
    assert_prediction(pred, served["bundles"]["seg"], data)


def test_masks_over_rest_and_grpc_match_in_process(served):
    client, bundles = served["client"], served["bundles"]
    images = {"wide": image(40, 50, seed=21), "jpeg": image(24, 30, seed=22, fmt="jpeg")}
    for name in ("seg", "seg-bin"):
        for answer in (client.rest(name, images, k=3), client.grpc(name, images, k=3)):
            assert answer["model"] == name
            preds = {p["input"]: p for p in answer["predictions"]}
            assert set(preds) == set(images)
            for key, data in images.items():
                assert_prediction(preds[key], bundles[name], data)
    # One raw body, with a top-k header that does not apply (and is not read)
    data = image(40, 50, seed=23)
    resp = _rest_raw(served, "seg", data, {"X-Top-K": "not a number"})
    assert resp.status_code == 200, resp.text
    assert_prediction(resp.json()["predictions"][0], bundles["seg"], data)


def test_a_fine_tuned_archive_is_served_as_it_predicts_in_process(served):
    """The archive of a real segmentation run (fashion-scenes) over REST, TorchServe gRPC and,
    on the native engine, OIP v2 (tritonclient HTTP and gRPC): the in-process forward's masks."""
    client, bundle = served["client"], served["bundles"]["scenes"]
    assert bundle.labels[0] == "background" and len(bundle.labels) == 11
    images = {"scene": image(64, 64, seed=81), "other-size": image(48, 80, seed=82)}
    for answer in (client.rest("scenes", images), client.grpc("scenes", images)):
        preds = {p["input"]: p for p in answer["predictions"]}
        for key, data in images.items():
            assert_prediction(preds[key], bundle, data)
    if served["engine"] == "native":
        for protocol in ("http", "grpc"):
            oip_client = _oip_client(served, protocol)
            try:
                result = oip_clients.infer(oip_client, "scenes", [oip_clients.images_input([images["scene"]])])
                assert_same_mask(result.as_numpy("mask")[0], bundle, images["scene"])
            finally:
                oip_client.close()


def test_batched_requests_each_get_their_own_size(served):
    """Concurrent requests of different sizes share batches (batch_size 4): each answer keeps
    its image's size and mask."""
    client, bundle = served["client"], served["bundles"]["seg"]
    sizes = [(40, 50), (32, 32), (17, 45), (64, 24), (40, 50), (33, 31), (20, 20), (50, 40)]
    images = [image(h, w, seed=30 + i) for i, (h, w) in enumerate(sizes)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda d: client.rest("seg", {"x": d}), images))
    for answer, data in zip(answers, images):
        assert_prediction(answer["predictions"][0], bundle, data)


@pytest.mark.parametrize("body, headers, needle", [
    (b"this is not an image", {"Content-Type": "application/octet-stream"}, "JPEG or PNG"),
    (image(40, 50, seed=1)[:60], {"Content-Type": "image/png"}, "PNG"),
], ids=["not-an-image", "cut-png"])
def test_bad_input_is_4xx_and_the_server_stays_up(served, body, headers, needle):
    resp = _rest_raw(served, "seg", body, headers)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["message"]
    with pytest.raises(grpc.RpcError) as info:
        served["client"].grpc("seg", {"x": body})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()
    _assert_still_serving(served)


# ---- OIP v2 (the native engine) -------------------------------------------------------------------

def _oip_client(served, protocol):
    if served["engine"] != "native":
        pytest.skip("the TorchServe engine does not speak OIP v2")
    s = served["settings"]
    if protocol == "http":
        return oip_clients.http_client(f"127.0.0.1:{s.inference_port}", served["token"])
    return oip_clients.grpc_client(f"127.0.0.1:{s.grpc_inference_port}", served["token"])


def _status(exc) -> str:
    return str(exc.status())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_oip_mask_and_class_fraction_tensors(served, protocol):
    client, bundles = _oip_client(served, protocol), served["bundles"]
    try:
        meta = client.get_model_metadata("seg")
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
            ("mask", "UINT8", [-1, -1, -1]), ("class_fraction", "FP32", [-1, 4])]
        meta = client.get_model_metadata("seg-bin")
        assert [(t["name"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
            ("mask", [-1, -1, -1]), ("class_fraction", [-1, 1])]

        images = [image(40, 50, seed=41), image(40, 50, seed=42, fmt="jpeg")]
        for name in ("seg", "seg-bin"):
            result = oip_clients.infer(client, name, [oip_clients.images_input(images)], parameters={"top_k": 2})
            masks, fractions = result.as_numpy("mask"), result.as_numpy("class_fraction")
            assert masks.dtype == np.uint8 and masks.shape == (2, 40, 50)
            assert fractions.dtype == np.float32 and fractions.shape == (2, len(bundles[name].labels))
            for mask, fraction, data in zip(masks, fractions, images):
                assert_same_mask(mask, bundles[name], data)
                counts = np.bincount(mask.reshape(-1), minlength=2) / mask.size
                expected = counts[1:2] if name == "seg-bin" else counts[:4]
                np.testing.assert_allclose(fraction, expected, atol=1e-6)
            if name == "seg":
                np.testing.assert_allclose(fractions.sum(axis=1), 1.0, atol=1e-5)

        one = oip_clients.infer(client, "seg", [oip_clients.images_input([images[0]])], outputs=["class_fraction"])
        assert one.as_numpy("mask") is None and one.as_numpy("class_fraction").shape == (1, 4)

        mixed = [image(40, 50, seed=43), image(50, 40, seed=44)]
        with pytest.raises(Exception) as info:
            oip_clients.infer(client, "seg", [oip_clients.images_input(mixed)])
        assert "one size" in str(info.value)
        assert _status(info.value) in ("400", "StatusCode.INVALID_ARGUMENT")
        with pytest.raises(Exception) as info:
            oip_clients.infer(client, "seg", [oip_clients.images_input([b"not an image"])])
        assert "JPEG or PNG" in str(info.value)
        assert _status(info.value) in ("400", "StatusCode.INVALID_ARGUMENT")
    finally:
        client.close()
    _assert_still_serving(served)


def test_oip_rest_json_tensors_carry_the_mask(served):
    """Plain JSON (no binary extension): base64 images in, the mask's ids flat in row-major order."""
    if served["engine"] != "native":
        pytest.skip("the TorchServe engine does not speak OIP v2")
    s, data = served["settings"], image(24, 30, seed=51)
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(data).decode()]}]}
    resp = requests.post(f"http://127.0.0.1:{s.inference_port}/v2/models/seg/infer", data=json.dumps(body),
                         headers={"Authorization": f"Bearer {served['token']}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert (outputs["mask"]["datatype"], outputs["mask"]["shape"]) == ("UINT8", [1, 24, 30])
    assert_same_mask(np.array(outputs["mask"]["data"], dtype=np.uint8).reshape(24, 30), served["bundles"]["seg"], data)
    assert sum(outputs["class_fraction"]["data"]) == pytest.approx(1.0, abs=1e-5)
