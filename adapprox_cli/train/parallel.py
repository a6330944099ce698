"""The processes torchrun starts: joining their group, wrapping the model, and the loop's collectives.

Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA), or sharded by rows with FSDP2; every collective here is a no-op in a single
process, so the loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "Processes",
    "gather_over_processes",
    "gathered_state_dicts",
    "join_processes",
    "leave_processes",
    "mean_over_processes",
    "reduce_step",
    "wait_for_processes",
    "wrap_model",
]


@dataclass
class Processes:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False  # this run started the process group, so it also tears it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def join_processes(device: str) -> Processes:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return Processes(world_size, rank, local_rank, created)


def wait_for_processes(processes: Processes) -> None:
    """Every process of a group this run created waits here until all have arrived."""
    if processes.created:
        import torch.distributed as dist

        dist.barrier()


def leave_processes(processes: Processes) -> None:
    """Tear down the process group this run created (a joined one is left to its creator)."""
    if processes.created:
        import torch.distributed as dist

        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, optimizer: torch.optim.Optimizer, processes: Processes, device: str, fsdp: bool
) -> nn.Module:
    """The module the loop calls: FSDP2-sharded in place, wrapped in DDP, or the model itself."""
    if fsdp:
        from adapprox_cli.distributed import shard_for_training

        # FSDP2 shards the module itself: the returned module is the same sharded object.
        shard_for_training(model, optimizer)
        return model
    if processes.enabled:
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = device.startswith("cuda")
        return DistributedDataParallel(model, device_ids=[torch.device(device).index] if on_cuda else None)
    return model


def gathered_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (one-process) model and optimizer state dicts of an FSDP2 run; every rank takes part."""
    from adapprox_cli.distributed import full_model_state_dict, full_optimizer_state_dict

    return full_model_state_dict(model), full_optimizer_state_dict(optimizer)


def mean_over_processes(value: torch.Tensor, processes: Processes) -> torch.Tensor:
    if not processes.enabled:
        return value
    import torch.distributed as dist

    tensor = value.detach().to(torch.float64).reshape(1)
    tensor = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(tensor)
    return tensor.cpu()[0] / processes.world_size


def reduce_step(loss: torch.Tensor, stop: bool, processes: Processes) -> tuple[float, bool]:
    """One collective per step: the mean loss over processes, and whether any was told to stop."""
    if not processes.enabled:
        return float(loss), stop
    import torch.distributed as dist

    tensor = torch.tensor([float(loss), 1.0 if stop else 0.0], dtype=torch.float64)
    tensor = tensor.cuda() if dist.get_backend() == "nccl" else tensor
    dist.all_reduce(tensor)
    tensor = tensor.cpu()
    return float(tensor[0]) / processes.world_size, bool(tensor[1] > 0)


def gather_over_processes(state: torch.Tensor, processes: Processes) -> list[torch.Tensor]:
    """Every process's copy of a generator state (a uint8 tensor), in rank order."""
    if not processes.enabled:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * processes.world_size
    dist.all_gather_object(states, state)
    return states
