"""Settings of the whole test session, and the fixtures several modules share."""

import os

import pytest

# The tests of the serving machinery (test_serving, test_auth, ...) serve stand-in archives
# with small handlers of their own (an echo handler, a slow one). The archive check run
# before every registration refuses any handler but modelctl's unless this is set
# (service/modelstore/check.py); tests/test_archive_check.py unsets it to check the refusal.
os.environ.setdefault("MODELCTL_ALLOW_FOREIGN_ARCHIVES", "1")


@pytest.fixture
def roots(tmp_path):
    """A data root of the test's own (the runs' Policy admits datasets only inside it)."""
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def policy(roots):
    """The operator's policy of a run: ``roots`` as its one data root, the default bounds."""
    from service.training.run_spec import Policy

    return Policy((roots,))


# ---- the test tiers ---------------------------------------------------------------------------
# A tier is a marker registered in pyproject.toml whose description starts with "tier:"
# (DEVELOPERS.md, "The test tiers"). Every test has exactly one, given by its module's
# ``pytestmark`` or, where a module mixes tiers, by the test's own mark; `make test-fast` runs
# the tier ``unit`` alone.
TIER_PREFIX = "tier:"


def registered_tiers(config) -> set[str]:
    """The markers pyproject.toml registers as tiers (``"name: tier: what it needs"``)."""
    tiers = set()
    for line in config.getini("markers"):
        name, _, description = line.partition(":")
        if description.strip().startswith(TIER_PREFIX):
            tiers.add(name.strip())
    return tiers


def tier_problems(items, tiers) -> list[str]:
    """One line per test without exactly one of ``tiers``: its node id and the tiers it has."""
    problems = []
    for item in items:
        found = sorted({mark.name for mark in item.iter_markers() if mark.name in tiers})
        if len(found) != 1:
            problems.append(f"{item.nodeid}: {', '.join(found) if found else 'no tier'}")
    return problems


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse the session when a collected test has no tier or more than one."""
    problems = tier_problems(items, registered_tiers(config))
    if problems:
        raise pytest.UsageError(
            "every test needs exactly one tier marker of pyproject.toml (DEVELOPERS.md, "
            "'The test tiers'):\n  " + "\n  ".join(problems))
