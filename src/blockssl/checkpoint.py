"""Checkpoints that are never half-written and never execute code when loaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` fills a temporary file in the same folder, which is fsynced, then renamed over ``path``: a kill
    at any instant leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file (UTF-8) through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` and check it is one of ours.

    ``mmap=True`` maps the file and reads a tensor when it is first used: evaluation, which needs the model's
    weights only, never reads the optimizer state (twice the weights with LARS' momentum, and the projectors').
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; the run has not saved one yet (start it without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated, corrupt or not "
                              "a blockssl checkpoint. Older checkpoints are kept in the same folder.") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a blockssl training checkpoint (no format_version field)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']}, this blockssl reads "
                              f"{FORMAT_VERSION}; use the blockssl version that wrote it")
    return ckpt


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Write ``step-<N>.pt`` atomically, point ``last.pt`` at it, and delete all but the newest ``keep``.

    ``last.pt`` is replaced by an atomic rename of a hard link (a copy where links are unsupported), so it always
    names a complete checkpoint. A failed write raises and leaves every existing checkpoint as it was.
    """
    path = folder / f"step-{step:08d}.pt"
    try:
        atomic_save(state, path)
        tmp = folder / f".last.pt.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, folder / "last.pt")
    except OSError as e:
        raise CheckpointError(f"could not write the checkpoint of step {step} in {folder} ({e}); the previous "
                              "checkpoints there are intact. Free disk space or fix permissions, then resume") from e
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path
