"""How a worker runs a model: precision, memory format and compilation.

The archive asks for them (:class:`service.inference.options.ServingOptions`, recorded in
the lineage's ``serving`` record); :func:`resolve_runtime` decides what the worker really runs:

* a reduced precision (bf16 autocast on a CPU with native bf16; bf16 or fp16 on a GPU)
  only when the lineage holds a passed agreement check (top-1 agreement with fp32 on
  held-out data >= 99 %) for that precision, on the same kind of device, run on exactly
  these weights; anything else runs fp32 and says why;
* ``channels_last`` and ``compile`` for image models only.

Nothing here knows which engine serves the model.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from service.models.bundle import state_dict_sha256
from service.inference.options import MIN_AGREEMENT, PRECISIONS

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags that mean native bf16 arithmetic (AVX512-BF16, AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX).

    ``torch.backends.cpu.get_cpu_capability()`` names the vector ISA only ("AVX512"), not
    bf16, so oneDNN's own answer is asked first and the CPU flags second.
    """
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return bool(set(BF16_CPU_FLAGS) & cpu_flags()) or not cpu_flags()
    except (AttributeError, RuntimeError):
        pass
    return bool(set(BF16_CPU_FLAGS) & cpu_flags())


def native_precisions(device: torch.device | str) -> tuple[str, ...]:
    """Precisions ``device`` computes natively (fp32 always)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        out = ["fp32", "fp16"]
        if torch.cuda.get_device_capability(index) >= (8, 0):
            out.append("bf16")
        return tuple(out)
    if device.type == "cpu" and cpu_has_native_bf16():
        return ("fp32", "bf16")
    return ("fp32",)


@dataclass(frozen=True)
class RuntimeOptions:
    """What the worker runs: ``precision`` (fp32, bf16, fp16), ``channels_last``, ``compile``."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (allowed: {', '.join(PRECISIONS)})")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile}


def check_passed(check: Mapping | None, precision: str, device: torch.device,
                 weights_sha256: str | None) -> tuple[bool, str]:
    """Whether a lineage's precision check admits ``precision`` on ``device``; and why not."""
    if not isinstance(check, Mapping):
        return False, "no agreement check in the lineage"
    if check.get("precision") != precision:
        return False, f"the check was run for {check.get('precision')!r}"
    if check.get("device_type") != device.type:
        return False, f"the check was run on {check.get('device_type')!r}, this worker runs on {device.type}"
    agreement = check.get("agreement")
    if not check.get("passed") or not isinstance(agreement, (int, float)) or agreement < MIN_AGREEMENT:
        return False, f"top-1 agreement with fp32 was {agreement!r}, below {MIN_AGREEMENT:.0%}"
    if weights_sha256 is not None and check.get("weights_sha256") != weights_sha256:
        return False, "the check was run on other weights"
    return True, f"top-1 agreement with fp32 {agreement:.2%} on {check.get('samples')} held-out inputs"


def resolve_runtime(lineage: Mapping, state_dict: Mapping[str, torch.Tensor], device: torch.device | str,
                    modality: str) -> tuple[RuntimeOptions, list[str]]:
    """The options a worker runs for a bundle: the archive's, less what is not allowed here.

    Returns the options and notes that say what was refused and why (the worker logs them).
    """
    device = torch.device(device)
    serving = lineage.get("serving") or {}
    notes: list[str] = []
    precision = serving.get("precision") or "fp32"
    if precision not in PRECISIONS:
        notes.append(f"unknown precision {precision!r}: fp32")
        precision = "fp32"
    if precision != "fp32":
        ok, why = check_passed(serving.get("precision_check"), precision, device, state_dict_sha256(state_dict))
        if ok and precision not in native_precisions(device):
            ok, why = False, f"this {device.type} has no native {precision}"
        notes.append(f"{precision}: {why}" if ok else f"{precision} refused ({why}): fp32")
        if not ok:
            precision = "fp32"
    channels_last = bool(serving.get("channels_last", False))
    compile_ = bool(serving.get("compile", False))
    if modality != "image" and (channels_last or compile_):
        notes.append("channels_last and compile apply to image models only: off")
        channels_last = compile_ = False
    return RuntimeOptions(precision, channels_last, compile_), notes


#: Environment variable naming the directory of torch.compile's on-disk caches.
COMPILE_CACHE_ENV = "MODELCTL_COMPILE_CACHE_DIR"


def configure_compile_cache(default: os.PathLike | str | None = None) -> str | None:
    """Point TorchInductor's caches (FX graph cache, compiled kernels) at a lasting directory.

    An explicit ``TORCHINDUCTOR_CACHE_DIR`` wins; then ``MODELCTL_COMPILE_CACHE_DIR``; then
    ``default``. Returns the directory in use (None: Inductor's own default under $TMPDIR).
    Must run before the first compilation in the process.
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.environ.get(COMPILE_CACHE_ENV) or (
        str(default) if default else None)
    if chosen:
        os.makedirs(chosen, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True  # the default; said here because we rely on it
    except ImportError:  # pragma: no cover - torch without inductor
        pass
    return chosen
