"""VICReg (Bardes et al. 2022): invariance, variance and covariance terms over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockssl.dist import all_gather_cat
from blockssl.losses.common import at_least_fp32, off_diagonal


def variance_term(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Hinge keeping every feature's standard deviation above 1."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1 - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances, divided by the dimension."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


class VICRegLoss(nn.Module):
    """``sim_coeff * MSE(z1, z2) + std_coeff * variance + cov_coeff * covariance``; defaults 25, 25, 1."""

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = all_gather_cat(at_least_fp32(z1)), all_gather_cat(at_least_fp32(z2))
        invariance = F.mse_loss(z1, z2)
        variance = (variance_term(z1) + variance_term(z2)) / 2
        covariance = covariance_term(z1) + covariance_term(z2)
        return self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
