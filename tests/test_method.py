"""The method's science: stop-gradient isolation, lean = reference execution, frozen blocks, keyed noise."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from blockssl.config import Config
from blockssl.execution import STEPS, StepTerms, Trainer, build_optimizers
from blockssl.method import BlockOutput, BlockwiseSSL, build_model
from blockssl.models.noise import noise_generator
from tests.conftest import assert_same_tensors, tiny_config


def _model(tmp_path, *overrides: str) -> tuple[BlockwiseSSL, Config]:
    cfg = tiny_config(tmp_path, *overrides)
    torch.manual_seed(0)
    return build_model(cfg, 3, 16), cfg


def _views(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, x + 0.3 * torch.randn(n, 3, 16, 16, generator=g)


def _losses(outs: list[BlockOutput]) -> dict[int, torch.Tensor]:
    return {k: out.loss for k, out in enumerate(outs) if out.loss is not None}


def _grad_norms(model: BlockwiseSSL) -> list[float]:
    """Total gradient norm of each block's backbone parameters."""
    return [sum(float(p.grad.abs().sum()) for p in block.parameters() if p.grad is not None)
            for block in model.blocks]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_stop_gradient_isolates_blocks(tmp_path, k):
    model, _ = _model(tmp_path)
    _losses(model(*_views()))[k].backward()
    norms = _grad_norms(model)
    assert all(n == 0 for n in norms[:k]), f"block {k + 1}'s loss reached earlier blocks: {norms}"
    assert norms[k] > 0
    for j, head in enumerate(model.heads):
        has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
        assert has_grad == (j == k)


def test_without_detach_gradients_cross_blocks(tmp_path):
    model, _ = _model(tmp_path, "train.detach=false", "train.execution=reference")
    _losses(model(*_views()))[3].backward()
    assert all(n > 0 for n in _grad_norms(model))


def test_end_to_end_preset_has_one_loss_and_full_backprop(tmp_path):
    model, _ = _model(tmp_path, "train.scheme=end_to_end")
    losses = _losses(model(*_views()))
    assert list(losses) == [3]
    losses[3].backward()
    assert all(n > 0 for n in _grad_norms(model))
    assert list(model.projectors.keys()) == ["3"]  # no unused projectors
    # Its one optimizer owns every block.
    assert {id(p) for p in model.optimizer_parameters(3)} == {id(p) for p in model.parameters()}


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


def _run_steps(model: BlockwiseSSL, cfg: Config, execution: str, steps: int) -> list[StepTerms]:
    optimizers = build_optimizers(model, cfg.train)
    for opt in optimizers.values():
        for g in opt.param_groups:
            g["lr"] = g["base_lr"]
    trainer = Trainer(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), nullcontext(), cfg.seed)
    model.train()
    return [STEPS[execution](trainer, *_views(), step).terms for step in range(steps)]


def assert_lean_equals_reference(model: BlockwiseSSL, cfg: Config, moved_share: float = 0.5) -> None:
    """Three steps of lean and of reference execution from the same model train it bit-identically, and more than
    ``moved_share`` of every block's parameters move (guards against gradients zeroed after the per-block
    backward)."""
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    lean_terms = _run_steps(model, cfg, "lean", steps=3)
    reference_terms = _run_steps(reference, cfg, "reference", steps=3)
    # Bit-identical: the same noise (keyed by block and step), and each block's gradient comes from its own loss.
    assert_same_tensors(model.state_dict(), reference.state_dict())
    assert [t.logged() for t in lean_terms] == [t.logged() for t in reference_terms]
    for k in range(model.num_blocks):
        moved = [not torch.equal(p, q) for p, q in zip(model.optimizer_parameters(k),
                                                          initial.optimizer_parameters(k), strict=True)]
        assert sum(moved) > moved_share * len(moved), f"block {k + 1}: {moved.count(False)} parameters did not move"


@pytest.mark.parametrize("optimizer", ["lars", "sgd", "adamw"])
def test_lean_execution_equals_reference(tmp_path, optimizer):
    assert_lean_equals_reference(*_model(tmp_path, f"train.optimizer={optimizer}", "train.lr=0.5",
                                         "train.weight_decay=1e-4"))


def test_lean_execution_equals_reference_with_blocks_ending_inside_layers(tmp_path):
    assert_lean_equals_reference(*_model(tmp_path, "model.granularity=unit",
                                         "model.blocks=stem+layer1.0,layer1.1-layer2.0,layer2.1-layer3.1,layer4"))


def test_frozen_block_is_bit_identical_and_keeps_bn_statistics(tmp_path):
    model, cfg = _model(tmp_path, "train.frozen_blocks=[1]")
    before = copy.deepcopy(model.blocks[0].state_dict())
    _run_steps(model, cfg, "lean", steps=2)
    assert not any(m.training for m in model.blocks[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert_same_tensors(model.blocks[0].state_dict(), before)
    assert 0 not in model.loss_blocks


def test_noise_only_in_train_mode(tmp_path):
    model, _ = _model(tmp_path, "noise.type=global", "noise.std=0.5")
    x1, x2 = _views()
    model.eval()
    with torch.no_grad():
        a, b = _losses(model(x1, x2))[3], _losses(model(x1, x2))[3]
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = _losses(model(x1, x2))[3]
        torch.manual_seed(1)
        d = _losses(model(x1, x2))[3]
    assert not torch.equal(c, d)


def test_noise_is_keyed_by_seed_replica_block_and_step(tmp_path):
    """A block's noise depends on (seed, replica, block, step) alone: not on the global RNG, nor on what ran before."""
    model, _ = _model(tmp_path, "noise.type=global", "noise.std=0.5")
    model.train()
    with torch.no_grad():
        h = model.blocks[0](_views()[0])

    def block2(*key: int) -> torch.Tensor:
        with torch.no_grad():
            return model.run_block(1, h, h, generator=noise_generator(*key, torch.device("cpu"))).h1

    # BatchNorm in train mode updates running statistics but its output does not depend on them.
    reference = block2(0, 0, 1, 5)
    torch.manual_seed(123)
    torch.randn(100)
    assert torch.equal(block2(0, 0, 1, 5), reference)
    for other in [(1, 0, 1, 5), (0, 1, 1, 5), (0, 0, 2, 5), (0, 0, 1, 6)]:
        assert not torch.equal(block2(*other), reference), other


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
    assert list(_losses(model(*_views()))) == list(range(n))
    _run_steps(model, cfg, "lean", steps=1)


@pytest.mark.parametrize("scheme", ["simultaneous", "end_to_end"])
def test_forward_features_are_the_probe_features_and_change_nothing(tmp_path, scheme):
    """A block's ``feature`` is what ``features`` returns (eval mode, same input) for every block, with or without
    a loss; asking for it leaves the losses and every buffer (BatchNorm statistics) as they would be without."""
    model, _ = _model(tmp_path, f"train.scheme={scheme}")
    x1, x2 = _views()
    model.eval()
    with torch.no_grad():
        outs = model(x1, x2, features=True)
        expected = model.features(x1)
    for out, e in zip(outs, expected, strict=True):
        assert out.feature is not None and torch.equal(out.feature, e)
    model.train()
    twin = copy.deepcopy(model)
    torch.manual_seed(0)
    a = model(x1, x2, features=True)
    torch.manual_seed(0)
    b = twin(x1, x2)
    assert all(out.feature is not None and not out.feature.requires_grad for out in a)
    assert all(out.feature is None for out in b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.h1, y.h1) and torch.equal(x.h2, y.h2)
        assert (x.loss is None and y.loss is None) or torch.equal(x.loss, y.loss)
    assert_same_tensors(model.state_dict(), twin.state_dict())
    assert [out.feature.shape[1] for out in a] == model.feature_dims
