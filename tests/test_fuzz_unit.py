"""Bad input without a server: the fuzz generator is seeded, deterministic and covers every
category, and the PNG check keeps the pixels of valid PNGs and checks its limits before libpng
sees them. The campaigns against each real engine are tests/test_fuzz.py."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torchvision.io import ImageReadMode, decode_image

from service.errors import InvalidInput, PayloadTooLarge
from service.inference import decode
from testkit import fuzzing
from testkit.fuzzing import generate

pytestmark = pytest.mark.unit


#: Small counts for the determinism check: every category, a fraction of the cases.
SMALL = {category: 12 for category in fuzzing.ALL_CATEGORIES} | {"oversize_body": 2, "oip": 80}


def _fingerprint(cases):
    return [(c.category, c.kind, c.transport, c.model, c.body, sorted(c.headers.items()), sorted(c.inputs.items()),
             c.api, c.version) for c in cases]


def test_generator_is_seeded_deterministic_and_covers_every_category():
    a, dropped_a = generate(seed=5, counts=SMALL, engine="native")
    b, dropped_b = generate(seed=5, counts=SMALL, engine="native")
    c, _ = generate(seed=6, counts=SMALL, engine="native")
    assert _fingerprint(a) == _fingerprint(b) and dropped_a == dropped_b
    assert _fingerprint(a) != _fingerprint(c)
    assert _fingerprint([x for x in a if x.api == "oip"]) != _fingerprint([x for x in c if x.api == "oip"])
    # TorchServe's campaign is the native one without OIP: the same cases, first
    ts, _ = generate(seed=5, counts=SMALL)
    assert _fingerprint(ts) == _fingerprint(a[:len(ts)])
    assert {x.category for x in ts} == set(fuzzing.CATEGORIES)
    assert {x.api for x in a[len(ts):]} == {"oip"}
    full, _ = generate()
    assert len(full) >= 1000
    per = Counter((case.category, case.transport) for case in full)
    for category in fuzzing.CATEGORIES:
        assert per[(category, "rest")] and per[(category, "grpc")], category
    kinds = {case.kind for case in full}
    assert {"png_huge_header", "jpeg_huge_header", "truncated", "bitflip", "header_k", "json_k",
            "grpc_input_k", "over_max_request_size"} <= kinds
    native, _ = generate(engine="native")
    oip_kinds = Counter((x.transport, x.kind.split("/")[0]) for x in native if x.api == "oip")
    assert sum(oip_kinds.values()) >= 600
    assert oip_kinds[("rest", "element_bomb")] == 4 and oip_kinds[("grpc", "element_bomb")] == 3
    for kind in fuzzing._Gen.OIP_REST_KINDS:
        assert oip_kinds[("rest", kind)] >= 10, kind
    for kind in fuzzing._Gen.OIP_GRPC_KINDS:
        assert oip_kinds[("grpc", kind)] >= 10, kind
    # the value lists are sent in turn: every bad Inference-Header-Content-Length, top_k, shape
    variants = {x.kind for x in native if x.api == "oip"}
    for name, _ in fuzzing._Gen.BAD_LENGTH_TEXT:
        assert f"header_length_not_number/{name}" in variants, name


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
