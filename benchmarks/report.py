"""BENCHMARKS.md sections: each benchmark rewrites only the text between its own markers."""

from __future__ import annotations

import platform
from pathlib import Path


def replace_section(out: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) in place of the
    text between those markers in ``out``; appended when the markers are absent. The rest
    of the file is kept."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the conditions a benchmark ran under."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
