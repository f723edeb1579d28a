"""Engine-independent inference: decode, preprocess, batch, forward, top-k.

Importing the package imports none of its modules: its names are imported on first use
(PEP 562). So :mod:`service.inference.options` (the serving options an archive is written
with, which the model store imports) is read without torch, and the control service
starts without it (tests/test_spec_no_torch.py).
"""

from service import lazy

#: Each name of the package -> the module that defines it.
_EXPORTS = {
    "BatchResult": "predictor",
    "Predictor": "predictor",
    "parse_k": "predictor",
    "PrecisionCheck": "precision",
    "check_precision": "precision",
    "RuntimeOptions": "fastpath",
    "resolve_runtime": "fastpath",
    "ServingOptions": "options",
}

__all__ = ["BatchResult", "PrecisionCheck", "Predictor", "RuntimeOptions", "ServingOptions", "check_precision",
           "parse_k", "resolve_runtime"]


__getattr__ = lazy.exports(__name__, _EXPORTS)
