"""The run directory's contract: what a pretraining run writes, when, and how a resumed run finds it.

``config.yaml`` (the resolved configuration) and ``run.json`` (command, git revision, versions, stages) when a run
starts; ``metrics.jsonl`` (``blockssl.loggers``, truncated to the checkpoint's step on resume); a checkpoint
``checkpoints/last.pt`` written atomically (``blockssl.checkpoint``), one whatever the execution; ``backbone.pt``
when the run is finished. Evaluation adds ``probe.json``, ``robustness.*`` and ``report.md``.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blockssl import dist
from blockssl.checkpoint import FORMAT_VERSION, atomic_save, save_checkpoint
from blockssl.config import Config, ConfigError, dump_config, to_dict
from blockssl.loggers import OPTIONAL
from blockssl.models.backbone import library_state_dict
from blockssl.runtime import git_revision

# What a run directory holds (evaluation adds probe.json, robustness.*, report.md).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "checkpoints", "backbone.pt")


def prepare(cfg: Config, resume: bool, overwrite: bool = False) -> Path:
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


def write_start(out: Path, cfg: Config, stages: list[list[int]], command: list[str] | None) -> None:
    """``config.yaml`` and ``run.json`` of a new run. The command is recorded as typed, its program named blockssl:
    the interpreter's argv[0] is an absolute path, which would tie a committed run.json to one machine."""
    (out / "config.yaml").write_text(dump_config(cfg))
    info = {"command": ["blockssl", *(command or sys.argv)[1:]], "git_revision": git_revision(),
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "world_size": dist.world_size(), "stages": [[k + 1 for k in g] for g in stages],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def save(out: Path, cfg: Config, *, step: int, phase: int, model: dict[str, torch.Tensor],
         optimizers: dict[str, Any], scaler: dict[str, Any], counts: dict[str, int],
         online_probe: dict[str, Any] | None) -> None:
    """Write the run's checkpoint (rank 0 only). No random state is saved: the noise of every step is keyed by
    (seed, replica, block, step) and the data order by (seed, epoch)."""
    state = {"format_version": FORMAT_VERSION, "config": to_dict(cfg), "step": step, "phase": phase,
             "model": model, "optimizers": optimizers, "scaler": scaler, "counts": dict(counts)}
    if online_probe is not None:
        state["online_probe"] = online_probe
    save_checkpoint(state, out / "checkpoints", step, cfg.train.keep_checkpoints)


def write_backbone(out: Path, model: dict[str, torch.Tensor], arch: str) -> None:
    """``backbone.pt``: the finished run's backbone (from the model's state, ``BlockwiseSSL.state_dict()``) under
    its library's names (torchvision's for a ResNet, timm's for a ViT)."""
    backbone = {name.removeprefix("backbone."): t for name, t in model.items() if name.startswith("backbone.")}
    atomic_save(library_state_dict(arch, backbone), out / "backbone.pt")
