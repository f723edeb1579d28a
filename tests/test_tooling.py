"""Tooling stays out of the product: benchmarks/ and testkit/ import the product, never the
reverse, need no sys.path edits, and are not packaged; testkit's shared builders work."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from testkit.builders import free_port

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
TOOLING = ("benchmarks", "testkit", "tests")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_product_imports_no_tooling():
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_roots(p) & set(TOOLING))
                 for p in (ROOT / "service").rglob("*.py") if "_gen" not in p.parts}
    assert {p: r for p, r in offenders.items() if r} == {}


def test_tooling_is_a_package_found_without_sys_path_edits():
    for package in ("benchmarks", "testkit"):
        assert (ROOT / package / "__init__.py").is_file(), package
        edits = [str(p.relative_to(ROOT)) for p in (ROOT / package).glob("*.py") if "sys.path" in p.read_text()]
        assert edits == [], edits


def test_tooling_is_not_packaged():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["service*"]
    allowed = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert not [line for line in allowed if line.strip("!/") in TOOLING], allowed


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p <= 65535 for p in ports)


def test_every_tooling_module_imports():
    """A module moved or renamed in the product breaks a benchmark only when it runs (they are
    not part of `make test`): import each one here, in a fresh interpreter."""
    import subprocess
    import sys

    modules = [f"{package}.{p.stem}" for package in ("benchmarks", "testkit")
               for p in sorted((ROOT / package).glob("*.py")) if p.stem != "__init__"]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) >= 9, modules
