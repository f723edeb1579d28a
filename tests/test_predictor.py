"""The engine-independent predictor, in process: parsing, batching, top-k, errors."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from service.errors import InvalidInput, PayloadTooLarge
from service.inference import Predictor, parse_k
from service.inference.decode import image_size
from service.models import image_eval_transform, load_model
from tests.helpers import TEXTS, make_bundle, random_image

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cnn():
    return Predictor(make_bundle("cnn"), name="cnn", version="1")


@pytest.fixture(scope="module")
def lstm():
    return Predictor(make_bundle("lstm"), name="lstm", version="1")


@pytest.fixture(scope="module")
def text():
    return Predictor(make_bundle("gru-text"), name="text", version="1")


def _probs(answer, index=0):
    return {p["index"]: p["probability"] for p in answer["predictions"][index]["top_k"]}


def test_image_batch_matches_plain_forward(cnn):
    bundle = make_bundle("cnn")
    imgs = [random_image(1, 20 + i, 24, "png", seed=i) for i in range(3)]
    result = cnn.predict([{"a": imgs[0], "b": imgs[1]}, {"c": imgs[2], "k": b"10"}])
    first, second = result.outputs
    assert [p["input"] for p in first["predictions"]] == ["a", "b"]
    assert len(first["predictions"][0]["top_k"]) == 5
    assert len(second["predictions"][0]["top_k"]) == 10
    model = load_model(bundle.spec, bundle.state_dict)
    transform = image_eval_transform(bundle.spec.input)
    from torchvision.io import ImageReadMode, decode_image

    x = transform(decode_image(torch.frombuffer(bytearray(imgs[2]), dtype=torch.uint8), ImageReadMode.GRAY))
    with torch.no_grad():
        expected = torch.softmax(model(x.unsqueeze(0)), 1)[0]
    for idx, p in _probs(second).items():
        assert p == pytest.approx(expected[idx].item(), abs=1e-5)
    probs = [p["probability"] for p in second["predictions"][0]["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert result.items == 3 and result.timings["inference"] > 0


def test_one_bad_request_does_not_fail_the_batch(cnn):
    good = random_image(1, 16, 16)
    result = cnn.predict([{"x": b"not an image"}, {"x": good}, {}])
    bad, ok, empty = result.outputs
    assert isinstance(bad, InvalidInput) and "JPEG or PNG" in bad.message
    assert ok["predictions"][0]["top_k"]
    assert isinstance(empty, InvalidInput)


@pytest.mark.parametrize(
    "value, expected",
    [(None, 5), (3, 3), (b"2", 2), ("7", 7), (500, 10)],  # capped at 10 classes
)
def test_k_parsing(value, expected):
    assert parse_k(value, 10) == expected


@pytest.mark.parametrize("value", [0, -1, "abc", b"1.5", 1001, True, 2.0])
def test_k_out_of_range(value):
    with pytest.raises(InvalidInput, match="k must"):
        parse_k(value, 10)


def test_sequences_are_padded_without_changing_answers(lstm):
    bundle = make_bundle("lstm")
    model = load_model(bundle.spec, bundle.state_dict)
    torch.manual_seed(3)
    seqs = [torch.randn(n, 8).tolist() for n in (3, 11, 6)]
    answer = lstm.predict([{"body": json.dumps({"inputs": seqs, "k": 3}).encode()}]).outputs[0]
    assert len(answer["predictions"]) == 3
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([seq]), torch.tensor([len(seq)])), 1)[0]
        for idx, p in _probs(answer, i).items():
            assert p == pytest.approx(expected[idx].item(), abs=1e-5)
    single = lstm.predict([{"body": seqs[1]}]).outputs[0]  # one bare sequence, decoded JSON
    assert _probs(single) == pytest.approx(_probs(answer, 1), abs=1e-5)


@pytest.mark.parametrize(
    "body, needle",
    [
        ([[1.0] * 7], "expects 8"),
        ([[1.0] * 8, [1.0] * 9], "expects 8"),
        ("[[1, 2", "not valid JSON"),
        ('[[NaN, 1, 1, 1, 1, 1, 1, 1]]', "NaN"),
        ([[float("inf")] * 8], "finite"),
        ([], "empty"),
        ([[[[1.0] * 8]]], "expected a sequence"),
        ({"seq": [[1.0] * 8]}, "inputs"),
        ([["a"] * 8], "expected a number"),
        ([[1.0] * 8] * 65, "max_length"),
    ],
)
def test_bad_sequences_are_invalid_input(lstm, body, needle):
    value = body if isinstance(body, str) else json.dumps(body, allow_nan=True)
    out = lstm.predict([{"body": value.encode()}]).outputs[0]
    assert isinstance(out, InvalidInput), out
    assert needle in out.message


def test_text_and_token_ids_agree(text):
    vocab = make_bundle("gru-text").vocab
    by_text = text.predict([{"body": json.dumps({"inputs": TEXTS[0]}).encode()}]).outputs[0]
    by_raw = text.predict([{"body": TEXTS[0].encode()}]).outputs[0]  # plain text body
    by_ids = text.predict([{"body": json.dumps(vocab.encode(TEXTS[0]))}]).outputs[0]
    assert _probs(by_text) == pytest.approx(_probs(by_ids), abs=1e-6)
    assert _probs(by_raw) == pytest.approx(_probs(by_ids), abs=1e-6)
    out = text.predict([{"body": json.dumps([1, 2, 99])}]).outputs[0]
    assert isinstance(out, InvalidInput) and "outside [0, 32)" in out.message


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_decompression_bomb_is_refused_before_decoding(cnn):
    assert image_size(_png_header(100_000, 100_000)) == (100_000, 100_000)
    out = cnn.predict([{"x": _png_header(100_000, 100_000)}]).outputs[0]
    assert isinstance(out, PayloadTooLarge) and out.http_status == 413


@pytest.mark.parametrize("cut", [10, 30, 200])
def test_truncated_images_are_invalid_input(cnn, cut):
    for fmt in ("png", "jpeg"):
        data = random_image(1, 32, 32, fmt)[:cut]
        out = cnn.predict([{"x": data}]).outputs[0]
        assert isinstance(out, InvalidInput), (fmt, cut, out)


def test_jpeg_size_is_read_from_the_frame_header():
    assert image_size(random_image(3, 37, 53, "jpeg")) == (53, 37)
