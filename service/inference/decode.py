"""Turning request payloads into tensors: images and JSON sequences.

Everything here raises InvalidInput (or PayloadTooLarge) with a message that says what
was wrong, so that the edge can answer 4xx instead of crashing a worker.

PNGs are checked in full before ``torchvision.io`` sees them: torchvision's PNG decoder
turns any libpng error raised while it reads the image data (a bad checksum, corrupt
compressed data, too little data, a bad row filter) into a segmentation fault of the
whole process, which in TorchServe is a dead worker and a 500 for every request of its
batch. :func:`check_png` therefore walks every chunk (CRC-32, order, header fields,
palette), inflates the image data once with bounded memory and checks its size and every
row's filter byte, and hands torchvision a canonical PNG of the checked chunks only
(IHDR, PLTE for palette images, IDAT, IEND: the ancillary chunks do not change the pixels
torchvision returns in gray or RGB mode).
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image

from service.errors import InvalidInput, PayloadTooLarge

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Decoded images larger than this are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000
#: libpng refuses rows or columns beyond this (its default user limit), with an error
#: torchvision cannot survive: refused here first.
PNG_MAX_DIMENSION = 1_000_000
#: A progressive JPEG may have any number of scans, and libjpeg passes over the whole
#: image for each: a small body of tiny scans keeps a worker busy for minutes. Real encoders
#: write about ten; libjpeg-turbo's documentation suggests refusing more than 500.
MAX_JPEG_SCANS = 500
#: Largest finite float32: a feature beyond it becomes inf in the model.
FLOAT32_MAX = 3.4028234663852886e38

# PNG: allowed bit depths and channels per colour type; Adam7 passes (x0, y0, dx, dy).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_FILTERS = bytes(range(5))  # none, sub, up, average, paeth
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_INFLATE_CHUNK = 1 << 20


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's first SOF marker, or None if none is found."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int


def png_header(data: bytes | bytearray | memoryview) -> PngHeader:
    """The PNG's IHDR, checked (the chunk's CRC, every field); InvalidInput otherwise."""
    if len(data) < 33:
        raise InvalidInput("truncated PNG image: no complete IHDR chunk")
    if bytes(data[8:16]) != b"\x00\x00\x00\x0dIHDR":
        raise InvalidInput("corrupt PNG image: the first chunk is not a 13-byte IHDR")
    (crc,) = struct.unpack(">I", data[29:33])
    if zlib.crc32(memoryview(data)[12:29]) != crc:
        raise InvalidInput("corrupt PNG image: CRC mismatch in the IHDR chunk")
    width, height, depth, ctype, compression, filter_method, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if width == 0 or height == 0:
        raise InvalidInput(f"image has a zero dimension ({width}x{height})")
    if width > 2**31 - 1 or height > 2**31 - 1:
        raise InvalidInput(f"corrupt PNG image: dimensions {width}x{height} out of range")
    if ctype not in _PNG_DEPTHS:
        raise InvalidInput(f"corrupt PNG image: unknown colour type {ctype}")
    if depth not in _PNG_DEPTHS[ctype]:
        raise InvalidInput(f"corrupt PNG image: bit depth {depth} is not allowed for colour type {ctype} "
                           f"(allowed: {', '.join(map(str, _PNG_DEPTHS[ctype]))})")
    if compression != 0 or filter_method != 0:
        raise InvalidInput(f"corrupt PNG image: unknown compression or filter method "
                           f"({compression}, {filter_method})")
    if interlace not in (0, 1):
        raise InvalidInput(f"corrupt PNG image: unknown interlace method {interlace}")
    return PngHeader(width, height, depth, ctype, interlace)


def _png_rows(h: PngHeader) -> list[tuple[int, int, int]]:
    """(offset, stride, rows) of the filtered scanlines of each pass in the inflated data;
    a stride is one filter byte plus the row's bytes."""
    bits = h.bit_depth * _PNG_CHANNELS[h.color_type]
    passes = _ADAM7 if h.interlace else ((0, 0, 1, 1),)
    out, offset = [], 0
    for x0, y0, dx, dy in passes:
        cols = (h.width - x0 + dx - 1) // dx if h.width > x0 else 0
        rows = (h.height - y0 + dy - 1) // dy if h.height > y0 else 0
        if cols and rows:
            stride = 1 + (cols * bits + 7) // 8
            out.append((offset, stride, rows))
            offset += stride * rows
    return out


def _check_filter_bytes(out: bytes, start: int, layout: list[tuple[int, int, int]]) -> None:
    """Every scanline filter byte that lies in ``out`` (inflated bytes from ``start``) is 0-4."""
    end = start + len(out)
    for offset, stride, rows in layout:
        lo, hi = max(offset, start), min(offset + stride * rows, end)
        if lo >= hi:
            continue
        first = offset + -(-(lo - offset) // stride) * stride
        if first < hi and out[first - start:hi - start:stride].translate(None, _PNG_FILTERS):
            raise InvalidInput("corrupt PNG image: invalid scanline filter type in the image data")


def _check_png_data(header: PngHeader, idat: list[memoryview]) -> None:
    """Inflate the image data (bounded memory) and check its size and filter bytes."""
    layout = _png_rows(header)
    expected = sum(stride * rows for _, stride, rows in layout)
    inflater = zlib.decompressobj()
    produced = 0
    try:
        for i, piece in enumerate(idat):
            pending = piece
            while pending:
                if inflater.eof:
                    raise InvalidInput("corrupt PNG image: data after the end of the compressed image data")
                out = inflater.decompress(pending, _INFLATE_CHUNK)
                _check_filter_bytes(out, produced, layout)
                produced += len(out)
                if produced > expected:
                    raise InvalidInput(f"corrupt PNG image: more image data than the header's {header.width}x"
                                       f"{header.height} pixels")
                pending = inflater.unconsumed_tail
        out = inflater.flush()
        _check_filter_bytes(out, produced, layout)
        produced += len(out)
    except zlib.error as exc:
        raise InvalidInput(f"corrupt PNG image: bad compressed image data ({exc})") from exc
    if not inflater.eof:
        raise InvalidInput("truncated PNG image: the compressed image data ends early")
    if inflater.unused_data:
        raise InvalidInput("corrupt PNG image: data after the end of the compressed image data")
    if produced != expected:
        raise InvalidInput(f"corrupt PNG image: {produced} bytes of image data where the header "
                           f"({header.width}x{header.height}) needs {expected}")


def check_png(data: bytes | bytearray) -> bytearray:
    """Check a whole PNG and return the canonical copy torchvision decodes safely.

    Every chunk must be complete, with a valid CRC-32 and a known type where it is
    critical; IHDR first, PLTE (once, before the data) where the colour type needs it,
    the IDAT chunks in one run, then IEND. The image data must inflate to exactly the
    scanlines the header declares, each with a valid filter byte. Call it after checking
    the header's dimensions: the inflation is bounded by them.
    """
    header = png_header(data)
    view = memoryview(data)
    n = len(data)
    pos = 33
    keep: list[memoryview] = [view[:33]]
    idat: list[memoryview] = []
    plte_seen = idat_done = False
    while True:
        if pos + 12 > n:
            raise InvalidInput("truncated PNG image: no IEND chunk")
        (length,) = struct.unpack(">I", view[pos:pos + 4])
        kind = bytes(view[pos + 4:pos + 8])
        if length > 2**31 - 1:
            raise InvalidInput(f"corrupt PNG image: chunk length {length} out of range")
        if not kind.isalpha() or not kind.isascii():
            raise InvalidInput(f"corrupt PNG image: invalid chunk type {kind!r}")
        end = pos + 12 + length
        if end > n:
            raise InvalidInput(f"truncated PNG image: the {kind.decode()} chunk ends beyond the data")
        (crc,) = struct.unpack(">I", view[end - 4:end])
        if zlib.crc32(view[pos + 4:end - 4]) != crc:
            raise InvalidInput(f"corrupt PNG image: CRC mismatch in chunk {kind.decode()}")
        if kind == b"IEND":
            if length:
                raise InvalidInput("corrupt PNG image: IEND chunk with data")
            break
        if kind == b"IDAT":
            if idat_done:
                raise InvalidInput("corrupt PNG image: IDAT chunks are not consecutive")
            idat.append(view[pos + 8:end - 4])
            keep.append(view[pos:end])
        else:
            if idat:
                idat_done = True
            if kind == b"IHDR":
                raise InvalidInput("corrupt PNG image: more than one IHDR chunk")
            if kind == b"PLTE":
                if plte_seen or idat:
                    raise InvalidInput("corrupt PNG image: PLTE chunk repeated or after the image data")
                plte_seen = True
                entries, rest = divmod(length, 3)
                if header.color_type in (0, 4):
                    raise InvalidInput("corrupt PNG image: PLTE chunk in a grayscale image")
                limit = min(256, 1 << header.bit_depth) if header.color_type == 3 else 256
                if rest or not 1 <= entries <= limit:
                    raise InvalidInput(f"corrupt PNG image: palette of {length} bytes (1 to {limit} "
                                       "three-byte entries allowed)")
                if header.color_type == 3:
                    keep.append(view[pos:end])
            elif kind[0] < 0x61:  # an upper-case first letter: critical, and not one we know
                raise InvalidInput(f"corrupt PNG image: unknown critical chunk {kind.decode()}")
        pos = end
    if not idat:
        raise InvalidInput("corrupt PNG image: no image data (IDAT)")
    if header.color_type == 3 and not plte_seen:
        raise InvalidInput("corrupt PNG image: palette image without a PLTE chunk")
    _check_png_data(header, idat)
    out = bytearray().join(keep)  # keep[0] is the signature and IHDR
    out += _PNG_IEND
    return out


def image_size(data: bytes) -> tuple[int, int]:
    """Declared (width, height) of a JPEG or PNG; InvalidInput for anything else."""
    if data.startswith(PNG_MAGIC):
        header = png_header(data)
        return header.width, header.height
    if data.startswith(JPEG_MAGIC):
        size = _jpeg_size(data)
        if size is None:
            raise InvalidInput("corrupt JPEG: no frame header found")
        return size
    raise InvalidInput("not a JPEG or PNG image")


def decode_image_bytes(data: bytes | bytearray, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode JPEG/PNG bytes into a uint8 tensor (channels, H, W) with torchvision.io."""
    if not data:
        raise InvalidInput("empty image")
    # torch.frombuffer needs a writable buffer: TorchServe hands bytearrays, used as they are.
    data = data if isinstance(data, bytearray) else bytearray(data)
    width, height = image_size(data)
    if width == 0 or height == 0:
        raise InvalidInput(f"image has a zero dimension ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    if data.startswith(JPEG_MAGIC):
        # Entropy-coded data escapes every 0xFF, so this counts each scan's SOS marker
        # (and any in embedded thumbnails): never fewer than the scans.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise InvalidInput(f"JPEG with {scans} scans; the limit is {MAX_JPEG_SCANS}")
    elif data.startswith(PNG_MAGIC):
        if max(width, height) > PNG_MAX_DIMENSION:
            raise PayloadTooLarge(f"PNG of {width}x{height} pixels: a side exceeds the limit of "
                                  f"{PNG_MAX_DIMENSION} pixels")
        data = check_png(data)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as exc:
        # torchvision's messages start with its source location: "decode_jpeg, /path/x.cpp:171, "
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise InvalidInput(f"cannot decode image: {reason}") from exc


def parse_json(value: Any) -> Any:
    """A JSON document from bytes/str, or the value itself if TorchServe decoded it."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput("body is not UTF-8 text") from exc
    if isinstance(value, str):
        try:
            return json.loads(value, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
        except RecursionError as exc:
            raise InvalidInput("body is not valid JSON here: nested too deeply") from exc
        except ValueError as exc:  # an integer of more digits than Python converts
            raise InvalidInput(f"body is not valid JSON here: {str(exc).split(';')[0]}") from exc
    return value


def _reject_constant(name: str):
    raise InvalidInput(f"{name} is not a finite number; not allowed in inputs")


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        if not value:
            raise InvalidInput("empty list in inputs")
        depth += 1
        value = value[0]
    return depth


def _check_number(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InvalidInput(f"{where}: expected a number, got {type(x).__name__}")
    if isinstance(x, int):  # compared exactly: no conversion of a huge integer to float
        if abs(x) > FLOAT32_MAX:
            raise InvalidInput(f"{where}: an integer of {x.bit_length()} bits is outside the float32 range")
        return float(x)
    if not math.isfinite(x):
        raise InvalidInput(f"{where}: {x} is not a finite number")
    if abs(x) > FLOAT32_MAX:
        raise InvalidInput(f"{where}: {x:.6g} is outside the float32 range (magnitude <= {FLOAT32_MAX:.6g})")
    return float(x)


def _check_count(value: list, max_sequences: int | None) -> None:
    if max_sequences is not None and len(value) > max_sequences:
        raise PayloadTooLarge(f"{len(value)} sequences exceed the limit of {max_sequences} per request")


def feature_sequences(value: Any, features: int, max_length: int,
                      max_sequences: int | None = None) -> list[torch.Tensor]:
    """One (T, F) float sequence or a list of them → list of float tensors."""
    depth = _depth(value)
    if depth == 2:
        value = [value]
    elif depth != 3:
        raise InvalidInput(
            f"expected a sequence of {features}-feature steps ([[f1..f{features}], ...]) "
            "or a list of such sequences"
        )
    _check_count(value, max_sequences)
    out = []
    for s, seq in enumerate(value):
        if not isinstance(seq, list) or not seq:
            raise InvalidInput(f"sequence {s}: expected a non-empty list of steps")
        if len(seq) > max_length:
            raise InvalidInput(f"sequence {s}: {len(seq)} steps exceed max_length {max_length}")
        for t, step in enumerate(seq):
            if not isinstance(step, list):
                raise InvalidInput(f"sequence {s} step {t}: expected a list of {features} numbers")
            if len(step) != features:
                raise InvalidInput(
                    f"sequence {s} step {t} has {len(step)} features; the model expects {features}"
                )
            for f, x in enumerate(step):
                _check_number(x, f"sequence {s} step {t} feature {f}")
        out.append(torch.tensor(seq, dtype=torch.float32))
    return out


def token_sequences(value: Any, vocab_size: int, max_length: int, encode=None,
                    max_sequences: int | None = None) -> list[torch.Tensor]:
    """Token ids (one list or a list of lists), or raw text when ``encode`` is given."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        if encode is None:
            raise InvalidInput("this model takes token ids, not text (it has no vocabulary)")
        texts = [value] if isinstance(value, str) else value
        _check_count(texts, max_sequences)
        seqs = []
        for s, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(f"sequence {s}: expected text, got {type(text).__name__}")
            ids = encode(text)
            if not ids:
                raise InvalidInput(f"sequence {s}: text has no tokens")
            seqs.append(ids)
        value = seqs
    depth = _depth(value)
    if depth == 1:
        value = [value]
    elif depth != 2:
        raise InvalidInput("expected token ids ([id, ...]), a list of them, or text")
    _check_count(value, max_sequences)
    out = []
    for s, seq in enumerate(value):
        if not isinstance(seq, list) or not seq:
            raise InvalidInput(f"sequence {s}: expected a non-empty list of token ids")
        if len(seq) > max_length:
            raise InvalidInput(f"sequence {s}: {len(seq)} tokens exceed max_length {max_length}")
        for t, tok in enumerate(seq):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise InvalidInput(f"sequence {s} token {t}: expected an integer id")
            if not 0 <= tok < vocab_size:
                raise InvalidInput(f"sequence {s} token {t}: id {tok} is outside [0, {vocab_size})")
        out.append(torch.tensor(seq, dtype=torch.long))
    return out
