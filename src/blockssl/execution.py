"""How one training step runs the blocks (``train.execution``), composed from one per-block unit of work.

The unit is :class:`Trainer`'s ``forward`` (block k on both views, noise, head, projector, loss) and ``update``
(that block's gradient averaging and optimizer step), with ``backward`` between them. The strategies:

- reference: every block forward, the summed loss backward once, every optimizer steps (the authors' code); every
  block's activations and gradients are alive together.
- lean: each block forward, backward and step before the next block runs. With detached inputs this is the same
  update (block k+1's input was computed before block k's step), with one block's graph alive at a time.
- pipeline: lean over the blocks of this process's stage, its input received from the previous stage's process
  and its output sent on to the next one (``blockssl.pipeline``).

Every step returns a :class:`Step`; none of them depends on where a block runs: each block's noise comes from
a generator keyed by (seed, replica, block, step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from blockssl import dist
from blockssl.config import TrainConfig
from blockssl.method import BlockOutput, BlockwiseSSL
from blockssl.models.noise import noise_generator
from blockssl.names import block_name
from blockssl.optim import build_optimizer


class NonFiniteLossError(FloatingPointError):
    """A block's loss or gradient became NaN or infinite."""


@dataclass
class BlockTerms:
    """One block's scalar terms of a step, 0-d tensors on the device: reading them is a host synchronisation, done
    at logging steps only. ``None``, or NaN in terms received from another pipeline stage, where not measured."""

    loss: torch.Tensor | None = None  # detached; None for a block without a loss
    spread: torch.Tensor | None = None  # embedding spread, 1 = spread over the sphere
    online_top1: torch.Tensor | float | None = None  # online probe, metrics window ending at this (logging) step
    online_loss: torch.Tensor | float | None = None
    saved_mb: torch.Tensor | float | None = None  # MiB saved for backward, when measured
    # At logging steps (blockssl.diagnostics): ||W - W0|| / ||W0|| of the block's convolutions, and RankMe of its
    # view-1 head features.
    weight_change: torch.Tensor | None = None
    rankme: torch.Tensor | None = None


# The terms logged per block after its loss and spread, in order, under ``{name}/block{k}`` ("online" as
# ``online/block{k}_top1`` and ``_loss``).
MEASURES = ("online_top1", "online_loss", "saved_mb", "weight_change", "rankme")


@dataclass
class StepTerms:
    """A step's terms: per block (numbered from 0), and the run's counts. A pipeline stage receives the terms of the
    blocks before it with its batch, adds its own and sends them on; the last stage logs them all."""

    blocks: dict[int, BlockTerms] = field(default_factory=dict)
    skipped: int | torch.Tensor = 0  # updates skipped for a non-finite loss or gradient (train.on_nonfinite=skip)
    replaced: int | torch.Tensor = 0  # unreadable images replaced in this batch

    def block(self, k: int) -> BlockTerms:
        return self.blocks.setdefault(k, BlockTerms())

    def merge(self, own: StepTerms) -> StepTerms:
        """These terms (of the batch, or received from the previous stage) with this process's step's own."""
        self.blocks.update(own.blocks)
        self.skipped = self.skipped + own.skipped
        return self

    def add(self, k: int, out: BlockOutput) -> None:
        if out.loss is not None:
            self.block(k).loss, self.block(k).spread = out.loss.detach(), out.spread

    def add_online(self, window: dict[int, tuple[float, float]]) -> None:
        """The online probe's top-1 and loss per block (``OnlineProbe.window_metrics``)."""
        for k, (top1, loss) in window.items():
            self.block(k).online_top1, self.block(k).online_loss = top1, loss

    def logged(self) -> dict[str, float]:
        """``loss`` (the sum over blocks), ``loss/block{k}`` and ``std/block{k}`` (numbered from 1), then the online
        probe's, ``saved_mb``, ``weight_change`` and ``rankme`` of each block where measured: what is logged. One
        host transfer."""
        order = sorted(self.blocks)
        slots = [(k, name) for k in order for name in ("loss", "spread", *MEASURES)
                 if getattr(self.blocks[k], name) is not None]
        device = next((v.device for k, name in slots if torch.is_tensor(v := getattr(self.blocks[k], name))), None)
        values = torch.stack([torch.as_tensor(getattr(self.blocks[k], name), dtype=torch.float64, device=device)
                              for k, name in slots]).tolist() if slots else []
        value = dict(zip(slots, values, strict=True))
        losses = [k for k in order if self.blocks[k].loss is not None]
        terms = {"loss": sum(value[k, "loss"] for k in losses)}
        for k in losses:
            terms[f"loss/{block_name(k)}"] = value[k, "loss"]
            terms[f"std/{block_name(k)}"] = value[k, "spread"]
        for group in (("online_top1", "online_loss"), ("saved_mb",), ("weight_change",), ("rankme",)):
            for k in order:
                for name in group:  # NaN: not measured (terms received from another stage)
                    if (k, name) in value and not math.isnan(value[k, name]):
                        key = (f"online/{block_name(k)}_{name[7:]}" if name.startswith("online")
                               else f"{name}/{block_name(k)}")
                        terms[key] = value[k, name]
        return terms


@dataclass
class Step:
    """What a step returns: the scalar terms, the online-probe features of the blocks run (view 1, detached, in
    block order), and the last block's detached outputs (what a pipeline stage sends on)."""

    terms: StepTerms
    features: list[torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor]


def build_optimizers(model: BlockwiseSSL, cfg: TrainConfig, blocks: Iterable[int] | None = None
                     ) -> dict[int, torch.optim.Optimizer]:
    """One optimizer per loss block (of ``blocks``, default all), over ``model.optimizer_parameters(k)``."""
    chosen = set(range(model.num_blocks) if blocks is None else blocks)
    return {k: build_optimizer(model.optimizer_parameters(k), cfg, model.no_weight_decay())
            for k in model.loss_blocks if k in chosen}


@dataclass
class Trainer:
    """The per-block unit of work and what it needs besides the data.

    ``stage_blocks`` are the blocks this process runs (default: every block up to the last loss block);
    ``replica`` is its index among the data-parallel copies of them (``dist.data_rank``).
    """

    model: BlockwiseSSL
    optimizers: dict[int, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    autocast: Any
    seed: int
    replica: int = 0
    skip_nonfinite: bool = False
    stage_blocks: list[int] | None = None

    @property
    def blocks(self) -> list[int]:
        """The blocks this process runs: its stage's, or every block up to the last loss block."""
        if self.stage_blocks is not None:
            return self.stage_blocks
        return list(range(self.model.last_loss_block + 1))

    def forward(self, k: int, h1: torch.Tensor, h2: torch.Tensor, step: int, feature: bool = False) -> BlockOutput:
        with self.autocast:
            return self.model.run_block(k, h1, h2, generator=self.generator(k, step, h1.device), feature=feature)

    def generator(self, k: int, step: int, device: torch.device) -> torch.Generator | None:
        if not (self.model.noise.active or self.model.stochastic):
            return None
        return noise_generator(self.seed, self.replica, k, step, device)

    def finite(self, value: torch.Tensor, what: str, step: int) -> bool:
        """False for a non-finite value when skipping is allowed; otherwise a non-finite value stops the run."""
        if torch.isfinite(value.detach()):  # a check, not part of the graph
            return True
        if self.skip_nonfinite:
            return False
        raise NonFiniteLossError(f"{what} is {value.item()} at step {step}; stopped before the update, the last "
                                 "checkpoint is intact. Lower train.lr, check the data, or set "
                                 "train.on_nonfinite=skip")

    def loss_finite(self, k: int, loss: torch.Tensor, step: int) -> bool:
        return self.finite(loss, f"block {k + 1} loss ({type(self.model.losses[str(k)]).__name__})", step)

    def backward(self, loss: torch.Tensor) -> None:
        with torch.autocast(loss.device.type, enabled=False):  # backward outside autocast
            self.scaler.scale(loss).backward()

    def update(self, k: int, step: int) -> bool:
        """Average block k's gradients over the replicas, step its optimizer and free its gradients; False if the
        step was skipped for a non-finite gradient.

        No DistributedDataParallel wrapper, whose hooks expect one backward per forward: each block's gradients
        are averaged in one flattened all-reduce right after its backward, so no gradient is sent twice."""
        opt = self.optimizers[k]
        params = [p for g in opt.param_groups for p in g["params"]]
        dist.average_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        # With fp16 the scaler itself skips steps whose gradients overflowed.
        stepped = self.scaler.is_enabled() or self.finite(torch.nn.utils.get_total_norm(grads),
                                                          f"block {k + 1} gradient", step)
        if stepped:
            self.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        return stepped

    def lean_blocks(self, blocks: Iterable[int], h1: torch.Tensor, h2: torch.Tensor, step: int, terms: StepTerms,
                    features: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks in order, each updated before the next runs; returns the last one's detached outputs. Terms go
        to ``terms``, view-1 head features to ``features`` when given."""
        for k in blocks:
            out = self.forward(k, h1, h2, step, feature=features is not None)
            if out.loss is not None:
                if self.loss_finite(k, out.loss, step):
                    self.backward(out.loss)
                    terms.skipped += not self.update(k, step)  # before block k+1: its gradients are freed
                else:
                    terms.skipped += 1
            terms.add(k, out)
            if features is not None and out.feature is not None:
                features.append(out.feature)
            h1, h2 = out.h1.detach(), out.h2.detach()
        return h1, h2


def reference_step(t: Trainer, x1: torch.Tensor, x2: torch.Tensor, step: int, features: bool = False) -> Step:
    """All blocks forward, one backward of the summed loss, then every block's step."""
    generators = {k: g for k in t.blocks if (g := t.generator(k, step, x1.device)) is not None}
    with t.autocast:
        outs = t.model(x1, x2, generators=generators, features=features)
    terms = StepTerms()
    losses = {k: out.loss for k, out in enumerate(outs) if out.loss is not None}
    if all([t.loss_finite(k, loss, step) for k, loss in losses.items()]):
        total = x1.new_zeros(())
        for loss in losses.values():
            total = total + loss
        t.backward(total)
        terms.skipped = sum(not t.update(k, step) for k in losses)
    else:
        terms.skipped = 1
    t.scaler.update()
    for k, out in enumerate(outs):
        terms.add(k, out)
    return Step(terms, [out.feature for out in outs if out.feature is not None],
                (outs[-1].h1.detach(), outs[-1].h2.detach()))


def lean_step(t: Trainer, x1: torch.Tensor, x2: torch.Tensor, step: int, features: bool = False) -> Step:
    """Each of this process's blocks forward, backward and step in turn; a pipeline stage's step is this one, on
    the inputs its process received."""
    terms = StepTerms()
    feats: list[torch.Tensor] | None = [] if features else None
    outputs = t.lean_blocks(t.blocks, x1, x2, step, terms, feats)
    t.scaler.update()
    return Step(terms, feats or [], outputs)


STEPS = {"reference": reference_step, "lean": lean_step}
