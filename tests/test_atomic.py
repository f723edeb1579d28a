"""service/atomic.py: atomic_write (bytes, text, a writer callback; exclusive publication)
and atomic_symlink replace a file whole or leave the old one, and leave no temporary file."""

from __future__ import annotations

import os
import stat

import pytest

from service import atomic

pytestmark = pytest.mark.unit


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_bytes_text_and_callback(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    assert atomic.atomic_write(target, b"bytes") is True
    assert target.read_bytes() == b"bytes"
    atomic.atomic_write(target, "t\u00e9xt")
    assert target.read_text(encoding="utf-8") == "t\u00e9xt"
    atomic.atomic_write(target, lambda fh: fh.write(b"from a writer"))
    assert target.read_bytes() == b"from a writer"
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def writer(fh):
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic.atomic_write(target, writer)
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_mode_and_exclusive_publication(tmp_path):
    target = tmp_path / "token"
    assert atomic.atomic_write(target, "first\n", mode=0o600, exclusive=True) is True
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 & ~_umask()
    assert atomic.atomic_write(target, "second\n", exclusive=True) is False  # the first one is kept
    assert target.read_text() == "first\n"
    assert _leftovers(tmp_path) == []


def test_the_fault_point_is_reached_after_the_temp_file_is_written(tmp_path, monkeypatch):
    reached = []
    monkeypatch.setattr(atomic.faultpoints, "point", lambda name: reached.append(
        (name, sorted(p.read_bytes() for p in tmp_path.glob(".*.tmp")))))
    atomic.write_text(tmp_path / "run.json", "{}\n")
    atomic.atomic_write(tmp_path / "api_token", "x\n", fault_point="token.temp_written")
    assert reached == [("atomic.temp_written:run.json", [b"{}\n"]), ("token.temp_written", [b"x\n"])]


def test_atomic_symlink_swaps_an_existing_link(tmp_path):
    a, b = tmp_path / "a.mar", tmp_path / "b.mar"
    a.write_text("a")
    b.write_text("b")
    links = tmp_path / "links"
    links.mkdir()
    link = links / "m-v1.mar"
    atomic.atomic_symlink(a, link)
    assert os.readlink(link) == str(a) and link.read_text() == "a"
    atomic.atomic_symlink(b, link)
    assert os.readlink(link) == str(b) and link.read_text() == "b"
    assert _leftovers(links) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
