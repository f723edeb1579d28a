"""Engine-independent inference: decode, preprocess, batch, forward, top-k."""

from service.inference.fastpath import RuntimeOptions, resolve_runtime
from service.inference.options import ServingOptions
from service.inference.predictor import BatchResult, Predictor, parse_k
from service.inference.precision import PrecisionCheck, check_precision

__all__ = ["BatchResult", "PrecisionCheck", "Predictor", "RuntimeOptions", "ServingOptions", "check_precision",
           "parse_k", "resolve_runtime"]
