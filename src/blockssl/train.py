"""Pretraining: one loop in a fixed order (batch, lr, forward with per-block losses, backward, step, log, save).

Execution modes (``train.execution``):
- reference: all blocks forward, the summed loss backward once, every optimizer steps (the authors' code);
  every block's activations and gradients are alive together.
- lean: block k's backward runs as soon as its loss exists, then block k's optimizer steps and its gradients
  are freed, before block k+1 runs. With detached inputs this is the same update (block k+1's input was
  computed before block k's step), but only one block's graph and gradients are alive at a time.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockssl import dist
from blockssl.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from blockssl.config import Config, ConfigError, dump_config, from_dict, lean_execution, loss_blocks, to_dict
from blockssl.data.datasets import build_dataset, dataset_info
from blockssl.data.loader import EpochSampler, TwoViews, pretrain_loader
from blockssl.data.transforms import two_view_transforms
from blockssl.eval.online import OnlineProbe
from blockssl.method import BlockwiseSSL, build_model, pop_features
from blockssl.optim import build_optimizer, lr_factor, set_lr

# What a run directory holds (evaluation adds probe.json, robustness.*, report.md).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints", "backbone.pt")


class NonFiniteLossError(FloatingPointError):
    """A block's loss or gradient became NaN or infinite."""


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return dist.local_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast_context(amp: str, device: torch.device) -> Any:
    """Mixed precision as ``train.amp`` says (none, bf16 or fp16), as a reusable context manager."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizers(model: BlockwiseSSL, phase: Phase, cfg: Config, lean: bool) -> dict[int, torch.optim.Optimizer]:
    """One optimizer per loss block in lean mode (each steps right after its block's backward), else one.

    Per-parameter optimizers (LARS, SGD, AdamW) make the split exact: the update does not depend on grouping.
    """
    if lean:
        return {k: build_optimizer(model.block_parameters(k), cfg.train) for k in phase.loss_blocks}
    return {-1: build_optimizer(model.trained_parameters(), cfg.train)}


def _finite(value: torch.Tensor, what: str, step: int, skip: bool) -> bool:
    """False for a non-finite value when skipping is allowed; otherwise a non-finite value stops the run."""
    if torch.isfinite(value):
        return True
    if skip:
        return False
    raise NonFiniteLossError(f"{what} is {value.item()} at step {step}; stopped before the update, the last "
                             "checkpoint is intact. Lower train.lr, check the data, or set train.on_nonfinite=skip")


def train_step(model: BlockwiseSSL, x1: torch.Tensor, x2: torch.Tensor, optimizers: dict[int, torch.optim.Optimizer],
               *, lean: bool, scaler: torch.amp.GradScaler, autocast: Any, step: int, skip_nonfinite: bool = False,
               features: bool = False) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the forward dict (total and per-block terms, detached) and ``nonfinite``,
    the number of updates skipped for a non-finite loss or gradient. ``features`` adds the blocks' detached head
    features of view 1 (``feat/block{k}``, for the online probe; not scalars: take them out with ``pop_features``).

    Distributed: no DistributedDataParallel wrapper, whose hooks expect one backward per forward. Each
    optimizer's gradients are averaged in one flattened all-reduce just before it steps, so in lean execution
    every block synchronises once per step, right after its own backward, and no gradient is sent twice.
    """
    skipped = 0

    def _step(opt: torch.optim.Optimizer, what: str) -> None:
        nonlocal skipped
        params = [p for g in opt.param_groups for p in g["params"]]
        dist.average_gradients(params)
        # With fp16 the scaler itself skips steps whose gradients overflowed.
        grads = [p.grad for p in params if p.grad is not None]
        if scaler.is_enabled() or _finite(torch.nn.utils.get_total_norm(grads), f"{what} gradient", step,
                                          skip_nonfinite):
            scaler.step(opt)
        else:
            skipped += 1
        opt.zero_grad(set_to_none=True)

    def backward_and_step(k: int, loss: torch.Tensor) -> None:
        nonlocal skipped
        if not _finite(loss, f"block {k + 1} loss ({type(model.loss).__name__})", step, skip_nonfinite):
            skipped += 1
            return
        with torch.autocast(x1.device.type, enabled=False):  # backward outside autocast
            scaler.scale(loss).backward()
        _step(optimizers[k], f"block {k + 1}")  # before block k+1 runs: block k's gradients are freed

    if lean:
        with autocast:
            out = model(x1, x2, on_block_loss=backward_and_step, features=features)
    else:
        with autocast:
            out = model(x1, x2, features=features)
        finite = [_finite(v, f"block {key.removeprefix('loss/block')} loss ({type(model.loss).__name__})", step,
                          skip_nonfinite) for key, v in out.items() if key.startswith("loss/")]
        if all(finite):
            scaler.scale(out["loss"]).backward()
            for opt in optimizers.values():
                _step(opt, "all blocks")
        else:
            skipped += 1
    scaler.update()
    out["nonfinite"] = torch.tensor(float(skipped))
    return {k: v.detach() for k, v in out.items()}


def git_revision() -> str:
    """The commit of the blockssl checkout in use (recorded with every run and benchmark)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool = False) -> Path:
    """Create the run directory, or check that resuming it is consistent. Raises before any compute."""
    out = Path(cfg.out)
    if overwrite and not resume:
        for name in RUN_FILES:
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


def pretrain(cfg: Config, *, resume: bool = False, overwrite: bool = False, stop_after: int | None = None,
             command: list[str] | None = None) -> Path:
    """Train ``cfg`` into ``cfg.out``; returns the run directory.

    ``resume`` continues from ``checkpoints/last.pt``. ``stop_after`` runs at most that many steps in this call,
    then checkpoints and returns, as a preempted job does.
    """
    started_group = dist.init_from_environment()
    main = dist.is_main_process()
    device = resolve_device(cfg.train.device)
    out = prepare_run_dir(cfg, resume, overwrite) if main else Path(cfg.out)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt") if resume else None  # fail before any work
    seed_everything(cfg.seed)  # the same initial weights in every process
    info = dataset_info(cfg.data)
    base = build_dataset(cfg.data, "pretrain")
    preset = cfg.loss.name if cfg.data.augment == "auto" else cfg.data.augment
    transforms = two_view_transforms(preset, info, cfg.data.min_crop_scale, cfg.data.blur)
    views = TwoViews(base, transforms, cfg.seed, strict=cfg.data.strict)
    sampler = EpochSampler(len(views), cfg.train.batch_size, cfg.seed, dist.rank(), dist.world_size())
    loader = pretrain_loader(views, sampler, num_workers=cfg.data.num_workers,
                             pin_memory=cfg.data.pin_memory and device.type == "cuda",
                             persistent_workers=cfg.data.persistent_workers)
    model = build_model(cfg, info.channels, info.image_size)
    if cfg.train.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    model.to(device)
    dist.broadcast_state(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.compile:  # in place, stage by stage: parameter names and checkpoints are unchanged
        for module in [*(getattr(model.backbone, f"layer{i}") for i in range(1, 5)), *model.heads,
                       *model.projectors.values()]:
            module.compile()
    torch.manual_seed(cfg.seed + dist.rank())  # noise injection differs between processes
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)

    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    phases = plan_phases(cfg, model.num_blocks, total_steps)
    lean = lean_execution(cfg)
    autocast = autocast_context(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    # Online linear evaluation: its own parameters and optimizer, fed detached features; created after the model
    # and leaving the global RNG stream as it was, so the model trains identically with it on or off.
    probe = (OnlineProbe(model.feature_dims, info.num_classes, cfg.online_probe).to(device)
             if cfg.online_probe.enabled else None)

    step = 0
    counts = {"nonfinite_skipped": 0, "bad_images_replaced": 0}  # cumulative over the run, kept in checkpoints
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        scaler.load_state_dict(ckpt["scaler"])
        _restore_rng(ckpt["rng"][min(dist.rank(), len(ckpt["rng"]) - 1)])
        step = ckpt["step"]
        counts = ckpt["counts"]
        if probe is not None and "online_probe" in ckpt:  # absent: the probe was switched on at this resume
            probe.load_checkpoint_state(ckpt["online_probe"], cfg.online_probe)
        if main:
            _truncate_metrics(out / "metrics.jsonl", step)
    elif main:
        (out / "config.yaml").write_text(dump_config(cfg))
        run_info = {"command": command or sys.argv, "git_revision": git_revision(),
                    "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
                    "world_size": dist.world_size(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")

    progress = _progress_bar(cfg, total_steps, step, main)
    meter = Throughput(cfg.train.batch_size)
    steps_this_call = 0
    stop = False
    with StopSignals() as signals:
        for phase_index, phase in enumerate(phases):
            if step >= phase.end or stop:
                continue
            model.loss_blocks, model.frozen = phase.loss_blocks, phase.frozen
            optimizers = build_optimizers(model, phase, cfg, lean)
            if ckpt is not None and ckpt["phase"] == phase_index:
                for key, opt in optimizers.items():
                    opt.load_state_dict(ckpt["optimizers"][str(key)])
            model.train()
            phase_steps = phase.end - phase.start
            warmup = round(cfg.train.warmup_epochs * steps_per_epoch * phase_steps / total_steps)
            while step < phase.end and not stop:
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                sampler.start(epoch, step_in_epoch)
                for x1, x2, labels, replaced in loader:
                    factor = lr_factor(step - phase.start, phase_steps, warmup, cfg.train.min_lr_ratio)
                    lr = max(set_lr(opt, factor) for opt in optimizers.values())  # same factor for all
                    x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
                    x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
                    probing = probe is not None and step % cfg.online_probe.every == 0
                    terms = train_step(model, x1, x2, optimizers, lean=lean, scaler=scaler, autocast=autocast,
                                       step=step, skip_nonfinite=cfg.train.on_nonfinite == "skip", features=probing)
                    skipped = int(terms.pop("nonfinite"))
                    features = pop_features(terms)
                    if probe is not None and probing and not skipped:  # non-finite features would poison it
                        probe.step(features, labels)
                    step += 1
                    steps_this_call += 1
                    counts["nonfinite_skipped"] += skipped
                    counts["bad_images_replaced"] += int(replaced.sum())
                    meter.tick()
                    if progress is not None:
                        progress.update(1)
                    last = step == phase.end
                    if step % cfg.train.log_every == 0 or last:
                        record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                                  **{k: float(v) for k, v in terms.items()},
                                  **(probe.window_metrics() if probe is not None else {}),
                                  "images_per_sec": meter.rate(), **counts}
                        _log(out / "metrics.jsonl", record, progress, main)
                    stop = dist.any_process(signals.requested) or (stop_after is not None
                                                                    and steps_this_call >= stop_after)
                    end_of_epoch = step % steps_per_epoch == 0
                    every = cfg.train.checkpoint_every
                    if (step % every == 0 if every else end_of_epoch) or last or stop:
                        _save(out, model, optimizers, scaler, step, phase_index, counts, cfg, probe)
                    if last or stop:
                        break
    if progress is not None:
        progress.close()
    if main and step >= total_steps:
        atomic_save(backbone_state_dict(model), out / "backbone.pt")
    dist.barrier()
    if started_group:
        torch.distributed.destroy_process_group()
    if signals.requested:
        raise Preempted(f"stopped by signal {signals.requested} at step {step}; checkpoint saved. Continue with: "
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


def _log(path: Path, record: dict[str, float], progress: Any, main: bool) -> None:
    """Append to metrics.jsonl, show in the progress bar, and warn on collapsing blocks."""
    if main:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    for key, value in record.items():
        if key.startswith("std/") and value < COLLAPSE_STD:
            warnings.warn(f"{key.removeprefix('std/')}: embedding spread {value:.3g} at step {record['step']} "
                          "(1 = spread over the sphere, 0 = collapsed); check its loss and learning rate",
                          stacklevel=2)
    if progress is not None:
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


def _progress_bar(cfg: Config, total: int, initial: int, main: bool) -> Any:
    if not (cfg.train.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)


def _save(out: Path, model: BlockwiseSSL, optimizers: dict[int, torch.optim.Optimizer],
          scaler: torch.amp.GradScaler, step: int, phase: int, counts: dict[str, int], cfg: Config,
          probe: OnlineProbe | None = None) -> None:
    """Rank 0 writes; every process contributes its RNG state so that a resumed run draws the same noise."""
    rng = dist.gather_objects({"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    if not dist.is_main_process():
        return
    state = {
        "format_version": FORMAT_VERSION, "config": to_dict(cfg), "step": step, "phase": phase,
        "model": model.state_dict(), "optimizers": {str(k): o.state_dict() for k, o in optimizers.items()},
        "scaler": scaler.state_dict(), "rng": rng, "counts": dict(counts),
    }
    if probe is not None:
        state["online_probe"] = probe.checkpoint_state()
    save_checkpoint(state, out / "checkpoints", step, cfg.train.keep_checkpoints)


def _restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint a resumed run restarts from, so no step appears twice."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def backbone_state_dict(model: BlockwiseSSL) -> dict[str, torch.Tensor]:
    """The backbone's weights under torchvision's names (no ``fc``)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}


def checkpoint_model(run_dir: str | Path, device: str = "cpu") -> tuple[BlockwiseSSL, Config, int]:
    """Rebuild a run's model from ``checkpoints/last.pt`` (for evaluation and export); also returns its config and
    the step it was saved at."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt", mmap=True)
    cfg = from_dict(ckpt["config"])
    info = dataset_info(cfg.data)
    model = build_model(cfg, info.channels, info.image_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir}: checkpoint does not match its own config ({e})") from None
    return model.to(device), cfg, ckpt["step"]

