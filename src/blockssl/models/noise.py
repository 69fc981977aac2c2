"""Noise injection at block outputs (Siddiqui et al. 2024): ``x + sigma * s(x) * N(0, 1)``, train mode only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NOISE_TYPES = ("none", "global", "channel", "spatial")
# The dimensions each kind's std is taken over, per layout: feature maps (N, C, H, W) and tokens (N, L, C), where
# "channel" is per sample and channel over the tokens and "spatial" per sample and token over the channels.
_DIMS: dict[str, dict[str, tuple[int, ...]]] = {
    "NCHW": {"global": (0, 1, 2, 3), "channel": (2, 3), "spatial": (1,)},
    "NLC": {"global": (0, 1, 2), "channel": (1,), "spatial": (2,)},
}


def noise_scale(x: torch.Tensor, kind: str, layout: str = "NCHW") -> torch.Tensor:
    """The standard deviation ``s(x)`` the noise is scaled by, broadcastable to ``x`` (N, C, H, W), or (N, L, C)
    tokens with ``layout="NLC"`` (channel: per channel over the tokens; spatial: per token over the channels).

    global: one std over the whole tensor (the paper's best, +0.33 points at sigma 0.25; the reference's ``all``);
    channel: per sample and channel over (H, W) (the reference's ``hw``);
    spatial: per sample and location over the channels: what the reference's ``c`` variant intends (its comment
    gives the shape B x 1 x H x W) but does not compute: it takes the std over H only (``dim=2``), a bug we do
    not copy.
    The unbiased std, as ``torch.std`` in the reference code; over a single element (channel noise on a 1x1 map)
    it would be NaN, so the population std (0) is used there.
    """
    dims = noise_dims(kind, layout)
    return x.std(dim=dims, keepdim=True, correction=_correction(x, dims))


def noise_dims(kind: str, layout: str = "NCHW") -> tuple[int, ...]:
    """The dimensions ``kind``'s std is taken over, for feature maps (NCHW) or tokens (NLC)."""
    if kind not in _DIMS[layout]:
        raise ValueError(f"unknown noise type {kind!r}; choose one of {', '.join(NOISE_TYPES)}")
    return _DIMS[layout][kind]


def _correction(x: torch.Tensor, dims: tuple[int, ...]) -> int:
    return 1 if math.prod(x.shape[d] for d in dims) > 1 else 0


def noise_generator(seed: int, replica: int, block: int, step: int, device: torch.device) -> torch.Generator:
    """The generator block ``block`` draws its noise from at ``step`` in data-parallel replica ``replica``.

    Keyed by these four numbers alone, so a run's noise does not depend on which process or device runs the block
    (one process, or a pipeline stage per block) nor on what else drew random numbers before it.
    """
    state = np.random.SeedSequence([seed % 2**64, replica, block, step]).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def default_generator(device: torch.device) -> torch.Generator:
    """Torch's global generator of ``device`` (a CUDA device without an index: the current one)."""
    if device.type == "cpu":
        return torch.default_generator
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


@dataclass(frozen=True)
class Noise:
    """Noise injection at block outputs as configured: ``kind`` (``noise.type``), sigma (``noise.std``) and whether
    the gradient flows through s(x) (``noise.scale_grad``)."""

    kind: str = "none"
    std: float = 0.0
    scale_grad: bool = True

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.std != 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, layout: str = "NCHW"
                 ) -> torch.Tensor:
        return inject_noise(x, self.kind, self.std, self.scale_grad, generator, layout)


def inject_noise(x: torch.Tensor, kind: str, sigma: float, scale_grad: bool = True,
                 generator: torch.Generator | None = None, layout: str = "NCHW") -> torch.Tensor:
    """Additive Gaussian noise relative to the activation's own scale, drawn from ``generator`` (default: the
    global one).

    ``scale_grad``: differentiate through ``s(x)`` as the reference code does (autograd sees its ``torch.std``);
    off, the noise is a constant offset and the gradient is the identity. The noise is not kept for backward:
    it is drawn again there from the generator's state (``_RedrawnNoise``), which saves a tensor the size of the
    block's output (205 MB at ResNet-50's block 1, batch 32, both views) for the same gradient.
    """
    if kind == "none" or sigma == 0:
        return x
    if generator is None:
        generator = default_generator(x.device)
    out: torch.Tensor = _RedrawnNoise.apply(x, noise_dims(kind, layout), sigma, scale_grad and torch.is_grad_enabled(),
                                            generator)
    return out


class _RedrawnNoise(torch.autograd.Function):
    """``x + sigma * s(x) * noise``, its backward the same operations' (the add's, the multiply's reduction to the
    scale's shape, the std's) with the noise drawn again from the generator state it was first drawn from."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dims: tuple[int, ...], sigma: float, scale_grad: bool,
                generator: torch.Generator) -> torch.Tensor:
        ctx.dims, ctx.sigma, ctx.scale_grad, ctx.state = dims, sigma, scale_grad, generator.get_state()
        ctx.generator_device = generator.device  # x's, except on meta (blockssl.cost): it has no generator of its own
        scale = x.std(dim=dims, keepdim=True, correction=_correction(x, dims))
        ctx.save_for_backward(x if scale_grad else None, scale)
        return x + sigma * scale * _draw(x.shape, x.dtype, x.device, generator)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.scale_grad:
            return grad, None, None, None, None
        x, scale = ctx.saved_tensors
        replay = torch.Generator(ctx.generator_device)
        replay.set_state(ctx.state)
        noise = _draw(x.shape, x.dtype, x.device, replay)
        grad_scale = (grad * noise).sum_to_size(scale.shape) * ctx.sigma
        # torch's std backward (FunctionsManual.cpp: std_backward, var_backward), operation for operation
        dims = ctx.dims
        count = math.prod(x.shape[d] for d in dims)
        grad_var = (grad_scale / (scale * 2)).masked_fill_(scale == 0, 0)
        through_scale = (2.0 / (count - _correction(x, dims))) * grad_var * (x - x.mean(dims, keepdim=True))
        return grad + through_scale, None, None, None, None


def _draw(shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    # Drawn in the logical (N, C, H, W) order whatever x's memory layout: channels_last gives the same noise.
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)
