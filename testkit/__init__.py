"""Test support shared by tests/ and benchmarks/: the builders (``testkit.builders``) and the
bad-input fuzz corpus and campaign (``testkit.fuzzing``).

Not product code: nothing under ``service`` imports it, and the image leaves it out
(pyproject's packages.find takes ``service*`` only; .dockerignore allows ``service/``).
pytest finds it through pyproject's ``pythonpath = ["."]``; ``python -m benchmarks.<name>``
from the repo root finds it on the current directory.
"""
