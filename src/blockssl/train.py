"""Pretraining: one loop in a fixed order (batch, lr, step, diagnostics, online probe, log, save).

How a step runs the blocks (reference, lean) is ``blockssl.execution``; where a process's batches come from and
its outputs go (its loader, or a pipeline's neighbouring stages), ``blockssl.strategy``; what a run directory holds,
``blockssl.rundir``.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blockssl import dist, rundir
from blockssl.checkpoint import CheckpointError, load_checkpoint
from blockssl.config import Config
from blockssl.config.plan import Phase, Plan, plan
from blockssl.data.datasets import dataset_info
from blockssl.diagnostics import add_diagnostics, snapshot
from blockssl.eval.online import OnlineProbe
from blockssl.execution import Step, StepTerms, Trainer, build_optimizers
from blockssl.loggers import Logger, Loggers, check_installed, training_loggers
from blockssl.memory import model_accounting
from blockssl.method import BlockwiseSSL, build_model
from blockssl.optim import lr_factor, set_lr
from blockssl.pipeline import Layout, init_groups, measure_block_seconds, plan_layout, single_stage
from blockssl.runtime import autocast_context, progress_bar, resolve_device, seed_everything
from blockssl.strategy import Batch, CheckpointPart, Local, build_strategy


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; resume the run to continue."""


# Embedding spread ("std/block" in metrics, 1 = spread like uniform points on the sphere) below which a block
# is reported as collapsing.
COLLAPSE_STD = 0.05


def pretrain(cfg: Config, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
             command: list[str] | None = None) -> Path:
    """Train ``cfg`` into ``cfg.out``; returns the run directory.

    ``resume`` continues from ``checkpoints/last.pt``. ``stop_after`` runs at most that many steps in this call,
    then checkpoints and returns, as a preempted job does. Under ``train.execution=pipeline`` each process runs
    the blocks of its stage (``blockssl.pipeline``); the run directory is the same as any run's.
    """
    check_installed(cfg.train.loggers)  # before any work
    started_group = dist.init_from_environment(cfg.train.dist_timeout_s)
    device = resolve_device(cfg.train.device)
    scheme, info = plan(cfg), dataset_info(cfg.data)
    layout = _layout(cfg, scheme, device)
    out = rundir.prepare(cfg, resume, overwrite) if dist.is_main_process() else Path(cfg.out)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt") if resume else None  # fail before any work
    strategy = build_strategy(cfg, scheme, layout, device)
    seed_everything(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg, info.channels, info.image_size)
    model, initial = _place(model, cfg, layout, device)
    per_epoch = strategy.sampler.steps_per_epoch
    total = min(cfg.train.epochs * per_epoch, cfg.train.max_steps or cfg.train.epochs * per_epoch)
    phases = scheme.phases(total)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    # Online linear evaluation: its own parameters and optimizer, fed detached features; each stage trains the
    # classifiers of its blocks.
    probe = (OnlineProbe(model.feature_dims, info.num_classes, cfg.online_probe).to(device)
             if cfg.online_probe.enabled else None)
    step, counts = _restore(ckpt, model, scaler, probe, cfg)
    if ckpt is None and dist.is_main_process():
        rundir.write_start(out, cfg, layout.stages, command)
    dist.barrier()  # the run directory exists before any process writes to it
    # Only the writer logs; resumed, its loggers drop what was logged after the checkpoint.
    loggers = training_loggers(cfg, out, step if ckpt is not None else None) if strategy.writes else Loggers()
    progress = progress_bar(total=total, initial=step, desc="pretrain", unit="step", enabled=cfg.train.progress,
                            main=strategy.writes)
    meter, tally = Throughput(cfg.train.batch_size), Tally(device)
    start, stop, saved = step, 0, None  # stop: why this call stops (0 not yet, -1 stop_after reached, else a signal)
    with StopSignals() as signals, loggers, closing(strategy):
        for index, phase, trainer, batch in _schedule(phases, step, strategy, lambda i, p: _trainer(
                model, cfg, layout, p, scaler, device, ckpt if ckpt is not None and ckpt["phase"] == i else None)):
            lr = _set_lr(trainer, phase, step, total, per_epoch, cfg)
            probing = probe is not None and step % cfg.online_probe.every == 0
            logging = (step + 1) % cfg.train.log_every == 0 or step + 1 == phase.end
            result = _step(strategy, trainer, batch, step, probing, logging, cfg, initial, probe)
            step += 1
            terms = batch.terms.merge(result.terms)
            if logging and probe is not None:
                terms.add_online(probe.window_metrics())
            stop = strategy.stop(batch, signals.requested, stop_after is not None and step - start >= stop_after)
            strategy.send(result, batch, terms, stop)
            meter.tick()
            every = cfg.train.checkpoint_every
            saving = (step % every == 0 if every else step % per_epoch == 0) or step == phase.end or stop != 0
            if strategy.writes:
                _record(terms, tally, counts, logging, saving, loggers, progress, step, step / per_epoch, lr, meter)
            if saving:
                saved = _save(strategy, out, cfg, model, trainer, scaler, probe, counts, step, index) or saved
            if stop:
                break
    strategy.finish()
    progress.close()
    if dist.is_main_process() and step >= total:  # saved: the merged checkpoint, also of a pipeline's later stages
        rundir.write_backbone(out, saved.model if saved is not None else model.state_dict(), cfg.model.arch)
    dist.barrier()
    if started_group:
        torch.distributed.destroy_process_group()
    if stop > 0:
        raise Preempted(f"stopped by signal {stop} at step {step}; checkpoint saved. Continue with: "
                        f"blockssl pretrain --resume {out}")
    return out


def _layout(cfg: Config, scheme: Plan, device: torch.device) -> Layout:
    """This process's place: a pipeline stage (and its data-parallel group), or one replica of every block."""
    n = scheme.num_blocks
    layout = (plan_layout(cfg, n, dist.world_size(), dist.rank(), lambda: measure_block_seconds(cfg, device))
              if scheme.execution == "pipeline" else single_stage(n, dist.world_size(), dist.rank()))
    init_groups(layout)
    return layout


def _place(model: BlockwiseSSL, cfg: Config, layout: Layout, device: torch.device
           ) -> tuple[BlockwiseSSL, dict[int, list[torch.Tensor]]]:
    """The model on its device, the same in every process, compiled when asked; and the initial weights that
    ``weight_change`` is measured from (the seed's, also when resuming: taken before a checkpoint is loaded)."""
    if cfg.train.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    # A pipeline stage holds only its own blocks, heads and projectors on its device; the rest stays on the CPU.
    modules = [m for k in layout.blocks for m in model.block_modules(k)] if layout.pipelined else [model]
    for m in modules:
        m.to(device)
        dist.broadcast_state(m)
        m.to(memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    initial = snapshot(model, layout.blocks)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.compile:  # in place, stage by stage: parameter names and checkpoints are unchanged
        for k in layout.blocks:
            for module in model.block_modules(k, compilable=True):
                module.compile()
    return model, initial


def _restore(ckpt: dict[str, Any] | None, model: BlockwiseSSL, scaler: torch.amp.GradScaler,
             probe: OnlineProbe | None, cfg: Config) -> tuple[int, dict[str, int]]:
    """The step to start from and the run's counts (cumulative, kept in checkpoints), with the checkpoint's
    weights, gradient scaler and online probe loaded when resuming."""
    if ckpt is None:
        return 0, {"nonfinite_skipped": 0, "bad_images_replaced": 0}
    model.load_state_dict(ckpt["model"])
    scaler.load_state_dict(ckpt["scaler"])
    if probe is not None and "online_probe" in ckpt:  # absent: the probe was switched on at this resume
        probe.load_checkpoint_state(ckpt["online_probe"], cfg.online_probe)
    return ckpt["step"], ckpt["counts"]


def _schedule(phases: list[Phase], step: int, strategy: Local, trainer: Callable[[int, Phase], Trainer]
              ) -> Iterator[tuple[int, Phase, Trainer, Batch]]:
    """Every remaining step's phase index, phase, trainer (built when its phase starts) and batch."""
    for index, phase in enumerate(phases):
        if phase.end > step:
            phase_trainer = trainer(index, phase)
            for batch in strategy.batches(max(step, phase.start), phase.end):
                yield index, phase, phase_trainer, batch


def _trainer(model: BlockwiseSSL, cfg: Config, layout: Layout, phase: Phase, scaler: torch.amp.GradScaler,
             device: torch.device, ckpt: dict[str, Any] | None) -> Trainer:
    """The phase's trainable blocks, its optimizers (restored from ``ckpt``, a checkpoint of this phase) and the
    per-block unit of work of this process's blocks."""
    model.loss_blocks, model.frozen = phase.loss_blocks, phase.frozen
    optimizers = build_optimizers(model, cfg.train, layout.blocks)
    if ckpt is not None:
        _load_optimizers(optimizers, ckpt["optimizers"], Path(cfg.out))
    model.train()
    return Trainer(model, optimizers, scaler, autocast_context(cfg.train.amp, device), cfg.seed,
                   replica=layout.replica, skip_nonfinite=cfg.train.on_nonfinite == "skip",
                   stage_blocks=[k for k in layout.blocks if k <= model.last_loss_block])


def _set_lr(trainer: Trainer, phase: Phase, step: int, total: int, per_epoch: int, cfg: Config) -> float:
    """Warm-up and cosine over the phase, a pure function of the step; returns the peak group's lr."""
    length = phase.end - phase.start
    warmup = round(cfg.train.warmup_epochs * per_epoch * length / total)
    factor = lr_factor(step - phase.start, length, warmup, cfg.train.min_lr_ratio)
    return max((set_lr(o, factor) for o in trainer.optimizers.values()), default=0.0)


def _step(strategy: Local, trainer: Trainer, batch: Batch, step: int, probing: bool, logging: bool, cfg: Config,
          initial: dict[int, list[torch.Tensor]], probe: OnlineProbe | None) -> Step:
    """One step of this process's blocks; at logging steps with their diagnostics (and saved bytes when asked),
    and the online probe's update on the features where it probes."""
    with model_accounting(trainer.model) if cfg.train.log_saved_memory and logging else nullcontext() as saved:
        result = strategy.step(trainer, batch, step, probing or logging)  # features: online probe, RankMe
    if saved is not None:
        for k, size in saved.result().blocks().items():
            result.terms.block(k).saved_mb = size / 2**20
    if logging:
        add_diagnostics(result.terms, trainer.model, initial, trainer.blocks, result.features)
    if probe is not None and probing and not result.terms.skipped and result.features:
        probe.step(result.features, batch.labels, first=trainer.blocks[0])  # non-finite features would poison it
    return result


def _save(strategy: Local, out: Path, cfg: Config, model: BlockwiseSSL, trainer: Trainer,
          scaler: torch.amp.GradScaler, probe: OnlineProbe | None, counts: dict[str, int], step: int, phase: int
          ) -> CheckpointPart | None:
    """The run's checkpoint, gathered from every process that holds a part of it and written by rank 0, which
    returns what it wrote (None elsewhere)."""
    part = strategy.checkpoint(model, trainer.optimizers, probe, counts)
    if part is not None:
        rundir.save(out, cfg, step=step, phase=phase, model=part.model, optimizers=part.optimizers,
                    scaler=scaler.state_dict(), counts=part.counts or counts, online_probe=part.online_probe)
    return part


class Tally:
    """Skipped updates and replaced images not yet counted, summed on the device: read on the host only when
    logging or saving."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, terms: StepTerms) -> None:
        self.sums[0] += terms.skipped
        self.sums[1] += terms.replaced

    def read(self) -> tuple[int, int]:
        skipped, replaced = (int(v) for v in self.sums.tolist())
        self.sums.zero_()
        return skipped, replaced


def _record(terms: StepTerms, tally: Tally, counts: dict[str, int], logging: bool, saving: bool, loggers: Logger,
            progress: tqdm, step: int, epoch: float, lr: float, meter: Throughput) -> None:
    """The writer's bookkeeping of a step: counts, progress, and at logging steps the metrics line."""
    tally.add(terms)
    progress.update(1)
    if logging or saving:
        skipped, replaced = tally.read()
        counts["nonfinite_skipped"] += skipped
        counts["bad_images_replaced"] += replaced
    if logging:
        _log(loggers, {"step": step, "epoch": epoch, "lr": lr, **terms.logged(),
                       "images_per_sec": meter.rate(), **counts}, progress)


@contextmanager
def closing(strategy: Local) -> Iterator[Local]:
    try:
        yield strategy
    finally:
        strategy.close()


class Throughput:
    """Images per second since the last reading."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step, self.steps, self.start = images_per_step, 0, time.perf_counter()

    def tick(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.steps * self.images_per_step / max(now - self.start, 1e-9)
        self.steps, self.start = 0, now
        return value


def _log(loggers: Logger, record: dict[str, float], progress: tqdm) -> None:
    """Log (metrics.jsonl and the other loggers), show in the progress bar, and warn on collapsing blocks."""
    loggers.log(record)
    for key, value in record.items():
        if key.startswith("std/") and value < COLLAPSE_STD:
            warnings.warn(f"{key.removeprefix('std/')}: embedding spread {value:.3g} at step {record['step']} "
                          "(1 = spread over the sphere, 0 = collapsed); check its loss and learning rate",
                          stacklevel=2)
    progress.set_postfix({k.removeprefix("loss/"): f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
                         | {"img/s": f"{record['images_per_sec']:.0f}"})


class StopSignals:
    """SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_optimizers(optimizers: dict[int, torch.optim.Optimizer], saved: dict[str, Any], out: Path) -> None:
    """This process's optimizers (a pipeline stage's: those of its blocks) from a checkpoint's."""
    missing = sorted(str(k) for k in optimizers if str(k) not in saved)
    if missing:
        raise CheckpointError(f"{out}: the checkpoint holds optimizers {sorted(saved)}, not those of loss blocks "
                              f"{missing}: it was written before every execution had one optimizer per loss block; "
                              "finish the run with the blockssl version that started it")
    for key, opt in optimizers.items():
        opt.load_state_dict(saved[str(key)])
