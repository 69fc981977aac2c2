"""Shared fixtures: a tiny configuration that trains in about a second on the CPU, comparisons of runs, and
two-process launches (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp

from blockssl.checkpoint import load_checkpoint
from blockssl.config import Config, load_config
from blockssl.dist import init_from_environment

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.synthetic_size=64", "data.num_workers=0",
    "model.arch=resnet18", "model.width=0.125", "model.head_dim=16", "model.projector=32-32",
    "train.batch_size=16", "train.epochs=2", "train.optimizer=lars", "train.warmup_epochs=0.5",
    "train.log_every=1", "train.progress=false", "train.device=cpu",
]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models: one thread is as fast as two, and spawned or killed-and-resumed runs use the same kernels.
    torch.set_num_threads(1)
    mp.set_forkserver_preload(["torch", "torchvision", "blockssl.cli", "conftest"])


def tiny_config(out: Path | str, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"out={out}", *overrides])


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts (same keys, equal tensors); a failure names the first key that differs."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def run_metrics(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl; strict, unlike the report's reader: a torn line fails the test."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Two runs' last checkpoints hold the same step and, to tolerance, the same weights (exact for integers)."""
    sa, sb = load_checkpoint(a / "checkpoints/last.pt"), load_checkpoint(b / "checkpoints/last.pt")
    assert sa["step"] == sb["step"] and sa["model"].keys() == sb["model"].keys()
    for key, value in sa["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(sb["model"][key], value, rtol=rtol, atol=atol, msg=key)
        else:
            assert torch.equal(value, sb["model"][key]), key


def authors_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, batch_size: int, lambd: float = 0.0051,
                         scale: float = 0.024) -> torch.Tensor:
    """The blockwise paper's loss as its main.py computes it, written independently of blockssl: BatchNorm1d without
    affine (SyncBatchNorm under a process group: autograd-aware global statistics), the cross-correlation divided
    by the global batch and summed in place by a raw all_reduce, both terms scaled."""
    distributed = torch.distributed.is_initialized()

    def bn(z: torch.Tensor) -> torch.Tensor:
        total = dist_fn.all_reduce(z.sum(0)) if distributed else z.sum(0)
        mean = total / batch_size
        squares = (z - mean).pow(2).sum(0)
        var = (dist_fn.all_reduce(squares) if distributed else squares) / batch_size
        return (z - mean) / torch.sqrt(var + 1e-5)

    c = bn(z1).T @ bn(z2)
    c.div_(batch_size)
    if distributed:
        torch.distributed.all_reduce(c)  # invisible to autograd, as in the reference
    off = c - torch.diag(torch.diagonal(c))
    return (torch.diagonal(c) - 1).pow(2).sum() * scale + lambd * off.pow(2).sum() * scale


# A tiny run that two processes train with synchronised BatchNorm (noise off: it differs between processes).
DDP_RUN = ["train.sync_bn=true", "noise.type=none", "train.epochs=1", "data.synthetic_size=64"]


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forkserver: each process forks from one that has already imported torch and blockssl, about 2 s sooner
    mp.start_processes(_entry, args=(world, port, fn, args), nprocs=world, join=True, start_method="forkserver")


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_from_environment()
    try:
        fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
