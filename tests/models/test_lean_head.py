"""The lean CbE head: the same function, gradients and BatchNorm statistics as conv -> BN -> ReLU -> mean."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from blockssl import dist
from blockssl.execution import Trainer, build_optimizers, lean_step
from blockssl.memory import SavedTensorAccounting
from blockssl.models.heads import Head
from blockssl.models.lean_head import lean_cbe
from blockssl.optim import set_lr
from tests.conftest import spawn
from tests.test_method import _model


def _heads(kernel: int, momentum: float | None = 0.1, dtype: torch.dtype = torch.float64) -> tuple[Head, Head]:
    plain = Head(5, "cbe", dim=12, kernel=kernel).to(dtype)
    bn = plain.expand[1]
    bn.momentum = momentum
    with torch.no_grad():  # a trained-looking BatchNorm: scales, shifts and running statistics away from defaults
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    lean = copy.deepcopy(plain)
    lean.lean_chunk_bytes = 12 * 6 * 7 * 4 * 2  # two images' maps per chunk: 7 images make 4 chunks, one short
    return plain, lean


def assert_same_heads(plain: Head, lean: Head, xp: torch.Tensor, xl: torch.Tensor, tol: float = 1e-10) -> None:
    """After the same forwards and backwards: input and parameter gradients and BatchNorm buffers agree."""
    assert _rel(xl.grad, xp.grad) < tol
    for (name, p), (_, q) in zip(plain.named_parameters(), lean.named_parameters(), strict=True):
        assert _rel(q.grad, p.grad) < tol, name
    for (name, p), (_, q) in zip(plain.named_buffers(), lean.named_buffers(), strict=True):
        assert _rel(q, p) < tol if p.is_floating_point() else torch.equal(q, p), name  # num_batches_tracked


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_lean_head_matches_the_plain_head_in_float64(kernel, training, momentum):
    plain, lean = _heads(kernel, momentum)
    plain.train(training)
    lean.train(training)
    x = torch.randn(7, 5, 6, 7, dtype=torch.float64) * 2 + 0.5
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: running statistics after two updates, gradients accumulated
        out_p, out_l = plain(xp), lean(xl)
        assert _rel(out_l, out_p) < 1e-10
        g = torch.randn_like(out_p)
        out_p.backward(g)
        out_l.backward(g)
    assert_same_heads(plain, lean, xp, xl)
    assert int(plain.expand[1].num_batches_tracked) == (2 if training else 0)


def test_lean_head_state_dict_is_the_plain_heads():
    plain, lean = _heads(1)
    assert plain.state_dict().keys() == lean.state_dict().keys()
    Head(5, "cbe", dim=12).load_state_dict(lean.state_dict())


def test_lean_head_does_not_save_its_full_resolution_maps():
    plain, lean = _heads(1, dtype=torch.float32)
    x = torch.randn(8, 5, 6, 7, requires_grad=True)
    saved = {}
    for name, head in (("plain", plain), ("lean", lean)):
        with SavedTensorAccounting([], exclude=[*head.parameters(), *head.buffers()]) as acc:
            head(x).sum().backward()
        saved[name] = acc.result().peak
    maps = 8 * 12 * 6 * 7 * 4  # one float32 map of the head's output channels
    # plain: its input, the convolution's output (BatchNorm's input) and the ReLU's output, 2 x 12 batch statistics;
    # lean: its input and two 8 x 12 per-image statistics, the batch count, mean and inverse std.
    assert saved["plain"] == x.numel() * 4 + 2 * maps + 2 * 12 * 4
    assert saved["lean"] == x.numel() * 4 + 2 * 8 * 12 * 4 + 4 + 2 * 12 * 4


def test_lean_head_under_bf16_autocast_stays_close_to_the_plain_head():
    plain, lean = _heads(1, dtype=torch.float32)
    x = torch.randn(8, 5, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, out_l = plain(x), lean(x)
    assert out_l.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_l.float(), out_p.float(), rtol=0.02, atol=0.02)


def test_lean_cbe_refuses_a_convolution_with_bias():
    with pytest.raises(ValueError, match="without bias"):
        lean_cbe(torch.randn(2, 3, 4, 4), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), 1 << 20)


def _sync_worker(rank: int, world: int, out: str) -> None:
    torch.manual_seed(0)
    plain, lean = _heads(1)
    # (the conversion builds float32 BatchNorms)
    plain, lean = (dist.convert_sync_batchnorm(h, torch.device("cpu")).double() for h in (plain, lean))
    assert isinstance(lean.expand[1], dist.SyncBatchNorm)
    x = (torch.randn(6, 5, 6, 7, dtype=torch.float64) * 2 + 0.5)[rank * 3:(rank + 1) * 3]
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_l = plain(xp), lean(xl)
    g = torch.randn(6, 12, dtype=torch.float64)[rank * 3:(rank + 1) * 3]
    out_p.backward(g)
    out_l.backward(g)
    assert _rel(out_l, out_p) < 1e-10
    assert_same_heads(plain, lean, xp, xl)
    Path(out, f"rank{rank}").write_text("ok")


def test_lean_head_with_synchronised_batchnorm_matches_the_plain_one_in_two_processes(tmp_path):
    spawn(_sync_worker, 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def test_model_with_lean_heads_trains_like_the_plain_heads_in_float64(tmp_path):
    """Three LARS steps of the whole blockwise model (noise on): the same weights, BatchNorm statistics and losses."""
    runs = []
    for lean in ("true", "false"):
        model, cfg = _model(tmp_path, f"model.lean_head={lean}", "model.lean_head_chunk_mb=1", "model.head_dim=64")
        model = model.double()
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(2, 16, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(3)]
        optimizers = build_optimizers(model, cfg.train)
        for opt in optimizers.values():
            set_lr(opt, 1.0)
        trainer = Trainer(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), nullcontext(), cfg.seed)
        model.train()
        losses = [lean_step(trainer, *v, step).terms.logged()["loss"] for step, v in enumerate(views)]
        runs.append((model.state_dict(), losses))
    (lean_state, lean_losses), (plain_state, plain_losses) = runs
    assert lean_losses == pytest.approx(plain_losses, rel=1e-10)
    for key, value in plain_state.items():
        if value.is_floating_point():
            assert _rel(lean_state[key], value) < 1e-9, key
        else:
            assert torch.equal(lean_state[key], value), key
