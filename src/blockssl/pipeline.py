"""Pipeline training (``train.execution=pipeline``): each stage of blocks in its own process, activations sent
forward only.

No gradient crosses a block boundary, so block k's process trains as soon as block k-1's activations of a batch
arrive, and nothing is ever sent back. Processes are laid out stage-major, ``rank = stage x replicas + replica``:
``WORLD_SIZE = stages x data-parallel replicas``. Stage 0 reads the data; every stage sends its last block's
detached outputs of both views, the labels (for the online probe) and a small record of its scalar terms to the
same replica of the next stage, which logs them when it is the last. A stage runs at most ``train.in_flight``
batches ahead of the next one, so memory stays bounded.

Exactness: block k+1 trains on block k's output computed with block k's parameters of the same step, as in
single-process lean execution; with each block's noise keyed by (seed, replica, block, step), a pipeline run and
the lean run of the same configuration give the same parameters.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as tdist

from blockssl import dist
from blockssl.config import Config, ConfigError
from blockssl.config.plan import parse_stages
from blockssl.data.datasets import dataset_info
from blockssl.execution import BlockTerms, StepTerms, Trainer, build_optimizers
from blockssl.method import build_model
from blockssl.runtime import autocast_context


@dataclass(frozen=True)
class Layout:
    """Where this process sits: stage ``stage`` (its blocks ``stages[stage]``, 0-based), replica ``replica`` of
    ``replicas``. One process without pipelining is the single stage of every block up to ``last_block``."""

    stages: list[list[int]]
    stage: int = 0
    replica: int = 0
    replicas: int = 1

    @property
    def blocks(self) -> list[int]:
        return self.stages[self.stage]

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == len(self.stages) - 1

    @property
    def pipelined(self) -> bool:
        return len(self.stages) > 1

    def rank(self, stage: int) -> int:
        """The global rank of this replica's process in ``stage``."""
        return stage * self.replicas + self.replica


def single_stage(num_blocks: int, world: int, rank: int) -> Layout:
    return Layout([list(range(num_blocks))], 0, rank, world)


def plan_layout(cfg: Config, num_blocks: int, world: int, rank: int,
                measure: Callable[[], list[float]] | None = None) -> Layout:
    """The stage grouping of ``train.stages`` and this process's place in it; raises before any compute when the
    world size does not fit. ``auto`` balances contiguous groups by ``measure()``'s per-block step times (rank 0's,
    broadcast, so every process agrees), with as many stages as processes allow, up to one block each."""
    stages = parse_stages(cfg.train.stages, num_blocks)
    if stages is None:
        count = max(s for s in range(1, num_blocks + 1) if world % s == 0)
        # Every process measures (the losses' collectives need all of them); rank 0's figures decide.
        times = dist.broadcast_object(measure() if measure is not None else None)
        stages = balanced_stages(times if times is not None else [1.0] * num_blocks, count)
    if world % len(stages):
        raise ConfigError(f"train.execution=pipeline: {world} processes cannot hold {len(stages)} stages "
                          f"({cfg.train.stages!r}) times data-parallel replicas; launch a multiple of {len(stages)} "
                          "processes (torchrun --nproc-per-node) or change train.stages")
    replicas = world // len(stages)
    return Layout(stages, rank // replicas, rank % replicas, replicas)


def balanced_stages(times: list[float], count: int) -> list[list[int]]:
    """Contiguous groups of blocks, ``count`` of them, minimising the slowest group's total time (ties: the
    earliest cut points)."""
    n = len(times)
    best: tuple[float, list[list[int]]] | None = None
    for cuts in itertools.combinations(range(1, n), count - 1):
        bounds = [0, *cuts, n]
        groups = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        slowest = max(sum(times[k] for k in g) for g in groups)
        if best is None or slowest < best[0]:
            best = (slowest, groups)
    assert best is not None
    return best[1]


def init_groups(layout: Layout) -> None:
    """Make each stage's replicas the data-parallel group (every process creates every group, in one order)."""
    if not layout.pipelined:
        return
    for s in range(len(layout.stages)):
        group = tdist.new_group([s * layout.replicas + d for d in range(layout.replicas)])
        if s == layout.stage:
            dist.set_data_parallel_group(group)


def measure_block_seconds(cfg: Config, device: torch.device, steps: int = 3) -> list[float]:
    """Each block's mean step time (forward of both views, backward, optimizer step) on random images of the
    dataset's shape and one replica's batch, measured on a copy of the run's model (nothing of the run changes)."""
    info = dataset_info(cfg.data)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, info.channels, info.image_size).to(device).train()
        batch = max(2, cfg.train.batch_size // dist.world_size())
        x = torch.randn(batch, info.channels, info.image_size, info.image_size, device=device)
    trainer = Trainer(model, build_optimizers(model, cfg.train), torch.amp.GradScaler(device.type, enabled=False),
                      autocast_context(cfg.train.amp, device), cfg.seed, stage_blocks=list(range(model.num_blocks)))
    seconds = [0.0] * model.num_blocks
    for step in range(steps + 1):  # the first step warms up
        h1 = h2 = x
        for k in range(model.num_blocks):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            h1, h2 = trainer.lean_blocks([k], h1, h2, step, StepTerms())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[k] += (time.perf_counter() - start) * (step > 0)
    return [t / steps for t in seconds]


@dataclass
class Message:
    """What one stage hands the next for one batch."""

    h1: torch.Tensor
    h2: torch.Tensor
    labels: torch.Tensor
    terms: StepTerms  # of the blocks up to the sender's last
    stop: int = 0  # the first stage's decision for the whole pipeline (``blockssl.strategy``)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# On the wire a message is a header (int64: stop, which blocks carry a loss, the activations' dtype, rank and shape),
# both views, the labels, and the float64 terms: skipped and replaced, then per block the fields of BlockTerms
# (NaN where absent). The header is read on the host (the shape is needed to receive): the other terms stay on the
# device until a logging step reads them.
_HEADER = 10
_FIELDS = [f.name for f in fields(BlockTerms)]


def _encode(terms: StepTerms, num_blocks: int, device: torch.device) -> torch.Tensor:
    wire = torch.full((2 + len(_FIELDS) * num_blocks,), math.nan, dtype=torch.float64, device=device)
    wire[0], wire[1] = terms.skipped, terms.replaced
    for k, block in terms.blocks.items():
        for i, name in enumerate(_FIELDS):
            if (value := getattr(block, name)) is not None:
                wire[2 + len(_FIELDS) * k + i] = value
    return wire


def _decode(wire: torch.Tensor, loss_mask: int, num_blocks: int) -> StepTerms:
    terms = StepTerms(skipped=wire[0], replaced=wire[1])
    for k in range(num_blocks):
        values: dict[str, torch.Tensor | None] = {name: wire[2 + len(_FIELDS) * k + i]
                                                  for i, name in enumerate(_FIELDS)}
        if not loss_mask >> k & 1:
            values["loss"] = values["spread"] = None
        terms.blocks[k] = BlockTerms(**values)
    return terms


class Link:
    """Point-to-point transfers to the next stage and from the previous one, for one replica chain.

    Sends are asynchronous; at most ``in_flight`` batches are left unfinished before a send waits for the oldest.
    Tensors travel from the device they live on (NCCL sends device tensors; gloo, the CPU ones here).
    """

    def __init__(self, layout: Layout, device: torch.device, in_flight: int, num_blocks: int) -> None:
        self.layout, self.device, self.in_flight, self.num_blocks = layout, device, in_flight, num_blocks
        self.pending: deque[tuple[list[Any], list[torch.Tensor]]] = deque()
        self.bytes_sent = 0
        self.wait_s = 0.0  # time spent waiting for the previous stage (the bubble) and for full send slots
        self.wire = device if tdist.get_backend() == "nccl" else torch.device("cpu")

    def send(self, msg: Message) -> None:
        h = msg.h1
        loss_mask = sum(1 << k for k, b in msg.terms.blocks.items() if b.loss is not None)
        header = torch.tensor([msg.stop, loss_mask, _DTYPES.index(h.dtype), h.dim(), *h.shape], dtype=torch.int64)
        pad = torch.zeros(_HEADER - header.numel(), dtype=torch.int64)
        tensors = [torch.cat([header, pad]), msg.h1.contiguous(), msg.h2.contiguous(), msg.labels,
                   _encode(msg.terms, self.num_blocks, h.device)]
        tensors = [t.to(self.wire, non_blocking=True) for t in tensors]
        dst = self.layout.rank(self.layout.stage + 1)
        works = [tdist.isend(t, dst) for t in tensors]
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self.pending.append((works, tensors))  # the tensors stay alive until their send completes
        while len(self.pending) > self.in_flight:
            start = time.perf_counter()
            for work in self.pending.popleft()[0]:
                work.wait()
            self.wait_s += time.perf_counter() - start

    def receive(self) -> Message:
        src = self.layout.rank(self.layout.stage - 1)
        start = time.perf_counter()
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.wire)
        tdist.recv(header, src)
        stop, loss_mask, dtype_index, ndim, *rest = header.tolist()
        shape, dtype = rest[:ndim], _DTYPES[dtype_index]
        h1 = torch.empty(shape, dtype=dtype, device=self.wire)
        h2 = torch.empty(shape, dtype=dtype, device=self.wire)
        labels = torch.empty(shape[0], dtype=torch.int64, device=self.wire)
        wire = torch.empty(2 + len(_FIELDS) * self.num_blocks, dtype=torch.float64, device=self.wire)
        for t in (h1, h2, labels, wire):
            tdist.recv(t, src)
        self.wait_s += time.perf_counter() - start
        h1, h2, labels, wire = (t.to(self.device, non_blocking=True) for t in (h1, h2, labels, wire))
        return Message(h1, h2, labels, _decode(wire, loss_mask, self.num_blocks), stop)

    def flush(self) -> None:
        while self.pending:
            for work in self.pending.popleft()[0]:
                work.wait()
