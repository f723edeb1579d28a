"""Durable, atomic file writes: a reader sees the old file or the new one, whole.

:func:`atomic_write` is the one write-then-rename of the package: it writes a temporary
file beside the target (same directory, so the rename never crosses a filesystem), flushes
and fsyncs it, renames it over the target (or, ``exclusive``, links it into place only
where no file is yet) and fsyncs the directory, so that after a crash or a power cut the
file is either the previous one or the new one, never empty or partial, and a rename that
was reported done stays done. When writing fails, the temporary file is removed and the
old file is left as it was. :func:`atomic_symlink` swaps a symlink the same way.

Its users: the run directory's ``spec.json``, ``run.json`` and ``result.json``, the model
store's records and lineage sidecar, the API token, nginx's generated files, the training
checkpoint (through a writer callback: ``torch.save``), TorchServe's archive links.

Each write reaches the fault point ``atomic.temp_written:<file name>`` (service/faultpoints.py)
once the temporary file is fsynced and before it is published, unless the caller names its
own point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

from service import faultpoints

#: What :func:`atomic_write` writes: bytes, text (UTF-8), or a callback given the open binary file.
Content = Union[bytes, str, Callable[[BinaryIO], object]]


def fsync_path(path: Path | str) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    fsync_path(path)


def temp_path(path: Path | str) -> Path:
    """The temporary file of a write of ``path``: hidden, beside it, this process's."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path | str, content: Content, *, mode: int = 0o644, exclusive: bool = False,
                 fault_point: str | None = None) -> bool:
    """Replace ``path`` with ``content`` atomically and durably (see the module docstring).

    ``content`` is bytes, a str (written as UTF-8) or a callable given the open binary file
    to write into (``lambda fh: torch.save(state, fh)``). The file gets ``mode`` (before the
    umask) when it is created. ``exclusive``: publish with ``os.link``, which fails rather
    than overwrite: an existing ``path`` is kept and False is returned. ``fault_point``: the
    name of the point reached between the fsync and the publication (default
    ``atomic.temp_written:<file name>``). Returns whether this call's file was published.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        faultpoints.point(fault_point or f"atomic.temp_written:{path.name}")
        published = True
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:  # another writer published first: theirs is kept
                published = False
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return published


def atomic_symlink(target: Path | str, link: Path | str) -> Path:
    """Make ``link`` a symlink to ``target``, replacing an existing link atomically (it is
    never missing), and fsync the directory."""
    link = Path(link)
    tmp = temp_path(link)
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    return link


def write_bytes(path: Path | str, data: bytes, *, mode: int = 0o644) -> Path:
    """:func:`atomic_write` of ``data``; returns ``path``."""
    atomic_write(path, data, mode=mode)
    return Path(path)


def write_text(path: Path | str, text: str, *, mode: int = 0o644) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8); returns ``path``."""
    atomic_write(path, text, mode=mode)
    return Path(path)
