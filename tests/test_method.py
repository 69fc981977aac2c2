"""The method's science: stop-gradient isolation, lean = reference execution, frozen blocks, noise in train only."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from blockssl.config import Config
from blockssl.method import BlockwiseSSL, build_model, pop_features
from blockssl.train import build_optimizers, plan_phases, train_step
from tests.conftest import assert_same_tensors, tiny_config


def _model(tmp_path, *overrides: str) -> tuple[BlockwiseSSL, Config]:
    cfg = tiny_config(tmp_path, *overrides)
    torch.manual_seed(0)
    return build_model(cfg, 3, 16), cfg


def _views(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, x + 0.3 * torch.randn(n, 3, 16, 16, generator=g)


def _grad_norms(model: BlockwiseSSL) -> list[float]:
    """Total gradient norm of each block's backbone parameters."""
    return [sum(float(p.grad.abs().sum()) for p in block.parameters() if p.grad is not None)
            for block in model.blocks]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_stop_gradient_isolates_blocks(tmp_path, k):
    model, _ = _model(tmp_path)
    out = model(*_views())
    out[f"loss/block{k + 1}"].backward()
    norms = _grad_norms(model)
    assert all(n == 0 for n in norms[:k]), f"block {k + 1}'s loss reached earlier blocks: {norms}"
    assert norms[k] > 0
    for j, head in enumerate(model.heads):
        has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        assert has_grad == (j == k)


def test_without_detach_gradients_cross_blocks(tmp_path):
    model, _ = _model(tmp_path, "train.detach=false", "train.execution=reference")
    out = model(*_views())
    out["loss/block4"].backward()
    assert all(n > 0 for n in _grad_norms(model))


def test_end_to_end_preset_has_one_loss_and_full_backprop(tmp_path):
    model, _ = _model(tmp_path, "train.scheme=end_to_end")
    out = model(*_views())
    assert [k for k in out if k.startswith("loss/")] == ["loss/block4"]
    out["loss"].backward()
    assert all(n > 0 for n in _grad_norms(model))
    assert list(model.projectors.keys()) == ["3"]  # no unused projectors


def test_blocks_without_a_loss_are_read_by_global_average_pooling(tmp_path):
    """End to end, no loss trains the heads of blocks 1-3: probes read their pooled block output instead."""
    model, _ = _model(tmp_path, "train.scheme=end_to_end")
    model.eval()
    x = _views()[0]
    feats = model.features(x)
    assert model.feature_dims == [*model.block_channels[:3], model.heads[3].out_dim]
    assert [len(list(head.parameters())) for head in model.heads][:3] == [0, 0, 0]
    pooled = model.blocks[0](x).mean(dim=(2, 3))
    torch.testing.assert_close(feats[0], pooled)


def _run_steps(model: BlockwiseSSL, cfg: Config, lean: bool, steps: int) -> None:
    optimizers = build_optimizers(model, plan_phases(cfg, model.num_blocks, 10)[0], cfg, lean)
    for opt in optimizers.values():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    for step in range(steps):
        torch.manual_seed(100 + step)  # same noise draws in both modes
        train_step(model, *_views(), optimizers, lean=lean, scaler=scaler, autocast=nullcontext(), step=step)


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_lean_execution_equals_reference(tmp_path, optimizer):
    model, cfg = _model(tmp_path, f"train.optimizer={optimizer}", "train.lr=0.5", "train.weight_decay=1e-4")
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    _run_steps(model, cfg, lean=True, steps=3)
    _run_steps(reference, cfg, lean=False, steps=3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} differs between lean and reference")
    # Every block learns (guards against gradients zeroed after the per-block backward).
    for k in range(model.num_blocks):
        moved = [not torch.equal(p, q) for p, q in zip(model.block_parameters(k), initial.block_parameters(k),
                                                          strict=True)]
        assert sum(moved) > len(moved) // 2, f"block {k + 1} barely changed"


def test_frozen_block_is_bit_identical_and_keeps_bn_statistics(tmp_path):
    model, cfg = _model(tmp_path, "train.frozen_blocks=[1]")
    before = copy.deepcopy(model.blocks[0].state_dict())
    _run_steps(model, cfg, lean=True, steps=2)
    assert not any(m.training for m in model.blocks[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert_same_tensors(model.blocks[0].state_dict(), before)
    assert 0 not in model.loss_blocks


def test_noise_only_in_train_mode(tmp_path):
    model, _ = _model(tmp_path, "noise.type=global", "noise.std=0.5")
    x1, x2 = _views()
    model.eval()
    with torch.no_grad():
        a, b = model(x1, x2)["loss"], model(x1, x2)["loss"]
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = model(x1, x2)["loss/block4"]
        torch.manual_seed(1)
        d = model(x1, x2)["loss/block4"]
    assert not torch.equal(c, d)


def test_features_are_head_outputs_per_block(tmp_path):
    model, _ = _model(tmp_path, "model.block_head_dims=[8,16,24,32]")
    model.eval()
    feats = model.features(_views()[0])
    assert [f.shape for f in feats] == [torch.Size([8, d]) for d in (8, 16, 24, 32)]


@pytest.mark.parametrize("blocks", ["stem+layer1+layer2,layer3+layer4", "stem,layer1,layer2,layer3,layer4",
                                    "stem+layer1+layer2+layer3+layer4"])
def test_any_grouping_trains(tmp_path, blocks):
    model, cfg = _model(tmp_path, f"model.blocks={blocks}")
    n = blocks.count(",") + 1
    assert model.num_blocks == n
    out = model(*_views())
    assert sorted(k for k in out if k.startswith("loss/")) == [f"loss/block{k + 1}" for k in range(n)]
    _run_steps(model, cfg, lean=True, steps=1)


@pytest.mark.parametrize("scheme", ["simultaneous", "end_to_end"])
def test_forward_features_are_the_probe_features_and_change_nothing(tmp_path, scheme):
    """``feat/block{k}`` is what ``features`` returns (eval mode, same input) for every block, with or without a
    loss; asking for it leaves the losses and every buffer (BatchNorm statistics) as they would be without."""
    model, _ = _model(tmp_path, f"train.scheme={scheme}")
    x1, x2 = _views()
    model.eval()
    with torch.no_grad():
        out = model(x1, x2, features=True)
        expected = model.features(x1)
    feats = [out[f"feat/block{k}"] for k in range(1, 5)]
    for f, e in zip(feats, expected, strict=True):
        assert torch.equal(f, e)
    model.train()
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    a = model(x1, x2, features=True)
    torch.manual_seed(0)
    b = twin(x1, x2)
    assert all(not v.requires_grad for k, v in a.items() if k.startswith("feat/"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert_same_tensors(model.state_dict(), twin.state_dict())
    assert [f.shape[1] for f in pop_features(a)] == model.feature_dims and not any(k.startswith("feat/") for k in a)
