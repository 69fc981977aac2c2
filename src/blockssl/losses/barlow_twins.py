"""Barlow Twins (Zbontar et al. 2021), as used at every block by Siddiqui et al. 2024."""

from __future__ import annotations

import torch
from torch import nn

from blockssl.dist import all_reduce_sum, all_reduce_sum_local_grad
from blockssl.losses.common import at_least_fp32, off_diagonal


def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each feature by the global batch's mean and (biased) variance: BatchNorm without affine."""
    n = all_reduce_sum(z.new_tensor(float(z.shape[0])))
    mean = all_reduce_sum(z.sum(0)) / n
    var = all_reduce_sum((z - mean).pow(2).sum(0)) / n
    return (z - mean) / torch.sqrt(var + eps)


class BarlowTwinsLoss(nn.Module):
    """``scale * (sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2)``, C the cross-correlation of the two views.

    Defaults: lambd = 0.0051, scale = 0.024 (the blockwise paper's train.sh, as Barlow Twins' original recipe, with
    one lr for every parameter; current Barlow Twins uses scale 1 and a bias lr of 0.0048 instead).

    ``reference_allreduce``: sum C over processes as the reference code does, with a plain all_reduce autograd does
    not see (the batch standardisation stays exact, as their SyncBatchNorm): the value is unchanged, but gradients
    averaged over W processes are 1/W of the global-batch loss's, as in the paper's runs (W = 16). Off: exact.
    """

    def __init__(self, lambd: float = 0.0051, scale: float = 0.024, reference_allreduce: bool = False) -> None:
        super().__init__()
        self.lambd, self.scale, self.reference_allreduce = lambd, scale, reference_allreduce

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = batch_standardize(at_least_fp32(z1)), batch_standardize(at_least_fp32(z2))
        n = all_reduce_sum(z1.new_tensor(float(z1.shape[0])))
        c = (all_reduce_sum_local_grad if self.reference_allreduce else all_reduce_sum)(z1.T @ z2) / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        return self.scale * (on_diag + self.lambd * off_diag)
