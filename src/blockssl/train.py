"""Pretraining: one loop in a fixed order (batch, lr, step of the execution strategy, online probe, log, save).

How a step runs the blocks (reference, lean, pipeline) is ``blockssl.execution``; a pipeline's stages and
what they send each other, ``blockssl.pipeline``.
"""

from __future__ import annotations

import json
import platform
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blockssl import dist
from blockssl.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    save_checkpoint,
)
from blockssl.config import (
    Config,
    ConfigError,
    dump_config,
    execution_strategy,
    loss_blocks,
    parse_blocks,
    to_dict,
)
from blockssl.data.datasets import dataset_info
from blockssl.data.loader import EpochSampler, TwoViews, pretrain_loader, shutdown_workers, two_view_dataset
from blockssl.data.photometric import to_device
from blockssl.diagnostics import add_diagnostics, snapshot
from blockssl.eval.online import OnlineProbe
from blockssl.execution import HEADER, STRATEGIES, Trainer, add_terms, build_optimizers, decode_terms, encode_record
from blockssl.loggers import OPTIONAL, Logger, Loggers, check_installed, training_loggers
from blockssl.memory import model_accounting
from blockssl.method import BlockwiseSSL, build_model
from blockssl.optim import lr_factor, set_lr
from blockssl.pipeline import (
    Layout,
    Link,
    Message,
    init_groups,
    measure_block_seconds,
    plan_layout,
    single_stage,
)
from blockssl.runtime import (
    autocast_context,
    backbone_state_dict,
    git_revision,
    progress_bar,
    resolve_device,
    seed_everything,
)

# What a run directory holds (evaluation adds probe.json, robustness.*, report.md).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints", "backbone.pt")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; resume the run to continue."""


# Embedding spread ("std/block" in metrics, 1 = spread like uniform points on the sphere) below which a block
# is reported as collapsing.
COLLAPSE_STD = 0.05


@dataclass
class Phase:
    """A stretch of steps with fixed trainable blocks: one for every scheme but sequential, which has one per block."""

    loss_blocks: list[int]
    frozen: set[int]
    start: int
    end: int


def plan_phases(cfg: Config, num_blocks: int, total_steps: int) -> list[Phase]:
    """The sequential scheme gives each block an equal share of the steps, earlier blocks frozen."""
    if cfg.train.scheme == "sequential":
        bounds = [total_steps * k // num_blocks for k in range(num_blocks + 1)]
        return [Phase([k], set(range(k)), bounds[k], bounds[k + 1]) for k in range(num_blocks)]
    return [Phase(loss_blocks(cfg), {b - 1 for b in cfg.train.frozen_blocks}, 0, total_steps)]


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool = False) -> Path:
    """Create the run directory, or check that resuming it is consistent. Raises before any compute."""
    out = Path(cfg.out)
    if overwrite and not resume:
        for name in (*RUN_FILES, *OPTIONAL):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    saved = out / "config.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume {out}: no config.yaml there; is it a blockssl run directory?")
        return out
    if saved.is_file():
        raise ConfigError(f"out={out} already holds a run; continue it with `blockssl pretrain --resume {out}`, "
                          "choose another out=, or pass --overwrite to delete it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _pretraining_set(cfg: Config, layout: Layout) -> tuple[TwoViews | None, int]:
    """The two-view pretraining set where images are read (every process but a pipeline's later stages), and its
    length everywhere. Later stages receive activations: they take the length (for the steps per epoch) from rank 0,
    a first-stage process, rather than scan the dataset (ImageNet's 1.28 M files) for it. What the first stage
    raises, every process raises, instead of waiting for a broadcast that never comes."""
    if not layout.pipelined:
        everywhere = two_view_dataset(cfg)
        return everywhere, len(everywhere)
    views: TwoViews | None = None
    error: Exception | None = None
    if layout.first:
        try:
            views = two_view_dataset(cfg)
        except Exception as e:  # re-raised below, once every process knows
            error = e
    size, failure = dist.broadcast_object((len(views) if views is not None else 0,
                                           None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"the first pipeline stage could not read the pretraining set: {failure}")
    return views, size


def pretrain(cfg: Config, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
             command: list[str] | None = None) -> Path:
    """Train ``cfg`` into ``cfg.out``; returns the run directory.

    ``resume`` continues from ``checkpoints/last.pt``. ``stop_after`` runs at most that many steps in this call,
    then checkpoints and returns, as a preempted job does. Under ``train.execution=pipeline`` each process runs
    the blocks of its stage (``blockssl.pipeline``); the run directory is the same as any run's.
    """
    check_installed(cfg.train.loggers)  # before any work
    started_group = dist.init_from_environment(cfg.train.dist_timeout_s)
    main = dist.is_main_process()
    device = resolve_device(cfg.train.device)
    info = dataset_info(cfg.data)
    strategy = execution_strategy(cfg)
    num_blocks = len(parse_blocks(cfg.model.blocks))
    layout = (plan_layout(cfg, num_blocks, dist.world_size(), dist.rank(), lambda: measure_block_seconds(cfg, device))
              if strategy == "pipeline" else single_stage(num_blocks, dist.world_size(), dist.rank()))
    init_groups(layout)
    out = prepare_run_dir(cfg, resume, overwrite) if main else Path(cfg.out)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt") if resume else None  # fail before any work
    views, size = _pretraining_set(cfg, layout)
    seed_everything(cfg.seed)  # the same initial weights in every process
    sampler = EpochSampler(size, cfg.train.batch_size, cfg.seed, layout.replica, layout.replicas)
    loader = pretrain_loader(views, sampler, num_workers=cfg.data.num_workers,
                             pin_memory=cfg.data.pin_memory and device.type == "cuda",
                             persistent_workers=cfg.data.persistent_workers) if views is not None else None
    model = build_model(cfg, info.channels, info.image_size)
    if cfg.train.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    # A pipeline stage holds only its own blocks, heads and projectors on its device; the rest stays on the CPU.
    modules = [m for k in layout.blocks for m in model.block_modules(k)] + [model.loss] if layout.pipelined \
        else [model]
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for m in modules:
        m.to(device)
        dist.broadcast_state(m)
        m.to(memory_format=memory_format)
    # What weight_change/block{k} is measured from: the seed's initialisation, also when resuming (taken before the
    # checkpoint is loaded).
    initial = snapshot(model, layout.blocks)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.compile:  # in place, stage by stage: parameter names and checkpoints are unchanged
        for k in layout.blocks:
            for module in model.block_modules(k, compilable=True):
                module.compile()

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    phases = plan_phases(cfg, model.num_blocks, total_steps)
    step_fn = STRATEGIES[strategy]
    autocast = autocast_context(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    # Online linear evaluation: its own parameters and optimizer, fed detached features; each stage trains the
    # classifiers of its blocks.
    probe = (OnlineProbe(model.feature_dims, info.num_classes, cfg.online_probe).to(device)
             if cfg.online_probe.enabled else None)
    writer = layout.last and layout.replica == 0  # the process that logs: it sees every block's terms
    link = Link(layout, device, cfg.train.in_flight) if layout.pipelined else None

    step = 0
    counts = {"nonfinite_skipped": 0, "bad_images_replaced": 0}  # cumulative over the run, kept in checkpoints
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        counts = ckpt["counts"]
        if probe is not None and "online_probe" in ckpt:  # absent: the probe was switched on at this resume
            probe.load_checkpoint_state(ckpt["online_probe"], cfg.online_probe)
    elif main:
        (out / "config.yaml").write_text(dump_config(cfg))
        # The command as typed, its program named "blockssl": the interpreter's argv[0] is an absolute path
        # (the console script's or __main__.py's), which would tie a committed run.json to one machine.
        run_info = {"command": ["blockssl", *(command or sys.argv)[1:]], "git_revision": git_revision(),
                    "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
                    "world_size": dist.world_size(), "stages": [[k + 1 for k in g] for g in layout.stages],
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    dist.barrier()  # the run directory exists before any process writes to it

    # Only the writer logs; resumed, its loggers drop what was logged after the checkpoint.
    loggers = training_loggers(cfg, out, step if ckpt is not None else None) if writer else Loggers()
    progress = progress_bar(total=total_steps, initial=step, desc="pretrain", unit="step",
                            enabled=cfg.train.progress, main=writer)
    meter = Throughput(cfg.train.batch_size)
    steps_this_call = 0
    tallies = torch.zeros(2, dtype=torch.float64, device=device)  # skipped updates, replaced images: not yet counted
    stop = 0  # why this call stops: 0 not yet, -1 stop_after reached, else the signal received
    batches = None
    try:
        with StopSignals() as signals, loggers:
            for phase_index, phase in enumerate(phases):
                if step >= phase.end or stop:
                    continue
                model.loss_blocks, model.frozen = phase.loss_blocks, phase.frozen
                optimizers = build_optimizers(model, cfg.train, layout.blocks)
                if ckpt is not None and ckpt["phase"] == phase_index:
                    _load_optimizers(optimizers, ckpt["optimizers"], out)
                blocks = [k for k in layout.blocks if k <= model.last_loss_block]
                trainer = Trainer(model, optimizers, scaler, autocast, cfg.seed, replica=layout.replica,
                                  skip_nonfinite=cfg.train.on_nonfinite == "skip", stage_blocks=blocks)
                model.train()
                phase_steps = phase.end - phase.start
                warmup = round(cfg.train.warmup_epochs * steps_per_epoch * phase_steps / total_steps)
                while step < phase.end and not stop:
                    epoch, step_in_epoch = divmod(step, steps_per_epoch)
                    sampler.start(epoch, step_in_epoch)
                    batches = iter(loader) if loader is not None else None
                    for _ in range(step_in_epoch, steps_per_epoch):
                        if batches is not None:
                            x1, x2, labels, replaced = next(batches)
                            record = encode_record(num_blocks, device)
                            record[HEADER.index("replaced")] = float(replaced.sum())
                            assert views is not None
                            x1 = to_device(views.transforms[0], x1, device, memory_format)  # colour ops done here when
                            x2 = to_device(views.transforms[1], x2, device, memory_format)  # data.photometric=device
                        else:
                            assert link is not None
                            msg = link.receive(num_blocks)
                            x1, x2, labels, record = msg.h1, msg.h2, msg.labels, msg.record
                        factor = lr_factor(step - phase.start, phase_steps, warmup, cfg.train.min_lr_ratio)
                        lr = max((set_lr(opt, factor) for opt in optimizers.values()), default=0.0)
                        probing = probe is not None and step % cfg.online_probe.every == 0
                        last = step + 1 == phase.end
                        logging = (step + 1) % cfg.train.log_every == 0 or last
                        measure = cfg.train.log_saved_memory and logging
                        with model_accounting(model) if measure else nullcontext() as saved:
                            result = step_fn(trainer, x1, x2, step, probing or logging)  # features: probe, RankMe
                        if saved is not None:
                            result.result.saved = saved.result().blocks()
                        if logging:
                            add_diagnostics(result.result, model, initial, blocks, result.features)
                        if probe is not None and probing and not result.result.skipped and result.features:
                            probe.step(result.features, labels, first=blocks[0])  # non-finite features would poison it
                        step += 1
                        steps_this_call += 1
                        online = probe.window_metrics() if probe is not None and logging else {}
                        add_terms(record, result.result, online)
                        if layout.first:  # decides for the whole pipeline: later stages stop at the same step
                            if dist.any_process(signals.requested):
                                stop = signals.requested or int(signal.SIGTERM)  # or another replica was signalled
                            elif stop_after is not None and steps_this_call >= stop_after:
                                stop = -1
                            record[HEADER.index("stop")] = stop
                        else:  # read on the host, like the shape in the batch's header: 2 small reads per step
                            stop = int(record[HEADER.index("stop")])
                        if link is not None and not layout.last:
                            link.send(Message(*result.outputs, labels.to(device, non_blocking=True), record))
                        meter.tick()
                        every = cfg.train.checkpoint_every
                        saving = (step % every == 0 if every else step % steps_per_epoch == 0) or last or stop != 0
                        if writer:
                            tallies += record[HEADER.index("skipped"): HEADER.index("replaced") + 1]
                            progress.update(1)
                            if logging or saving:  # read on the host only here
                                skipped, replaced_images = (int(v) for v in tallies.tolist())
                                tallies.zero_()
                                counts["nonfinite_skipped"] += skipped
                                counts["bad_images_replaced"] += replaced_images
                            if logging:
                                _log(loggers, {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                                               **decode_terms(record, num_blocks), "images_per_sec": meter.rate(),
                                               **counts}, progress)
                        if saving:
                            _save(out, model, layout, optimizers, scaler, step, phase_index, counts, cfg, probe)
                        if last or stop:
                            break
    finally:  # also on an error: a loader worker left running would keep this process alive
        shutdown_workers(batches)
    if link is not None:
        link.flush()
    progress.close()
    if main and step >= total_steps:
        atomic_save(backbone_state_dict(model), out / "backbone.pt")
    dist.barrier()
    if started_group:
        torch.distributed.destroy_process_group()
    if stop > 0:
        raise Preempted(f"stopped by signal {stop} at step {step}; checkpoint saved. Continue with: "
                        f"blockssl pretrain --resume {out}")
    return out


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


def _save(out: Path, model: BlockwiseSSL, layout: Layout, optimizers: dict[int, torch.optim.Optimizer],
          scaler: torch.amp.GradScaler, step: int, phase: int, counts: dict[str, int], cfg: Config,
          probe: OnlineProbe | None = None) -> None:
    """Rank 0 writes one checkpoint, a normal one whatever the execution: a pipeline's stages send it their own
    blocks' weights, optimizers and probe classifiers (and the last stage its counts), and it merges them.

    No random state is saved: the noise of every step is keyed by (seed, replica, block, step)."""
    optimizer_states = {str(k): o.state_dict() for k, o in optimizers.items()}
    probe_state = probe.checkpoint_state() if probe is not None else None
    if layout.pipelined:
        owned = {id(t) for k in layout.blocks for m in model.block_modules(k)
                 for t in [*m.parameters(), *m.buffers()]}
        part = None if layout.replica else _to_cpu({
            "blocks": layout.blocks, "optimizers": optimizer_states, "probe": probe_state,
            "model": {n: t for n, t in model.state_dict(keep_vars=True).items() if id(t) in owned},
            "counts": dict(counts) if layout.last else None})
        parts = [p for p in dist.gather_to_main(part) or [] if p is not None]
        if not dist.is_main_process():
            return
        model.load_state_dict({k: t for p in parts for k, t in p["model"].items()}, strict=False)
        optimizer_states = {k: v for p in parts for k, v in p["optimizers"].items()}
        if probe_state is not None:
            probe_state = OnlineProbe.merge_checkpoint_states([(p["blocks"], p["probe"]) for p in parts])
        counts = parts[-1]["counts"]
    elif not dist.is_main_process():
        return
    state = {
        "format_version": FORMAT_VERSION, "config": to_dict(cfg), "step": step, "phase": phase,
        "model": model.state_dict(), "optimizers": optimizer_states, "scaler": scaler.state_dict(),
        "counts": dict(counts),
    }
    if probe_state is not None:
        state["online_probe"] = probe_state
    save_checkpoint(state, out / "checkpoints", step, cfg.train.keep_checkpoints)


def _to_cpu(obj: Any) -> Any:
    """Tensors of nested dicts and lists moved to the CPU (NCCL cannot gather pickled device tensors)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _load_optimizers(optimizers: dict[int, torch.optim.Optimizer], saved: dict[str, Any], out: Path) -> None:
    """This process's optimizers (a pipeline stage's: those of its blocks) from a checkpoint's."""
    missing = sorted(str(k) for k in optimizers if str(k) not in saved)
    if missing:
        raise CheckpointError(f"{out}: the checkpoint holds optimizers {sorted(saved)}, not those of loss blocks "
                              f"{missing}: it was written before every execution had one optimizer per loss block; "
                              "finish the run with the blockssl version that started it")
    for key, opt in optimizers.items():
        opt.load_state_dict(saved[str(key)])
