"""Serving segmentation models in process (issue 13, section 4): the served rule is the
trainer's, the predictor's masks at each image's size, a center-cropped view sampled back, the
precision check on pixels, masks in chunks, the mask PNG, the 8-bit bound and the OIP contract.
Both engines serving them are tests/test_segmentation_serving.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.io import decode_png, encode_png

from service.errors import InvalidInput, InvalidSpec
from service.inference import Predictor, RuntimeOptions, check_precision, maskpng
from service.inference.segmentation import crop_box, predict_masks, predict_masks_through_crop
from service.models import ModelSpec, build_model, load_model
from service.models import decisions
from service.modelstore import ModelBundle, ModelStore
from service.modelstore.check import verify_archive
from service.serving.native import oip
from service.training import tasks
from tests.test_segmentation_serving import (
    SPECS, TIE, _transformed, assert_prediction, image, make_unet, png_pixels, unet_bundles)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bundles():
    return unet_bundles()


def test_the_served_rule_is_the_trainers():
    assert tasks.segmentation_prediction is decisions.segmentation_prediction
    assert tasks.MULTILABEL_THRESHOLD == decisions.MULTILABEL_THRESHOLD == 0.5
    logits = torch.tensor([[[[0.0, -1e-3, 3.0]]]])  # sigmoid(0) = 0.5 exactly: ge, not gt
    assert decisions.segmentation_prediction(logits).tolist() == [[[1, 0, 1]]]


def test_predictor_answers_masks_at_each_images_size(bundles):
    images = {"wide": image(40, 50, seed=1), "small": image(16, 20, seed=2), "jpeg": image(40, 50, 3, "jpeg"),
              "square": image(32, 32, seed=4)}
    for name, bundle in bundles.items():
        predictor = Predictor(bundle, name=name, version="1", max_batch=3)  # 4 images: two chunks
        assert predictor.warm_up([1, 3]).keys() == {1, 3}
        result = predictor.predict([dict(images, k=b"junk")], [None])  # k does not apply: ignored
        answer = result.outputs[0]
        assert (answer["model"], answer["version"]) == (name, "1")
        assert [p["input"] for p in answer["predictions"]] == list(images)
        masks = [assert_prediction(p, bundle, images[p["input"]]) for p in answer["predictions"]]
        assert len(np.unique(masks[0])) == (2 if name == "seg-bin" else 4)  # not a constant mask
        # channels_last runs the same forward in another memory format: the same masks
        other = Predictor(bundle, runtime=RuntimeOptions("fp32", channels_last=True)).predict([images], [3])
        assert [png_pixels(p["mask"]).tolist() for p in other.outputs[0]["predictions"]] == [
            m.tolist() for m in masks]


def test_a_center_cropped_view_is_sampled_back_where_the_crop_came_from():
    """With ``resize`` (shorter side) and a center crop, the model sees the crop only: the mask
    puts its logits back there, and the cut-off sides take the crop's edge. An 80x100 image,
    resize 40, size 32: resized 40x50, the crop at (4, 9), i.e. rows 8..71 and columns 18..81 of
    the original, twice the crop's scale: that region is interpolate(logits, 64x64), the
    rest its edge rows and columns repeated."""
    bundle = make_unet("seg", seed=5, input={"type": "image", "channels": 1, "size": 32, "resize": 40})
    model = load_model(bundle.spec, bundle.state_dict)
    data = image(80, 100, seed=61)
    pred = Predictor(bundle).predict([{"x": data}]).outputs[0]["predictions"][0]
    assert (pred["height"], pred["width"]) == (80, 100)
    with torch.no_grad():
        logits = model(_transformed(bundle.spec, data).unsqueeze(0))
    up = F.pad(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False), (18, 18, 8, 8),
               mode="replicate")[0]
    expected, got = up.argmax(dim=0), torch.from_numpy(png_pixels(pred["mask"]).astype(np.int64))
    top2 = up.topk(2, dim=0).values
    differ = got != expected
    assert int(differ.sum()) <= 3 and bool((top2[0] - top2[1])[differ].lt(TIE).all())
    assert len(expected.unique()) > 1
    # the geometry is torchvision's: resize's size and center_crop's anchor
    for height, width in ((80, 100), (100, 80), (33, 47), (47, 33), (41, 97), (40, 40)):
        x = torch.arange(height * width, dtype=torch.float32).reshape(1, height, width)
        resized = TF.resize(x, [40], interpolation=TF.InterpolationMode.NEAREST)
        new_h, new_w, top, left = crop_box(bundle.spec.input, height, width)
        assert (new_h, new_w) == tuple(resized.shape[-2:])
        assert torch.equal(TF.center_crop(resized, [32, 32]), resized[:, top:top + 32, left:left + 32])


def test_the_precision_check_compares_pixels(bundles):
    """A reduced precision is admitted on the agreement of every pixel's class (the served
    rule), not of an argmax over a (C, H, W) output counted per image."""
    held_out = [image(32, 32, seed=700 + i) for i in range(100)]
    for name, bundle in bundles.items():
        check = check_precision(bundle, held_out, "bf16", batch_size=100)
        assert check.samples == 100 and check.agreed <= 100 * 32 * 32
        assert check.agreement == check.agreed / (100 * 32 * 32) and 0.9 < check.agreement <= 1.0
        assert 0 < check.max_abs_prob_diff < 0.5  # probabilities (softmax / sigmoid), not logits


def test_masks_in_chunks_equal_one_argmax():
    """Past the chunk bound, images go one at a time and classes in groups, with a running
    maximum: the same ids as one argmax, ties (integer logits) to the lower class."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (3, 7, 8, 8), generator=g).float()
    expected = F.interpolate(logits, size=(33, 41), mode="bilinear", align_corners=False).argmax(dim=1)
    for chunk in (1 << 24, 33 * 41 * 7, 33 * 41 * 3, 1):
        assert torch.equal(predict_masks(logits, (33, 41), chunk_elements=chunk), expected), chunk
    one = torch.randn(2, 1, 8, 8, generator=g)
    assert torch.equal(predict_masks(one, (20, 9), chunk_elements=1),
                       torch.ge(torch.sigmoid(F.interpolate(one, (20, 9), mode="bilinear")[:, 0]), 0.5).long())
    box = (8, 11, 0, 1)  # through a crop: bands of rows
    whole = predict_masks_through_crop(logits, (33, 41), box)
    assert torch.equal(predict_masks_through_crop(logits, (33, 41), box, chunk_elements=7 * 41 * 2), whole)
    assert torch.equal(predict_masks_through_crop(logits, (33, 41), box, chunk_elements=1), whole)


def test_mask_png_is_a_plain_8_bit_grayscale_png():
    mask = np.random.default_rng(0).integers(0, 256, size=(7, 13), dtype=np.uint8)
    data = maskpng.encode(mask)
    decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    assert decoded.shape == (1, 7, 13) and np.array_equal(decoded[0].numpy(), mask)
    assert np.array_equal(maskpng.decode(data), mask)
    with pytest.raises(ValueError):
        maskpng.decode(encode_png(torch.zeros((3, 4, 4), dtype=torch.uint8)).numpy().tobytes())  # RGB


def test_more_classes_than_8_bit_masks_hold_are_refused(tmp_path):
    spec = dict(SPECS["seg"], num_classes=257, config={"depth": 2, "base_channels": 1})
    bundle = ModelBundle(ModelSpec.from_dict(spec), build_model(ModelSpec.from_dict(spec)).state_dict(),
                         [f"c{i}" for i in range(257)])
    with pytest.raises(InvalidSpec, match="at most 256 classes"):
        Predictor(bundle)
    store = ModelStore(tmp_path / "store")
    store.write("wide", bundle)
    with pytest.raises(Exception, match="at most 256 classes"):
        verify_archive(store.path("wide", 1), name="wide", version=1)


def test_oip_contract_of_a_segmentation_model(bundles):
    io_ = oip.model_io(Predictor(bundles["seg"]))
    assert io_.metadata() == {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
                              "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
                                          {"name": "class_fraction", "datatype": "FP32", "shape": [-1, 4]}]}
    tensor = oip.Tensor("images", "BYTES", [2], [image(40, 50, 1), image(40, 51, 2)])
    with pytest.raises(InvalidInput, match="one size"):
        oip.to_payload(io_, [tensor])
    same = oip.Tensor("images", "BYTES", [3], [image(40, 50, 1), image(40, 50, 2, "jpeg"), b"not an image"])
    assert list(oip.to_payload(io_, [same])) == ["0", "1", "2"]  # the bad one is the predictor's to name
