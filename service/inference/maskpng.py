"""The PNG of a served mask: 8-bit grayscale, one class id per pixel.

Written here rather than by ``torchvision.io.encode_png`` so that the native engine's OIP
answer (a ``UINT8 [N, H, W]`` tensor) can read the pixels back on its I/O thread without
torch, cheaply: every scanline uses filter type 0 (none), so reading is one inflate and a
reshape. Masks are large runs of a few values, which deflate compresses well without
PNG's predictive filters. Any PNG reader decodes these files (the tests use torchvision's).

Only numpy and zlib: nothing here touches torch.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: zlib level of the image data: masks compress well at every level, 1 is the fastest.
COMPRESSION_LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(mask: np.ndarray) -> bytes:
    """An (H, W) uint8 array as an 8-bit grayscale PNG (no interlace, filter 0 on every row)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8 or 0 in mask.shape:
        raise ValueError(f"a mask is a non-empty (H, W) uint8 array, got {mask.dtype} {mask.shape}")
    height, width = mask.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # column 0: each row's filter byte (0: none)
    rows[:, 1:] = mask
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(rows.tobytes(), COMPRESSION_LEVEL)), _chunk(b"IEND", b"")))


def decode(data: bytes) -> np.ndarray:
    """The (H, W) uint8 pixels of a PNG written by :func:`encode`; ValueError for any other."""
    view = memoryview(data)
    if bytes(view[:8]) != SIGNATURE:
        raise ValueError("not a PNG")
    pos, header, idat = 8, None, []
    while pos + 12 <= len(view):
        (length,) = struct.unpack(">I", view[pos:pos + 4])
        kind = bytes(view[pos + 4:pos + 8])
        body = view[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise ValueError(f"PNG chunk {kind!r} is cut short")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(bytes(body))
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or header[2:] != (8, 0, 0, 0, 0):
        raise ValueError(f"not an 8-bit grayscale mask PNG without interlace (IHDR {header})")
    width, height = header[0], header[1]
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if rows.size != height * (width + 1):
        raise ValueError(f"PNG image data of {rows.size} bytes for {width}x{height} pixels")
    rows = rows.reshape(height, width + 1)
    if rows[:, 0].any():
        raise ValueError("PNG rows use a filter other than none: not a mask written by modelctl")
    return rows[:, 1:]
