"""Fine-tuning runs: datasets, the classic training recipe, checkpoints, DDP under torchrun,
and a new archive version in the model store at the end.

Entry points: ``python -m service.training run SPEC`` and ``modelctl finetune run SPEC``
(both :func:`service.training.run_command.run_command`); in-process:
:func:`service.training.recipe.run_finetune`.
"""

from service.training.run_spec import Hyperparameters, Policy, RunSpec

__all__ = ["Hyperparameters", "Policy", "RunSpec"]
