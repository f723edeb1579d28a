"""Processes of a run: one, or several under torchrun (DDP with gloo on CPU, nccl on GPU).

A run with ``nproc > 1`` is started by :func:`torchrun_command` (``python -m
torch.distributed.run --standalone``); each worker then finds RANK / WORLD_SIZE /
LOCAL_RANK in its environment and :func:`init` joins the process group.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from service.errors import FailedPrecondition


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a torchrun worker (its environment names a rank and a world)."""
    environ = os.environ if environ is None else environ
    return "RANK" in environ and "WORLD_SIZE" in environ


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is FailedPrecondition."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FailedPrecondition("hyperparameters.device is cuda but no CUDA device is available")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


@dataclass
class DistContext:
    """This process's place in the run. One process: rank 0 of a world of 1, no group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.initialized else None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (the tensor itself with one)."""
        if not self.initialized:
            return tensor
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (a collective: call it everywhere)."""
        if not self.initialized:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (batch-norm statistics drift per rank while
        training; evaluation and the archive then see the same model everywhere)."""
        if not self.initialized:
            return
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)

    def gather(self, obj):
        """Every process's ``obj``, in rank order (a collective)."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
        self.initialized = False


def init(device_preference: str, environ: Mapping[str, str] | None = None) -> DistContext:
    """Join the torchrun process group when there is one (gloo on CPU, nccl on CUDA)."""
    environ = os.environ if environ is None else environ
    if not under_torchrun(environ) or int(environ["WORLD_SIZE"]) == 1:
        return DistContext(device=pick_device(device_preference))
    rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(minutes=30))
    return DistContext(rank, world, local, device, True)


def torchrun_command(nproc: int, module_args: list[str], module: str = "service.training") -> list[str]:
    """The command that starts ``nproc`` workers of ``python -m module *module_args`` on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *module_args]
