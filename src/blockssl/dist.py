"""Process-group helpers. Without a process group every function is the identity for one process.

Convention for losses: every process computes the loss of the *global* batch (the same value everywhere),
and the collectives' backward passes sum gradients over processes. DistributedDataParallel then averages
parameter gradients over processes, which gives exactly the gradient of the global-batch loss. (A raw
``dist.all_reduce`` in a loss is invisible to autograd and gives 1/world_size of it; see paper.md.)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


# The processes holding copies of this process's blocks, over which gradients are averaged and the losses'
# collectives (cross-correlation, negatives, batch statistics) and BatchNorm statistics run: every process, except
# in pipeline training, where each stage's replicas form a group (``set_data_parallel_group``).
_data_group: Any = None


def set_data_parallel_group(group: Any) -> None:
    global _data_group
    _data_group = group


def data_parallel_group() -> Any:
    return _data_group


def data_world_size() -> int:
    """How many processes share the global batch of this process's blocks."""
    return dist.get_world_size(_data_group) if is_distributed() else 1


def data_rank() -> int:
    """This process's index among them: which share of the global batch it holds."""
    return dist.get_rank(_data_group) if is_distributed() else 0


# torch 2.14 warns that torch.distributed.nn.functional is deprecated; its autograd behaviour is exactly what the
# two-process tests check (tests/test_dist.py), so it stays, without the warning in every training step.
_QUIET = {"action": "ignore", "category": FutureWarning, "message": ".*torch.distributed.nn.functional"}


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel processes; autograd-aware (the backward sums the gradients over them too)."""
    if not is_distributed():
        return x
    with warnings.catch_warnings():
        warnings.filterwarnings(**_QUIET)  # type: ignore[arg-type]
        return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM, group=_data_group or dist.group.WORLD)


def all_reduce_sum_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes as a plain ``torch.distributed.all_reduce`` on a tensor of the graph: the value is the sum,
    but autograd sees only the local term, so gradients averaged over processes come out 1/world_size of the true
    ones. Only for reproducing reference code that does this (Barlow Twins, the blockwise paper)."""
    if not is_distributed():
        return x
    total = x.detach().clone()
    dist.all_reduce(total, group=_data_group)
    return x + (total - x.detach())


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every data-parallel process's ``x`` along dim 0, in rank order; autograd-aware."""
    if not is_distributed():
        return x
    with warnings.catch_warnings():
        warnings.filterwarnings(**_QUIET)  # type: ignore[arg-type]
        return torch.cat(dist_fn.all_gather(x, group=_data_group or dist.group.WORLD), dim=0)


def init_from_environment(timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's or SLURM's variables; returns whether one was started.

    One process (no WORLD_SIZE, or WORLD_SIZE=1, and not a multi-task SLURM step) is the plain local case. A
    multi-process launch that is misconfigured raises: it never falls back silently to one process. ``timeout_s``
    bounds every collective and transfer (``train.dist_timeout_s``; None = torch's default).
    """
    if is_distributed():
        return False
    env = os.environ
    if "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        # srun without torchrun: map SLURM's variables; the job script exports MASTER_ADDR (see README).
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_PORT", "29500")
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun, or under "
                           "SLURM export MASTER_ADDR (e.g. the first host of $SLURM_JOB_NODELIST)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))
    return True


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the data-parallel processes in one flattened all-reduce (DDP's
    semantics).

    Blockwise training calls this once per block right after that block's backward, so each gradient crosses
    the network exactly once per step and nothing waits for the other blocks.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=_data_group)
    flat /= data_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_state(module: nn.Module) -> None:
    """Make every data-parallel process start from the first one's parameters and buffers."""
    if not is_distributed():
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, group=_data_group, group_src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order, on rank 0 (None elsewhere)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any device (torch's SyncBatchNorm needs a GPU).

    Statistics are summed across processes with autograd-aware all-reduces; on CUDA ``convert_sync_batchnorm``
    uses torch's fused implementation of the same maths instead.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-d or 4-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce_sum(x.new_tensor(float(x.numel() // x.shape[1])))
        mean = all_reduce_sum(x.sum(dims)) / count
        var = all_reduce_sum((x - mean.view(shape)).pow(2).sum(dims)) / count
        tracked = self.num_batches_tracked
        if self.running_mean is not None and self.running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * count / (count - 1), alpha=m)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def convert_sync_batchnorm(module: ModuleT, device: torch.device) -> ModuleT:
    """Replace every BatchNorm by a synchronised one (torch's on CUDA, ``SyncBatchNorm`` above elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=_data_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync  # type: ignore[return-value]  # a BatchNorm becomes its synchronised subclass
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def any_process(flag: bool | int) -> bool:
    """True if ``flag`` is set in any data-parallel process (so that they all stop at the same step)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=local_device())  # NCCL reduces device tensors only
    dist.all_reduce(t, group=_data_group)
    return bool(t.item() > 0)


def shard_indices(n: int) -> range:
    """This process's share of ``n`` items for evaluation: every world_size-th one, without padding."""
    return range(rank(), n, world_size())


def gather_in_order(local: torch.Tensor, indices: range, n: int) -> torch.Tensor:
    """Reassemble rows computed for ``shard_indices(n)`` in every process into one tensor in item order (on the CPU).

    One tensor all-gather (shares padded to the same length, on this process's device as NCCL requires), not
    pickled objects: the features of a large dataset stay one contiguous copy.
    """
    if not is_distributed():
        return local
    world = world_size()
    if len(local) != len(indices):
        raise ValueError(f"{len(local)} rows for a share of {len(indices)} items")
    per = math.ceil(n / world)
    padded = local.new_zeros((per, *local.shape[1:]), device=local_device())
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n, *local.shape[1:]), device="cpu")
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n, world))].cpu()
    return out
