"""Small pieces the losses share."""

from __future__ import annotations

import torch


def at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings (under AMP) are promoted: batch statistics and correlations need fp32."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
