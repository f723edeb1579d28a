"""Engine-independent inference: decode, preprocess, batch, forward, top-k."""

from service.inference.predictor import BatchResult, Predictor, parse_k

__all__ = ["BatchResult", "Predictor", "parse_k"]
