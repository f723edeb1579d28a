"""Turning request payloads into tensors: images and JSON sequences.

Everything here raises InvalidInput (or PayloadTooLarge) with a message that says what
was wrong, so that the edge can answer 4xx instead of crashing a worker.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image

from service.errors import InvalidInput, PayloadTooLarge

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Decoded images larger than this are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000


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


def image_size(data: bytes) -> tuple[int, int]:
    """Declared (width, height) of a JPEG or PNG; InvalidInput for anything else."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24:
            raise InvalidInput("truncated PNG: no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
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
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as exc:
        raise InvalidInput(f"cannot decode image: {str(exc).splitlines()[0]}") from exc


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
    if not math.isfinite(x):
        raise InvalidInput(f"{where}: {x} is not a finite number")
    return float(x)


def feature_sequences(value: Any, features: int, max_length: int) -> list[torch.Tensor]:
    """One (T, F) float sequence or a list of them → list of float tensors."""
    depth = _depth(value)
    if depth == 2:
        value = [value]
    elif depth != 3:
        raise InvalidInput(
            f"expected a sequence of {features}-feature steps ([[f1..f{features}], ...]) "
            "or a list of such sequences"
        )
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


def token_sequences(value: Any, vocab_size: int, max_length: int, encode=None) -> list[torch.Tensor]:
    """Token ids (one list or a list of lists), or raw text when ``encode`` is given."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        if encode is None:
            raise InvalidInput("this model takes token ids, not text (it has no vocabulary)")
        texts = [value] if isinstance(value, str) else value
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
