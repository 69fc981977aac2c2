"""Shared fixtures: a tiny configuration that trains in about a second on the CPU, and bit-exact comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blockssl.config import Config, load_config

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
