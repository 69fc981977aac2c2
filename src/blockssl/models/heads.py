"""Per-block pooling heads and projector MLPs (Siddiqui et al. 2024, "CbE + GSP" and the Barlow Twins projector)."""

from __future__ import annotations

import itertools
from typing import cast

import torch
from torch import nn

from blockssl.models.backbone import Layout
from blockssl.models.lean_head import lean_cbe


class Head(nn.Module):
    """Turns a block's feature map into the vector its loss and its linear probe read.

    ``gap``: global average pooling. ``cbe`` ("conv-based expansion"): a ``kernel x kernel`` convolution to
    ``dim`` channels, BatchNorm, ReLU, then global average pooling; the paper's best design uses 1x1 and 2048.
    ``cbe_pooled``: the block's output average-pooled to ``grid x grid`` first, then ``cbe``: the expansion runs at
    grid² locations instead of H x W (4 instead of 3,136 at ResNet-50's block 1 with grid 2, whose CbE is 3.3 of the
    blockwise model's 15.8 forward GFLOPs per image and view; ``blockssl cost``). Its parameters and state dict are
    ``cbe``'s.
    ``lean_chunk_bytes > 0`` computes ``cbe`` chunk by chunk without storing its full-resolution maps
    (``blockssl.models.lean_head``): the same function, parameters and state dict. It applies to ``cbe`` only:
    ``cbe_pooled`` stores grid² locations per image, too little for recomputation to pay.

    On tokens (``layout="NLC"``, a transformer block's output) the head reads the tokens ``token_pool`` names:
    ``cls``, the class token (the first of ``prefix_tokens``), or ``mean``, the patch tokens (those after the
    prefix); ``gap`` is their mean, ``cbe`` the same expansion per token (a linear map, BatchNorm over every token of
    the batch, ReLU) before it: on the class token alone, an MLP layer.
    """

    def __init__(self, in_channels: int, kind: str = "cbe", dim: int = 2048, kernel: int = 1,
                 lean_chunk_bytes: int = 0, grid: int = 2, layout: Layout = "NCHW", token_pool: str = "auto",
                 prefix_tokens: int = 0) -> None:
        super().__init__()
        if layout == "NLC" and kind == "cbe_pooled":
            raise ValueError("model.head=cbe_pooled pools a feature map to a grid; for token outputs use cbe or gap")
        if token_pool not in ("auto", "cls", "mean") or (layout == "NCHW" and token_pool != "auto"):
            raise ValueError(f"model.token_pool={token_pool}: choose auto, cls or mean, for token outputs only (leave "
                             "it auto for a feature map)")
        if token_pool == "cls" and not prefix_tokens:
            raise ValueError("model.token_pool=cls reads a class token, and this backbone has none; use "
                             "model.token_pool=mean")
        self.layout = layout
        # the token positions read: the class token, or every token after the prefix
        cls = token_pool == "cls" or (token_pool == "auto" and prefix_tokens > 0)
        self.tokens = slice(0, 1) if cls else slice(prefix_tokens, None)
        self.lean_chunk_bytes = lean_chunk_bytes if kind == "cbe" and layout == "NCHW" else 0
        self.pool: nn.Module = nn.AdaptiveAvgPool2d(grid) if kind == "cbe_pooled" else nn.Identity()
        if kind == "gap":
            self.expand: nn.Module = nn.Identity()
            self.out_dim = in_channels
        elif kind in ("cbe", "cbe_pooled"):
            self.expand = nn.Sequential(
                nn.Conv2d(in_channels, dim, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(dim),
                nn.ReLU(inplace=True),
            ) if layout == "NCHW" else nn.Sequential(nn.Linear(in_channels, dim, bias=False), TokenBatchNorm(dim),
                                                     nn.ReLU(inplace=True))
            self.out_dim = dim
        else:
            raise ValueError(f"unknown head {kind!r}; choose gap, cbe or cbe_pooled")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean_chunk_bytes:
            expand = cast(nn.Sequential, self.expand)
            conv, bn = cast(nn.Conv2d, expand[0]), cast(nn.BatchNorm2d, expand[1])
            return lean_cbe(x, conv, bn, self.lean_chunk_bytes)
        if self.layout == "NLC":
            return self.expand(x[:, self.tokens]).mean(dim=1)
        return self.expand(self.pool(x)).mean(dim=(2, 3))

    @property
    def plain(self) -> bool:
        """The head is plain pooling: its output is ``pooled``'s."""
        return isinstance(self.expand, nn.Identity) and isinstance(self.pool, nn.Identity) and not self.lean_chunk_bytes

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Plain pooling of the block output, without the expansion: the mean over locations of a feature map,
        the mean of the tokens the head reads (``pool`` readout; the head of a block no loss trains)."""
        return x.mean(dim=(2, 3)) if self.layout == "NCHW" else x[:, self.tokens].mean(dim=1)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over every token of the batch, per channel, for (N, L, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, 1)).view_as(x)


def projector(in_dim: int, dims: list[int]) -> nn.Module:
    """MLP ``in_dim -> dims[0] -> ... -> dims[-1]``: Linear (no bias), BN, ReLU between layers, a plain last Linear.

    ``[8192, 8192, 8192]`` is the Barlow Twins projector the paper uses at every block; ``[]`` is the identity.
    """
    layers: list[nn.Module] = []
    widths = [in_dim, *dims]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers) if layers else nn.Identity()
