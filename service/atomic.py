"""Durable, atomic small-file writes: a reader sees the old file or the new one, whole.

:func:`write_text` writes a temporary file beside the target, fsyncs it, renames it over
the target and fsyncs the directory, so that after a crash or a power cut the file is
either the previous one or the new one, never empty or partial, and a rename that was
reported done stays done. The run directory's ``spec.json``, ``run.json`` and
``result.json`` and the model store's records are written so.
"""

from __future__ import annotations

import os
from pathlib import Path

from service import faultpoints


def fsync_path(path: Path | str) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fsync_path(path)


def write_bytes(path: Path | str, data: bytes, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        faultpoints.point(f"atomic.temp_written:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: Path | str, text: str, *, mode: int = 0o644) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode=mode)
