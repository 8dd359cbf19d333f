"""torch.distributed for the recursive stage's training loops, started the way torchrun starts
processes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT in the environment).

One process without those variables is the plain single-device run. Rank 0 alone writes
checkpoints and records; every rank trains the same replica on its slice of each batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    """The requested parallel setting cannot run here."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group the environment describes (gloo on CPU, nccl on CUDA) and return
    this process's device (cuda:LOCAL_RANK on GPUs); one process: just the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda:"):
        return torch.device(device)
    if world <= 1:
        return torch.device("cuda" if cuda else "cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return chosen


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on one of them (a SIGTERM seen by one rank)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number (a loss) over the ranks; the number itself in one process."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
