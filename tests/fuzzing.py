"""Bad-input fuzzing: a seeded generator of bad payloads, and a campaign against a real server.

Used by ``tests/test_fuzz.py`` (a real TorchServe, real gRPC gateway) and by
``benchmarks/fuzz_report.py`` (``make fuzz``, the figures in BENCHMARKS.md). Nothing here
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

CATEGORIES = ("png_corrupt", "jpeg_corrupt", "decompression_bomb", "wrong_content_type",
              "empty_body", "oversize_body", "nan_inf_sequence", "wrong_nesting", "bad_k")
#: Cases per category in the default campaign (both transports together).
DEFAULT_COUNTS = {
    "png_corrupt": 180, "jpeg_corrupt": 160, "decompression_bomb": 60, "wrong_content_type": 100,
    "empty_body": 40, "oversize_body": 8, "nan_inf_sequence": 150, "wrong_nesting": 150,
    "bad_k": 160,
}


@dataclass
class Case:
    """One bad request. REST: ``body`` with ``headers``; gRPC: the ``inputs`` map."""

    id: int
    category: str
    kind: str
    transport: str  # "rest" or "grpc"
    model: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        size = len(self.body) if self.transport == "rest" else sum(map(len, self.inputs.values()))
        return f"#{self.id} {self.category}/{self.kind} over {self.transport} to {self.model} ({size} bytes)"


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


def multipart(fields: dict[str, bytes], rng: random.Random) -> tuple[bytes, str]:
    """A multipart/form-data body with a seeded boundary (deterministic bytes)."""
    boundary = "fuzz" + "".join(rng.choice("0123456789abcdef") for _ in range(16))
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def generate(seed: int = 20260101, counts: dict[str, int] | None = None,
             max_request_size: int = 16 * 1024 * 1024) -> tuple[list[Case], Counter]:
    """The campaign's cases for ``seed``, and the candidates dropped because the reference
    decoder took them (random JPEG bit flips that still decode are not bad payloads)."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    gen = _Gen(seed)
    for category in CATEGORIES:
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
@dataclass
class FuzzServer:
    serving: Any
    settings: Any
    token: str

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.inference_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_inference_port}"

    def workers(self) -> dict[tuple[str, str], tuple[bool, tuple[int, ...]]]:
        """(ready, worker pids) per model version."""
        return {r.key: (r.ready, r.pids) for r in self.serving.readiness()}


def start_server(root: Path, startup_timeout_s: float = 120) -> FuzzServer:
    """TorchServe + gateway on free ports serving the two fuzz models (one worker each)."""
    from service.client import read_token
    from service.models import ModelSpec, build_model
    from service.modelstore import ModelBundle, ModelStore
    from service.modelstore.store import ServingOptions
    from service.serving.settings import ServeSettings
    from service.serving.supervisor import Serving
    from tests.helpers import free_port

    store = ModelStore(root / "store")
    options = ServingOptions(batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS)
    for name, spec_dict in ((IMAGE_MODEL, IMAGE_SPEC), (SEQ_MODEL, SEQ_SPEC)):
        torch.manual_seed(0)
        spec = ModelSpec.from_dict(spec_dict)
        labels = [f"{name}-{i}" for i in range(spec.num_classes)]
        store.write(name, ModelBundle(spec, build_model(spec).state_dict(), labels), options=options)
    settings = ServeSettings(
        model_store=store.root, state_dir=root / "state", inference_port=free_port(),
        management_port=free_port(), metrics_port=free_port(), grpc_inference_port=free_port(),
        grpc_management_port=free_port(), ts_grpc_inference_port=free_port(), exporter_port=free_port(),
        worker_port_base=random.Random(time.time_ns()).randint(20000, 40000),
        startup_timeout_s=startup_timeout_s,
    )
    serving = Serving(settings)
    report = serving.start()
    try:
        not_ready = [r for r in report if not r.ready]
        if not_ready:
            raise RuntimeError(f"fuzz models not ready: {not_ready}")
        return FuzzServer(serving, settings, _client_token(settings.state_dir, read_token))
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
        (no answer within the timeout), "accepted" (2xx: a bad payload taken) or "other"."""
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
        if s == "INVALID_ARGUMENT" or (s == "RESOURCE_EXHAUSTED" and self.case.category == "oversize_body"):
            return "expected" if self.message.strip() else "other"
        if s in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"):
            return "server_error"
        return "other"


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
            resp = self._session().post(f"{self.server.rest_url}/predictions/{case.model}", data=case.body,
                                        headers={**self._auth, **case.headers}, timeout=(10, self.timeout_s))
        except requests.Timeout:
            return "timeout", "", False
        try:
            body = resp.json()
            message = body.get("message", "") if isinstance(body, dict) else ""
        except ValueError:
            message = resp.text[:300]
        if not str(message).strip() and not resp.content:
            return f"HTTP {resp.status_code}", resp.reason or "", True
        return f"HTTP {resp.status_code}", str(message), False

    def _grpc_call(self, case: Case) -> tuple[str, str]:
        request = self._pb2.PredictionsRequest(model_name=case.model, input=case.inputs)
        try:
            self._stub.Predictions(request, metadata=[("authorization", f"Bearer {self.server.token}")],
                                   timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            if exc.code() == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                return "timeout", exc.details() or ""
            return exc.code().name, exc.details() or ""
        return "OK", ""

    def valid_requests(self) -> list[str]:
        """One valid request per model and transport; returns the failures (empty: all good)."""
        g = torch.Generator().manual_seed(1)
        image = encode_png(rgb_pixels(g, 24, 30)).numpy().tobytes()
        seq = json.dumps({"inputs": [[[0.1 * j] * FEATURES for j in range(5)]], "k": 2}).encode()
        failures = []
        for case in (Case(-1, "valid", "image", "rest", IMAGE_MODEL, body=image,
                          headers={"Content-Type": "image/png", "X-Top-K": "2"}),
                     Case(-1, "valid", "sequence", "rest", SEQ_MODEL, body=seq,
                          headers={"Content-Type": "application/json"}),
                     Case(-1, "valid", "image", "grpc", IMAGE_MODEL, inputs={"img": image, "k": b"2"}),
                     Case(-1, "valid", "sequence", "grpc", SEQ_MODEL, inputs={"data": seq})):
            out = self.send(case)
            if out.status not in ("HTTP 200", "OK"):
                failures.append(f"valid {case.kind} over {case.transport}: {out.status} {out.message[:200]}")
        return failures


@dataclass
class CampaignResult:
    outcomes: list[Outcome]
    checkpoints: list[dict]
    dropped: Counter
    seconds: float
    workers_before: dict
    workers_after: dict

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
            "inputs": len(self.outcomes),
            "by_category": dict(Counter(o.case.category for o in self.outcomes)),
            "by_transport": dict(Counter(o.case.transport for o in self.outcomes)),
            "answers": dict(sorted(Counter(o.status for o in self.outcomes).items())),
            "by_category_answers": {
                c: dict(sorted(Counter(o.status for o in self.outcomes if o.case.category == c).items()))
                for c in CATEGORIES if any(o.case.category == c for o in self.outcomes)},
            "expected": verdicts.get("expected", 0),
            "server_errors": verdicts.get("server_error", 0),
            "hangs": verdicts.get("hang", 0),
            "accepted": verdicts.get("accepted", 0),
            "other": verdicts.get("other", 0),
            "worker_restarts": len(self.restarts()),
            "failed_valid_requests": sum(len(c["failures"]) for c in self.checkpoints),
            "dropped_still_decodable": sum(self.dropped.values()),
            "max_seconds": round(max((o.seconds for o in self.outcomes), default=0.0), 3),
            "seconds": round(self.seconds, 1),
        }


def run_campaign(server: FuzzServer, cases: list[Case], *, threads: int = 4, timeout_s: float = 30.0,
                 checkpoints: int = 4, dropped: Counter | None = None) -> CampaignResult:
    """Send every case (``threads`` at a time) in ``checkpoints`` slices; after each slice a
    valid request per model and transport must succeed. Worker pids are read before and
    after: a changed pid is a worker TorchServe had to restart."""
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
                              "workers": server.workers()})
    finally:
        sender.close()
    outcomes.sort(key=lambda o: o.case.id)
    return CampaignResult(outcomes, marks, dropped or Counter(), time.perf_counter() - start,
                          workers_before, server.workers())
