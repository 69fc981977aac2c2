"""The scheme resolved once into a plan: which blocks carry a loss, whether block inputs are detached, how a step runs
the blocks, the pipeline's stages, and the phases of training (the sequential scheme has one per block).

``train.scheme`` (end to end, simultaneous, sequential), ``train.loss_blocks``, ``train.detach``,
``train.frozen_blocks``, ``train.execution`` and ``train.stages`` are presets and switches; ``plan`` turns them into
what ``build_model`` and the training loop read, and refuses combinations that cannot work (``blockssl.config``
resolves it whenever a configuration is loaded, so that happens before any compute).
"""

from __future__ import annotations

from dataclasses import dataclass

from blockssl.config.checks import parse_blocks
from blockssl.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Phase:
    """A stretch of steps with fixed trainable blocks: one for every scheme but sequential, which has one per block."""

    loss_blocks: list[int]
    frozen: set[int]
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """Blocks numbered from 0. ``trained``: the blocks a loss trains in some phase (they get a projector and a loss
    module); ``stages``: a pipeline's blocks per stage, None when not pipelined or balanced by measurement
    (``train.stages=auto``)."""

    scheme: str
    num_blocks: int
    loss_blocks: list[int]
    trained: list[int]
    frozen: set[int]
    detach: bool
    execution: str  # reference, lean or pipeline
    stages: list[list[int]] | None

    def phases(self, total_steps: int) -> list[Phase]:
        """The sequential scheme gives each block an equal share of the steps, earlier blocks frozen."""
        if self.scheme == "sequential":
            bounds = [total_steps * k // self.num_blocks for k in range(self.num_blocks + 1)]
            return [Phase([k], set(range(k)), bounds[k], bounds[k + 1]) for k in range(self.num_blocks)]
        return [Phase(self.loss_blocks, self.frozen, 0, total_steps)]


def plan(cfg: Config) -> Plan:
    """The plan of a configuration; a ConfigError names the switch that cannot work with the others."""
    n = len(parse_blocks(cfg.model.blocks))
    chosen, execution = loss_blocks(cfg), execution_strategy(cfg)
    stages = parse_stages(cfg.train.stages, n)  # checked whatever the execution: a typo is refused at once
    return Plan(cfg.train.scheme, n, chosen, list(range(n)) if cfg.train.scheme == "sequential" else chosen,
                {b - 1 for b in cfg.train.frozen_blocks}, detach_inputs(cfg), execution,
                stages if execution == "pipeline" else None)


def loss_blocks(cfg: Config) -> list[int]:
    """0-based indices of the blocks that carry a loss."""
    n = len(parse_blocks(cfg.model.blocks))
    spec = cfg.train.loss_blocks.strip()
    if spec == "auto":
        spec = "last" if cfg.train.scheme == "end_to_end" else "all"
    if spec == "all":
        chosen = list(range(n))
    elif spec == "last":
        chosen = [n - 1]
    else:
        try:
            chosen = sorted({int(s) - 1 for s in spec.split(",")})
        except ValueError:
            raise ConfigError(f"train.loss_blocks: {spec!r}; use auto, all, last or block numbers like 1,2,4") from None
    frozen = {b - 1 for b in cfg.train.frozen_blocks}
    chosen = [k for k in chosen if k not in frozen]
    if not chosen or any(not 0 <= k < n for k in chosen):
        raise ConfigError(f"train.loss_blocks: {cfg.train.loss_blocks!r} selects no valid trainable block of 1..{n}")
    return chosen


def detach_inputs(cfg: Config) -> bool:
    """The stop-gradient switch: on for blockwise schemes, off for end-to-end, unless set explicitly."""
    if cfg.train.detach == "auto":
        return cfg.train.scheme != "end_to_end"
    return cfg.train.detach == "true"


def execution_strategy(cfg: Config) -> str:
    """The execution strategy, ``reference``, ``lean`` or ``pipeline``: per-block backward and step (lean, pipeline)
    is the same update as the reference only when no gradient crosses blocks."""
    t = cfg.train
    if t.execution in ("lean", "pipeline") and not detach_inputs(cfg):
        raise ConfigError(f"train.execution={t.execution} needs detached block inputs (train.detach=true or a "
                          "blockwise scheme): with gradients crossing blocks, one block's step would change "
                          "another's gradient; use train.execution=reference or auto")
    if t.execution == "pipeline" and t.scheme == "sequential":
        raise ConfigError("train.execution=pipeline: the sequential scheme trains one block at a time, so stages "
                          "would wait for each other; use train.scheme=simultaneous or another execution")
    if t.execution == "auto":
        return "lean" if detach_inputs(cfg) else "reference"
    return t.execution


def parse_stages(spec: str, num_blocks: int) -> list[list[int]] | None:
    """``train.stages`` -> the 0-based blocks of each pipeline stage; None for ``auto`` (decided by measurement)."""
    if spec == "auto":
        return None
    if spec == "blocks":
        return [[k] for k in range(num_blocks)]
    try:
        stages = [[int(b) - 1 for b in group.split("+")] for group in spec.split(",")]
    except ValueError:
        stages = []
    if [k for stage in stages for k in stage] != list(range(num_blocks)):
        raise ConfigError(f"train.stages: {spec!r} must group the blocks 1..{num_blocks} in order, each once, into "
                          "stages separated by ',' (e.g. '1+2,3+4'), or be 'blocks' (one per stage) or 'auto'")
    return stages
