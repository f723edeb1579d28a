"""Benchmarks and the tools that write BENCHMARKS.md, run from the repo root as
``python -m benchmarks.<name>`` (the Makefile's bench, eval, fuzz and soak targets).

Tooling, not product: it imports ``service`` and ``testkit``, and nothing under ``service``
imports it. ``benchmarks.report`` rewrites one benchmark's section of BENCHMARKS.md.
"""
