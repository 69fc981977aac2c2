"""The CbE head (conv, BatchNorm, ReLU, global average pooling) without storing its full-resolution maps.

The plain head keeps the convolution's and the BatchNorm's outputs for backward: at ResNet-50's block 1 that is two
2048 x 56 x 56 maps, about 51 MB per image and view, more than the block itself saves (Siddiqui et al. 2024 note
that these maps dominate activation memory). Only the pooled output leaves the head, so its backward needs little:

- ``d out / d pre`` is ``g[n, d] / (H W)`` where the ReLU passed ``pre`` and 0 elsewhere, so BatchNorm's two
  reductions, ``sum(d pre)`` and ``sum(d pre * yhat)``, are sums over images of ``g`` times two per-image,
  per-channel statistics of the forward: how many locations the ReLU passed, and the sum of ``yhat`` there;
- the input gradient needs the ReLU mask and ``yhat`` per location, recomputed from the input one chunk of images
  at a time.

The forward computes the batch statistics first (for a 1x1 convolution from the input's mean and covariance, as the
convolution is linear; for larger kernels by a chunked pass), then normalises chunk by chunk. The cost is one more
convolution over the input (two for kernels above 1x1) and an input covariance; the memory is one chunk's maps
(``chunk_bytes``) plus two ``N x dim`` statistics. Outputs, gradients and BatchNorm running statistics are those of
``conv -> BatchNorm2d -> ReLU -> mean`` (tests/models/test_lean_head.py, float64), synchronised BatchNorm included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from blockssl import dist


@torch.compiler.disable  # dynamo cannot trace the Function's module argument; the rest of the head still compiles
def lean_cbe(x: torch.Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, chunk_bytes: int
             ) -> torch.Tensor:
    """``relu(bn(conv(x))).mean((2, 3))`` computed chunk by chunk, holding at most ``chunk_bytes`` of full-resolution
    maps; updates ``bn``'s running statistics exactly as ``bn`` would."""
    if conv.bias is not None or conv.groups != 1 or not bn.affine:
        raise ValueError("lean_cbe expects an ungrouped convolution without bias and an affine BatchNorm")
    h = (x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1  # type: ignore[operator]
    w = (x.shape[3] + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1  # type: ignore[operator]
    chunk = max(1, chunk_bytes // (conv.out_channels * h * w * 4))
    batch_stats = bn.training or not bn.track_running_stats
    sync = dist.is_distributed() and isinstance(bn, nn.SyncBatchNorm | dist.SyncBatchNorm)
    spec = _Spec(conv, bn, chunk, batch_stats, sync, x.device.type)
    out: torch.Tensor = _LeanCbE.apply(x, conv.weight, bn.weight, bn.bias, spec)
    return out


class _Spec:
    """What the function needs besides tensors (autograd.Function takes them as one argument)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, chunk: int, batch_stats: bool,
                 sync: bool, device: str) -> None:
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
        self.bn, self.chunk, self.batch_stats, self.sync = bn, chunk, batch_stats, sync
        # Under autocast the convolutions run in its dtype, as the plain head's would (backward runs outside autocast,
        # so the dtype is kept here); statistics stay in float32 (float64 for float64 inputs). Devices without
        # autocast (meta, where blockssl.cost counts) run in the input's dtype.
        enabled = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        self.autocast = torch.get_autocast_dtype(device) if enabled else None


def _conv(x: torch.Tensor, weight: torch.Tensor, spec: _Spec) -> torch.Tensor:
    dtype = spec.autocast or x.dtype
    return F.conv2d(x.to(dtype), weight.to(dtype), None, spec.stride, spec.padding, spec.dilation)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _moments(x: torch.Tensor, weight: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and biased variance per output channel of ``conv(x)`` over images and locations (this process's
    share of the batch)."""
    dtype = _stat_dtype(x)
    if spec.pointwise:  # a 1x1 convolution is linear per location: mean W m, variance w_d^T Cov(x) w_d
        cols = x.to(dtype).transpose(0, 1).reshape(x.shape[1], -1)
        mean_x = cols.mean(1)
        centred = cols - mean_x[:, None]
        cov = centred @ centred.T / cols.shape[1]
        w = weight.to(dtype).flatten(1)
        return x.new_tensor(float(cols.shape[1]), dtype=dtype), w @ mean_x, ((w @ cov) * w).sum(1)
    count = 0.0
    mean = m2 = x.new_zeros((), dtype=dtype)
    for part in _chunks(x.shape[0], spec.chunk):  # Chan et al.'s pairwise merge of per-chunk moments
        y = _conv(x[part], weight, spec).to(dtype)
        var_c, mean_c = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        n_c = float(y.numel() // y.shape[1])
        delta = mean_c - mean
        total = count + n_c
        mean = mean + delta * (n_c / total)
        m2 = m2 + var_c * n_c + delta.pow(2) * (count * n_c / total)
        count = total
    return x.new_tensor(count, dtype=dtype), mean, m2 / count


def _global_moments(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every data-parallel process's moments (synchronised BatchNorm)."""
    total = dist.all_reduce_sum(count)
    global_mean = dist.all_reduce_sum(mean * count) / total
    spread = dist.all_reduce_sum((var + (mean - global_mean).pow(2)) * count)
    return total, global_mean, spread / total


class _LeanCbE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                spec: _Spec) -> torch.Tensor:
        bn, dtype = spec.bn, _stat_dtype(x)
        with torch.no_grad():
            if spec.batch_stats:
                count, mean, var = _moments(x, weight, spec)
                if spec.sync:
                    count, mean, var = _global_moments(count, mean, var)
                _update_running_stats(bn, count, mean, var)
            else:
                assert bn.running_mean is not None and bn.running_var is not None
                count, mean, var = x.new_tensor(1.0, dtype=dtype), bn.running_mean.to(dtype), bn.running_var.to(dtype)
            invstd = torch.rsqrt(var + bn.eps)
            scale, shift = (gamma.to(dtype) * invstd)[:, None, None], beta.to(dtype)[:, None, None]
            out, passed, yhat_sum = [], [], []
            for part in _chunks(x.shape[0], spec.chunk):
                centred, pre = _centred_and_relu_input(x[part], weight, mean, scale, shift, spec)
                mask = pre > 0
                out.append(pre.clamp_min_(0).mean((2, 3)))
                passed.append(mask.sum((2, 3), dtype=dtype))
                yhat_sum.append(centred.mul_(mask).sum((2, 3)) * invstd)
                ctx.locations = pre.shape[2] * pre.shape[3]
        ctx.spec = spec
        ctx.save_for_backward(x, weight, gamma, beta, count, mean, invstd, torch.cat(passed), torch.cat(yhat_sum))
        return torch.cat(out).to(spec.autocast or x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: _Spec = ctx.spec
        x, weight, gamma, beta, count, mean, invstd, passed, yhat_sum = ctx.saved_tensors
        g = grad.to(mean.dtype) / ctx.locations  # d out / d pre at the locations the ReLU passed
        dbeta, dgamma = (g * passed).sum(0), (g * yhat_sum).sum(0)  # sums of d pre and d pre * yhat
        centre = slope = torch.zeros_like(dbeta)
        if spec.batch_stats:  # the gradient through the batch mean and variance
            sums = torch.stack([dbeta, dgamma])
            if spec.sync:
                sums = dist.all_reduce_sum(sums)
            centre, slope = sums[0] / count, sums[1] / count
        # dy = a * (g [ReLU passed] - centre - yhat * slope), a = gamma * invstd, yhat = invstd * (y - mean):
        # per chunk one fused pass for the terms linear in y, one for the masked term
        a = gamma.to(mean.dtype) * invstd
        coef, const = (-a * slope * invstd)[:, None, None], (-a * centre)[:, None, None]
        scale, shift = a[:, None, None], beta.to(mean.dtype)[:, None, None]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dweight = torch.zeros_like(weight, dtype=mean.dtype) if ctx.needs_input_grad[1] else None
        with torch.no_grad():
            for part in _chunks(x.shape[0], spec.chunk):
                xp = x[part].to(spec.autocast or x.dtype)
                centred, pre = _centred_and_relu_input(xp, weight, mean, scale, shift, spec)
                passed_here = pre.gt_(0)  # 1 where the ReLU passed, in place
                dy = torch.addcmul(const, centred, coef).addcmul_(passed_here, (a * g[part])[:, :, None, None])
                dy = dy.to(xp.dtype)
                if dx is not None:
                    dx[part] = conv2d_input(xp.shape, weight.to(dy.dtype), dy, spec.stride, spec.padding,
                                            spec.dilation)
                if dweight is not None:
                    dweight += conv2d_weight(xp, weight.shape, dy, spec.stride, spec.padding, spec.dilation)
        return (dx, None if dweight is None else dweight.to(weight.dtype),
                dgamma.to(gamma.dtype) if ctx.needs_input_grad[2] else None,
                dbeta.to(beta.dtype) if ctx.needs_input_grad[3] else None, None)


def _centred_and_relu_input(x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``y - mean`` of a chunk's convolution and the ReLU's input ``scale * (y - mean) + shift``, computed the same
    way in forward and backward, so the recomputed ReLU mask is the forward's."""
    centred = _conv(x, weight, spec).to(mean.dtype).sub_(mean[:, None, None])
    return centred, torch.addcmul(shift, centred, scale)


def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, count: torch.Tensor, mean: torch.Tensor,
                          var: torch.Tensor) -> None:
    """What BatchNorm does in training: an exponential (or, with ``momentum=None``, cumulative) average of the
    batch mean and the unbiased batch variance."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * count / (count - 1)
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
