"""BlockwiseSSL: a backbone cut into blocks, a head and a projector per block, one SSL loss per block.

The stop-gradient between blocks is the ``detach`` switch of ``run_block``; end-to-end training is the same code
with it off and a loss at the last block only (Siddiqui et al. 2024, "Training schemes").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from blockssl.config import Config, ConfigError, parse_blocks, parse_projector
from blockssl.config.plan import plan
from blockssl.losses import BarlowTwinsLoss, SimCLRLoss, VICRegLoss
from blockssl.models.backbone import Backbone, BackboneOptions, build_backbone, group_stages
from blockssl.models.heads import Head, projector
from blockssl.models.noise import Noise, default_generator

READOUTS = ("head", "pool")  # how a block's output becomes the vector a probe reads (``BlockwiseSSL.readouts``)


@dataclass
class BlockOutput:
    """One block's forward on both views (``BlockwiseSSL.run_block``)."""

    h1: torch.Tensor  # the block's outputs, noise included: the next block's inputs
    h2: torch.Tensor
    loss: torch.Tensor | None = None  # with its graph; None for a block without a loss
    spread: torch.Tensor | None = None  # embedding spread (collapse monitor), detached
    feature: torch.Tensor | None = None  # detached head output of view 1, when asked for


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

    ``run_block(k, h1, h2)`` is block k's forward on both views (``BlockOutput``); ``forward(x1, x2)`` runs the
    blocks in order up to the last loss block (later blocks carry no loss: their compute is skipped). Blocks
    are numbered from 0 here and from 1 in configurations and metrics. Blocks in ``frozen`` run in eval mode and
    without gradient. How losses become updates is the execution strategy's business (``blockssl.execution``).
    """

    def __init__(
        self,
        backbone: Backbone,
        blocks: list[list[str]],
        *,
        heads: list[Head],
        projectors: dict[int, nn.Module],
        losses: dict[int, nn.Module],
        loss_blocks: list[int],
        detach: bool = True,
        noise: Noise | None = None,
        frozen: set[int] | None = None,
        checkpoint_stages: bool = False,
        stochastic: bool = False,
    ) -> None:
        """``blocks``: the backbone's stage names grouped into blocks; ``heads``: one per block; ``projectors`` and
        ``losses``: one per block a loss may train (``build_model`` makes them from a configuration).

        ``stochastic``: the backbone draws random numbers in training (a ViT's stochastic depth, from torch's global
        generator): each block's forward then draws them from that generator seeded by the block's key (the one its
        noise is drawn from), so that every execution, a pipeline's processes included, draws the same."""
        super().__init__()
        self.backbone = backbone
        self.block_stages = blocks
        _, infos = group_stages(backbone, blocks)
        self.block_channels = [i.channels for i in infos]
        self.block_layouts = [i.layout for i in infos]
        self.heads = nn.ModuleList(heads)
        self.feature_dims = [h.out_dim for h in heads]  # width of each block's features (what probes read)
        self.projectors = nn.ModuleDict({str(k): p for k, p in projectors.items()})
        self.losses = nn.ModuleDict({str(k): loss for k, loss in losses.items()})
        self.detach = detach
        self.noise = noise or Noise()  # none
        self.frozen: set[int] = set(frozen or ())
        self.loss_blocks = list(loss_blocks)
        self.checkpoint_stages = checkpoint_stages
        self.stochastic = stochastic

    @property
    def blocks(self) -> list[nn.Sequential]:
        """Views over the backbone's stages, built on access: parameters stay registered once, under torchvision's
        names, and module replacements (e.g. SyncBatchNorm) are seen."""
        return group_stages(self.backbone, self.block_stages)[0]

    @property
    def num_blocks(self) -> int:
        return len(self.block_stages)

    def block_modules(self, k: int, compilable: bool = False) -> list[nn.Module]:
        """What block k owns: its stages, head, projector and loss (what a pipeline stage keeps on its device).

        ``compilable``: the modules to ``compile()`` in place instead: the backbone's stages made of one module (a
        block is a view rebuilt on access; a stage of several, such as a ResNet's stem, kept flat for torchvision's
        names, stays eager), head and projector."""
        stages = [self.blocks[k]] if not compilable else [
            m for name in self.block_stages[k] if len(ms := self.backbone.stage_modules(name)) == 1 for m in ms]
        return [*stages, *self._head_modules(k, loss=not compilable)]

    def _head_modules(self, k: int, loss: bool = True) -> list[nn.Module]:
        """Block k's head, and its projector and loss where a loss may train it."""
        if str(k) not in self.projectors:
            return [self.heads[k]]
        return [self.heads[k], self.projectors[str(k)], *([self.losses[str(k)]] if loss else [])]

    def block_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """The parameters and buffers of what block k owns (``block_modules``), under the model's names."""
        owned = [*(m for stage in self.block_stages[k] for m in self.backbone.stage_modules(stage)),
                 *self._head_modules(k)]
        prefixes = tuple(f"{name}." for name, module in self.named_modules() if any(module is m for m in owned))
        return {name: t for name, t in self.state_dict().items() if name.startswith(prefixes)}

    @property
    def last_loss_block(self) -> int:
        return max(self.loss_blocks)

    def optimizer_parameters(self, k: int) -> list[nn.Parameter]:
        """What loss block k's optimizer updates: its head and projector, and the unfrozen blocks its loss trains:
        block k alone with detached inputs, else every block after the previous loss block (all of them, end to end).

        One optimizer per loss block, whatever the execution: per-parameter optimizers (LARS, SGD, AdamW) make the
        split exact, and each block's step can run as soon as its own gradients exist.
        """
        first = k if self.detach else max((j for j in self.loss_blocks if j < k), default=-1) + 1
        blocks = self.blocks
        params = [p for j in range(first, k + 1) if j not in self.frozen for p in blocks[j].parameters()]
        return [*params, *self.heads[k].parameters(), *self.projectors[str(k)].parameters()]

    def no_weight_decay(self) -> list[nn.Parameter]:
        """The backbone's parameters exempt from weight decay beyond biases and norms: those its ``no_weight_decay``
        names, timm's convention (a ViT's position embedding and class token); none for a ResNet."""
        backbone = cast(nn.Module, self.backbone)
        names: set[str] = getattr(backbone, "no_weight_decay", set)()
        return [p for name, p in backbone.named_parameters() if name in names]

    def train(self, mode: bool = True) -> BlockwiseSSL:
        super().train(mode)
        for k in self.frozen:  # frozen blocks keep their BatchNorm statistics
            self.blocks[k].eval()
        return self

    def run_block(self, k: int, h1: torch.Tensor, h2: torch.Tensor, *, generator: torch.Generator | None = None,
                  feature: bool = False) -> BlockOutput:
        """Block k on both views (its inputs detached when the stop-gradient is on), noise drawn from ``generator``
        in training, then, for a loss block, head, projector and loss.

        ``feature`` asks for the detached head output of view 1, for the online probe. A loss block computes it
        for its loss anyway; a block without a loss (frozen blocks, earlier blocks in the sequential scheme) costs
        one head forward in eval mode and without gradient, so that neither its BatchNorm statistics nor anything
        else of the model depends on whether features were asked for; for a block no loss ever trains (the
        end-to-end scheme's first blocks) that head is a global average pooling.
        """
        if self.detach:
            h1, h2 = h1.detach(), h2.detach()  # the stop-gradient: loss k trains block k only
        block = self.blocks[k]
        trainable = k not in self.frozen
        with nullcontext() if trainable else torch.no_grad(), self._keyed_randomness(generator):
            # Each view runs separately, as in Barlow Twins: BatchNorm statistics are per view.
            h1, h2 = self._stages(block, h1), self._stages(block, h2)
            if trainable and self.training:
                h1 = self.noise(h1, generator, self.block_layouts[k])
                h2 = self.noise(h2, generator, self.block_layouts[k])
        if k not in self.loss_blocks:
            return BlockOutput(h1, h2, feature=self._probe_only_head(k, h1) if feature else None)
        proj, head = self.projectors[str(k)], self.heads[k]
        e1 = head(h1)
        z1, z2 = proj(e1), proj(head(h2))
        # Collapse monitor: per-feature std of the normalised embeddings x sqrt(dim): about 1 for points spread
        # over the sphere, 0 when every image maps to the same vector.
        zn = nn.functional.normalize(z1.detach().float(), dim=1)
        return BlockOutput(h1, h2, loss=self.losses[str(k)](z1, z2), spread=zn.std(0).mean() * zn.shape[1] ** 0.5,
                           feature=e1.detach() if feature else None)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, generators: Mapping[int, torch.Generator] | None = None,
                features: bool = False) -> list[BlockOutput]:
        """Every block up to the last loss block in order, each on the previous one's output (all graphs kept)."""
        outs: list[BlockOutput] = []
        h1, h2 = x1, x2
        for k in range(self.last_loss_block + 1):
            out = self.run_block(k, h1, h2, generator=(generators or {}).get(k), feature=features)
            outs.append(out)
            h1, h2 = out.h1, out.h2
        return outs

    @contextmanager
    def _keyed_randomness(self, generator: torch.Generator | None) -> Iterator[None]:
        """Torch's global generator of the block's device seeded from the block's key for the block's forward
        (``stochastic``), its state restored after."""
        if not (self.stochastic and self.training and generator is not None):
            yield
            return
        device = generator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            default_generator(device).manual_seed((generator.initial_seed() + 1) % 2**64)  # apart from the noise's
            yield

    def _stages(self, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """The block's stages in order; with ``checkpoint_stages`` each keeps only its input for backward and is
        recomputed there (activation checkpointing, the usual way to cut end-to-end training's memory)."""
        if not (self.checkpoint_stages and torch.is_grad_enabled()):
            return block(x)
        for stage in block:
            x = checkpoint(stage, x, use_reentrant=False, context_fn=_recompute_contexts(stage))
        return x

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
        return self.readouts(x)["head"]

    def readouts(self, x: torch.Tensor, names: Sequence[str] = ("head",)) -> dict[str, list[torch.Tensor]]:
        """Every block's features read out in one pass, per readout: ``head`` (its head's output, what its loss
        sees) and ``pool`` (plain global average pooling of the block output, whatever the head: the readout that
        compares blocks and schemes on equal terms)."""
        unknown = set(names) - set(READOUTS)
        if unknown:
            raise ValueError(f"unknown readouts {sorted(unknown)}; choose from {', '.join(READOUTS)}")
        out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        heads = cast(list[Head], list(self.heads))
        for block, head in zip(self.blocks, heads, strict=True):
            x = block(x)
            for name, feats in out.items():
                feats.append(head(x) if name == "head" else head.pooled(x))
        return out


def _recompute_contexts(stage: nn.Module) -> Callable[[], tuple[Any, Any]]:
    return lambda: (nullcontext(), _running_stats_kept(stage))


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Undo what a recomputed forward does to BatchNorm running statistics: they were updated by the first one."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
    kept = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, kept, strict=True):
                b.copy_(value)


def build_model(cfg: Config, in_channels: int, image_size: int) -> BlockwiseSSL:
    """The model of a configuration, ``in_channels`` and ``image_size`` from the dataset: the one place where the
    configuration's names become modules (built in a fixed order: backbone, heads, projectors, losses, so a seed
    gives the same weights)."""
    m = cfg.model
    options = BackboneOptions.of(m, in_channels, image_size)
    backbone = build_backbone(m.arch, options)
    blocks = parse_blocks(m.blocks, tuple(s.name for s in backbone.stage_info))
    n = len(blocks)
    scheme = plan(cfg)
    # Projectors and losses only where a loss may sit: at ImageNet scale each 8192-wide projector holds about 150 M
    # weights.
    trained = scheme.trained
    head_dims = m.block_head_dims or [m.head_dim] * n
    lean_chunk_bytes = m.lean_head_chunk_mb * 2**20 if m.lean_head else 0
    # A block no loss ever trains (end-to-end's blocks 1 to N-1) is read by plain global average pooling: a CbE head
    # there would stay a random projection, and its probe would measure that, not the block.
    try:  # settings that fit only some block outputs (tokens or feature maps) are refused here
        heads = [Head(info.channels, m.head if k in trained else "gap", head_dims[k], m.head_kernel,
                      lean_chunk_bytes, m.head_grid, info.layout, m.token_pool, info.prefix_tokens)
                 for k, info in enumerate(group_stages(backbone, blocks)[1])]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    specs = m.block_projectors or [m.projector] * n
    projectors = {k: projector(heads[k].out_dim, parse_projector(specs[k])) for k in trained}
    return BlockwiseSSL(
        backbone,
        blocks,
        heads=heads,
        projectors=projectors,
        losses={k: build_loss(cfg) for k in trained},
        loss_blocks=scheme.loss_blocks,
        detach=scheme.detach,
        noise=Noise(cfg.noise.type, cfg.noise.std, cfg.noise.scale_grad),
        frozen=scheme.frozen,
        checkpoint_stages=cfg.train.checkpoint_stages,
        stochastic=m.drop_path > 0,
    )
