"""modelctl: serve and fine-tune PyTorch models behind TorchServe."""

__version__ = "0.1.0"
