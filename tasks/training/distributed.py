"""torchrun/DDP process setup: NCCL on CUDA, gloo on CPU; a single process needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    local_world: int = 1  # processes of the job on this node (all of them on one node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device_preference: str) -> Processes:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device_preference == "cuda" or (device_preference == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Processes(rank, world, local_rank, device, local_world)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(module: torch.nn.Module, processes: Processes) -> None:
    """Mean of gradients over processes, for modules not wrapped in DDP (e.g. a discriminator)."""
    if not processes.distributed:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= processes.world


def mean_over_processes(values: dict[str, float], processes: Processes) -> dict[str, float]:
    if not processes.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=processes.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(v) / processes.world for k, v in zip(keys, tensor.tolist())}


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()
