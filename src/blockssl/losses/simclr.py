"""SimCLR's NT-Xent loss (Chen et al. 2020) with negatives from every process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockssl.dist import all_gather_cat, all_reduce_sum, data_rank, data_world_size
from blockssl.losses.common import at_least_fp32


class SimCLRLoss(nn.Module):
    """Cross-entropy of each view against its partner among all 2N - 1 other views of the global batch.

    ``temperature`` 0.1 (the paper explores 0.1 to 0.2). Each process scores its own anchors against the
    gathered embeddings; the mean over anchors is then summed over processes, so the value is the global one.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = F.normalize(at_least_fp32(z1), dim=1), F.normalize(at_least_fp32(z2), dim=1)
        n_local = z1.shape[0]
        n = n_local * data_world_size()
        anchors = torch.cat([z1, z2])  # local anchors: view 1 then view 2
        keys = torch.cat([all_gather_cat(z1), all_gather_cat(z2)])  # global: all view 1, then all view 2
        logits = anchors @ keys.T / self.temperature
        idx = torch.arange(n_local, device=z1.device) + data_rank() * n_local
        own = torch.cat([idx, idx + n])  # where each anchor sits among the keys
        partner = torch.cat([idx + n, idx])
        logits[torch.arange(2 * n_local, device=z1.device), own] = float("-inf")  # no self-similarity
        local = F.cross_entropy(logits, partner, reduction="sum")
        return all_reduce_sum(local) / (2 * n)
