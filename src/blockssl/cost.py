"""What a configuration costs, per block and part, beside the end-to-end model of the same backbone (``blockssl cost``):
parameters, forward and training FLOPs, optimizer state, the bytes data parallelism all-reduces, the bytes saved for
backward, and under pipeline execution each stage's load and state.

Everything is counted by torch on the configuration's own model and training step, run on the meta device: shapes
without data, so even the paper's 604 M projector parameters cost no memory and no arithmetic to count.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the forward of both views and the backward of the block
  losses, in the order of the configured execution (``blockssl.execution``; the optimizer steps left out). It counts
  matrix products and convolutions, 2 FLOPs per multiply-add, and their backward as autograd runs it: where an
  input needs no gradient none is computed, so a block's first convolutions behind the stop-gradient cost 1x their
  forward in backward, not 2x. Nothing elementwise is counted (BatchNorm, ReLU, pooling, noise, the optimizer), nor
  matrix-vector products. Training FLOPs = forward + backward.
- Saved bytes: ``blockssl.memory.model_accounting``, exact; in float32, as autocast does not run on the meta device
  (``train.amp`` roughly halves the activations). The peak is the most held at once under the configured execution.
- Parameters: ``numel x element_size``. The gradients of the trained parameters are what data parallelism
  all-reduces each step, once (``dist.average_gradients``, DDP's flattened buffer; a ring all-reduce sends about
  twice that per process). Optimizer state: ``optimizer_state_bytes``. The gradient peak is the most gradient bytes
  alive after a backward of the step: every trained parameter's under reference execution, one loss block's under
  lean execution, whose update frees them before the next block runs (``Trainer.update``).
- Memory per device (``device_memory``): a training-memory estimate for a device holding the whole model (data
  parallelism) at its share of the batch, the sum of the counted parts: weights + gradient peak + optimizer state +
  saved peak x the device's images x 2 views. It leaves out what the counts do not see: the allocator's caching and
  fragmentation, the temporaries of the largest operation (a backward's output gradients among them), the data
  loader's batches, the online probe and the CUDA context; and it spreads per-batch terms (BatchNorm statistics, the
  loss's D x D matrices) over the counted batch, so at a device's smaller batch they count for less than they hold.

FLOPs and saved bytes are per image and view: a step of ``train.batch_size`` images runs each image through both
views, and its count is divided by twice the batch (the loss, which runs once per pair of views, counts half to each
view); a training step costs twice these figures per image. The step is counted at the global batch, so a loss whose
cost per image grows with the batch (SimCLR's negatives) is priced as in training. The online probe is not counted.
Counting takes seconds, but the lean CbE head runs chunk by chunk as in training: at 224 px and batch 2048 (the
library defaults) about a minute; a smaller ``train.batch_size`` changes its per-image figures by per-batch terms only.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.graph import Node
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from blockssl.config import Config, ConfigError, TrainConfig, apply_overrides, parse_blocks
from blockssl.config.plan import execution_strategy, parse_stages
from blockssl.data.datasets import dataset_info
from blockssl.memory import PARTS, Name, model_accounting, model_scopes, resolve_name
from blockssl.method import BlockwiseSSL, build_model
from blockssl.models.backbone import BackboneOptions, run_spec, stage_names
from blockssl.models.noise import noise_generator

# The end-to-end model of the same backbone, as configs/imagenet/barlow_twins_end_to_end.yaml and the benchmarks
# build it: one loss at the last block, full backpropagation, the last block globally average-pooled into its
# projector, no noise; the switches a blockwise configuration may have set go back to their scheme's presets.
END_TO_END = ("train.scheme=end_to_end", "model.head=gap", "noise.type=none", "train.loss_blocks=auto",
              "train.detach=auto", "train.execution=auto")


@dataclass(frozen=True)
class Cost:
    """The counts of a part, a block, a pipeline stage or a model. FLOPs and saved bytes are per image and view."""

    params: int = 0
    trained: int = 0  # parameters an optimizer updates
    forward_flops: float = 0.0
    train_flops: float = 0.0  # forward + backward
    param_bytes: int = 0
    grad_bytes: int = 0  # gradients of the trained parameters: what data parallelism all-reduces per step
    optimizer_bytes: int = 0
    saved_bytes: float = 0.0  # saved for backward

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    @property
    def state_bytes(self) -> int:
        """What a device holds besides activations: parameters, gradients and optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


@dataclass
class ModelCost:
    """One model's costs: ``parts[k][part]`` for block k (from 0) and each of ``blockssl.memory.PARTS``."""

    parts: dict[int, dict[str, Cost]]
    saved_peak: float  # the most bytes saved for backward held at once, per image and view
    grad_peak: int  # the most gradient bytes alive at once in the step

    def block(self, k: int) -> Cost:
        return sum(self.parts[k].values(), Cost())

    def blocks(self, ks: Iterable[int]) -> Cost:
        return sum((self.block(k) for k in ks), Cost())

    @property
    def total(self) -> Cost:
        return self.blocks(self.parts)


@dataclass
class CostReport:
    """A configuration's model, the end-to-end model of its backbone, and its pipeline stages (0-based blocks of
    each; empty unless ``train.execution=pipeline``)."""

    cfg: Config
    model: ModelCost
    end_to_end: ModelCost
    stages: list[list[int]] = field(default_factory=list)
    devices: int = 16  # the data-parallel devices that share train.batch_size in the memory estimate


@dataclass(frozen=True)
class DeviceMemory:
    """A device's training memory at its share of the batch, estimated from the counts (the module docstring says
    what it leaves out)."""

    weights: int
    gradients: int  # the gradient peak
    optimizer: int
    activations: float  # the saved peak x the device's images x 2 views

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def device_memory(cost: ModelCost, batch: int) -> DeviceMemory:
    """The memory of a device that trains the whole model on ``batch`` images (both views of each)."""
    total = cost.total
    return DeviceMemory(total.param_bytes, cost.grad_peak, total.optimizer_bytes, cost.saved_peak * batch * 2)


def device_batch(cfg: Config, devices: int) -> int:
    """Each device's images per step: ``train.batch_size`` is the global batch, split evenly as the loader does."""
    if devices < 1 or cfg.train.batch_size % devices:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by {devices} devices")
    return cfg.train.batch_size // devices


def optimizer_state_bytes(params: Iterable[nn.Parameter], cfg: TrainConfig) -> int:
    """Bytes of state the optimizer of ``blockssl.optim.build_optimizer`` keeps for ``params`` once it has stepped:
    LARS one momentum buffer per parameter in ``train.momentum_dtype`` (``LARS._update``), SGD one momentum buffer
    (``torch.optim.SGD``; none at momentum 0), AdamW two moment buffers and a float32 step count per tensor
    (``torch.optim.AdamW``). tests/test_cost.py checks these against the optimizers' own state."""
    params = list(params)
    if cfg.optimizer == "lars":
        return sum(p.numel() for p in params) * getattr(torch, cfg.momentum_dtype).itemsize
    if cfg.optimizer == "sgd":
        return _bytes(params) if cfg.momentum else 0
    if cfg.optimizer == "adamw":
        return 2 * _bytes(params) + 4 * len(params)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose lars, sgd or adamw")


def end_to_end_config(cfg: Config) -> Config:
    """The configuration of the end-to-end model of ``cfg``'s backbone (``END_TO_END``)."""
    return apply_overrides(copy.deepcopy(cfg), END_TO_END, ("train", "model", "noise"))


def cost_report(cfg: Config, devices: int = 16) -> CostReport:
    """The costs of ``cfg``, of the end-to-end model of its backbone, and ``cfg``'s pipeline stages; the memory
    estimate splits ``train.batch_size`` over ``devices`` (16: the paper's GPUs)."""
    device_batch(cfg, devices)  # a bad device count fails before the counting
    return CostReport(cfg, count_model(cfg), count_model(end_to_end_config(cfg)), pipeline_stages(cfg), devices)


def pipeline_stages(cfg: Config) -> list[list[int]]:
    """The 0-based blocks of each pipeline stage: ``train.stages`` under ``train.execution=pipeline``, else none.
    ``auto``, decided at launch from measured step times and the process count, is shown as one block per stage."""
    if execution_strategy(cfg) != "pipeline":
        return []
    n = len(parse_blocks(cfg.model.blocks))
    return parse_stages(cfg.train.stages, n) or [[k] for k in range(n)]


def balanced_blocks(cfg: Config, n: int = 4) -> str:
    """The grouping (``model.blocks``) of ``cfg``'s backbone stages into ``n`` contiguous blocks whose largest
    training FLOPs per image is the smallest: blocks to put on separate devices (a pipeline's slowest stage sets its
    pace). A block's cost is its stages' backbone FLOPs plus the head, projector and loss at its last stage, each
    counted on the model with one stage per block (``count_model``): trained blockwise for a stage that starts a
    block (its input needs no gradient), end to end for one inside a block, so the sum is the grouping's own count."""
    m = cfg.model
    if cfg.train.scheme == "end_to_end":
        raise ConfigError("--balance groups the blocks of a blockwise scheme; end to end trains one block")
    if m.block_projectors or m.block_head_dims or cfg.train.frozen_blocks:
        raise ConfigError("--balance prices every block with model.projector and model.head_dim, all trained: "
                          "remove model.block_projectors, model.block_head_dims and train.frozen_blocks, or give "
                          "model.blocks yourself (blockssl cost shows each block's FLOPs)")
    stages = stage_names(m.arch, BackboneOptions.of(m))
    if not 1 <= n <= len(stages):
        raise ConfigError(f"--balance {n}: choose 1 to {len(stages)} blocks, the stages of {m.arch}")
    single = apply_overrides(copy.deepcopy(cfg), [f"model.blocks={','.join(stages)}", "train.loss_blocks=all"],
                             ("model", "train"))
    parts = count_model(single).parts
    inside = count_model(end_to_end_config(single)).parts
    first = [parts[i]["backbone"].train_flops for i in range(len(stages))]
    inner = [0.0, *itertools.accumulate(inside[i]["backbone"].train_flops for i in range(len(stages)))]
    top = [sum(c.train_flops for part, c in parts[i].items() if part != "backbone") for i in range(len(stages))]

    def block(i: int, j: int) -> float:  # stages i..j-1
        return first[i] + inner[j] - inner[i + 1] + top[j - 1]

    # best[k][j]: the smallest largest block over groupings of the first j stages into k blocks, and its last cut
    best = [[(0.0, 0)] + [(math.inf, 0)] * len(stages)]
    for k in range(1, n + 1):
        best.append([(math.inf, 0)] * (len(stages) + 1))
        for j in range(k, len(stages) + 1):
            best[k][j] = min((max(best[k - 1][i][0], block(i, j)), i) for i in range(k - 1, j))
    cuts, j = [], len(stages)
    for k in range(n, 0, -1):
        i = best[k][j][1]
        cuts.append((i, j))
        j = i
    return ",".join(run_spec(stages[i:j]) for i, j in reversed(cuts))


def count_model(cfg: Config, device: torch.device | str = "meta") -> ModelCost:
    """Every count of ``cfg``'s model over one training step of ``train.batch_size`` random images of the dataset's
    shape. ``device``: the meta device counts without memory or arithmetic; a real one gives the same counts (a
    check of the meta path)."""
    info = dataset_info(cfg.data)
    batch = cfg.train.batch_size
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        with torch.device(device):
            model = build_model(cfg, info.channels, info.image_size).train()
        x1, x2 = (torch.randn(batch, info.channels, info.image_size, info.image_size, device=device) for _ in range(2))
        # Noise drawn as in training, from a CPU generator (the meta device has none); its values change no count.
        generators = {k: noise_generator(cfg.seed, 0, k, 0, torch.device("cpu")) for k in range(model.num_blocks)
                      } if cfg.noise.type != "none" else {}
        with model_accounting(model) as saved, _PartFlops(model) as flops:
            grad_peak = _train_step(model, x1, x2, execution_strategy(cfg) != "reference", flops, generators)
    per_view = 2 * batch
    trained = {id(p) for k in model.loss_blocks for p in model.optimizer_parameters(k)}
    saved_parts = saved.result().parts
    parts: dict[int, dict[str, Cost]] = {}
    for k, modules in enumerate(_part_modules(model)):
        parts[k] = {}
        for part in PARTS:
            name = f"block{k + 1}/{part}"
            params = [p for m in modules[part] for p in m.parameters()]
            learned = [p for p in params if id(p) in trained]
            forward = flops.forward_flops[name] / per_view
            parts[k][part] = Cost(
                params=sum(p.numel() for p in params), trained=sum(p.numel() for p in learned),
                forward_flops=forward, train_flops=forward + flops.backward_flops[name] / per_view,
                param_bytes=_bytes(params), grad_bytes=_bytes(learned),
                optimizer_bytes=optimizer_state_bytes(learned, cfg.train),
                saved_bytes=saved_parts.get(name, 0) / per_view)
    unattributed = (set(flops.forward_flops) | set(flops.backward_flops) | set(saved_parts)) - {
        f"block{k + 1}/{p}" for k in parts for p in PARTS}
    assert not unattributed, f"counts outside the model's parts: {sorted(unattributed)}"
    return ModelCost(parts, saved.result().peak / per_view, grad_peak)


def _train_step(model: BlockwiseSSL, x1: torch.Tensor, x2: torch.Tensor, lean: bool, flops: _PartFlops,
                generators: dict[int, torch.Generator]) -> int:
    """A training step's forwards and backwards in ``blockssl.execution``'s order, without the updates: lean (and
    pipeline) runs each block's forward and backward in turn, reference every forward, then one backward. Returns
    the most gradient bytes alive after a backward."""
    if lean:
        h1, h2, peak = x1, x2, 0
        for k in range(model.last_loss_block + 1):
            out = model.run_block(k, h1, h2, generator=generators.get(k))
            if out.loss is not None:
                with flops.backward():
                    out.loss.backward()
                peak = max(peak, _grad_bytes(model))
                model.zero_grad(set_to_none=True)  # as block k's update does before block k+1 runs
            h1, h2 = out.h1.detach(), out.h2.detach()
        return peak
    outs = model(x1, x2, generators=generators)
    with flops.backward():
        torch.stack([out.loss for out in outs if out.loss is not None]).sum().backward()
    return _grad_bytes(model)


def _grad_bytes(model: nn.Module) -> int:
    return _bytes(p.grad for p in model.parameters() if p.grad is not None)


def _part_modules(model: BlockwiseSSL) -> list[dict[str, list[nn.Module]]]:
    """Each block's modules by part (the loss has no parameters, the noise is no module)."""
    return [{"backbone": [m for name in model.block_stages[k] for m in model.backbone.stage_modules(name)],
             "noise": [], "head": [model.heads[k]],
             "projector": [model.projectors[str(k)]] if str(k) in model.projectors else [], "loss": []}
            for k in range(model.num_blocks)]


def _bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


_PART = "blockssl.part"  # the autograd node metadata key of the part whose forward created the node


class _PartFlops:
    """FLOPs counted by ``FlopCounterMode``, attributed to the parts of ``blockssl.memory.model_scopes``.

    In forward, to the part whose module runs (module hooks, as the saved-bytes accounting; what runs outside them
    belongs to the block's noise). In backward, to the part whose forward created the autograd node that runs: when a
    part's forward ends, the nodes behind its outputs that no earlier part claimed are tagged with it and switch the
    part from a node pre-hook. FlopCounterMode's own per-module breakdown follows backward by gradient hooks on module
    inputs and outputs instead, which misattributes here: a module run on both views is left when the first view's
    backward through it ends, and a block whose input needs no gradient is never left.
    """

    def __init__(self, model: BlockwiseSSL) -> None:
        self.scopes, self.unscoped = model_scopes(model)
        self.counter = FlopCounterMode(display=False)
        self.forward_flops: dict[str, int] = defaultdict(int)
        self.backward_flops: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.part = ""
        self.in_backward = False
        self.seen = 0  # FLOPs attributed so far
        self.handles: list[RemovableHandle] = []

    def __enter__(self) -> _PartFlops:
        for module, name in self.scopes:
            self.handles += [module.register_forward_pre_hook(self._enter(name)),
                             module.register_forward_hook(self._leave)]
        self.counter.__enter__()
        self.part = resolve_name(self.unscoped)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
                 ) -> None:
        self._flush()
        self.counter.__exit__(kind, error, tb)
        for handle in self.handles:
            handle.remove()

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Around a backward call: what it counts is backward FLOPs."""
        self._flush()
        self.in_backward = True
        try:
            yield
        finally:
            self._flush()
            self.in_backward = False
            self.part = resolve_name(self.unscoped)

    def _flush(self) -> None:
        """What was counted since the last flush belongs to the part running until now."""
        total = self.counter.get_total_flops()
        (self.backward_flops if self.in_backward else self.forward_flops)[self.part] += total - self.seen
        self.seen = total

    def _enter(self, name: Name) -> Callable[..., None]:
        def enter(_: nn.Module, inputs: Any) -> None:
            if self.in_backward:  # a stage recomputed by activation checkpointing: part of the node that needs it
                return
            self._end_part(inputs)
            self.stack.append(resolve_name(name))
            self.part = self.stack[-1]
        return enter

    def _leave(self, _: nn.Module, inputs: Any, outputs: Any) -> None:  # returning something would replace outputs
        if self.in_backward:
            return
        self._end_part(outputs)
        self.stack.pop()
        self.part = self.stack[-1] if self.stack else resolve_name(self.unscoped)

    def _end_part(self, tensors: Any) -> None:
        """The running part ends: the FLOPs so far are its own, and so are the unclaimed nodes behind ``tensors``."""
        self._flush()
        # the modules scoped here take and return tensors, or tuples of them (the loss takes both views)
        nodes = [t.grad_fn for t in (tensors if isinstance(tensors, tuple) else (tensors,))
                 if isinstance(t, torch.Tensor)]
        while nodes:
            node = nodes.pop()
            if node is None or _PART in _metadata(node):
                continue
            _metadata(node)[_PART] = self.part
            node.register_prehook(self._switch(self.part))
            nodes += [next_node for next_node, _ in node.next_functions]

    def _switch(self, part: str) -> Callable[..., None]:
        def switch(_: Any) -> None:
            self._flush()
            self.part = part
        return switch


def _metadata(node: Node) -> dict[str, str]:
    return cast(dict[str, str], node.metadata)  # a property at run time; torch's stub declares a method


def format_cost(report: CostReport) -> str:
    """The report as plain-text tables: every block's parts, the totals beside the end-to-end model's, and the
    pipeline stages."""
    cfg, model, e2e = report.cfg, report.model, report.end_to_end
    m, t = cfg.model, cfg.train
    projectors = ", ".join(dict.fromkeys(m.block_projectors or [m.projector]))
    head = f"{m.head} {m.head_grid}x{m.head_grid}" if m.head == "cbe_pooled" else m.head
    lines = [f"{m.arch} (width {m.width:g}) at {dataset_info(cfg.data).image_size} px, blocks {m.blocks}, head {head}, "
             f"projectors {projectors or 'none'}, {cfg.loss.name}",
             f"scheme {t.scheme}, {execution_strategy(cfg)} execution, {t.optimizer}; counted by torch on one training "
             f"step of {t.batch_size} images", ""]
    rows = []
    for k, parts in model.parts.items():
        rows += [[str(k + 1), part, *_cells(c)] for part, c in parts.items() if c != Cost()]
        rows.append([str(k + 1), "all", *_cells(model.block(k))])
    rows.append(["all", "all", *_cells(model.total)])
    lines += _table(["block", "part", *COLUMNS], rows, left=2)
    totals = [["this configuration", *_cells(model.total), _binary(model.saved_peak)],
              ["end to end", *_cells(e2e.total), _binary(e2e.saved_peak)],
              ["ratio", *(_ratio(a, b) for a, b in zip([*_values(model.total), model.saved_peak],
                                                      [*_values(e2e.total), e2e.saved_peak], strict=True))]]
    lines += ["", *_table(["totals", *COLUMNS, "saved peak"], totals, left=1),
              f"end to end: the same backbone with {' '.join(END_TO_END[:3])}",
              "(one loss at the last block, its output pooled into the projector: the global average of a feature map,",
              "a ViT's class token; full backpropagation)",
              "", *_memory_lines(report)]
    if report.stages:
        total = model.total.train_flops
        stage_rows = [[str(i + 1), "+".join(str(k + 1) for k in ks), _si(c.train_flops),
                       f"{100 * c.train_flops / total:.1f}%", _si(c.params), _binary(c.state_bytes)]
                      for i, ks in enumerate(report.stages) for c in [model.blocks(ks)]]
        lines += ["", *_table(["stage", "blocks", "train FLOPs", "share", "params", "params+grads+optimizer"],
                              stage_rows, left=2)]
        replicas = report.devices // len(report.stages)
        if replicas:
            slowest = max(model.blocks(ks).train_flops for ks in report.stages)
            lines += [f"{len(report.stages)} stages x {replicas} replicas on {len(report.stages) * replicas} devices "
                      f"(--devices): {replicas * e2e.total.train_flops / slowest:.1f}x one device training end to "
                      f"end, by training FLOPs (the slowest stage sets the pace); data-parallel end to end: "
                      f"{len(report.stages) * replicas}x. Links, optimizer steps and the pipeline's fill are not "
                      "counted"]
    if t.scheme == "sequential":
        lines.append("sequential: each block as it trains in its phase; phase k also runs blocks 1..k-1 forward")
    lines += ["",
              "per image and view: the step's counts over both views divided by twice the batch (a step costs twice "
              "these per image)",
              "FLOPs: matrix products and convolutions, 2 per multiply-add (torch.utils.flop_counter); train = forward "
              "+ backward",
              f"optimizer: the state {t.optimizer} keeps; all-reduce: the gradient bytes data parallelism sums per "
              "step",
              "saved: bytes saved for backward, in float32; saved peak: the most held at once in the step"]
    return "\n".join(lines)


def _memory_lines(report: CostReport) -> list[str]:
    """The memory estimate per device, this configuration's beside end to end's, and what it leaves out."""
    batch, counted = device_batch(report.cfg, report.devices), report.cfg.train.batch_size
    mine, e2e = ([*dataclasses.astuple(m), m.total] for m in (device_memory(c, batch)
                                                              for c in (report.model, report.end_to_end)))
    rows = [["this configuration", *map(_binary, mine)], ["end to end", *map(_binary, e2e)],
            ["ratio", *(_ratio(a, b) for a, b in zip(mine, e2e, strict=True))]]
    return [f"memory per device, batch {batch} ({counted} over {report.devices} devices, --devices), an estimate in "
            "float32",
            *_table(["per device", "weights", "gradients", "optimizer", "activations", "total"], rows, left=1),
            f"weights + gradient peak + optimizer state + saved peak x {batch} x 2 views, for a device holding the "
            "whole model" + ("; a pipeline stage holds its blocks' state (below)" if report.stages else ""),
            "left out: allocator caching, temporaries of the largest op, the data loader, the online probe; per-batch",
            f"terms (BatchNorm statistics, the loss's D x D matrices) counted as spread over {counted} images"]


COLUMNS = ["params", "trained", "fwd FLOPs", "train FLOPs", "optimizer", "all-reduce", "saved"]


def _values(c: Cost) -> list[float]:
    return [c.params, c.trained, c.forward_flops, c.train_flops, c.optimizer_bytes, c.grad_bytes, c.saved_bytes]


def _cells(c: Cost) -> list[str]:
    return [_si(c.params), _si(c.trained), _si(c.forward_flops), _si(c.train_flops), _binary(c.optimizer_bytes),
            _binary(c.grad_bytes), _binary(c.saved_bytes)]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _si(x: float) -> str:
    """A count with an SI prefix (15.82 G)."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}"
    return f"{x:.0f}"


def _binary(x: float) -> str:
    """Bytes with a binary prefix (1.18 GiB)."""
    for prefix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}"
    return f"{x:.0f} B"


def _table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Columns padded to their widest cell: the first ``left`` aligned left, the numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [header, *rows]]
