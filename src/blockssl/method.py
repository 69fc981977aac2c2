"""BlockwiseSSL: a backbone cut into blocks, a head and a projector per block, one SSL loss per block.

The stop-gradient between blocks is the ``detach`` switch in ``forward``; end-to-end training is the same code
with it off and a loss at the last block only (Siddiqui et al. 2024, "Training schemes").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn

from blockssl.config import Config, detach_inputs, loss_blocks, parse_blocks, parse_projector
from blockssl.losses import BarlowTwinsLoss, SimCLRLoss, VICRegLoss
from blockssl.models.backbone import ResNet, group_stages
from blockssl.models.heads import Head, projector
from blockssl.models.noise import inject_noise

# Forward-dict keys of the per-block head features (``forward(..., features=True)``): not scalars, never logged.
FEATURE_PREFIX = "feat/block"

# Called as soon as block k's loss exists: memory-lean execution runs that block's backward and step there.
BlockLossHook = Callable[[int, torch.Tensor], None]


def build_loss(cfg: Config) -> nn.Module:
    c = cfg.loss
    losses: dict[str, Callable[[], nn.Module]] = {
        "barlow_twins": lambda: BarlowTwinsLoss(lambd=c.lambd, scale=c.scale,
                                                reference_allreduce=c.reference_allreduce),
        "simclr": lambda: SimCLRLoss(temperature=c.temperature),
        "vicreg": lambda: VICRegLoss(sim_coeff=c.sim_coeff, std_coeff=c.std_coeff, cov_coeff=c.cov_coeff),
    }
    if c.name not in losses:
        raise ValueError(f"unknown loss {c.name!r}; choose one of {', '.join(losses)}")
    return losses[c.name]()


class BlockwiseSSL(nn.Module):
    """Blocks, heads and projectors built by looping over the backbone's stage metadata.

    ``forward(x1, x2)`` returns ``{"loss": total, "loss/block{k}": ..., "std/block{k}": ...}`` for the blocks that
    carry a loss (numbered from 1). Blocks in ``frozen`` run in eval mode and without gradient.

    ``forward(x1, x2, features=True)`` adds ``"feat/block{k}"``: the detached head output of view 1 (what
    ``features`` returns, here from the training forward: train-mode BatchNorm, noise included) of every block
    the forward runs, for the online probe. A loss block's head output is already computed for its loss, so it
    costs nothing; a block without a loss (frozen blocks, earlier blocks in the sequential scheme) costs one head
    forward, in eval mode and without gradient, so that neither its BatchNorm statistics nor anything else of the
    model depends on whether features were asked for; for a block no loss trains (the end-to-end scheme's first
    blocks) that head is a global average pooling. Blocks after
    the last loss block are not run and have no features. ``pop_features`` takes them out of the dict.
    """

    def __init__(
        self,
        backbone: ResNet,
        blocks: list[list[str]],
        *,
        loss: nn.Module,
        loss_blocks: list[int],
        detach: bool = True,
        head: str = "cbe",
        head_dims: list[int] | None = None,
        head_kernel: int = 1,
        projectors: dict[int, list[int]] | None = None,
        noise: str = "none",
        noise_std: float = 0.0,
        noise_scale_grad: bool = True,
        frozen: set[int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.block_stages = blocks
        _, infos = group_stages(backbone, blocks)
        self.block_channels = [i.channels for i in infos]
        n = len(blocks)
        head_dims = head_dims or [2048] * n
        # Projectors only where a loss may sit: at ImageNet scale each 8192-wide one holds about 150 M weights.
        projectors = projectors if projectors is not None else {k: [8192, 8192, 8192] for k in loss_blocks}
        # A block no loss ever trains (end-to-end's blocks 1 to N-1) is read by plain global average pooling: a
        # CbE head there would stay a random projection, and its probe would measure that, not the block.
        heads = [Head(c, head if k in projectors else "gap", d, head_kernel)
                 for k, (c, d) in enumerate(zip(self.block_channels, head_dims, strict=True))]
        self.heads = nn.ModuleList(heads)
        self.feature_dims = [h.out_dim for h in heads]  # width of each block's features (what probes read)
        self.projectors = nn.ModuleDict({str(k): projector(heads[k].out_dim, p) for k, p in projectors.items()})
        self.loss = loss
        self.detach = detach
        self.noise, self.noise_std, self.noise_scale_grad = noise, noise_std, noise_scale_grad
        self.frozen: set[int] = set(frozen or ())
        self.loss_blocks = list(loss_blocks)

    @property
    def blocks(self) -> list[nn.Sequential]:
        """Views over the backbone's stages, built on access: parameters stay registered once, under torchvision's
        names, and module replacements (e.g. SyncBatchNorm) are seen."""
        return group_stages(self.backbone, self.block_stages)[0]

    @property
    def num_blocks(self) -> int:
        return len(self.block_stages)

    def block_parameters(self, k: int) -> Iterator[nn.Parameter]:
        """Parameters trained by block k's loss alone when inputs are detached: block, head, projector."""
        yield from self.blocks[k].parameters()
        yield from self.heads[k].parameters()
        if str(k) in self.projectors:
            yield from self.projectors[str(k)].parameters()

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: unfrozen blocks up to the last loss, and the loss blocks' heads and projectors.

        With detached inputs a block without a loss gets no gradient; the optimizer skips it.
        """
        params: list[nn.Parameter] = []
        blocks = self.blocks
        for k in range(max(self.loss_blocks) + 1):
            if k not in self.frozen:
                params += blocks[k].parameters()
        for k in self.loss_blocks:
            params += self.heads[k].parameters()
            params += self.projectors[str(k)].parameters()
        return params

    def train(self, mode: bool = True) -> BlockwiseSSL:
        super().train(mode)
        for k in self.frozen:  # frozen blocks keep their BatchNorm statistics
            self.blocks[k].eval()
        return self

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, on_block_loss: BlockLossHook | None = None,
                features: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = x1.new_zeros(())
        h1, h2 = x1, x2
        blocks = self.blocks
        for k in range(max(self.loss_blocks) + 1):  # later blocks carry no loss: skip their compute
            if self.detach:
                h1, h2 = h1.detach(), h2.detach()  # the stop-gradient: loss k trains block k only
            trainable = k not in self.frozen
            with nullcontext() if trainable else torch.no_grad():
                # Each view runs separately, as in Barlow Twins: BatchNorm statistics are per view.
                h1, h2 = blocks[k](h1), blocks[k](h2)
                if trainable and self.training:
                    h1 = inject_noise(h1, self.noise, self.noise_std, self.noise_scale_grad)
                    h2 = inject_noise(h2, self.noise, self.noise_std, self.noise_scale_grad)
            if k not in self.loss_blocks:
                if features:
                    out[f"{FEATURE_PREFIX}{k + 1}"] = self._probe_only_head(k, h1)
                continue
            proj, head = self.projectors[str(k)], self.heads[k]
            e1 = head(h1)
            z1, z2 = proj(e1), proj(head(h2))
            if features:
                out[f"{FEATURE_PREFIX}{k + 1}"] = e1.detach()
            loss_k = self.loss(z1, z2)
            out[f"loss/block{k + 1}"] = loss_k
            # Collapse monitor: per-feature std of the normalised embeddings x sqrt(dim): about 1 for points
            # spread over the sphere, 0 when every image maps to the same vector.
            zn = nn.functional.normalize(z1.detach().float(), dim=1)
            out[f"std/block{k + 1}"] = zn.std(0).mean() * zn.shape[1] ** 0.5
            if on_block_loss is not None:
                on_block_loss(k, loss_k)  # may run backward now and free this block's graph
                loss_k = loss_k.detach()
            total = total + loss_k
        out["loss"] = total
        return out

    def _probe_only_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Head k's output for a block without a loss: in eval mode (its BatchNorm statistics untouched, as in
        ``features``), no gradient."""
        head = self.heads[k]
        mode = head.training
        head.eval()
        try:
            with torch.no_grad():
                return head(h.detach())
        finally:
            head.train(mode)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's head output (the vectors the linear probes read); no noise, no gradient needed."""
        feats = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            feats.append(head(x))
        return feats


def pop_features(out: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Remove the ``feat/block{k}`` entries of a forward dict; returns them in block order (block 1 first)."""
    keys = sorted((key for key in out if key.startswith(FEATURE_PREFIX)),
                  key=lambda key: int(key.removeprefix(FEATURE_PREFIX)))
    return [out.pop(key) for key in keys]


def build_model(cfg: Config, in_channels: int, image_size: int) -> BlockwiseSSL:
    """The model of a configuration; ``in_channels`` and ``image_size`` come from the dataset."""
    m = cfg.model
    stem = m.stem if m.stem != "auto" else ("small" if image_size <= 64 else "imagenet")
    backbone = ResNet(m.arch, in_channels=m.in_channels or in_channels, stem=stem, width=m.width,
                      zero_init_residual=m.zero_init_residual)
    blocks = parse_blocks(m.blocks)
    n = len(blocks)
    specs = m.block_projectors or [m.projector] * n
    trained = range(n) if cfg.train.scheme == "sequential" else loss_blocks(cfg)
    return BlockwiseSSL(
        backbone,
        blocks,
        loss=build_loss(cfg),
        loss_blocks=loss_blocks(cfg),
        detach=detach_inputs(cfg),
        head=m.head,
        head_dims=m.block_head_dims or [m.head_dim] * n,
        head_kernel=m.head_kernel,
        projectors={k: parse_projector(specs[k]) for k in trained},
        noise=cfg.noise.type,
        noise_std=cfg.noise.std,
        noise_scale_grad=cfg.noise.scale_grad,
        frozen={b - 1 for b in cfg.train.frozen_blocks},
    )
