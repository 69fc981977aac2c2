"""Where a process's training steps get their batches, where their outputs go, who decides to stop, and what its
part of a checkpoint holds.

``Local``: a process that holds every block (alone, or as one data-parallel replica): batches from its loader,
nothing sent, the stop decided with the other replicas, the whole checkpoint. ``Stage``: one stage of a pipeline
(``blockssl.pipeline``): the first stage reads the data and decides to stop for every stage, later stages receive
activations, terms and that decision from the previous one; each sends its outputs on, and rank 0 merges every
stage's part of the checkpoint by name.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from blockssl import dist
from blockssl.config import Config
from blockssl.config.plan import Plan
from blockssl.data.loader import EpochSampler, TwoViews, pretrain_loader, shutdown_workers, two_view_dataset
from blockssl.data.photometric import to_device
from blockssl.eval.online import OnlineProbe
from blockssl.execution import STEPS, Step, StepTerms, Trainer, lean_step
from blockssl.method import BlockwiseSSL
from blockssl.pipeline import Layout, Link, Message

Batch = Message  # a step's inputs: both views, labels, the terms so far and the pipeline's stop decision


@dataclass
class CheckpointPart:
    """What a process contributes to the run's checkpoint: its blocks' state, optimizers and online classifiers,
    by name, and the run's counts (from the process that logs them)."""

    model: dict[str, torch.Tensor]
    optimizers: dict[str, Any]
    online_probe: dict[str, Any] | None
    counts: dict[str, int] | None


class Local:
    """Every block in this process; a data-parallel replica reads its share of each global batch."""

    def __init__(self, cfg: Config, scheme: Plan, layout: Layout, device: torch.device, views: TwoViews | None,
                 size: int) -> None:
        self.layout, self.device, self.views = layout, device, views
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.sampler = EpochSampler(size, cfg.train.batch_size, cfg.seed, layout.replica, layout.replicas)
        self.loader = pretrain_loader(views, self.sampler, num_workers=cfg.data.num_workers,
                                      pin_memory=cfg.data.pin_memory and device.type == "cuda",
                                      persistent_workers=cfg.data.persistent_workers) if views is not None else None
        self.iterator: Iterator[Any] | None = None
        self.execution = STEPS.get(scheme.execution, lean_step)  # a pipeline stage runs its own blocks lean

    @property
    def writes(self) -> bool:
        """Whether this process logs and counts: it sees every block's terms."""
        return self.layout.last and self.layout.replica == 0

    def batches(self, start: int, end: int) -> Iterator[Batch]:
        """The batches of steps ``start`` to ``end - 1``, epoch after epoch (the data order is a function of the
        seed and the epoch, so a resumed run reads the same ones)."""
        assert self.loader is not None and self.views is not None
        per_epoch = self.sampler.steps_per_epoch
        for epoch in range(start // per_epoch, (end - 1) // per_epoch + 1):
            first = max(start - epoch * per_epoch, 0)
            self.sampler.start(epoch, first)
            self.iterator = iter(self.loader)
            for x1, x2, labels, replaced in itertools.islice(self.iterator, min(per_epoch, end - epoch * per_epoch)
                                                             - first):
                yield Batch(to_device(self.views.transforms[0], x1, self.device, self.memory_format),
                            to_device(self.views.transforms[1], x2, self.device, self.memory_format),  # colour ops
                            labels, StepTerms(replaced=int(replaced.sum())))  # here with data.photometric=device

    def step(self, trainer: Trainer, batch: Batch, step: int, features: bool) -> Step:
        return self.execution(trainer, batch.h1, batch.h2, step, features)

    def stop(self, batch: Batch, requested: int, budget_spent: bool) -> int:
        """Why this step is the call's last: 0 not, -1 its step budget (``stop_after``) is spent, else the signal
        received by this process or another replica (all stop at the same step)."""
        if dist.any_process(requested):
            return requested or int(signal.SIGTERM)
        return -1 if budget_spent else 0

    def send(self, step: Step, batch: Batch, terms: StepTerms, stop: int) -> None:
        """Nothing leaves a process that holds every block."""

    def checkpoint(self, model: BlockwiseSSL, optimizers: dict[int, torch.optim.Optimizer],
                   probe: OnlineProbe | None, counts: dict[str, int]) -> CheckpointPart | None:
        """The run's checkpoint content on rank 0 (a collective: every process calls it), None elsewhere."""
        if not dist.is_main_process():
            return None
        return _part(model.state_dict(), optimizers, probe.checkpoint_state() if probe is not None else None, counts)

    def finish(self) -> None:
        """After the last step: nothing in flight."""

    def close(self) -> None:
        """Also on an error: a loader worker left running would keep this process, and the run, alive."""
        shutdown_workers(self.iterator)


class Stage(Local):
    """One stage of a pipeline; later stages hold no dataset, only its length (for the steps per epoch)."""

    def __init__(self, cfg: Config, scheme: Plan, layout: Layout, device: torch.device, views: TwoViews | None,
                 size: int) -> None:
        super().__init__(cfg, scheme, layout, device, views, size)
        self.link = Link(layout, device, cfg.train.in_flight, scheme.num_blocks)

    def batches(self, start: int, end: int) -> Iterator[Batch]:
        if self.layout.first:
            yield from super().batches(start, end)
        else:
            for _ in range(start, end):
                yield self.link.receive()

    def stop(self, batch: Batch, requested: int, budget_spent: bool) -> int:
        """The first stage decides for the whole pipeline; later stages stop at the same step."""
        return super().stop(batch, requested, budget_spent) if self.layout.first else batch.stop

    def send(self, step: Step, batch: Batch, terms: StepTerms, stop: int) -> None:
        if not self.layout.last:
            self.link.send(Message(*step.outputs, batch.labels.to(self.device, non_blocking=True), terms, stop))

    def checkpoint(self, model: BlockwiseSSL, optimizers: dict[int, torch.optim.Optimizer],
                   probe: OnlineProbe | None, counts: dict[str, int]) -> CheckpointPart | None:
        """Each stage's first replica sends rank 0 its blocks' part (tensors on the CPU: NCCL cannot gather pickled
        device tensors), merged there by name over rank 0's own (whose later blocks are stale and replaced)."""
        mine = None
        if self.layout.replica == 0:
            state = model.state_dict() if self.layout.first else model_part(model, self.layout.blocks)
            mine = _to_cpu(_part(state, optimizers,
                                 probe.checkpoint_state(self.layout.blocks) if probe is not None else None,
                                 counts if self.layout.last else None))
        parts: list[CheckpointPart] = [p for p in dist.gather_to_main(mine) or [] if p is not None]
        if not dist.is_main_process():
            return None
        probes = [p.online_probe for p in parts if p.online_probe is not None]
        return CheckpointPart(
            model={name: t for p in parts for name, t in p.model.items()},
            optimizers={k: v for p in parts for k, v in p.optimizers.items()},
            online_probe=probe.merge_checkpoint_states(probes) if probe is not None else None,
            counts=parts[-1].counts)

    def finish(self) -> None:
        self.link.flush()


def build_strategy(cfg: Config, scheme: Plan, layout: Layout, device: torch.device) -> Local:
    """The process's strategy, with its pretraining set where it reads images. A pipeline's later stages receive
    activations: they take the set's length from rank 0, a first-stage process, rather than scan the dataset
    (ImageNet's 1.28 M files) for it; what the first stage raises, every process raises, instead of waiting for a
    broadcast that never comes."""
    if not layout.pipelined:
        views = two_view_dataset(cfg)
        return Local(cfg, scheme, layout, device, views, len(views))
    first_views: TwoViews | None = None
    error: Exception | None = None
    if layout.first:
        try:
            first_views = two_view_dataset(cfg)
        except Exception as e:  # re-raised below, once every process knows
            error = e
    size, failure = dist.broadcast_object((len(first_views) if first_views is not None else 0,
                                           None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"the first pipeline stage could not read the pretraining set: {failure}")
    return Stage(cfg, scheme, layout, device, first_views, size)


def _part(model: dict[str, torch.Tensor], optimizers: dict[int, torch.optim.Optimizer],
          probe: dict[str, Any] | None, counts: dict[str, int] | None) -> CheckpointPart:
    return CheckpointPart(model, {str(k): o.state_dict() for k, o in optimizers.items()}, probe,
                          None if counts is None else dict(counts))


def model_part(model: BlockwiseSSL, blocks: list[int]) -> dict[str, torch.Tensor]:
    """The state of ``blocks`` (their stages, heads and projectors) under the model's names."""
    return {name: t for k in blocks for name, t in model.block_state_dict(k).items()}


def _to_cpu(obj: Any) -> Any:
    """Tensors of nested dicts, lists and checkpoint parts moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, CheckpointPart):
        return CheckpointPart(*(_to_cpu(getattr(obj, f)) for f in ("model", "optimizers", "online_probe", "counts")))
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
