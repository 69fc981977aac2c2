"""Process-group helpers. Without a process group every function is the identity for one process.

Convention for losses: every process computes the loss of the *global* batch (the same value everywhere),
and the collectives' backward passes sum gradients over processes. DistributedDataParallel then averages
parameter gradients over processes, which gives exactly the gradient of the global-batch loss. (A raw
``dist.all_reduce`` in a loss is invisible to autograd and gives 1/world_size of it; see paper.md.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes; autograd-aware (the backward sums the gradients over processes too)."""
    if not is_distributed():
        return x
    return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``x`` along dim 0, in rank order; autograd-aware."""
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)
