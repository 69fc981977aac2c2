"""What training, evaluation and export share without importing each other: the device, mixed precision, seeding,
progress bars, the code revision, and a run's model rebuilt from its last checkpoint."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blockssl import dist
from blockssl.checkpoint import CheckpointError, load_checkpoint
from blockssl.config import Config, ConfigError, from_dict
from blockssl.data.datasets import dataset_info
from blockssl.method import BlockwiseSSL, build_model


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


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, main: bool | None = None,
                 **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only where it helps: when ``enabled`` (``train.progress``, the CLI's ``--quiet``),
    in the process that reports (``main``; default rank 0), and when stderr is a terminal (a log file would collect
    every redraw). A hidden bar takes the same calls and does nothing, so callers never branch on it. ``options`` go to
    tqdm (``total``, ``desc``, ``unit``, ``leave``, ...)."""
    shown = enabled and (dist.is_main_process() if main is None else main) and sys.stderr.isatty()
    return tqdm(iterable, disable=not shown, dynamic_ncols=True, **options)


def git_revision() -> str:
    """The commit of the blockssl checkout in use (recorded with every run and benchmark)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CHECKPOINT = "checkpoints/last.pt"  # in a run directory
# How a run directory comes to hold each file that a command reads from it: the fix when one is missing.
MAKERS = {
    CHECKPOINT: "its pretraining has not saved a checkpoint yet; let it run, or continue it with "
                "`blockssl pretrain --resume {path}`",
    "probes.pt": "run `blockssl probe {path}` first",
}


def require_run_dir(path: str | Path, example: str, needs: tuple[str, ...] = (CHECKPOINT,), option: str = "") -> Path:
    """``path`` as a run directory of ``blockssl pretrain`` holding ``needs`` (files of ``MAKERS``), checked when a
    command starts: a wrong path fails in an instant, not after minutes of evaluation. The error (a
    ``CheckpointError``: the CLI prints it and exits with status 2) names the path, as ``option`` does when given,
    and the command's own fix: ``example``, a call that would work."""
    path = Path(path)
    named = f"{option} {path}" if option else str(path)
    if not (path / "config.yaml").is_file():
        why = "no config.yaml in it" if path.is_dir() else "it is a file" if path.exists() else "it does not exist"
        raise CheckpointError(f"{named} is not a blockssl run directory ({why}); pass the run directory of a "
                              f"pretraining (the out= of `blockssl pretrain`), e.g. `{example}`")
    for need in needs:
        if not (path / need).is_file():
            raise CheckpointError(f"{named} has no {need}: {MAKERS[need].format(path=path)}")
    return path


def require_out_dir(path: str | Path, option: str) -> Path:
    """``path`` as a folder to write into, new or existing, checked when a command starts: not a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a folder to write into (created if missing)")
    return path


def checkpoint_model(run_dir: str | Path, device: str = "cpu") -> tuple[BlockwiseSSL, Config, int]:
    """Rebuild a run's model from ``checkpoints/last.pt`` (for evaluation and export); also returns its config and
    the step it was saved at."""
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT, mmap=True)
    cfg = from_dict(ckpt["config"])
    info = dataset_info(cfg.data)
    model = build_model(cfg, info.channels, info.image_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir}: checkpoint does not match its own config ({e})") from None
    return model.to(device), cfg, ckpt["step"]
