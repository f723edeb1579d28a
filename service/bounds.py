"""The operator's bounds on fine-tuning runs and deployments, with this service's ceilings.

A run spec is checked against a :class:`service.training.run_spec.Policy`. Its bounds are the
operator's: each is set by a ``MODELCTL_MAX_*`` variable (or the control service's
:class:`~service.control.settings.ControlConfig` field of the same name), and may lower this
service's ceiling below, never raise it above. A spec cannot set them.

====================================  ==================  ========  =====================
setting (ControlConfig field)         Policy field        least     default = ceiling
====================================  ==================  ========  =====================
MODELCTL_MAX_EPOCHS                   max_epochs          1         1000
MODELCTL_MAX_BATCH_SIZE               max_batch_size      1         8192 (per process)
MODELCTL_MAX_NPROC                    max_nproc           1         64 (processes a run)
MODELCTL_MAX_DATALOADER_WORKERS       max_workers         0         32 (per process)
MODELCTL_MAX_EXAMPLES                 max_examples        1         2,000,000
MODELCTL_MAX_DATASET_ELEMENTS         max_elements        1         2**28 (a .npz's arrays)
====================================  ==================  ========  =====================

``MODELCTL_MAX_DEPLOY_WORKERS`` bounds the workers of a deployed version (DeployModel,
RollbackModel, a job's deploy_workers). Unset (0), it is the GPUs a replica sees when it
sees any, else its cores, and never less than the default workers of a deployment.

Light on purpose: the control API imports it, and must not import torch.
"""

from __future__ import annotations

import os
import typing

from service.errors import InvalidArgument

MAX_EPOCHS = 1000
#: Examples per process and step.
MAX_BATCH_SIZE = 8192
#: Training processes of one run (torchrun's nproc_per_node x nodes).
MAX_NPROC = 64
#: DataLoader worker processes per training process.
MAX_DATALOADER_WORKERS = 32
#: Examples a dataset, train_size, val_size and test_size may hold.
MAX_EXAMPLES = 2_000_000
#: Elements of the arrays of a .npz dataset, all together, read from their headers before
#: any is loaded: 2**28 float32 values are 1 GiB (and the loader copies them once).
MAX_DATASET_ELEMENTS = 2**28

#: ControlConfig field (its variable is MODELCTL_<FIELD>) -> (Policy field, least, ceiling).
RUN_BOUNDS: dict[str, tuple[str, int, int]] = {
    "max_epochs": ("max_epochs", 1, MAX_EPOCHS),
    "max_batch_size": ("max_batch_size", 1, MAX_BATCH_SIZE),
    "max_nproc": ("max_nproc", 1, MAX_NPROC),
    "max_dataloader_workers": ("max_workers", 0, MAX_DATALOADER_WORKERS),
    "max_examples": ("max_examples", 1, MAX_EXAMPLES),
    "max_dataset_elements": ("max_elements", 1, MAX_DATASET_ELEMENTS),
}
#: Policy field -> ControlConfig field.
POLICY_FIELDS = {policy: config for config, (policy, _, _) in RUN_BOUNDS.items()}

MAX_DEPLOY_WORKERS_ENV = "MODELCTL_MAX_DEPLOY_WORKERS"


def env_name(config_field: str) -> str:
    return "MODELCTL_" + config_field.upper()


def check_run_bound(config_field: str, value) -> int:
    """``value`` if it is an integer within the bound's least value and ceiling; else
    InvalidArgument naming the setting."""
    _, least, ceiling = RUN_BOUNDS[config_field]
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= ceiling:
        raise InvalidArgument(f"{env_name(config_field)} must be an integer from {least} to {ceiling} "
                              f"(an operator may lower this service's bound, not raise it), got {value!r}")
    return value


def run_bounds_from_env(environ: typing.Mapping[str, str] | None = None) -> dict[str, int]:
    """The Policy fields set by ``MODELCTL_MAX_*`` variables (checked), by Policy field name."""
    environ = os.environ if environ is None else environ
    found = {}
    for config_field, (policy_field, _, _) in RUN_BOUNDS.items():
        raw = environ.get(env_name(config_field), "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise InvalidArgument(f"{env_name(config_field)}: expected an integer, got {raw[:40]!r}") from None
            found[policy_field] = check_run_bound(config_field, value)
    return found


def trainer_env(config) -> dict[str, str]:
    """The variables that give a trainer process the run bounds of ``config`` (a
    ControlConfig): the trainer checks its spec and its dataset against them too."""
    return {env_name(field): str(getattr(config, field)) for field in RUN_BOUNDS}


def visible_gpus(environ: typing.Mapping[str, str] | None = None) -> int:
    """GPUs this process sees: NVML's count, within ``CUDA_VISIBLE_DEVICES`` when set
    (CUDA stops at its first negative entry); 0 without a driver."""
    environ = os.environ if environ is None else environ
    cap = None
    devices = environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        cap = 0
        for item in devices.split(","):
            if not item.strip() or item.strip().startswith("-"):
                break
            cap += 1
        if cap == 0:
            return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: no GPU
        return 0
    return count if cap is None else min(count, cap)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_max_deploy_workers(environ: typing.Mapping[str, str] | None = None) -> int:
    """Workers a deployed version may have when the operator sets no maximum: one per GPU
    where there are GPUs (TorchServe gives each worker one), else one per core."""
    return visible_gpus(environ) or cores()
