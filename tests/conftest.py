"""Settings of the whole test session."""

import os

# The tests of the serving machinery (test_serving, test_auth, ...) serve stand-in archives
# with small handlers of their own (an echo handler, a slow one). The archive check run
# before every registration refuses any handler but modelctl's unless this is set
# (service/modelstore/check.py); tests/test_archive_check.py unsets it to check the refusal.
os.environ.setdefault("MODELCTL_ALLOW_FOREIGN_ARCHIVES", "1")
