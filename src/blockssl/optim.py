"""LARS, parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator

import torch
from torch import nn

from blockssl.config import TrainConfig

# A batched update holds a temporary the size of its bucket: at most 64 MB of float32 here. Unbounded, the paper's
# 600 M projector parameters made the CPU step 1.2x slower than one parameter at a time (page faults); the small
# tensors, where launches dominate, still go in few buckets.
BUCKET_ELEMENTS = 2**24


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in Barlow Twins.

    A group with ``lars_exclude=True`` (biases and norm parameters) gets neither weight decay nor adaptation.
    ``momentum_dtype`` (e.g. ``torch.bfloat16``) stores the momentum buffers in a lower precision, halving the
    optimizer state, the largest per-block state of the paper's 8192-wide projectors; the update is computed in the
    weights' precision and rounded when stored.

    ``foreach`` updates the parameters of a group, device and dtype together with multi-tensor kernels, in buckets of
    up to ``BUCKET_ELEMENTS`` (a few launches instead of about ten per parameter); ``False`` updates one parameter at
    a time, with the same arithmetic and results (``benchmarks/optimizer_step.py`` measures both).
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, momentum_dtype: torch.dtype | None = None, foreach: bool = True) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)
        self.momentum_dtype = momentum_dtype
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            for bucket in _buckets(stepped, BUCKET_ELEMENTS if self.foreach else 0):
                self._update(group, bucket)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """Parameters of one group, device and dtype, updated with multi-tensor (``torch._foreach_*``) kernels."""
        grads = [p.grad for p in params if p.grad is not None]  # all of them: the step skips the others
        updates: list[torch.Tensor] | tuple[torch.Tensor, ...] = grads
        if not group["lars_exclude"]:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            param_norm = torch.stack(torch._foreach_norm(params))
            update_norm = torch.stack(torch._foreach_norm(updates))
            # the trust ratio eta * |w| / |update|, and 1 where either norm is zero (a zero-initialised weight)
            trust = torch.where((param_norm > 0) & (update_norm > 0), group["eta"] * param_norm / update_norm,
                                torch.ones_like(param_norm))
            torch._foreach_mul_(updates, list(trust.unbind()))
        mus = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype)
            mus.append(state["mu"])
        if mus[0].dtype == params[0].dtype:
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        else:  # a low-precision momentum: the update in the weights' precision, rounded when stored
            full = [mu.to(p.dtype) for mu, p in zip(mus, params, strict=True)]
            torch._foreach_mul_(full, group["momentum"])
            torch._foreach_add_(full, updates)
            torch._foreach_add_(params, full, alpha=-group["lr"])
            torch._foreach_copy_(mus, full)


def _buckets(params: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """``params`` by device and dtype, in consecutive buckets of at most ``limit`` elements (a larger parameter
    alone; ``limit=0``: one parameter per bucket)."""
    kinds: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        kinds.setdefault((p.device, p.dtype), []).append(p)
    for same in kinds.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for p in same:
            if bucket and size + p.numel() > limit:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        yield bucket


def param_groups(params: Iterable[nn.Parameter], cfg: TrainConfig, no_decay: Collection[nn.Parameter] = ()
                 ) -> list[dict]:
    """Two groups: weights, and biases + norm parameters (1-d) + ``no_decay`` (a ViT's position embedding and
    class token, timm's ``no_weight_decay`` as DINO and MAE use it), the latter without weight decay or LARS scaling.

    Each group carries ``base_lr`` (the peak for a global batch of ``batch_size``) for ``set_lr``.
    """
    params = [p for p in params if p.requires_grad]
    excluded = {id(p) for p in no_decay}
    weights = [p for p in params if p.ndim > 1 and id(p) not in excluded]
    others = [p for p in params if p.ndim <= 1 or id(p) in excluded]
    scale = cfg.batch_size / 256  # linear scaling rule (Goyal et al. 2017)
    bias_lr = cfg.bias_lr or cfg.lr
    return [
        {"params": weights, "base_lr": cfg.lr * scale, "weight_decay": cfg.weight_decay},
        {"params": others, "base_lr": bias_lr * scale, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, no_decay: Collection[nn.Parameter] = ()
                    ) -> torch.optim.Optimizer:
    groups = param_groups(params, cfg, no_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta,
                    momentum_dtype=getattr(torch, cfg.momentum_dtype))
    for g in groups:
        g.pop("lars_exclude", None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose lars, sgd or adamw")


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Fraction of the peak learning rate at ``step``: linear warm-up, then cosine down to ``min_ratio``.

    The paper's recipe: 10 warm-up epochs, cosine to 0.001 x peak.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr * factor``; returns the weights' lr for logging."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
