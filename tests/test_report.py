"""benchmarks.report: one benchmark's section of BENCHMARKS.md is replaced, the rest kept."""

import pytest

from benchmarks.report import replace_section

pytestmark = pytest.mark.unit


def test_replaces_only_its_own_section_and_appends_a_missing_one(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n<!-- a:start -->old<!-- a:end -->\nhand-written\n")
    replace_section(out, "<!-- a:start -->", "<!-- a:end -->", "<!-- a:start -->new<!-- a:end -->")
    assert out.read_text() == "# Benchmarks\n\nintro\n<!-- a:start -->new<!-- a:end -->\nhand-written\n"
    replace_section(out, "<!-- b:start -->", "<!-- b:end -->", "<!-- b:start -->b<!-- b:end -->")
    assert out.read_text().endswith("hand-written\n\n<!-- b:start -->b<!-- b:end -->\n")
    fresh = tmp_path / "fresh.md"
    replace_section(fresh, "<!-- a:start -->", "<!-- a:end -->", "<!-- a:start -->x<!-- a:end -->")
    assert fresh.read_text() == "# Benchmarks\n\n<!-- a:start -->x<!-- a:end -->\n"
