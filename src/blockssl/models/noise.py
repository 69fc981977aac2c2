"""Noise injection at block outputs (Siddiqui et al. 2024): ``x + sigma * s(x) * N(0, 1)``, train mode only."""

from __future__ import annotations

import math

import numpy as np
import torch

NOISE_TYPES = ("none", "global", "channel", "spatial")
_DIMS: dict[str, tuple[int, ...]] = {"global": (0, 1, 2, 3), "channel": (2, 3), "spatial": (1,)}


def noise_scale(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The standard deviation ``s(x)`` the noise is scaled by, broadcastable to ``x`` (N, C, H, W).

    global: one std over the whole tensor (the paper's best, +0.33 points at sigma 0.25; the reference's ``all``);
    channel: per sample and channel over (H, W) (the reference's ``hw``);
    spatial: per sample and location over the channels: what the reference's ``c`` variant intends (its comment
    gives the shape B x 1 x H x W) but does not compute: it takes the std over H only (``dim=2``), a bug we do
    not copy.
    The unbiased std, as ``torch.std`` in the reference code; over a single element (channel noise on a 1x1 map)
    it would be NaN, so the population std (0) is used there.
    """
    if kind not in _DIMS:
        raise ValueError(f"unknown noise type {kind!r}; choose one of {', '.join(NOISE_TYPES)}")
    dims = _DIMS[kind]
    correction = 1 if math.prod(x.shape[d] for d in dims) > 1 else 0
    return x.std(dim=dims, keepdim=True, correction=correction)


def noise_generator(seed: int, replica: int, block: int, step: int, device: torch.device) -> torch.Generator:
    """The generator block ``block`` draws its noise from at ``step`` in data-parallel replica ``replica``.

    Keyed by these four numbers alone, so a run's noise does not depend on which process or device runs the block
    (one process, or a pipeline stage per block) nor on what else drew random numbers before it.
    """
    state = np.random.SeedSequence([seed % 2**64, replica, block, step]).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


def inject_noise(x: torch.Tensor, kind: str, sigma: float, scale_grad: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise relative to the activation's own scale, drawn from ``generator`` (default: the
    global one).

    ``scale_grad``: differentiate through ``s(x)`` as the reference code does (autograd sees its ``torch.std``);
    off, the noise is a constant offset and the gradient is the identity.
    """
    if kind == "none" or sigma == 0:
        return x
    with torch.set_grad_enabled(scale_grad and torch.is_grad_enabled()):
        scale = noise_scale(x, kind)
    # Drawn in the logical (N, C, H, W) order whatever x's memory layout: channels_last gives the same noise.
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return x + sigma * scale * noise
