"""How an archive asks to be served: :class:`ServingOptions` and the precision contract.

The options are chosen when an archive is written and travel inside it twice: as TorchServe's
``model-config.yaml`` (:meth:`ServingOptions.to_yaml`: batching, timeouts, the handler's
section) and as the lineage's ``serving`` record (:meth:`ServingOptions.lineage`), which the
worker reads back (:func:`service.inference.fastpath.resolve_runtime`). The precisions a
worker may run (:data:`PRECISIONS`) and the agreement that admits a reduced one
(:data:`MIN_AGREEMENT`) are written here once, for the archive's writer, the agreement check
(:mod:`service.inference.precision`) and the worker.

This module imports nothing of the service but its errors: the model store imports it to
write an archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.errors import InvalidSpec

#: Precisions a worker can run a model in. Anything but fp32 needs a passed agreement check.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Least top-1 agreement with fp32, on held-out data, that admits a reduced precision.
MIN_AGREEMENT = 0.99
#: Seconds TorchServe gives a worker of a compiled model to load (compile and warm up).
COMPILE_STARTUP_TIMEOUT_S = 900
#: The archive's TorchServe model configuration (:meth:`ServingOptions.to_yaml`).
MODEL_CONFIG_FILE = "model-config.yaml"


@dataclass(frozen=True)
class ServingOptions:
    """Per-model serving options, written into the archive's model-config.yaml and lineage.

    ``batch_size`` and ``max_batch_delay_ms`` drive TorchServe's batching. The fast-path
    options are read by the worker from the archive's lineage (``serving``):

    * ``precision``: "fp32" (default), "bf16" (CPUs with native bf16, GPUs) or "fp16"
      (GPUs). A reduced precision needs ``precision_check``: the record of
      ``service.inference.check_precision`` run on this bundle's weights with held-out
      inputs. A failed check is recorded as well, and the worker then runs fp32.
    * ``channels_last``: NHWC activations and weights (image models).
    * ``compile``: ``torch.compile`` at load (image models), its compile paid in the
      worker's initialize and cached on disk.

    Turn each on only where measured faster for the model (``make bench``).
    """

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 120
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    precision_check: Mapping[str, Any] | None = None

    def __post_init__(self):
        for key in ("batch_size", "response_timeout_s"):
            if getattr(self, key) < 1:
                raise InvalidSpec(key, "must be >= 1")
        if self.max_batch_delay_ms < 0:
            raise InvalidSpec("max_batch_delay_ms", "must be >= 0")
        if self.max_batch_delay_ms == 0 and self.batch_size > 1:
            # Measured side by side (BENCHMARKS.md): 128 ms at concurrency 1 against 30 ms with 2 ms.
            raise InvalidSpec("max_batch_delay_ms", "0 with batch_size > 1 makes TorchServe 0.12 wait about "
                                                    "100 ms for every batch; use 1 or more")
        if self.precision not in PRECISIONS:
            raise InvalidSpec("precision", f"unknown precision {self.precision!r}", allowed=PRECISIONS)
        for key in ("channels_last", "compile"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidSpec(key, "must be true or false")
        check = self.precision_check
        if self.precision != "fp32":
            if not isinstance(check, Mapping):
                raise InvalidSpec(
                    "precision_check",
                    f"precision {self.precision} needs the record of an agreement check with fp32 on "
                    "held-out data (service.inference.check_precision)",
                )
            if check.get("precision") != self.precision:
                raise InvalidSpec(
                    "precision_check",
                    f"the check was run for {check.get('precision')!r}, not {self.precision!r}",
                )
        if check is not None:
            object.__setattr__(self, "precision_check", dict(check))

    def to_yaml(self) -> str:
        # TorchServe hands the ``handler`` section to the handler (context.model_yaml_config);
        # the worker reads the same options, and the check, from the archive's lineage.
        # A compiled model compiles at load, one graph per batch size (minutes on a cold
        # cache): TorchServe's default of 120 s to load a worker is too short for that.
        startup = f"startupTimeout: {COMPILE_STARTUP_TIMEOUT_S}\n" if self.compile else ""
        return (
            f"batchSize: {self.batch_size}\n"
            f"maxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
            f"{startup}"
            "handler:\n"
            f"  precision: {self.precision}\n"
            f"  channels_last: {str(self.channels_last).lower()}\n"
            f"  compile: {str(self.compile).lower()}\n"
        )

    def lineage(self) -> dict:
        """The ``serving`` record of the lineage: the options and the precision check."""
        return {
            "batch_size": self.batch_size,
            "max_batch_delay_ms": self.max_batch_delay_ms,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "precision_check": dict(self.precision_check) if self.precision_check is not None else None,
        }
