"""Training diagnostics per block, logged at logging steps: how far its weights moved from initialisation and the
effective rank of its features (RankMe, the collapse monitor of Garrido et al. 2023).

A block's loss can fall while its convolutions barely move (a recipe was found whose convolutions ended within 3-5%
of their random initialisation) or while its features collapse onto a few directions: the loss shows neither.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from blockssl.execution import StepTerms
from blockssl.method import BlockwiseSSL


def rankme(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe of an (N, D) embedding matrix: exp of the entropy of its normalised singular values,
    ``p_k = s_k / sum(s) + eps`` (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
    self-supervised representations by their rank", eqs. 1-2, eps = 1e-7).

    A smooth count of the directions the embeddings use: between 1 (one direction, or none: an all-zero matrix)
    and min(N, D), so a batch of N images cannot show a rank above N. The paper estimates it on 25,600 images;
    one batch gives a lower, noisier estimate, comparable across the steps of a run at a fixed batch size.

    Computed in at least float32 whatever ``z``'s dtype; returns a 0-d tensor on ``z``'s device, NaN when ``z``
    holds a non-finite value (the SVD would raise). On CUDA the SVD synchronises with the host (cuSOLVER's
    convergence check), hence its use at logging steps only.
    """
    z = z.detach().to(torch.promote_types(z.dtype, torch.float32))
    finite = torch.isfinite(z).all()  # decided on the device: no host synchronisation
    s = torch.linalg.svdvals(torch.where(finite, z, 0))
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    rank = torch.exp(-(p * p.log()).sum())
    return torch.where(finite, rank, torch.nan)


def relative_change(current: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    """``||W - W0||_F / ||W0||_F`` with W the tensors of ``current`` taken together (as one flattened vector) and
    W0 those of ``initial``: 0 at initialisation, 0.04 for weights within 4% (in norm) of it. A 0-d tensor."""
    norm = torch.linalg.vector_norm
    moved = torch.stack([norm(w.detach() - w0) for w, w0 in zip(current, initial, strict=True)])
    return norm(moved) / norm(torch.stack([norm(w0) for w0 in initial]))


def block_weights(model: BlockwiseSSL, k: int) -> list[torch.Tensor]:
    """Block k's backbone weights whose change is measured: those with more than one dimension (convolutions).

    BatchNorm weights and biases are left out: they start at constants, 1 and 0 (weights at 0 too in the last
    BatchNorm of each residual branch under ``model.zero_init_residual``), not at a random draw, and a change
    relative to 0 has no size."""
    return [p for p in model.blocks[k].parameters() if p.ndim > 1]


def snapshot(model: BlockwiseSSL, blocks: Iterable[int]) -> dict[int, list[torch.Tensor]]:
    """Copies of the measured weights of ``blocks`` (``block_weights``), on their device: taken at initialisation,
    they are what ``weight_change`` is measured from (a resumed run takes them from the same seed, before loading
    its checkpoint)."""
    return {k: [w.detach().clone() for w in block_weights(model, k)] for k in blocks}


def add_diagnostics(terms: StepTerms, model: BlockwiseSSL, initial: dict[int, list[torch.Tensor]],
                    blocks: list[int], features: list[torch.Tensor]) -> None:
    """Write into ``terms`` the weight change of every block of ``initial`` and the RankMe of ``features``, the
    view-1 head features of ``blocks`` (the blocks run, in order): 0-d tensors on the device, read at logging."""
    for k, weights in initial.items():
        terms.block(k).weight_change = relative_change(block_weights(model, k), weights)
    for k, feature in zip(blocks, features, strict=True):
        terms.block(k).rankme = rankme(feature)
