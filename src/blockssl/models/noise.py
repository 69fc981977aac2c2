"""Noise injection at block outputs (Siddiqui et al. 2024): ``x + sigma * s(x) * N(0, 1)``, train mode only."""

from __future__ import annotations

import torch

NOISE_TYPES = ("none", "global", "channel", "spatial")


def noise_scale(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The standard deviation ``s(x)`` the noise is scaled by, broadcastable to ``x`` (N, C, H, W).

    global: one std over the whole tensor (the paper's best, +0.33 points at sigma 0.25);
    channel: per sample and channel over (H, W) (the reference code takes it over H only, a bug we do not copy);
    spatial: per sample and location over the channels.
    """
    # Population std (correction=0): defined for a 1x1 map or a single channel too.
    if kind == "global":
        return x.std(correction=0)
    if kind == "channel":
        return x.flatten(2).std(dim=2, correction=0)[:, :, None, None]
    if kind == "spatial":
        return x.std(dim=1, keepdim=True, correction=0)
    raise ValueError(f"unknown noise type {kind!r}; choose one of {', '.join(NOISE_TYPES)}")


def inject_noise(x: torch.Tensor, kind: str, sigma: float) -> torch.Tensor:
    """Additive Gaussian noise relative to the activation's own scale; the scale is not differentiated through."""
    if kind == "none" or sigma == 0:
        return x
    with torch.no_grad():
        scale = noise_scale(x, kind)
    # Drawn in the logical (N, C, H, W) order whatever x's memory layout: channels_last gives the same noise.
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    return x + sigma * scale * noise
