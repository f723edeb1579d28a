"""Bad-input fuzzing: a seeded generator of bad payloads, and a campaign against a real server.

Used by ``tests/test_fuzz.py`` (a real TorchServe, real gRPC gateway) and by
``benchmarks.fuzz_report`` (``make fuzz``, the figures in BENCHMARKS.md). Nothing here
is faked: every case is sent over the wire, REST to TorchServe's ``/predictions`` and gRPC
through our gateway.

A case is *bad by construction*: a PNG whose chunks, checksums, header fields or image data
break the PNG specification; a JPEG that the reference decoder (``torchvision.io`` through
``service.inference.decode``, in this process) refuses; a body the model cannot take; an
invalid ``k``. Generation is deterministic for a seed (Python's ``random.Random``, a seeded
torch generator for pixels), so a failing case can be rebuilt and replayed by its id.

The expected answer to every case is an HTTP 4xx with a message, or gRPC INVALID_ARGUMENT
with a message. gRPC RESOURCE_EXHAUSTED is also accepted for the ``oversize`` category
only: gRPC itself refuses a message over the server's limit with that status, before any
of our code runs. Anything else (a 5xx, another gRPC status, a 2xx, no answer within the
client timeout) is a failure, as is a worker that was restarted during the campaign.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

from service.errors import ServiceError

# --------------------------------------------------------------------------------------
# The models under test: tiny, one image CNN and one float-sequence RNN.
# --------------------------------------------------------------------------------------
IMAGE_MODEL = "fuzz-cnn"
SEQ_MODEL = "fuzz-lstm"
IMAGE_SPEC = {
    "family": "cnn", "num_classes": 6,
    "config": {"channels": [4, 8], "activation": "relu", "pool": "max"},
    # resize set: the shorter side is resized first, so the aspect-ratio limit is exercised
    "input": {"type": "image", "channels": 3, "size": 16, "resize": 20},
}
FEATURES = 4
MAX_LENGTH = 32
SEQ_SPEC = {
    "family": "rnn", "num_classes": 3,
    "config": {"cell": "lstm", "input_size": FEATURES, "hidden_size": 8, "pooling": "last"},
    "input": {"type": "sequence", "max_length": MAX_LENGTH},
}
#: Requests per TorchServe batch: bad and good requests share batches.
BATCH_SIZE = 4
MAX_BATCH_DELAY_MS = 10

#: The categories every engine gets: TorchServe's inference API (REST ``/predictions``, gRPC
#: ``Predictions``), which both engines serve.
CATEGORIES = ("png_corrupt", "jpeg_corrupt", "decompression_bomb", "wrong_content_type",
              "empty_body", "oversize_body", "nan_inf_sequence", "wrong_nesting", "bad_k")
#: Open Inference Protocol v2 (REST ``/v2/models/<m>/infer``, gRPC ``ModelInfer``): the
#: native engine only (TorchServe does not speak it).
OIP_CATEGORIES = ("oip",)
ALL_CATEGORIES = CATEGORIES + OIP_CATEGORIES
#: Cases per category in the default campaign (both transports together).
DEFAULT_COUNTS = {
    "png_corrupt": 180, "jpeg_corrupt": 160, "decompression_bomb": 60, "wrong_content_type": 100,
    "empty_body": 40, "oversize_body": 8, "nan_inf_sequence": 150, "wrong_nesting": 150,
    "bad_k": 160, "oip": 640,
}
#: The binary tensor extension's header: the length of the JSON part of a REST OIP body.
HEADER_LENGTH = "Inference-Header-Content-Length"


def categories(engine: str) -> tuple[str, ...]:
    """The categories a campaign against ``engine`` sends."""
    return ALL_CATEGORIES if engine == "native" else CATEGORIES


def _itemsize(datatype: str) -> int:
    """Bytes per element of an OIP datatype (0 for BYTES or an unknown one)."""
    from service.serving.native.oip import NUMPY

    dtype = NUMPY.get(datatype)
    return dtype.itemsize if dtype is not None else 0


@dataclass
class Case:
    """One bad request. TorchServe's API: REST ``body`` with ``headers``, gRPC the ``inputs``
    map. OIP (``api="oip"``): REST ``body`` with ``headers`` to ``/v2/models/<model>[/versions/
    <version>]/infer``; gRPC ``body`` is the serialized ``ModelInferRequest``."""

    id: int
    category: str
    kind: str
    transport: str  # "rest" or "grpc"
    model: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)
    api: str = "torchserve"  # or "oip"
    version: str | None = None

    def describe(self) -> str:
        size = len(self.body) if self.transport == "rest" or self.api == "oip" else sum(
            map(len, self.inputs.values()))
        api = " OIP" if self.api == "oip" else ""
        version = f" version {self.version}" if self.version is not None else ""
        return (f"#{self.id} {self.category}/{self.kind} over {self.transport}{api} to {self.model[:40]}{version} "
                f"({size} bytes)")


# --------------------------------------------------------------------------------------
# PNG and JPEG building blocks
# --------------------------------------------------------------------------------------
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a well-formed PNG."""
    out, i = [], 8
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        out.append((data[i + 4:i + 8], data[i + 8:i + 8 + n]))
        i += 12 + n
    return out


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIG + b"".join(png_chunk(k, d) for k, d in chunks)


def ihdr(width: int, height: int, bit_depth: int = 8, color_type: int = 0, compression: int = 0,
         filter_method: int = 0, interlace: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", width, height, bit_depth, color_type, compression, filter_method,
                       interlace)


def gray_png(width: int, height: int, fill: int = 0, level: int = 6) -> bytes:
    """A valid 8-bit grayscale PNG of one colour (compresses ~1000:1: bomb material)."""
    row = b"\x00" + bytes([fill]) * width
    raw = zlib.compress(row * height, level)
    return build_png([(b"IHDR", ihdr(width, height)), (b"IDAT", raw), (b"IEND", b"")])


def rgb_pixels(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def sample_png(g: torch.Generator, rng: random.Random) -> bytes:
    return encode_png(rgb_pixels(g, rng.randint(8, 40), rng.randint(8, 40))).numpy().tobytes()


def sample_jpeg(g: torch.Generator, rng: random.Random) -> bytes:
    pixels = rgb_pixels(g, rng.randint(8, 40), rng.randint(8, 40))
    return encode_jpeg(pixels, quality=rng.choice([50, 75, 90])).numpy().tobytes()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, total length incl. the marker) of each header segment up to SOS."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        out.append((i, marker, 2 + length))
        if marker == 0xDA:
            break
        i += 2 + length
    return out


def flip_bits(data: bytes, rng: random.Random, lo: int, hi: int, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        pos = rng.randrange(lo, hi)
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def reference_refuses(data: bytes) -> bool:
    """True when the reference decoder (service.inference.decode, in this process) refuses
    ``data`` as an image for the image model."""
    from service.inference import decode

    try:
        decode.decode_image_bytes(data, IMAGE_SPEC["input"]["channels"])
    except ServiceError:
        return True
    return False


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------
class _Gen:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.cases: list[Case] = []
        self.dropped: Counter = Counter()
        self._picks: dict[str, int] = {}
        self.max_request_size = 16 * 1024 * 1024

    def transport(self, i: int) -> str:
        return "rest" if i % 2 == 0 else "grpc"

    def add(self, category: str, kind: str, transport: str, model: str, *, body: bytes | None = None,
            headers: dict | None = None, inputs: dict | None = None, key: str | None = None) -> None:
        """A case carrying one payload: REST as the raw body, gRPC as the input ``key``."""
        headers = dict(headers or {})
        if transport == "rest":
            if body is None:
                body = b""
            headers.setdefault("Content-Type", "application/octet-stream")
            case = Case(0, category, kind, "rest", model, body=body, headers=headers)
        else:
            if inputs is None:
                inputs = {} if body is None else {key or ("data" if model == SEQ_MODEL else "img"): body}
            case = Case(0, category, kind, "grpc", model, inputs=inputs)
        case.id = len(self.cases)
        self.cases.append(case)

    def image(self, category: str, kind: str, i: int, data: bytes, *, check: bool = True) -> None:
        """An image case; with ``check``, dropped (counted) if the reference decoder takes it."""
        if check and not reference_refuses(data):
            self.dropped[f"{category}/{kind}"] += 1
            return
        self.add(category, kind, self.transport(i), IMAGE_MODEL, body=data,
                 headers={"Content-Type": self.rng.choice(["image/png", "image/jpeg",
                                                           "application/octet-stream"])})

    # ---- PNG ---------------------------------------------------------------------------
    def png_corrupt(self, n: int) -> None:
        kinds = ["bitflip", "truncated", "bad_signature", "idat_zlib_error", "short_image_data",
                 "long_image_data", "bad_filter_byte", "bad_ihdr", "no_iend", "palette_without_plte",
                 "unknown_critical_chunk", "huge_chunk_length", "trailing_zlib_data", "interlaced_short",
                 "bad_plte"]
        made = i = 0
        while made < n:
            kind = kinds[i % len(kinds)]
            data = self._png_case(kind)
            before = len(self.cases)
            self.image("png_corrupt", kind, i, data, check=False)  # bad by the PNG specification
            made += len(self.cases) - before
            i += 1
            if i > 20 * n:
                raise RuntimeError("cannot generate enough corrupt PNGs")

    def _png_case(self, kind: str) -> bytes:
        rng = self.rng
        good = sample_png(self.g, rng)
        chunks = png_chunks(good)
        ihdr_data, idat = chunks[0][1], b"".join(d for k, d in chunks if k == b"IDAT")
        width, height, depth, ctype = struct.unpack(">IIBB", ihdr_data[:10])
        raw = zlib.decompress(idat)
        if kind == "bitflip":
            return flip_bits(good, rng, 8, len(good), rng.randint(1, 8))
        if kind == "truncated":
            return good[:rng.randrange(1, len(good))]
        if kind == "bad_signature":
            return flip_bits(good, rng, 0, 8, 1)
        if kind == "idat_zlib_error":  # data damaged, checksum of the chunk recomputed
            damaged = flip_bits(idat, rng, 0, len(idat), rng.randint(1, 4))
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", damaged), (b"IEND", b"")])
        if kind == "short_image_data":
            cut = rng.randrange(0, len(raw))
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", zlib.compress(raw[:cut])), (b"IEND", b"")])
        if kind == "long_image_data":
            extra = bytes(rng.randint(1, 4 * (width * 3 + 1)))
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", zlib.compress(raw + extra)), (b"IEND", b"")])
        if kind == "bad_filter_byte":
            stride = width * 3 + 1
            rows = bytearray(raw)
            rows[stride * rng.randrange(height)] = rng.randint(5, 255)
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", zlib.compress(bytes(rows))), (b"IEND", b"")])
        if kind == "bad_ihdr":
            field_ = rng.choice(["width0", "height0", "depth", "ctype", "compression", "filter",
                                 "interlace", "combo", "short"])
            if field_ == "short":
                return build_png([(b"IHDR", ihdr_data[:rng.randrange(13)]), (b"IDAT", idat), (b"IEND", b"")])
            values = dict(width=width, height=height, bit_depth=depth, color_type=ctype)
            if field_ == "width0":
                values["width"] = 0
            elif field_ == "height0":
                values["height"] = 0
            elif field_ == "depth":
                values["bit_depth"] = rng.choice([0, 3, 5, 7, 9, 32, 255])
            elif field_ == "ctype":
                values["color_type"] = rng.choice([1, 5, 7, 8, 255])
            elif field_ == "combo":  # allowed values, forbidden pair
                values["bit_depth"], values["color_type"] = rng.choice([(1, 2), (4, 6), (16, 3), (2, 4)])
            extra = {"compression": {"compression": rng.randint(1, 255)},
                     "filter": {"filter_method": rng.randint(1, 255)},
                     "interlace": {"interlace": rng.randint(2, 255)}}.get(field_, {})
            return build_png([(b"IHDR", ihdr(**values, **extra)), (b"IDAT", idat), (b"IEND", b"")])
        if kind == "no_iend":
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", idat)])
        if kind == "palette_without_plte":
            pal = ihdr(width, height, 8, 3)
            rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
            return build_png([(b"IHDR", pal), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])
        if kind == "bad_plte":
            pal = ihdr(width, height, rng.choice([1, 2, 4, 8]), 3)
            bits = pal[8]
            entries = rng.choice([0, 257, 300, (1 << bits) + 1]) if bits < 8 else rng.choice([0, 257])
            plte = bytes(3 * entries) if rng.random() < 0.7 else bytes(3 * 4 + rng.randint(1, 2))
            rowbytes = (width * bits + 7) // 8
            rows = b"".join(b"\x00" + bytes(rowbytes) for _ in range(height))
            return build_png([(b"IHDR", pal), (b"PLTE", plte), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])
        if kind == "unknown_critical_chunk":
            name = bytes([rng.randint(65, 90)]) + bytes(rng.randint(97, 122) for _ in range(3))
            return build_png([(b"IHDR", ihdr_data), (name, bytes(rng.randint(0, 16))), (b"IDAT", idat),
                              (b"IEND", b"")])
        if kind == "huge_chunk_length":
            out = bytearray(good)
            pos = 8 + 12 + 13  # IDAT's length field
            out[pos:pos + 4] = struct.pack(">I", rng.choice([0x7FFFFFFF, 0xFFFFFFFF, 0x80000000,
                                                             len(idat) + rng.randint(1, 1000)]))
            return bytes(out)
        if kind == "trailing_zlib_data":
            return build_png([(b"IHDR", ihdr_data), (b"IDAT", idat + bytes(rng.randint(1, 64))),
                              (b"IEND", b"")])
        if kind == "interlaced_short":  # Adam7 declared, data laid out for a plain image
            return build_png([(b"IHDR", ihdr(width, height, depth, ctype, interlace=1)),
                              (b"IDAT", zlib.compress(raw[:len(raw) - rng.randint(1, width)])), (b"IEND", b"")])
        raise ValueError(kind)

    # ---- JPEG --------------------------------------------------------------------------
    def jpeg_corrupt(self, n: int) -> None:
        kinds = ["truncated", "bitflip", "header_bitflip", "bad_soi", "bad_sof", "bad_dht", "bad_dqt",
                 "bad_sos", "segment_length", "missing_segment", "garbage_after_soi"]
        made = i = 0
        while made < n:
            kind = kinds[i % len(kinds)]
            before = len(self.cases)
            self.image("jpeg_corrupt", kind, i, self._jpeg_case(kind))
            made += len(self.cases) - before
            i += 1
            if i > 20 * n:
                raise RuntimeError("cannot generate enough corrupt JPEGs")

    def _jpeg_case(self, kind: str) -> bytes:
        rng = self.rng
        good = sample_jpeg(self.g, rng)
        segs = jpeg_segments(good)
        by_marker = {m: (off, ln) for off, m, ln in segs}
        sos_off = by_marker[0xDA][0]
        out = bytearray(good)
        if kind == "truncated":
            return good[:rng.randrange(2, len(good) - 2)]
        if kind == "bitflip":
            return flip_bits(good, rng, 2, len(good), rng.randint(1, 16))
        if kind == "header_bitflip":
            return flip_bits(good, rng, 2, sos_off, rng.randint(1, 4))
        if kind == "bad_soi":
            return flip_bits(good, rng, 0, 2, 1)
        if kind == "bad_sof":
            off = by_marker[0xC0][0]
            which = rng.choice(["precision", "components", "sampling", "qtable", "height0", "width0"])
            if which == "precision":
                out[off + 4] = rng.choice([0, 7, 9, 16, 255])
            elif which == "components":
                out[off + 9] = rng.choice([0, 2, 5, 255])
            elif which == "sampling":
                out[off + 11] = rng.choice([0x00, 0x05, 0x50, 0xFF])
            elif which == "qtable":
                out[off + 12] = rng.choice([4, 9, 255])
            elif which == "height0":
                out[off + 5:off + 7] = b"\0\0"
            else:
                out[off + 7:off + 9] = b"\0\0"
            return bytes(out)
        if kind == "bad_dht":
            off = by_marker[0xC4][0]
            which = rng.choice(["class", "counts"])
            if which == "class":
                out[off + 4] = rng.choice([0x20, 0x04, 0xFF])
            else:
                for j in range(16):
                    out[off + 5 + j] = 0xFF
            return bytes(out)
        if kind == "bad_dqt":
            off = by_marker[0xDB][0]
            out[off + 4] = rng.choice([0x04, 0x07, 0x20, 0xFF])
            return bytes(out)
        if kind == "bad_sos":
            which = rng.choice(["count", "selector", "tables", "spectral"])
            if which == "count":
                out[sos_off + 4] = rng.choice([0, 5, 255])
            elif which == "selector":
                out[sos_off + 5] = rng.choice([0, 9, 200])
            elif which == "tables":
                out[sos_off + 6] = rng.choice([0x44, 0x99, 0xFF])
            else:
                out[sos_off + 2 + by_marker[0xDA][1] - 3] = rng.choice([1, 63, 200])
            return bytes(out)
        if kind == "segment_length":
            off, marker, _ = rng.choice(segs)
            out[off + 2:off + 4] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, len(good)]))
            return bytes(out)
        if kind == "missing_segment":
            off, marker, length = rng.choice([s for s in segs if s[1] in (0xC0, 0xDA, 0xDB)])
            return good[:off] + good[off + length:]
        if kind == "garbage_after_soi":
            return good[:2] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + good[2:]
        raise ValueError(kind)

    # ---- decompression bombs and limits -----------------------------------------------
    def decompression_bomb(self, n: int) -> None:
        tiny_idat = zlib.compress(b"\0" * 64)
        huge = [(60000, 60000), (65535, 65535), (100000, 100000), (2**31 - 1, 2**31 - 1), (40000, 1001),
                (7000, 7000)]
        kinds = ["png_huge_header", "jpeg_huge_header", "png_over_width_limit", "png_aspect_ratio",
                 "request_pixel_budget", "too_many_images", "jpeg_scan_bomb"]
        for i in range(n):
            kind = kinds[i % len(kinds)]
            t = self.transport(i // len(kinds))
            if kind == "png_huge_header":
                w, h = self.rng.choice(huge)
                data = build_png([(b"IHDR", ihdr(w, h, 8, self.rng.choice([0, 2, 6]))), (b"IDAT", tiny_idat),
                                  (b"IEND", b"")])
                self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=data)
            elif kind == "jpeg_huge_header":
                data = bytearray(sample_jpeg(self.g, self.rng))
                off = [o for o, m, _ in jpeg_segments(bytes(data)) if m == 0xC0][0]
                w, h = self.rng.choice([(60000, 60000), (65500, 65500), (65535, 65535), (40000, 2000)])
                data[off + 5:off + 9] = struct.pack(">HH", h, w)
                self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=bytes(data))
            elif kind == "png_over_width_limit":  # beyond libpng's 1,000,000-pixel row limit
                w, h = self.rng.choice([(1_000_001, 1), (2_000_000, 1), (1, 3_000_000), (16_000_000, 2)])
                data = build_png([(b"IHDR", ihdr(w, h)), (b"IDAT", tiny_idat), (b"IEND", b"")])
                self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=data)
            elif kind == "png_aspect_ratio":  # valid, few pixels, but a huge image once resized
                w, h = self.rng.choice([(1_000_000, 1), (1, 1_000_000), (500_000, 2), (3, 400_000)])
                self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=_cached_gray_png(w, h))
            elif kind == "request_pixel_budget":  # each image under the limit, together over it
                img = _cached_gray_png(6000, 6000)
                if t == "rest":
                    body, ctype = multipart({f"img{j}": img for j in range(2)}, self.rng)
                    self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=body,
                             headers={"Content-Type": ctype})
                else:
                    self.add("decompression_bomb", kind, t, IMAGE_MODEL,
                             inputs={f"img{j}": img for j in range(2)})
            elif kind == "jpeg_scan_bomb":  # a progressive JPEG, then many empty scans
                scans = self.rng.choice([600, 5000, 100_000, 1_400_000])
                self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=_cached_scan_bomb(scans))
            else:
                tiny = sample_png(self.g, self.rng)
                count = self.rng.choice([65, 100, 200])
                if t == "rest":
                    body, ctype = multipart({f"i{j}": tiny for j in range(count)}, self.rng)
                    self.add("decompression_bomb", kind, t, IMAGE_MODEL, body=body,
                             headers={"Content-Type": ctype})
                else:
                    self.add("decompression_bomb", kind, t, IMAGE_MODEL,
                             inputs={f"i{j}": tiny for j in range(count)})

    # ---- content types, empty bodies, oversize ---------------------------------------
    def wrong_content_type(self, n: int) -> None:
        rng = self.rng
        gif = b"GIF89a" + bytes([16, 0, 16, 0, 0x80, 0, 0]) + bytes(rng.randrange(256) for _ in range(40))
        bmp = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + bytes(62)
        webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8 " + bytes(22)
        tiff = b"II*\x00" + bytes(40)
        for i in range(n):
            t = self.transport(i)
            to_image = i % 4 < 2
            if to_image:
                kind, body, ctype = rng.choice([
                    ("gif", gif, "image/gif"), ("bmp", bmp, "image/bmp"), ("webp", webp, "image/webp"),
                    ("tiff", tiff, "image/tiff"),
                    ("json_to_image", json.dumps({"inputs": [[0.5] * FEATURES]}).encode(), "application/json"),
                    ("text_to_image", b"a cat on a mat", "text/plain"),
                    ("html", b"<html><body><img src=x></body></html>", "text/html"),
                    ("form", b"img=abc&k=3", "application/x-www-form-urlencoded"),
                    ("random_bytes", bytes(rng.randrange(256) for _ in range(rng.randint(1, 512))),
                     "application/octet-stream"),
                    ("svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
                ])
                self.add("wrong_content_type", kind, t, IMAGE_MODEL, body=body, headers={"Content-Type": ctype})
            else:
                kind, body, ctype = rng.choice([
                    ("png_to_sequence", sample_png(self.g, rng), "image/png"),
                    ("png_as_json", sample_png(self.g, rng), "application/json"),
                    ("xml", b"<inputs><s>0.1</s></inputs>", "application/xml"),
                    ("form", b"inputs=0.1,0.2&k=2", "application/x-www-form-urlencoded"),
                    ("utf16_json", json.dumps([[0.1] * FEATURES]).encode("utf-16"), "application/json"),
                    ("latin1", "caf\xe9 \xff".encode("latin-1"), "text/plain"),
                    ("csv", b"0.1,0.2,0.3,0.4\n0.5,0.6,0.7,0.8\n", "text/csv"),
                    ("random_bytes", bytes(rng.randrange(256) for _ in range(rng.randint(1, 512))),
                     "application/octet-stream"),
                    ("text", b"an unknown word sequence", "text/plain"),
                ])
                self.add("wrong_content_type", kind, t, SEQ_MODEL, body=body, headers={"Content-Type": ctype})

    def empty_body(self, n: int) -> None:
        rng = self.rng
        for i in range(n):
            t = self.transport(i)
            model = IMAGE_MODEL if i % 4 < 2 else SEQ_MODEL
            if t == "rest":
                kind, body, ctype = rng.choice([
                    ("empty_octet", b"", "application/octet-stream"), ("empty_json", b"", "application/json"),
                    ("empty_text", b"", "text/plain"), ("empty_png", b"", "image/png"),
                    ("empty_multipart_part", None, None), ("whitespace_json", b"  \n ", "application/json"),
                ])
                if body is None:
                    body, ctype = multipart({"x": b""}, rng)
                self.add("empty_body", kind, t, model, body=body, headers={"Content-Type": ctype})
            else:
                kind, inputs = rng.choice([
                    ("no_inputs", {}), ("empty_input", {"x": b""}), ("only_k", {"k": b"3"}),
                    ("empty_input_and_k", {"x": b"", "k": b"1"}),
                ])
                self.add("empty_body", kind, t, model, inputs=inputs)

    def oversize_body(self, n: int, limit: int) -> None:
        big = _cached_big(limit + 64 * 1024)
        for i in range(n):
            t = self.transport(i)
            model = IMAGE_MODEL if i % 4 < 2 else SEQ_MODEL
            self.add("oversize_body", "over_max_request_size", t, model, body=big,
                     headers={"Content-Type": "application/json" if model == SEQ_MODEL else "image/png"})

    # ---- sequences ---------------------------------------------------------------------
    def _seq(self, steps: int | None = None) -> list[list[float]]:
        steps = steps or self.rng.randint(1, 12)
        return [[round(self.rng.uniform(-2, 2), 4) for _ in range(FEATURES)] for _ in range(steps)]

    def _send_json(self, category: str, kind: str, i: int, text: str | bytes, model: str = SEQ_MODEL,
                   headers: dict | None = None) -> None:
        body = text.encode() if isinstance(text, str) else text
        t = self.transport(i)
        ctype = self.rng.choice(["application/json", "application/json", "text/plain",
                                 "application/octet-stream"])
        self.add(category, kind, t, model, body=body, headers={"Content-Type": ctype, **(headers or {})})

    def nan_inf_sequence(self, n: int) -> None:
        rng = self.rng
        bad_values = ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "3.5e38", "-1e39", "1.8e308"]
        for i in range(n):
            seqs = [self._seq() for _ in range(rng.randint(1, 3))]
            token = rng.choice(bad_values)
            marker = "__BAD__"
            s = rng.randrange(len(seqs))
            t_ = rng.randrange(len(seqs[s]))
            seqs[s][t_][rng.randrange(FEATURES)] = marker
            shape = rng.choice(["bare_one", "bare_list", "object"])
            doc: Any = seqs[0] if shape == "bare_one" and len(seqs) == 1 else seqs
            if shape == "object":
                doc = {"inputs": doc, "k": rng.randint(1, 3)}
            text = json.dumps(doc).replace(f'"{marker}"', token)
            self._send_json("nan_inf_sequence", f"{token}_{shape}", i, text)

    def wrong_nesting(self, n: int) -> None:
        rng = self.rng
        for i in range(n):
            kind = rng.choice(["flat", "too_deep", "ragged_features", "wrong_feature_count", "step_not_list",
                               "string_values", "bool_values", "null_values", "empty_list", "empty_sequence",
                               "scalar_body", "object_without_inputs", "unknown_keys", "inputs_object",
                               "deep_brackets", "deep_objects", "too_long", "too_many_sequences",
                               "mixed_depth", "huge_int_value"])
            seq = self._seq()
            if kind == "flat":
                doc = [x for step in seq for x in step]
            elif kind == "too_deep":
                doc = [[seq]] if rng.random() < 0.5 else [[[seq]]]
            elif kind == "ragged_features":
                doc = [step[:rng.randint(0, FEATURES - 1)] if j % 2 else step for j, step in enumerate(seq)]
                if all(len(s) == FEATURES for s in doc):
                    doc = seq + [seq[0][:1]]
            elif kind == "wrong_feature_count":
                width = rng.choice([1, 2, 3, 5, 8, 100])
                doc = [[0.1] * width for _ in seq]
            elif kind == "step_not_list":
                doc = [seq[0], rng.choice([0.5, "x", None, {"a": 1}])] + seq[1:]
            elif kind == "string_values":
                doc = [[str(x) for x in step] for step in seq]
            elif kind == "bool_values":
                doc = [[True] * FEATURES for _ in seq]
            elif kind == "null_values":
                doc = [[None] * FEATURES for _ in seq]
            elif kind == "empty_list":
                doc = rng.choice([[], [[]], [[[]]], {"inputs": []}])
            elif kind == "empty_sequence":
                doc = [seq, []]
            elif kind == "scalar_body":
                doc = rng.choice([1, 0.5, "text", None, True])
            elif kind == "object_without_inputs":
                doc = rng.choice([{"input": seq}, {"data": seq}, {"k": 1}, {}])
            elif kind == "unknown_keys":
                doc = {"inputs": seq, "k": 1, "extra": rng.randint(0, 9)}
            elif kind == "inputs_object":
                doc = {"inputs": {"inputs": seq}}
            elif kind == "deep_brackets":
                depth = rng.choice([50, 1500, 5000, 100_000])
                self._send_json("wrong_nesting", f"{kind}_{depth}", i, "[" * depth + "]" * depth)
                continue
            elif kind == "deep_objects":
                depth = rng.choice([100, 3000, 50_000])
                self._send_json("wrong_nesting", f"{kind}_{depth}", i, '{"inputs":' * depth + "1" + "}" * depth)
                continue
            elif kind == "too_long":
                doc = self._seq(MAX_LENGTH + rng.randint(1, 100))
            elif kind == "too_many_sequences":
                doc = [self._seq(1) for _ in range(rng.choice([65, 200, 5000]))]
            elif kind == "mixed_depth":
                doc = [seq, seq[0]]
            else:  # huge_int_value: over Python's int-from-text digit limit
                self._send_json("wrong_nesting", kind, i, "[[" + "9" * rng.choice([4400, 10_000]) + ", 1, 2, 3]]")
                continue
            self._send_json("wrong_nesting", kind, i, json.dumps(doc))

    # ---- k ----------------------------------------------------------------------------
    BAD_K_TEXT = ["0", "-1", "-5", "1001", "5000", "99999999999999999999", "1" * 5000, "3.5", "1e3",
                  "abc", "", "  ", "0x10", "+3", "\u00b2", "\u0663", "NaN", "inf", "3 4", "1,2", "[3]",
                  "-0", "00000000000000000000000000000", "k=3", "\u20073"]
    BAD_K_JSON = ["0", "-1", "1001", "1e30", "1.5", "2.0", "true", "false", "[3]", '{"k": 3}', '"abc"', '""',
                  "1e400", "NaN", "-Infinity", "9" * 4400, "-" + "9" * 30]

    def bad_k(self, n: int) -> None:
        rng = self.rng
        for i in range(n):
            t = self.transport(i)
            way = rng.choice(["header", "multipart", "json"]) if t == "rest" else rng.choice(["input", "json"])
            model = SEQ_MODEL if way == "json" or (i % 3 == 0) else IMAGE_MODEL
            payload = (json.dumps([self._seq()]).encode() if model == SEQ_MODEL
                       else sample_png(self.g, rng))
            if way == "json":
                k = rng.choice(self.BAD_K_JSON)
                text = '{"inputs": ' + json.dumps([self._seq()]) + ', "k": ' + k + "}"
                self._send_json("bad_k", "json_k", i, text)
                continue
            if way == "header":  # no leading or trailing blanks: requests refuses them in a header
                k = rng.choice([v for v in self.BAD_K_TEXT if v == v.strip()])
                k = k.encode("utf-8").decode("latin-1")  # what goes on the wire, as latin-1 text
                self.add("bad_k", "header_k", t, model, body=payload,
                         headers={"X-Top-K": k, "Content-Type": "application/json" if model == SEQ_MODEL
                                  else "image/png"})
                continue
            k = rng.choice(self.BAD_K_TEXT)
            if way == "multipart":
                key = "data" if model == SEQ_MODEL else "img"
                body, ctype = multipart({key: payload, "k": k.encode()}, rng)
                self.add("bad_k", "multipart_k", t, model, body=body, headers={"Content-Type": ctype})
            else:
                raw = k.encode() if rng.random() < 0.9 else b"\xff\xfe\x00"
                key = "data" if model == SEQ_MODEL else "img"
                self.add("bad_k", "grpc_input_k", t, model, inputs={key: payload, "k": raw})

    # ---- OIP v2 (native engine only) ----------------------------------------------------
    #: What each kind breaks, over REST (``POST /v2/models/{m}[/versions/{v}]/infer``, JSON or the
    #: binary tensor extension) and over gRPC (``ModelInfer``, typed contents or raw).
    OIP_REST_KINDS = ("shape_mismatch", "wrong_datatype", "binary_size_over", "binary_size_under",
                      "header_length_beyond", "header_length_not_number", "bytes_cut_short", "bad_dims",
                      "unknown_input", "missing_input", "nested_too_deep", "non_json_header", "bad_top_k",
                      "bad_lengths", "unknown_model", "unknown_output", "bad_parameters", "bad_values",
                      "bad_batch")
    OIP_GRPC_KINDS = ("shape_mismatch", "wrong_datatype", "bytes_cut_short", "bad_dims", "unknown_input",
                      "missing_input", "bad_top_k", "bad_lengths", "raw_count_mismatch", "contents_and_raw",
                      "unknown_model", "unknown_output", "bad_values", "bad_batch", "not_protobuf")

    def _pick(self, key: str, options):
        """The next of ``options`` for ``key``, in turn from a seeded start: over enough cases
        every option is sent (a random choice would leave some out)."""
        if key not in self._picks:
            self._picks[key] = self.rng.randrange(len(options))
        i = self._picks[key]
        self._picks[key] = i + 1
        return options[i % len(options)]

    def oip(self, n: int) -> None:
        """``n`` cases of the kinds in turn, then one element bomb of each way (heavy: 16 MiB)."""
        for i in range(n):
            t = self.transport(i)
            kinds = self.OIP_REST_KINDS if t == "rest" else self.OIP_GRPC_KINDS
            kind = kinds[(i // 2) % len(kinds)]
            self._oip_kind = kind
            (getattr(self, f"_oip_{t}_{kind}", None) or getattr(self, f"_oip_{kind}"))(t)
        self._oip_kind = "element_bomb"
        for t, ways in self.ELEMENT_BOMBS.items():
            for way in ways:
                model, body, headers = element_bomb(way, self.max_request_size)
                self._add_oip(way, t, model, None, body, headers)

    # building blocks: one request, as REST JSON / binary or as a gRPC message
    def _png(self) -> bytes:
        return sample_png(self.g, self.rng)

    def _seq_rows(self, n: int | None = None, steps: int | None = None) -> np.ndarray:
        n = n or self.rng.randint(1, 3)
        steps = steps or self.rng.randint(1, 8)
        return np.array([self._seq(steps) for _ in range(n)], dtype=np.float32)

    def _oip_rest(self, kind: str, model: str, request: Any, blobs: list[bytes] | None = None, *,
                  header_length: str | None = None, version: str | None = None, raw: bytes | None = None) -> None:
        """A REST OIP case: ``request`` (a dict, or text) then ``blobs`` (binary extension,
        with the JSON part's length as Inference-Header-Content-Length unless given)."""
        head = raw if raw is not None else (request if isinstance(request, bytes) else
                                             (request if isinstance(request, str) else json.dumps(request)).encode())
        headers = {"Content-Type": "application/json"}
        if blobs is not None or header_length is not None:
            headers = {"Content-Type": "application/octet-stream",
                       HEADER_LENGTH: str(len(head)) if header_length is None else header_length}
        body = head + b"".join(blobs or [])
        self._add_oip(kind, "rest", model, version, body, headers)

    def _oip_grpc(self, kind: str, request) -> None:
        self._add_oip(kind, "grpc", request.model_name, request.model_version or None,
                      request.SerializeToString(deterministic=True), {})

    def _add_oip(self, kind: str, transport: str, model: str, version: str | None, body: bytes,
                 headers: dict) -> None:
        case = Case(len(self.cases), "oip", f"{self._oip_kind}/{kind}", transport, model, body=body,
                    headers=headers, api="oip", version=version)
        self.cases.append(case)

    @staticmethod
    def _pb():
        from service._gen.oip.v2 import open_inference_grpc_pb2 as pb

        return pb

    def _grpc_request(self, model: str, inputs: list[tuple[str, str, list[int], Any]], *,
                      raw: list[bytes] | None = None, version: str = "", top_k: Any = None,
                      outputs: list[str] = ()):
        """A ModelInferRequest; each input (name, datatype, shape, contents) carries
        ``contents`` as typed contents ({field: values}) or None."""
        pb = self._pb()
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=f"fuzz-{len(self.cases)}")
        for name, datatype, shape, contents in inputs:
            tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
            if contents is not None:
                tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
        for blob in raw or ():
            req.raw_input_contents.append(blob)
        if top_k is not None:
            which, value = top_k
            req.parameters["top_k"].CopyFrom(pb.InferParameter(**{which: value}))
        for name in outputs:
            req.outputs.add(name=name)
        return req

    @staticmethod
    def _bytes_elems(*values: bytes) -> bytes:
        return b"".join(struct.pack("<I", len(v)) + v for v in values)

    def _valid_rest(self, model: str, binary: bool | None = None):
        """(request dict, blobs) of a valid request for ``model``, JSON or binary."""
        binary = self.rng.random() < 0.5 if binary is None else binary
        if model == IMAGE_MODEL:
            png = self._png()
            if binary:
                blob = self._bytes_elems(png)
                return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                    "parameters": {"binary_data_size": len(blob)}}]}, [blob]
            return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(png).decode()]}]}, None
        rows = self._seq_rows()
        if binary:
            blob = rows.tobytes()
            return {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                                "parameters": {"binary_data_size": len(blob)}}]}, [blob]
        return {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                            "data": rows.tolist()}]}, None

    def _valid_grpc_inputs(self, model: str, raw: bool | None = None):
        raw = self.rng.random() < 0.5 if raw is None else raw
        if model == IMAGE_MODEL:
            png = self._png()
            if raw:
                return [("images", "BYTES", [1], None)], [self._bytes_elems(png)]
            return [("images", "BYTES", [1], {"bytes_contents": [png]})], None
        rows = self._seq_rows()
        if raw:
            return [("sequences", "FP32", list(rows.shape), None)], [rows.tobytes()]
        return [("sequences", "FP32", list(rows.shape), {"fp32_contents": rows.reshape(-1).tolist()})], None

    def _model(self) -> str:
        return self._pick("_model.1", [IMAGE_MODEL, SEQ_MODEL])

    # -- the kinds, REST and gRPC ---------------------------------------------------------
    def _oip_rest_shape_mismatch(self, t: str) -> None:
        way = self._pick("rest_shape_mismatch.1",
                         ["images_json", "images_binary", "seq_json", "seq_binary", "seq_json_nested"])
        if way.startswith("images"):
            png = self._png()
            count = self._pick("rest_shape_mismatch.2", [0, 2, 3])
            if way == "images_json":
                req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [count],
                                   "data": [base64.b64encode(png).decode()]}]}
                return self._oip_rest(f"{way}_{count}", IMAGE_MODEL, req)
            blob = self._bytes_elems(png)
            req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [count],
                               "parameters": {"binary_data_size": len(blob)}}]}
            return self._oip_rest(f"{way}_{count}", IMAGE_MODEL, req, [blob])
        rows = self._seq_rows()
        n, steps, feats = rows.shape
        shape = self._pick("rest_shape_mismatch.3", [[n, steps + 1, feats], [n + 1, steps, feats],
                                                     [n, steps, feats - 1], [n * steps * feats]])
        if way == "seq_binary":
            blob = rows.tobytes()
            req = {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": shape,
                               "parameters": {"binary_data_size": len(blob)}}]}
            return self._oip_rest(way, SEQ_MODEL, req, [blob])
        data = rows.tolist() if way == "seq_json_nested" else rows.reshape(-1).tolist()
        if shape == [n * steps * feats]:  # the count agrees: take one element off
            data = rows.reshape(-1).tolist()[:-1]
        self._oip_rest(way, SEQ_MODEL, {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": shape,
                                                    "data": data}]})

    def _oip_grpc_shape_mismatch(self, t: str) -> None:
        way = self._pick("grpc_shape_mismatch.1", ["images_typed", "images_raw", "seq_typed", "seq_raw"])
        if way.startswith("images"):
            png = self._png()
            count = self._pick("grpc_shape_mismatch.2", [0, 2, 5])
            if way == "images_typed":
                req = self._grpc_request(IMAGE_MODEL, [("images", "BYTES", [count], {"bytes_contents": [png]})])
            else:
                req = self._grpc_request(IMAGE_MODEL, [("images", "BYTES", [count], None)],
                                         raw=[self._bytes_elems(png)])
            return self._oip_grpc(way, req)
        rows = self._seq_rows()
        n, steps, feats = rows.shape
        shape = self._pick("grpc_shape_mismatch.3",
                           [[n, steps + 1, feats], [n + 1, steps, feats], [n, steps, feats + 1]])
        if way == "seq_typed":
            req = self._grpc_request(SEQ_MODEL, [("sequences", "FP32", shape,
                                                  {"fp32_contents": rows.reshape(-1).tolist()})])
        else:
            req = self._grpc_request(SEQ_MODEL, [("sequences", "FP32", shape, None)], raw=[rows.tobytes()])
        self._oip_grpc(way, req)

    WRONG_IMAGE_TYPES = ("FP64", "FP32", "INT64", "UINT8", "FP8", "fp32", "BF16", "STRING", "")
    WRONG_SEQ_TYPES = ("BYTES", "FP64", "FP16", "INT64", "INT32", "FP8", "bytes", "TF32")

    def _oip_rest_wrong_datatype(self, t: str) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            dt = self._pick("rest_wrong_datatype.1", self.WRONG_IMAGE_TYPES)
            png = self._png()
            if dt == "UINT8" or rng.random() < 0.4:  # the encoded image as raw numbers
                size = len(png) if dt in ("UINT8", "INT8") else len(png) // max(1, _itemsize(dt))
                blob = png[:size * max(1, _itemsize(dt))]
                req = {"inputs": [{"name": "images", "datatype": dt, "shape": [size],
                                   "parameters": {"binary_data_size": len(blob)}}]}
                return self._oip_rest(f"images_{dt or 'empty'}_binary", IMAGE_MODEL, req, [blob])
            data = [rng.uniform(0, 255) for _ in range(4)] if dt.upper().startswith(("FP", "BF")) else \
                [rng.randint(0, 255) for _ in range(4)]
            return self._oip_rest(f"images_{dt or 'empty'}_json", IMAGE_MODEL,
                                  {"inputs": [{"name": "images", "datatype": dt, "shape": [4], "data": data}]})
        dt = self._pick("rest_wrong_datatype.2", self.WRONG_SEQ_TYPES + (5, None))
        rows = self._seq_rows()
        if dt in ("BYTES", "bytes"):
            data = [str(x) for x in rows.reshape(-1).tolist()]
        elif dt in ("INT64", "INT32"):
            data = [int(x * 10) for x in rows.reshape(-1).tolist()]
        else:
            data = rows.reshape(-1).tolist()
        if dt in ("FP64", "FP16") and rng.random() < 0.5:
            blob = rows.astype(np.float64 if dt == "FP64" else np.float16).tobytes()
            req = {"inputs": [{"name": "sequences", "datatype": dt, "shape": list(rows.shape),
                               "parameters": {"binary_data_size": len(blob)}}]}
            return self._oip_rest(f"sequences_{dt}_binary", SEQ_MODEL, req, [blob])
        self._oip_rest(f"sequences_{dt}_json", SEQ_MODEL,
                       {"inputs": [{"name": "sequences", "datatype": dt, "shape": list(rows.shape), "data": data}]})

    def _oip_grpc_wrong_datatype(self, t: str) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            dt = self._pick("grpc_wrong_datatype.1", self.WRONG_IMAGE_TYPES)
            png = self._png()
            if dt == "FP64":
                inputs = [("images", dt, [4], {"fp64_contents": [rng.uniform(0, 255) for _ in range(4)]})]
                return self._oip_grpc(f"images_{dt}_typed", self._grpc_request(IMAGE_MODEL, inputs))
            if dt == "FP32":
                inputs = [("images", dt, [4], {"fp32_contents": [rng.uniform(0, 255) for _ in range(4)]})]
                return self._oip_grpc(f"images_{dt}_typed", self._grpc_request(IMAGE_MODEL, inputs))
            size = len(png) // max(1, _itemsize(dt))
            req = self._grpc_request(IMAGE_MODEL, [("images", dt, [size], None)],
                                     raw=[png[:size * max(1, _itemsize(dt))]])
            return self._oip_grpc(f"images_{dt or 'empty'}_raw", req)
        dt = self._pick("grpc_wrong_datatype.2", self.WRONG_SEQ_TYPES)
        rows = self._seq_rows()
        flat = rows.reshape(-1).tolist()
        typed = {"BYTES": {"bytes_contents": [str(x).encode() for x in flat]},
                 "FP64": {"fp64_contents": flat}, "INT64": {"int64_contents": [int(x * 10) for x in flat]},
                 "INT32": {"int_contents": [int(x * 10) for x in flat]}}.get(dt)
        if typed is not None and rng.random() < 0.6:
            return self._oip_grpc(f"sequences_{dt}_typed", self._grpc_request(
                SEQ_MODEL, [("sequences", dt, list(rows.shape), typed)]))
        if dt in ("FP16", "bytes") and rng.random() < 0.5:  # no typed field for these: said so
            return self._oip_grpc(f"sequences_{dt}_typed", self._grpc_request(
                SEQ_MODEL, [("sequences", dt, list(rows.shape), {"fp32_contents": flat})]))
        blob = rows.astype(np.float64).tobytes() if dt == "FP64" else rows.astype(np.float16).tobytes() \
            if dt == "FP16" else rows.tobytes()
        self._oip_grpc(f"sequences_{dt}_raw", self._grpc_request(
            SEQ_MODEL, [("sequences", dt, list(rows.shape), None)], raw=[blob]))

    def _oip_rest_binary_size_over(self, t: str) -> None:
        model = self._model()
        req, blobs = self._valid_rest(model, binary=True)
        over = self._pick("rest_binary_size_over.1", [1, 3, 100, 1 << 20, 1 << 40, 10**30])
        req["inputs"][0]["parameters"]["binary_data_size"] += over
        self._oip_rest(f"over_by_{over}", model, req, blobs)

    def _oip_rest_binary_size_under(self, t: str) -> None:
        rng = self.rng
        model = self._model()
        req, blobs = self._valid_rest(model, binary=True)
        if rng.random() < 0.5:  # the size agrees with the shape; bytes follow the last input
            extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            return self._oip_rest("bytes_after_last_input", model, req, [blobs[0] + extra])
        size = req["inputs"][0]["parameters"]["binary_data_size"]
        req["inputs"][0]["parameters"]["binary_data_size"] = rng.randint(0, size - 1)
        self._oip_rest("size_under_the_data", model, req, blobs)

    def _oip_rest_header_length_beyond(self, t: str) -> None:
        model = self._model()
        req, blobs = self._valid_rest(model, binary=True)
        head = json.dumps(req).encode()
        total = len(head) + len(blobs[0])
        length = self._pick("rest_header_length_beyond.1", [total + 1, total + 1000, 2**31, 10**12, 2**64 + 7])
        self._oip_rest("beyond_body", model, req, blobs, header_length=str(length))

    #: Inference-Header-Content-Length values that are not a length, by name. Headers go as
    #: latin-1: "\xb2" is the byte 0xB2, a superscript two, which str.isdigit() takes for a
    #: digit; int() refuses more than 4300 digits.
    BAD_LENGTH_TEXT = (("abc", "abc"), ("minus", "-5"), ("decimal", "1.5"), ("hex", "0x10"), ("exponent", "1e3"),
                       ("plus", "+3"), ("superscript_2", "\xb2"), ("superscripts_12", "\xb9\xb2"),
                       ("two_numbers", "12 34"), ("nan", "NaN"), ("minus_zero", "-0"), ("5000_digits", "9" * 5000),
                       ("4301_digits", "1" * 4301), ("5000_zeros_then_12", "0" * 5000 + "12"),
                       ("one_half", "\xbd"))

    def _oip_rest_header_length_not_number(self, t: str) -> None:
        model = self._model()
        req, blobs = self._valid_rest(model, binary=True)
        name, value = self._pick("rest_header_length_not_number.1", self.BAD_LENGTH_TEXT)
        self._oip_rest(name, model, req, blobs, header_length=value)

    def _cut_bytes(self) -> tuple[str, int, bytes]:
        """(kind, declared count, raw BYTES data) with an element cut short."""
        rng = self.rng
        png = self._png()
        way = self._pick("_cut_bytes.1",
                         ["prefix_over", "prefix_cut", "second_prefix_cut", "second_over", "fewer", "more"])
        if way == "prefix_over":
            return way, 1, struct.pack("<I", len(png) + self._pick("_cut_bytes.2", [1, 100, 2**31])) + png
        if way == "prefix_cut":
            return way, 1, struct.pack("<I", len(png))[:rng.randint(1, 3)]
        if way == "second_prefix_cut":
            return way, 2, self._bytes_elems(png) + struct.pack("<I", 10)[:rng.randint(1, 3)]
        if way == "second_over":
            return way, 2, self._bytes_elems(png) + struct.pack("<I", 0xFFFFFFFF) + png[:10]
        if way == "fewer":
            return way, self._pick("_cut_bytes.3", [2, 3, 64]), self._bytes_elems(png)
        return way, 1, self._bytes_elems(png, png)

    def _oip_bytes_cut_short(self, t: str) -> None:
        kind, count, raw = self._cut_bytes()
        if t == "rest":
            req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [count],
                               "parameters": {"binary_data_size": len(raw)}}]}
            return self._oip_rest(kind, IMAGE_MODEL, req, [raw])
        self._oip_grpc(kind, self._grpc_request(IMAGE_MODEL, [("images", "BYTES", [count], None)], raw=[raw]))

    #: Shapes that no tensor has, or that declare far more elements than any request holds.
    BAD_SHAPES_JSON = ([-1], [1, -5, 4], [10**12], [1e12], [2**63], [2**64 + 1], [10**30], [65536, 65536, 65536],
                       [1] * 9, [], "3", [True], [None], [1.0], [[1]], {"0": 1}, None, [2**31, 2**31])
    BAD_SHAPES_GRPC = ([-1], [1, -5, 4], [10**12], [2**62], [2**63 - 1], [-(2**63)], [2**31, 2**31, 2**31],
                       [1] * 9, [], [65536, 65536, 65536])

    def _oip_rest_bad_dims(self, t: str) -> None:
        model = self._model()
        req, blobs = self._valid_rest(model)
        shape = self._pick("rest_bad_dims.1", self.BAD_SHAPES_JSON)
        req["inputs"][0]["shape"] = shape
        name = json.dumps(shape).replace(" ", "")
        self._oip_rest(f"shape_{name[:40]}{'_binary' if blobs else ''}", model, req, blobs)

    def _oip_grpc_bad_dims(self, t: str) -> None:
        model = self._model()
        inputs, raw = self._valid_grpc_inputs(model)
        shape = self._pick("grpc_bad_dims.1", self.BAD_SHAPES_GRPC)
        name, dt, _, contents = inputs[0]
        req = self._grpc_request(model, [(name, dt, shape, contents)], raw=raw)
        self._oip_grpc(f"shape_{json.dumps(shape).replace(' ', '')[:40]}{'_raw' if raw else ''}", req)

    UNKNOWN_INPUTS = ("image", "img", "input__0", "", "IMAGES", "sequence", "texts", "lengths", "inputs",
                      "images\x00", "data")

    def _oip_unknown_input(self, t: str) -> None:
        model = self._model()
        other = "sequences" if model == IMAGE_MODEL else "images"
        name = self._pick("unknown_input.1", self.UNKNOWN_INPUTS + (other,))
        if name == "lengths" and model == SEQ_MODEL:
            name = "length"
        if t == "rest":
            req, blobs = self._valid_rest(model)
            req["inputs"][0]["name"] = name
            return self._oip_rest(f"named_{name!r}", model, req, blobs)
        inputs, raw = self._valid_grpc_inputs(model)
        _, dt, shape, contents = inputs[0]
        self._oip_grpc(f"named_{name!r}", self._grpc_request(model, [(name, dt, shape, contents)], raw=raw))

    def _oip_missing_input(self, t: str) -> None:
        if t == "grpc":
            way = self._pick("missing_input.1", ["no_inputs", "only_lengths", "lengths_and_top_k", "given_twice"])
            if way == "no_inputs":
                return self._oip_grpc(way, self._grpc_request(self._model(), []))
            if way == "only_lengths":
                return self._oip_grpc(way, self._grpc_request(
                    SEQ_MODEL, [("lengths", "INT64", [1], {"int64_contents": [3]})]))
            if way == "given_twice":  # the same input twice
                png = self._png()
                return self._oip_grpc(way, self._grpc_request(
                    IMAGE_MODEL, [("images", "BYTES", [1], {"bytes_contents": [png]})] * 2))
            return self._oip_grpc(way, self._grpc_request(
                SEQ_MODEL, [("lengths", "INT64", [2], {"int64_contents": [1, 2]})], top_k=("int64_param", 2)))
        way = self._pick("missing_input.2", [
            "inputs_empty", "inputs_absent", "inputs_null", "inputs_object", "inputs_string", "input_not_object",
            "no_name", "no_datatype", "name_not_string", "no_data", "only_lengths", "given_twice"])
        model = self._model()
        req, blobs = self._valid_rest(model, binary=False)
        tensor = req["inputs"][0]
        if way == "inputs_empty":
            req["inputs"] = []
        elif way == "inputs_absent":
            req = {"parameters": {"top_k": 2}}
        elif way == "inputs_null":
            req["inputs"] = None
        elif way == "inputs_object":
            req["inputs"] = tensor
        elif way == "inputs_string":
            req["inputs"] = tensor["name"]
        elif way == "input_not_object":
            req["inputs"] = [self._pick("missing_input.3", [1, "images", [tensor], None])]
        elif way == "no_name":
            del tensor["name"]
        elif way == "no_datatype":
            del tensor["datatype"]
        elif way == "name_not_string":
            tensor["name"] = self._pick("missing_input.4", [1, None, ["images"], {"n": 1}])
        elif way == "no_data":
            del tensor["data"]
        elif way == "only_lengths":
            model = SEQ_MODEL
            req = {"inputs": [{"name": "lengths", "datatype": "INT64", "shape": [1], "data": [2]}]}
        else:
            req["inputs"] = [tensor, dict(tensor)]
        self._oip_rest(way, model, req)

    def _oip_rest_nested_too_deep(self, t: str) -> None:
        way = self._pick("rest_nested_too_deep.1", ["brackets", "objects", "data", "parameters", "shape"])
        depth = self._pick("rest_nested_too_deep.2", [20, 1500, 5000, 100_000])
        model = self._model()
        if way == "brackets":
            return self._oip_rest(f"{way}_{depth}", model, "[" * depth + "]" * depth)
        if way == "objects":
            return self._oip_rest(f"{way}_{depth}", model, '{"inputs":' * depth + "1" + "}" * depth)
        req, _ = self._valid_rest(SEQ_MODEL, binary=False)
        text = json.dumps(req)
        if way == "data":  # one element nested deeper than any shape (9 .. 100000 levels)
            depth = self._pick("rest_nested_too_deep.3", [9, 20, 1500, 100_000])
            text = text.replace('"data": [[', '"data": [' + "[" * depth + "0.5" + "]" * depth + ", [", 1)
        elif way == "parameters":  # unknown parameters are ignored: only depths the JSON reader refuses
            depth = max(depth, 1500)
            text = text[:-1] + ', "parameters": ' + '{"a":' * depth + "1" + "}" * depth + "}"
        else:
            text = text.replace('"shape": [', '"shape": [' + "[" * depth + "1" + "]" * depth + ", ", 1)
        self._oip_rest(f"{way}_{depth}", SEQ_MODEL, text)

    def _oip_rest_non_json_header(self, t: str) -> None:
        rng = self.rng
        model = self._model()
        req, blobs = self._valid_rest(model, binary=True)
        way = self._pick("rest_non_json_header.1", [
            "random_bytes", "png", "not_utf8", "form", "json_array", "json_number", "json_string", "json_null",
            "trailing_garbage", "nan_constant", "empty_header", "binary_without_header"])
        text = json.dumps(req)
        if way == "random_bytes":
            head = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        elif way == "png":
            head = self._png()
        elif way == "not_utf8":
            head = text.encode()[:-2] + b"\xff\xfe}"
        elif way == "form":
            head = b"inputs=images&datatype=BYTES"
        elif way == "json_array":
            head = json.dumps(req["inputs"]).encode()
        elif way == "json_number":
            head = b"12"
        elif way == "json_string":
            head = json.dumps(text).encode()
        elif way == "json_null":
            head = b"null"
        elif way == "trailing_garbage":
            head = text.encode() + b"}x"
        elif way == "nan_constant":
            head = text[:-1].encode() + b', "id": NaN}'
        elif way == "empty_header":
            head = b""
        else:  # the binary body with no Inference-Header-Content-Length: not JSON
            return self._oip_rest(way, model, text.encode() + blobs[0], raw=text.encode() + blobs[0])
        self._oip_rest(way, model, req, blobs, raw=head)

    #: top_k values no request may use: over REST as JSON, over gRPC as a typed parameter.
    BAD_TOP_K_JSON = (0, -1, 10**30, "abc", 1.5, 1001, True, False, [3], {"k": 1}, 1e3, "", "\u00b2", "-0",
                      "1.5", -(10**30), "0x10")
    BAD_TOP_K_GRPC = (("int64_param", 0), ("int64_param", -1), ("int64_param", 1001), ("int64_param", 2**62),
                      ("int64_param", -(2**63)), ("string_param", "abc"), ("string_param", "1.5"),
                      ("string_param", ""), ("string_param", "\u00b2"), ("string_param", "9" * 5000),
                      ("bool_param", True), ("bool_param", False), ("double_param", 1.5),
                      ("double_param", 3.0), ("double_param", float("nan")), ("uint64_param", 10**19),
                      ("uint64_param", 0))

    def _oip_bad_top_k(self, t: str) -> None:
        model = self._model()
        if t == "rest":
            req, blobs = self._valid_rest(model)
            value = self._pick("bad_top_k.1", self.BAD_TOP_K_JSON)
            req["parameters"] = {"top_k": value}
            return self._oip_rest(f"top_k_{json.dumps(value)[:20]}", model, req, blobs)
        inputs, raw = self._valid_grpc_inputs(model)
        which, value = self._pick("bad_top_k.2", self.BAD_TOP_K_GRPC)
        self._oip_grpc(f"top_k_{which}_{str(value)[:20]}",
                       self._grpc_request(model, inputs, raw=raw, top_k=(which, value)))

    def _oip_bad_lengths(self, t: str) -> None:
        rng = self.rng
        rows = self._seq_rows()
        n, steps, _ = rows.shape
        way = self._pick("bad_lengths.1", ["zero", "over_t", "negative", "shape_n_plus_1", "shape_n_1", "fp32", "int32",
                          "huge", "to_image_model"])
        values, shape, dt = [rng.randint(1, steps) for _ in range(n)], [n], "INT64"
        bad = rng.randrange(n)
        if way == "zero":
            values[bad] = 0
        elif way == "over_t":
            values[bad] = steps + rng.randint(1, 100)
        elif way == "negative":
            values[bad] = -rng.randint(1, 5)
        elif way == "shape_n_plus_1":
            values, shape = values + [1], [n + 1]
        elif way == "shape_n_1":
            shape = [n, 1]
        elif way == "fp32":
            dt = "FP32"
        elif way == "int32":
            dt = "INT32"
        elif way == "huge":
            values[bad] = 2**62 if t == "grpc" else self._pick("bad_lengths.2", [2**62, 2**64])
        model = IMAGE_MODEL if way == "to_image_model" else SEQ_MODEL
        if t == "rest":
            if model == IMAGE_MODEL:
                req, blobs = self._valid_rest(IMAGE_MODEL)
            else:
                req, blobs = {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": [n, steps, FEATURES],
                                          "data": rows.tolist()}]}, None
            req["inputs"].append({"name": "lengths", "datatype": dt, "shape": shape,
                                  "data": [float(v) for v in values] if dt == "FP32" else values})
            return self._oip_rest(way, model, req, blobs)
        if model == IMAGE_MODEL:
            inputs, raw = self._valid_grpc_inputs(IMAGE_MODEL, raw=False)
        else:
            inputs, raw = [("sequences", "FP32", [n, steps, FEATURES],
                            {"fp32_contents": rows.reshape(-1).tolist()})], None
        field_ = {"INT64": "int64_contents", "FP32": "fp32_contents", "INT32": "int_contents"}[dt]
        if dt == "INT32" and way == "huge":
            values[bad] = 2**31 - 1
        inputs.append(("lengths", dt, shape, {field_: [float(v) for v in values] if dt == "FP32" else values}))
        self._oip_grpc(way, self._grpc_request(model, inputs, raw=raw))

    def _oip_grpc_raw_count_mismatch(self, t: str) -> None:
        model = self._model()
        inputs, raw = self._valid_grpc_inputs(model, raw=True)
        way = self._pick("grpc_raw_count_mismatch.1",
                         ["two_raw_for_one_input", "one_raw_for_two_inputs", "three_raw_for_two_inputs"])
        if way == "two_raw_for_one_input":
            raw = raw + raw
        else:
            rows = self._seq_rows()
            model = SEQ_MODEL
            inputs = [("sequences", "FP32", list(rows.shape), None), ("lengths", "INT64", [rows.shape[0]], None)]
            raw = [rows.tobytes()]
            if way == "three_raw_for_two_inputs":
                raw = raw + [np.ones(rows.shape[0], dtype=np.int64).tobytes(), b"\x00" * 8]
        self._oip_grpc(way, self._grpc_request(model, inputs, raw=raw))

    def _oip_grpc_contents_and_raw(self, t: str) -> None:
        model = self._model()
        inputs, raw = self._valid_grpc_inputs(model, raw=False)
        _, _, _, contents = inputs[0]
        raw_inputs, raw_blobs = self._valid_grpc_inputs(model, raw=True)
        name, dt, shape, _ = raw_inputs[0]
        if self.rng.random() < 0.5:
            contents = {}  # empty contents, still set
        self._oip_grpc("contents_and_raw" if contents else "empty_contents_and_raw",
                       self._grpc_request(model, [(name, dt, shape, contents)], raw=raw_blobs))

    UNKNOWN_MODELS = (("no-such-model", None), (IMAGE_MODEL, "999"), (SEQ_MODEL, "0"), (IMAGE_MODEL, "01"),
                      (SEQ_MODEL, "1.0"), ("fuzz", None), (IMAGE_MODEL.upper(), None), (SEQ_MODEL, "-1"),
                      (IMAGE_MODEL, "latest"), ("x" * 300, None), (SEQ_MODEL + "%2F1", None))

    def _oip_unknown_model(self, t: str) -> None:
        model, version = self._pick("unknown_model.1", self.UNKNOWN_MODELS)
        real = SEQ_MODEL if model.startswith(SEQ_MODEL) else IMAGE_MODEL
        kind = f"{'model' if version is None else 'version'}_{(model if version is None else version)[:24]}"
        if t == "rest":
            req, blobs = self._valid_rest(real)
            return self._oip_rest(kind, model, req, blobs, version=version)
        inputs, raw = self._valid_grpc_inputs(real)
        self._oip_grpc(kind, self._grpc_request(model, inputs, raw=raw, version=version or ""))

    def _oip_unknown_output(self, t: str) -> None:
        rng = self.rng
        model = self._model()
        name = self._pick("unknown_output.1",
                          ["logits", "", "values", "positive", "LABELS", "labels ", "output__0", "\u00e9"])
        if t == "grpc":
            inputs, raw = self._valid_grpc_inputs(model)
            outputs = [name] if rng.random() < 0.5 else ["labels", name]
            return self._oip_grpc(f"output_{name!r}", self._grpc_request(model, inputs, raw=raw, outputs=outputs))
        req, blobs = self._valid_rest(model)
        way = self._pick("unknown_output.2", ["name", "name", "not_a_list", "no_name", "name_not_string"])
        if way == "name":
            req["outputs"] = [{"name": name}] if rng.random() < 0.5 else [{"name": "labels"}, {"name": name}]
            return self._oip_rest(f"output_{name!r}", model, req, blobs)
        req["outputs"] = {"not_a_list": "labels", "no_name": [{"nom": "labels"}],
                          "name_not_string": [{"name": self._pick("unknown_output.3", [5, None, ["labels"]])}]}[way]
        self._oip_rest(f"outputs_{way}", model, req, blobs)

    def _oip_rest_bad_parameters(self, t: str) -> None:
        rng = self.rng
        model = self._model()
        req, blobs = self._valid_rest(model, binary=rng.random() < 0.7)
        way = self._pick("rest_bad_parameters.1", [
            "request_list", "request_string", "request_number", "size_negative", "size_float", "size_string",
            "size_bool", "size_null_no_data"])
        if way == "request_list":
            req["parameters"] = [1]
        elif way == "request_string":
            req["parameters"] = "top_k=3"
        elif way == "request_number":
            req["parameters"] = 5
        else:
            if not blobs:
                req, blobs = self._valid_rest(model, binary=True)
            value = {"size_negative": -1, "size_float": float(len(blobs[0])), "size_string": str(len(blobs[0])),
                     "size_bool": True, "size_null_no_data": None}[way]
            req["inputs"][0]["parameters"]["binary_data_size"] = value
        self._oip_rest(way, model, req, blobs)

    def _oip_bad_values(self, t: str) -> None:
        rng = self.rng
        if rng.random() < 0.4:  # images: not base64, not an image, empty
            way = self._pick("bad_values.1",
                             ["not_base64", "base64_garbage", "empty_image", "base64_url_alphabet", "not_a_string"])
            png = self._png()
            if t == "grpc":
                way = way if way in ("base64_garbage", "empty_image") else "png_as_base64_text"
                value = {"base64_garbage": bytes(rng.randrange(256) for _ in range(64)), "empty_image": b"",
                         "png_as_base64_text": base64.b64encode(png)}[way]
                return self._oip_grpc(way, self._grpc_request(
                    IMAGE_MODEL, [("images", "BYTES", [1], {"bytes_contents": [value]})]))
            data = {"not_base64": "not base64!!", "base64_garbage": base64.b64encode(bytes(64)).decode(),
                    "empty_image": "", "base64_url_alphabet": base64.urlsafe_b64encode(png + b"\xfb\xff").decode(),
                    "not_a_string": self._pick("bad_values.2", [1, None, [1, 2], {"b64": "x"}])}[way]
            return self._oip_rest(way, IMAGE_MODEL, {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                                 "data": [data]}]})
        rows = self._seq_rows()
        flat = rows.reshape(-1)
        pos = rng.randrange(flat.size)
        way = self._pick("bad_values.3", ["nan", "inf", "over_float32", "string", "bool", "null"] if t == "rest"
                         else ["nan", "inf", "raw_nan", "raw_inf"])
        if t == "grpc":
            values = flat.copy()
            values[pos] = {"nan": np.nan, "raw_nan": np.nan}.get(way, np.inf * self._pick("bad_values.4", [1, -1]))
            if way.startswith("raw"):
                req = self._grpc_request(SEQ_MODEL, [("sequences", "FP32", list(rows.shape), None)],
                                         raw=[values.astype(np.float32).tobytes()])
            else:
                req = self._grpc_request(SEQ_MODEL, [("sequences", "FP32", list(rows.shape),
                                                      {"fp32_contents": values.tolist()})])
            return self._oip_grpc(way, req)
        if way in ("nan", "inf") and rng.random() < 0.5:  # over the binary extension: no JSON reader to refuse it
            values = flat.copy()
            values[pos] = np.nan if way == "nan" else -np.inf
            blob = values.astype(np.float32).tobytes()
            req = {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                               "parameters": {"binary_data_size": len(blob)}}]}
            return self._oip_rest(f"binary_{way}", SEQ_MODEL, req, [blob])
        data = flat.tolist()
        marker = "__BAD__"
        data[pos] = marker
        big = self._pick("bad_values.5", ["1e39", "-3.5e38", "1e400"])
        token = {"nan": "NaN", "inf": "Infinity", "over_float32": big,
                 "string": '"0.5"', "bool": "true", "null": "null"}[way]
        text = json.dumps({"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                                       "data": data}]}).replace(f'"{marker}"', token)
        self._oip_rest(f"json_{way}", SEQ_MODEL, text)

    #: Element bombs: a body just under the size limit holding millions of tiny elements
    #: that agree with their shape (each is a few bytes; decoding them one by one in Python
    #: takes seconds). One case per way.
    ELEMENT_BOMBS = {"rest": ("binary_bytes", "json_fp32", "json_bytes", "binary_fp32"),
                     "grpc": ("typed_bytes", "raw_bytes", "typed_fp32")}

    def _oip_grpc_not_protobuf(self, t: str) -> None:
        """Bytes that are no ModelInferRequest at all (gRPC decodes them before our code runs)."""
        rng = self.rng
        way = self._pick("grpc_not_protobuf.1", ["random", "truncated", "bad_wire_type", "json", "length_over"])
        if way == "random":
            data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        elif way == "truncated":
            inputs, raw = self._valid_grpc_inputs(self._model())
            good = self._grpc_request(IMAGE_MODEL, inputs, raw=raw).SerializeToString()
            data = good[:rng.randrange(1, len(good))]
        elif way == "bad_wire_type":  # field 1 with wire types 6 and 7 (none such)
            data = bytes([0x0E | (rng.randint(0, 1)), 0x01, 0x02])
        elif way == "json":
            data = json.dumps({"model_name": IMAGE_MODEL, "inputs": []}).encode()
        else:  # a length prefix past the end
            data = b"\x0a" + bytes([0xFF, 0xFF, 0x03]) + IMAGE_MODEL.encode()
        if self._decodes(data):
            data = b"\xff" + data  # 0xFF: field 31, wire type 7: never valid
        self._add_oip(way, "grpc", IMAGE_MODEL, None, data, {})

    def _decodes(self, data: bytes) -> bool:
        from google.protobuf.message import DecodeError

        try:
            self._pb().ModelInferRequest.FromString(data)
        except DecodeError:
            return False
        return True

    def _oip_bad_batch(self, t: str) -> None:
        rng = self.rng
        way = self._pick("bad_batch.1", [
            "too_long", "wrong_features", "too_many_sequences", "no_sequences", "empty_steps", "no_images",
            "too_many_images", "images_rank_2", "sequences_rank_2"])
        if way in ("no_images", "too_many_images", "images_rank_2"):
            png = self._png()
            count = {"no_images": 0, "too_many_images": self._pick("bad_batch.2", [65, 100]), "images_rank_2": 2}[way]
            shape = [1, 2] if way == "images_rank_2" else [count]
            if t == "rest":
                req = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape,
                                   "data": [base64.b64encode(png).decode()] * count}]}
                return self._oip_rest(f"{way}_{count}", IMAGE_MODEL, req)
            return self._oip_grpc(f"{way}_{count}", self._grpc_request(
                IMAGE_MODEL, [("images", "BYTES", shape, {"bytes_contents": [png] * count})]))
        if way == "too_long":
            rows = self._seq_rows(n=1, steps=MAX_LENGTH + rng.randint(1, 100))
        elif way == "wrong_features":
            rows = np.full((1, rng.randint(1, 5), self._pick("bad_batch.3", [1, 3, 5, 16])), 0.25, dtype=np.float32)
        elif way == "too_many_sequences":
            rows = np.full((self._pick("bad_batch.4", [65, 300]), 1, FEATURES), 0.5, dtype=np.float32)
        elif way == "no_sequences":
            rows = np.zeros((0, 3, FEATURES), dtype=np.float32)
        elif way == "empty_steps":
            rows = np.zeros((rng.randint(1, 3), 0, FEATURES), dtype=np.float32)
        else:  # sequences_rank_2
            rows = np.full((3, FEATURES), 0.5, dtype=np.float32)
        if t == "rest":
            if rng.random() < 0.5:
                blob = rows.tobytes()
                req = {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                                   "parameters": {"binary_data_size": len(blob)}}]}
                return self._oip_rest(f"{way}_binary", SEQ_MODEL, req, [blob])
            req = {"inputs": [{"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
                               "data": rows.reshape(-1).tolist()}]}
            return self._oip_rest(way, SEQ_MODEL, req)
        if rng.random() < 0.5:
            return self._oip_grpc(f"{way}_raw", self._grpc_request(
                SEQ_MODEL, [("sequences", "FP32", list(rows.shape), None)], raw=[rows.tobytes()]))
        self._oip_grpc(way, self._grpc_request(
            SEQ_MODEL, [("sequences", "FP32", list(rows.shape), {"fp32_contents": rows.reshape(-1).tolist()})]))


_CACHE: dict[tuple, bytes] = {}
_CACHE_LOCK = threading.Lock()


def _cached_gray_png(width: int, height: int) -> bytes:
    with _CACHE_LOCK:
        key = ("gray", width, height)
        if key not in _CACHE:
            _CACHE[key] = gray_png(width, height, level=9)
        return _CACHE[key]


def _cached_scan_bomb(scans: int) -> bytes:
    """A valid 2000x2000 progressive JPEG with ``scans`` empty AC scans before its EOI."""
    with _CACHE_LOCK:
        key = ("scans", scans)
        if key not in _CACHE:
            import io

            from PIL import Image

            ramp = torch.arange(2000, dtype=torch.int32).remainder(256).to(torch.uint8)
            pixels = ramp.expand(2000, 2000).numpy()
            buf = io.BytesIO()
            Image.fromarray(pixels, "L").save(buf, "JPEG", progressive=True, quality=75)
            data = buf.getvalue()
            # component 1, Huffman tables 0/0, spectral band 1-63, no approximation, no data
            empty_scan = bytes.fromhex("FFDA0008010100013F00")
            _CACHE[key] = data[:-2] + empty_scan * scans + data[-2:]
        return _CACHE[key]


def _cached_big(size: int) -> bytes:
    with _CACHE_LOCK:
        key = ("big", size)
        if key not in _CACHE:
            body = json.dumps({"inputs": [[0.25] * FEATURES]}).encode()
            _CACHE[key] = body + b" " * (size - len(body))  # valid JSON, just too large
        return _CACHE[key]


def element_bomb(way: str, limit: int) -> tuple[str, bytes, dict[str, str]]:
    """(model, body, REST headers) of an OIP element bomb (cached): just under ``limit``
    bytes, millions of elements, each agreeing with the declared shape. gRPC ways: the body
    is the serialized ModelInferRequest."""
    with _CACHE_LOCK:
        key = ("element_bomb", way, limit)
        if key not in _CACHE:
            _CACHE[key] = _element_bomb(way, limit - 64 * 1024)
        return _CACHE[key]


def _element_bomb(way: str, size: int) -> tuple[str, bytes, dict[str, str]]:
    def binary(model: str, tensor: dict, blob: bytes):
        tensor["parameters"] = {"binary_data_size": len(blob)}
        head = json.dumps({"inputs": [tensor]}).encode()
        return model, head + blob, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}

    def json_body(model: str, tensor: dict):
        return model, json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode(), {
            "Content-Type": "application/json"}

    if way == "binary_bytes":  # zero-length BYTES elements: 4 bytes each
        n = size // 4
        return binary(IMAGE_MODEL, {"name": "images", "datatype": "BYTES", "shape": [n]}, bytes(4 * n))
    if way == "binary_fp32":
        steps = size // (4 * FEATURES)
        return binary(SEQ_MODEL, {"name": "sequences", "datatype": "FP32", "shape": [1, steps, FEATURES]},
                      bytes(4 * FEATURES * steps))
    if way == "json_fp32":  # "0," per element
        steps = size // (2 * FEATURES)
        return json_body(SEQ_MODEL, {"name": "sequences", "datatype": "FP32", "shape": [1, steps, FEATURES],
                                     "data": [0] * (steps * FEATURES)})
    if way == "json_bytes":  # '"",' per element
        n = size // 3
        return json_body(IMAGE_MODEL, {"name": "images", "datatype": "BYTES", "shape": [n], "data": [""] * n})
    from service._gen.oip.v2 import open_inference_grpc_pb2 as pb

    if way == "typed_bytes":  # 2 bytes per empty element
        n = size // 2
        req = pb.ModelInferRequest(model_name=IMAGE_MODEL)
        req.inputs.add(name="images", datatype="BYTES", shape=[n],
                       contents=pb.InferTensorContents(bytes_contents=[b""] * n))
        return IMAGE_MODEL, req.SerializeToString(), {}
    if way == "raw_bytes":
        n = size // 4
        req = pb.ModelInferRequest(model_name=IMAGE_MODEL, raw_input_contents=[bytes(4 * n)])
        req.inputs.add(name="images", datatype="BYTES", shape=[n])
        return IMAGE_MODEL, req.SerializeToString(), {}
    if way == "typed_fp32":  # packed: 4 bytes per element
        steps = size // (4 * FEATURES)
        req = pb.ModelInferRequest(model_name=SEQ_MODEL)
        req.inputs.add(name="sequences", datatype="FP32", shape=[1, steps, FEATURES],
                       contents=pb.InferTensorContents(fp32_contents=np.zeros(steps * FEATURES, np.float32)))
        return SEQ_MODEL, req.SerializeToString(), {}
    raise ValueError(way)


def multipart(fields: dict[str, bytes], rng: random.Random) -> tuple[bytes, str]:
    """A multipart/form-data body with a seeded boundary (deterministic bytes)."""
    boundary = "fuzz" + "".join(rng.choice("0123456789abcdef") for _ in range(16))
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def generate(seed: int = 20260101, counts: dict[str, int] | None = None,
             max_request_size: int = 16 * 1024 * 1024, engine: str = "torchserve") -> tuple[list[Case], Counter]:
    """The campaign's cases for ``seed`` and ``engine``, and the candidates dropped because the
    reference decoder took them (random JPEG bit flips that still decode are not bad payloads).

    The cases of :data:`CATEGORIES` are the same for every engine; the native engine's
    campaign adds :data:`OIP_CATEGORIES` after them."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    gen = _Gen(seed)
    gen.max_request_size = max_request_size
    for category in categories(engine):
        n = counts.get(category, 0)
        if not n:
            continue
        if category == "oversize_body":
            gen.oversize_body(n, max_request_size)
        else:
            getattr(gen, category)(n)
    return gen.cases, gen.dropped


# --------------------------------------------------------------------------------------
# A real server for the campaign
# --------------------------------------------------------------------------------------
ENGINES = ("torchserve", "native")


@dataclass
class FuzzServer:
    serving: Any
    settings: Any
    token: str
    engine: str = "torchserve"

    @property
    def rest_url(self) -> str:
        port = self.serving.rest_port if self.engine == "native" else self.settings.inference_port
        return f"http://127.0.0.1:{port}"

    @property
    def grpc_target(self) -> str:
        port = self.serving.grpc_port if self.engine == "native" else self.settings.grpc_inference_port
        return f"127.0.0.1:{port}"

    def workers(self) -> dict[tuple[str, str], tuple[bool, tuple[int, ...]]]:
        """(ready, worker pids) per model version (native: the engine's own pid, one copy)."""
        return {r.key: (r.ready, r.pids) for r in self.serving.readiness()}

    def health(self) -> list[str]:
        """What is wrong with the engine now (empty: alive and every model READY).

        TorchServe: every registered version READY (its management API answers). Native:
        the in-process engine's device threads and I/O loop alive, ``/v2/health/ready``
        200, and every version of ``serving.models`` READY."""
        import requests

        problems = []
        try:
            not_ready = [f"{r.name}:{r.version} ({r.reason})" for r in self.serving.readiness() if not r.ready]
        except Exception as exc:  # noqa: BLE001 - the management interface is down: reported
            return [f"readiness unavailable: {type(exc).__name__}: {exc}"]
        if not_ready:
            problems.append("not ready: " + ", ".join(not_ready))
        if self.engine != "native":
            return problems
        serving = self.serving
        if serving.failure:
            problems.append(f"engine failure: {serving.failure}")
        if serving._io_thread is None or not serving._io_thread.is_alive():
            problems.append("the REST/gRPC I/O thread is not running")
        if serving.models is None or not serving.plane.live():
            problems.append("a device thread died")
        else:
            versions = serving.models.versions()
            if not versions or not all(v.ready for v in versions):
                problems.append("versions not READY: " + ", ".join(
                    f"{v.name}:{v.version} {v.state} {v.error}" for v in versions if not v.ready))
        try:
            resp = requests.get(f"{self.rest_url}/v2/health/ready", timeout=10)
            if resp.status_code != 200:
                problems.append(f"/v2/health/ready answered {resp.status_code}")
        except requests.RequestException as exc:
            problems.append(f"/v2/health/ready: {type(exc).__name__}: {exc}")
        return problems

    def stop(self) -> None:
        self.serving.stop()


def _write_store(root: Path):
    from service.models import ModelSpec, build_model
    from service.modelstore import ModelBundle, ModelStore
    from service.inference.options import ServingOptions

    store = ModelStore(root / "store")
    options = ServingOptions(batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS)
    for name, spec_dict in ((IMAGE_MODEL, IMAGE_SPEC), (SEQ_MODEL, SEQ_SPEC)):
        torch.manual_seed(0)
        spec = ModelSpec.from_dict(spec_dict)
        labels = [f"{name}-{i}" for i in range(spec.num_classes)]
        store.write(name, ModelBundle(spec, build_model(spec).state_dict(), labels), options=options)
    return store


def start_server(root: Path, engine: str = "torchserve", startup_timeout_s: float = 120) -> FuzzServer:
    """A real engine on free ports serving the two fuzz models (the same two archives):
    ``torchserve`` (TorchServe + gateway, one worker each) or ``native`` (the native engine,
    in this process)."""
    from service.predict_client import read_token
    from service.serving.settings import ServeSettings
    from testkit.builders import free_port

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    store = _write_store(root)
    settings = ServeSettings(
        engine=engine, model_store=store.root, state_dir=root / "state", inference_port=free_port(),
        ts_inference_port=free_port(), management_port=free_port(), metrics_port=free_port(), grpc_inference_port=free_port(),
        grpc_management_port=free_port(), ts_grpc_inference_port=free_port(), exporter_port=free_port(),
        worker_port_base=random.Random(time.time_ns()).randint(20000, 40000),
        startup_timeout_s=startup_timeout_s,
    )
    if engine == "native":
        from service.serving.native.engine import NativeServing

        serving = NativeServing(settings)
    else:
        from service.serving.torchserve.supervisor import Serving

        serving = Serving(settings)
    report = serving.start()
    try:
        not_ready = [r for r in report if not r.ready]
        if not_ready:
            raise RuntimeError(f"fuzz models not ready on {engine}: {not_ready}")
        token = (serving.api_token.value if engine == "native"
                 else _client_token(settings.state_dir, read_token))
        return FuzzServer(serving, settings, token, engine)
    except BaseException:
        serving.stop()
        raise


def _client_token(state_dir: Path, read_token) -> str:
    """The bearer token clients send: the operator's API token where the instance has one
    (``<state_dir>/api_token``, in front of TorchServe), else TorchServe's inference key."""
    api_token = Path(state_dir) / "api_token"
    if api_token.is_file():
        return api_token.read_text().strip()
    return read_token(state_dir)


# --------------------------------------------------------------------------------------
# Sending, and the campaign
# --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    status: str  # "HTTP 400", "INVALID_ARGUMENT", "OK", "timeout", "error: ..."
    message: str
    seconds: float
    #: REST only: the message is the status line's reason phrase, the body was empty.
    #: TorchServe's frontend answers a body over max_request_size so (413, no body).
    reason_only: bool = False

    @property
    def verdict(self) -> str:
        """"expected", "server_error" (5xx / INTERNAL / UNKNOWN / UNAVAILABLE), "hang"
        (no answer within the timeout), "accepted" (2xx: a bad payload taken) or "other".

        Expected: REST 4xx with a message (OIP routes: ``{"error": message}``); gRPC
        INVALID_ARGUMENT with a message, and RESOURCE_EXHAUSTED for an oversize body; for OIP
        also NOT_FOUND (an unknown model or version) and RESOURCE_EXHAUSTED."""
        s = self.status
        if s == "timeout":
            return "hang"
        if s.startswith("HTTP "):
            code = int(s[5:])
            if 400 <= code < 500:
                if self.reason_only and not (code == 413 and self.case.category == "oversize_body"):
                    return "other"  # our own errors always carry a body with the message
                return "expected" if self.message.strip() else "other"
            if code >= 500:
                return "server_error"
            return "accepted" if 200 <= code < 300 else "other"
        if s == "OK":
            return "accepted"
        if s == "INVALID_ARGUMENT" or (s == "RESOURCE_EXHAUSTED" and self.case.category == "oversize_body") or (
                self.case.api == "oip" and s in ("NOT_FOUND", "RESOURCE_EXHAUSTED")):
            return "expected" if self.message.strip() else "other"
        if s in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"):
            return "server_error"
        return "other"


OIP_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def rest_path(case: Case) -> str:
    """The REST route a case goes to."""
    from urllib.parse import quote

    if case.api != "oip":
        return f"/predictions/{case.model}"
    version = f"/versions/{quote(case.version, safe='')}" if case.version is not None else ""
    return f"/v2/models/{quote(case.model, safe='%')}{version}/infer"


def valid_oip_cases(image: bytes) -> list[Case]:
    """Valid OIP requests: REST JSON (base64 image), REST binary (FP32 sequences with
    lengths), gRPC raw (image), gRPC typed contents (sequences) with top_k."""
    from service._gen.oip.v2 import open_inference_grpc_pb2 as pb

    rows = np.array([[[0.1 * j] * FEATURES for j in range(5)]] * 2, dtype=np.float32)
    lengths = np.array([5, 3], dtype=np.int64)
    head = json.dumps({"inputs": [
        {"name": "sequences", "datatype": "FP32", "shape": list(rows.shape),
         "parameters": {"binary_data_size": rows.nbytes}},
        {"name": "lengths", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": lengths.nbytes}}],
        "parameters": {"top_k": 2}}).encode()
    rest_json = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                        "data": [base64.b64encode(image).decode()]}],
                            "parameters": {"top_k": 2}}).encode()
    grpc_image = pb.ModelInferRequest(model_name=IMAGE_MODEL)
    grpc_image.inputs.add(name="images", datatype="BYTES", shape=[1])
    grpc_image.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    grpc_seq = pb.ModelInferRequest(model_name=SEQ_MODEL, model_version="1")
    grpc_seq.inputs.add(name="sequences", datatype="FP32", shape=list(rows.shape),
                        contents=pb.InferTensorContents(fp32_contents=rows.reshape(-1).tolist()))
    grpc_seq.parameters["top_k"].int64_param = 2
    return [
        Case(-1, "valid", "image", "rest", IMAGE_MODEL, body=rest_json, headers={"Content-Type": "application/json"},
             api="oip"),
        Case(-1, "valid", "sequence", "rest", SEQ_MODEL, body=head + rows.tobytes() + lengths.tobytes(),
             headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}, api="oip",
             version="1"),
        Case(-1, "valid", "image", "grpc", IMAGE_MODEL, body=grpc_image.SerializeToString(), api="oip"),
        Case(-1, "valid", "sequence", "grpc", SEQ_MODEL, body=grpc_seq.SerializeToString(), api="oip",
             version="1"),
    ]


class Sender:
    """Thread-safe sender: a requests session per thread, one gRPC channel."""

    def __init__(self, server: FuzzServer, timeout_s: float):
        import grpc

        from service._gen import inference_pb2, inference_pb2_grpc

        self.server, self.timeout_s = server, timeout_s
        self._local = threading.local()
        self._grpc = grpc
        self._pb2 = inference_pb2
        self._channel = grpc.insecure_channel(server.grpc_target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)
        # OIP's ModelInfer with the request as bytes (serialized by the generator) and the
        # answer as bytes: no generated stub needed to send what a case holds
        self._model_infer = self._channel.unary_unary(OIP_MODEL_INFER)
        self._auth = {"Authorization": f"Bearer {server.token}"}

    def close(self) -> None:
        self._channel.close()

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def send(self, case: Case) -> Outcome:
        start = time.perf_counter()
        reason_only = False
        try:
            if case.transport == "rest":
                status, message, reason_only = self._rest(case)
            else:
                status, message = self._grpc_call(case)
        except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
            status, message = f"error: {type(exc).__name__}", str(exc)[:300]
        return Outcome(case, status, message, time.perf_counter() - start, reason_only)

    def _rest(self, case: Case) -> tuple[str, str, bool]:
        import requests

        try:
            resp = self._session().post(f"{self.server.rest_url}{rest_path(case)}", data=case.body,
                                        headers={**self._auth, **case.headers}, timeout=(10, self.timeout_s))
        except requests.Timeout:
            return "timeout", "", False
        if case.api == "oip":  # OIP's error answer is {"error": message}; nothing else counts
            try:
                body = resp.json()
            except ValueError:
                body = None
            message = body.get("error") if isinstance(body, dict) else None
            if resp.status_code >= 400 and not isinstance(message, str):
                return f"HTTP {resp.status_code}", "", False
            return f"HTTP {resp.status_code}", str(message or ""), False
        try:
            body = resp.json()
            message = body.get("message", "") if isinstance(body, dict) else ""
        except ValueError:
            message = resp.text[:300]
        if not str(message).strip() and not resp.content:
            return f"HTTP {resp.status_code}", resp.reason or "", True
        return f"HTTP {resp.status_code}", str(message), False

    def _grpc_call(self, case: Case) -> tuple[str, str]:
        metadata = [("authorization", f"Bearer {self.server.token}")]
        try:
            if case.api == "oip":
                self._model_infer(case.body, metadata=metadata, timeout=self.timeout_s)
            else:
                request = self._pb2.PredictionsRequest(model_name=case.model, input=case.inputs)
                self._stub.Predictions(request, metadata=metadata, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            if exc.code() == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timeout", exc.details() or ""
            return exc.code().name, exc.details() or ""
        return "OK", ""

    def valid_cases(self) -> list[Case]:
        """One valid request per model and transport (native: and per OIP transport)."""
        g = torch.Generator().manual_seed(1)
        image = encode_png(rgb_pixels(g, 24, 30)).numpy().tobytes()
        seq = json.dumps({"inputs": [[[0.1 * j] * FEATURES for j in range(5)]], "k": 2}).encode()
        cases = [Case(-1, "valid", "image", "rest", IMAGE_MODEL, body=image,
                      headers={"Content-Type": "image/png", "X-Top-K": "2"}),
                 Case(-1, "valid", "sequence", "rest", SEQ_MODEL, body=seq,
                      headers={"Content-Type": "application/json"}),
                 Case(-1, "valid", "image", "grpc", IMAGE_MODEL, inputs={"img": image, "k": b"2"}),
                 Case(-1, "valid", "sequence", "grpc", SEQ_MODEL, inputs={"data": seq})]
        if self.server.engine == "native":
            cases += valid_oip_cases(image)
        return cases

    def valid_requests(self) -> list[str]:
        """:meth:`valid_cases`, sent; returns the failures (empty: all good)."""
        failures = []
        for case in self.valid_cases():
            out = self.send(case)
            if out.status not in ("HTTP 200", "OK"):
                api = " OIP" if case.api == "oip" else ""
                failures.append(f"valid {case.kind} over {case.transport}{api}: {out.status} {out.message[:200]}")
        return failures


@dataclass
class CampaignResult:
    outcomes: list[Outcome]
    checkpoints: list[dict]
    dropped: Counter
    seconds: float
    workers_before: dict
    workers_after: dict
    engine: str = "torchserve"
    #: :meth:`FuzzServer.health` after the campaign: what is wrong with the engine (empty: nothing).
    health_after: list[str] = field(default_factory=list)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.verdict != "expected"]

    def restarts(self) -> list[str]:
        """Model versions whose worker pids changed, or that are not ready, after the run."""
        out = []
        for key, (ready, pids) in self.workers_before.items():
            after = self.workers_after.get(key)
            if after is None or not after[0] or set(after[1]) != set(pids):
                out.append(f"{key[0]}:{key[1]} before {pids} ready={ready}, after {after}")
        return out

    def summary(self) -> dict:
        verdicts = Counter(o.verdict for o in self.outcomes)
        return {
            "engine": self.engine,
            "inputs": len(self.outcomes),
            "by_category": dict(Counter(o.case.category for o in self.outcomes)),
            "by_transport": dict(Counter(o.case.transport for o in self.outcomes)),
            "answers": dict(sorted(Counter(o.status for o in self.outcomes).items())),
            "by_category_answers": {
                c: dict(sorted(Counter(o.status for o in self.outcomes if o.case.category == c).items()))
                for c in ALL_CATEGORIES if any(o.case.category == c for o in self.outcomes)},
            "expected": verdicts.get("expected", 0),
            "server_errors": verdicts.get("server_error", 0),
            "hangs": verdicts.get("hang", 0),
            "accepted": verdicts.get("accepted", 0),
            "other": verdicts.get("other", 0),
            "worker_restarts": len(self.restarts()),
            "failed_valid_requests": sum(len(c["failures"]) for c in self.checkpoints),
            "valid_requests": sum(c.get("valid", 0) for c in self.checkpoints),
            "health_after": self.health_after,
            "dropped_still_decodable": sum(self.dropped.values()),
            "max_seconds": round(max((o.seconds for o in self.outcomes), default=0.0), 3),
            "seconds": round(self.seconds, 1),
        }


def run_campaign(server: FuzzServer, cases: list[Case], *, threads: int = 4, timeout_s: float = 30.0,
                 checkpoints: int = 4, dropped: Counter | None = None) -> CampaignResult:
    """Send every case (``threads`` at a time) in ``checkpoints`` slices; after each slice a
    valid request per model and transport must succeed. Worker pids are read before and
    after: a changed pid is a worker TorchServe had to restart (native: one pid, the engine's
    own, which must stay READY). After the last slice, :meth:`FuzzServer.health`."""
    sender = Sender(server, timeout_s)
    start = time.perf_counter()
    workers_before = server.workers()
    outcomes: list[Outcome] = []
    marks: list[dict] = []
    order = list(cases)
    random.Random(len(cases)).shuffle(order)  # categories interleaved: bad and bad share batches
    size = max(1, -(-len(order) // max(1, checkpoints)))
    try:
        with ThreadPoolExecutor(threads) as pool:
            for first in range(0, len(order), size):
                outcomes.extend(pool.map(sender.send, order[first:first + size]))
                marks.append({"after": len(outcomes), "failures": sender.valid_requests(),
                              "valid": len(sender.valid_cases()), "workers": server.workers()})
    finally:
        sender.close()
    seconds = time.perf_counter() - start
    outcomes.sort(key=lambda o: o.case.id)
    return CampaignResult(outcomes, marks, dropped or Counter(), seconds, workers_before, server.workers(),
                          engine=server.engine, health_after=server.health())
