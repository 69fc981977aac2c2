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
