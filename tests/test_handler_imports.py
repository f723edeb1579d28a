"""The TorchServe handler stays thin: no captum, no stock TorchServe handlers."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_handler_imports_no_captum_or_stock_handlers():
    code = (
        "import sys, service.handlers.torchserve as h; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'captum' "
        "or m.startswith('ts.torch_handler')); "
        "print(','.join(bad)); assert callable(h.handle)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
