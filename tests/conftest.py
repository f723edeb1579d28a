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
    from service.training.spec import Policy

    return Policy((roots,))
