"""Per-block pooling heads (gap, CbE) and the projector MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blockssl.models.heads import Head, projector


def test_gap_is_mean_over_height_and_width():
    torch.manual_seed(0)
    head = Head(6, kind="gap")
    assert head.out_dim == 6
    assert not list(head.parameters())
    x = torch.randn(3, 6, 5, 7)
    out = head(x)
    assert out.shape == (3, 6)
    expected = torch.tensor([[x[n, c].sum().item() / 35 for c in range(6)] for n in range(3)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kernel", [1, 3])
def test_cbe_is_conv_bn_relu_then_pool(kernel):
    torch.manual_seed(0)
    head = Head(4, kind="cbe", dim=10, kernel=kernel)
    assert head.out_dim == 10
    conv = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(conv) == 1 and conv[0].bias is None and conv[0].kernel_size == (kernel, kernel)
    assert conv[0].in_channels == 4 and conv[0].out_channels == 10
    x = torch.randn(5, 4, 6, 6)
    expanded = head.expand(x)
    assert expanded.shape == (5, 10, 6, 6)  # odd kernels keep the spatial size
    out = head(x)
    assert out.shape == (5, 10)
    # In train mode: BatchNorm with batch statistics, then ReLU, then global average pooling.
    y = nn.functional.conv2d(x, conv[0].weight, padding=kernel // 2)
    y = (y - y.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        y.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out, torch.relu(y).mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    assert (out >= 0).all() and out.abs().max() > 0


@pytest.mark.parametrize(("grid", "kernel"), [(2, 1), (4, 1), (2, 3)])
def test_pooled_cbe_is_average_pool_to_a_grid_then_cbe(grid, kernel):
    torch.manual_seed(0)
    head = Head(4, kind="cbe_pooled", dim=10, kernel=kernel, grid=grid)
    assert head.out_dim == 10
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    head.double()
    out = head(x)
    assert out.shape == (5, 10)
    # Reference: mean over each (8 / grid)-square of the input, then conv, BatchNorm with batch statistics, ReLU, mean.
    side = 8 // grid
    pooled = x.reshape(5, 4, grid, side, grid, side).mean(dim=(3, 5))
    y = nn.functional.conv2d(pooled, head.expand[0].weight, padding=kernel // 2)
    y = (y - y.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        y.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    expected = torch.relu(y).mean(dim=(2, 3))
    torch.testing.assert_close(out, expected)
    # The gradient reaches the block (every input location, through the pooling) and the expansion, as the reference's.
    g = torch.randn_like(out)
    (grad_x, grad_w), (ref_x, ref_w) = (torch.autograd.grad(o, [x, head.expand[0].weight], g) for o in (out, expected))
    torch.testing.assert_close(grad_x, ref_x)
    torch.testing.assert_close(grad_w, ref_w)
    assert (grad_x != 0).all()


def test_pooled_cbe_has_the_cbe_state_dict_and_no_lean_variant():
    plain = Head(6, kind="cbe", dim=12)
    pooled = Head(6, kind="cbe_pooled", dim=12, grid=2, lean_chunk_bytes=2**20)
    pooled.load_state_dict(plain.state_dict())  # the same parameters and buffers: a CbE checkpoint loads into it
    # grid x grid maps leave nothing for the chunked recomputation to save: the lean setting applies to cbe only
    assert pooled.lean_chunk_bytes == 0
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(pooled(x), plain(nn.functional.adaptive_avg_pool2d(x, 2)))


def test_cbe_default_is_papers_1x1_2048():
    head = Head(8)
    assert head.out_dim == 2048
    assert head.expand[0].kernel_size == (1, 1)


def test_unknown_head_kind():
    with pytest.raises(ValueError, match="gap, cbe or cbe_pooled"):
        Head(4, kind="attention")


def test_projector_structure():
    mlp = projector(16, [32, 24, 8])
    kinds = [type(m) for m in mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 24), (24, 8)]
    assert all(m.bias is None for m in linears)
    assert [m.num_features for m in mlp if isinstance(m, nn.BatchNorm1d)] == [32, 24]
    assert mlp(torch.randn(4, 16)).shape == (4, 8)


def test_projector_single_layer_is_one_linear():
    mlp = projector(16, [8])
    assert [type(m) for m in mlp] == [nn.Linear]
    assert mlp[0].bias is None


def test_empty_projector_is_identity():
    mlp = projector(16, [])
    assert not list(mlp.parameters())
    x = torch.randn(3, 16)
    assert torch.equal(mlp(x), x)
