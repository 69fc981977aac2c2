"""Activation accounting (bytes saved for backward) and activation checkpointing of the backbone's stages."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from blockssl.config import ConfigError
from blockssl.execution import Trainer, build_optimizers, lean_step
from blockssl.memory import PARTS, SavedTensorAccounting, model_accounting
from blockssl.train import pretrain
from tests.conftest import assert_same_tensors, run_metrics, tiny_config
from tests.test_method import _model, _run_steps, _views


def test_accounting_matches_a_hand_computed_figure():
    """Linear (no bias) -> ReLU -> Linear (no bias) -> squared sum, batch 5, float32.

    Saved: the first Linear's input (5 x 4; its weight is a parameter and excluded), the ReLU's output (5 x 8),
    which the second Linear saves again as its input (one storage, counted once), and pow's input (5 x 3)."""
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x = torch.randn(5, 4)
    with SavedTensorAccounting([(net[0], "first"), (net[1], "relu"), (net[2], "second")],
                               exclude=net.parameters()) as acc:
        loss = net(x).pow(2).sum()
        assert acc.held == 5 * 4 * 4 + 5 * 8 * 4 + 5 * 3 * 4
        loss.backward()
        assert acc.held == 0  # backward released the graph
    saved = acc.result()
    assert saved.parts == {"first": 5 * 4 * 4, "relu": 5 * 8 * 4, "other": 5 * 3 * 4}
    assert saved.peak == saved.total == 300


def test_accounting_peak_follows_graphs_released_between_forwards():
    net = nn.Linear(6, 6, bias=False)
    x = torch.randn(3, 6)
    with SavedTensorAccounting([], exclude=net.parameters()) as acc:
        for _ in range(3):  # one graph at a time: the peak is one graph's
            net(x * 2).sum().backward()
        kept = [net(x * 2).sum() for _ in range(3)]  # three graphs alive together
    assert acc.result().peak == 3 * 3 * 6 * 4
    del kept
    assert acc.held == 0


@pytest.mark.parametrize("lean_head", ["true", "false"])
def test_per_block_accounting_separates_lean_from_reference_execution(tmp_path, lean_head):
    peaks = {}
    for execution in ("lean", "reference"):
        model, cfg = _model(tmp_path, f"model.lean_head={lean_head}")
        with model_accounting(model) as acc:
            _run_steps(model, cfg, execution, steps=1)
        saved = acc.result()
        assert set(saved.parts) == {f"block{k}/{p}" for k in range(1, 5) for p in PARTS}
        assert acc.held == 0
        blocks = saved.blocks()
        # lean: one block's graph at a time; reference: every block's graph until the one backward
        expected = max(blocks.values()) if execution == "lean" else saved.total
        assert saved.peak == expected
        peaks[execution] = saved
    lean, reference = peaks["lean"], peaks["reference"]
    assert lean.peak < 0.7 * reference.peak
    # a later block's input is the earlier block's output: saved again under lean, shared under reference
    assert lean.blocks()[1] > reference.blocks()[1] and lean.blocks()[0] == reference.blocks()[0]


def test_lean_head_saves_what_the_plain_head_saves_less_its_maps(tmp_path):
    heads = {}
    for lean in ("true", "false"):
        model, cfg = _model(tmp_path, f"model.lean_head={lean}")
        with model_accounting(model) as acc:
            _run_steps(model, cfg, "lean", steps=1)
        heads[lean] = acc.result().parts["block1/head"]
    # per view: the convolution's and the BatchNorm/ReLU's 16 x 16 x 16 maps of 8 images and BatchNorm's two
    # 16-wide statistics, against the lean head's two 8 x 16 statistics, its count, mean and inverse std
    maps, dim = 8 * 16 * 16 * 16 * 4, 16 * 4
    assert heads["false"] - heads["true"] == 2 * ((2 * maps + 2 * dim) - (2 * 8 * dim + 4 + 2 * dim))


@pytest.mark.parametrize("scheme", ["end_to_end", "simultaneous"])
def test_checkpointed_stages_train_bit_identically_with_less_saved(tmp_path, scheme):
    model, cfg = _model(tmp_path, f"train.scheme={scheme}")
    checkpointed = copy.deepcopy(model)
    checkpointed.checkpoint_stages = True
    execution = "reference" if scheme == "end_to_end" else "lean"
    with model_accounting(model) as plain:
        terms = _run_steps(model, cfg, execution, steps=3)
    with model_accounting(checkpointed) as kept:
        checkpointed_terms = _run_steps(checkpointed, cfg, execution, steps=3)
    # weights and BatchNorm running statistics (updated once per forward, not again when recomputed)
    assert_same_tensors(model.state_dict(), checkpointed.state_dict())
    assert [t.logged() for t in terms] == [t.logged() for t in checkpointed_terms]
    assert kept.result().peak < 0.5 * plain.result().peak


def test_checkpoint_stages_reaches_the_model():
    model, _ = _model("unused", "train.checkpoint_stages=true")
    assert model.checkpoint_stages


def test_saved_memory_is_logged_per_block_at_logging_steps(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "train.log_saved_memory=true", "train.log_every=2"))
    records = run_metrics(run)
    model, cfg = _model(tmp_path)
    trainer = Trainer(model, build_optimizers(model, cfg.train), torch.amp.GradScaler("cpu", enabled=False),
                      nullcontext(), cfg.seed)
    with model_accounting(model.train()) as acc:  # a step of the run's batch size, measured directly
        lean_step(trainer, *_views(cfg.train.batch_size), 0)
    expected = {f"saved_mb/block{k + 1}": v / 2**20 for k, v in acc.result().blocks().items()}
    for record in records:
        assert {k: v for k, v in record.items() if k.startswith("saved_mb/")} == pytest.approx(expected)


def test_saved_memory_needs_eager_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.compile=false"):
        tiny_config(tmp_path, "train.log_saved_memory=true", "train.compile=true")
