"""Noise injection ``x + sigma * s(x) * N(0, 1)``: the scale of each variant, and an identity gradient."""

from __future__ import annotations

import pytest
import torch

from blockssl.memory import SavedTensorAccounting
from blockssl.models.noise import NOISE_TYPES, inject_noise, noise_scale


def test_none_and_zero_sigma_return_input_unchanged():
    x = torch.randn(2, 3, 4, 4)
    assert inject_noise(x, "none", 0.5) is x
    for kind in ("global", "channel", "spatial"):
        assert torch.equal(inject_noise(x, kind, 0.0), x)


def test_unknown_kind_is_rejected():
    assert set(NOISE_TYPES) == {"none", "global", "channel", "spatial"}
    with pytest.raises(ValueError, match="spatial"):
        inject_noise(torch.randn(2, 3, 4, 4), "gaussian", 0.1)


def test_global_noise_std_is_sigma_times_tensor_std():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(16, 16, 32, 32) + 1.0
    sigma = 0.25
    out = inject_noise(x, "global", sigma)
    assert (out - x).std().item() == pytest.approx(sigma * x.std().item(), rel=0.01)
    torch.testing.assert_close(noise_scale(x, "global").flatten(), x.std().flatten())


def _channel_input() -> torch.Tensor:
    """(N, C, H, W) whose channels have very different scales and vary along W only.

    The std over H alone is zero while the std over (H, W) is not, so a scale computed over H only (what the
    reference code's ``c`` variant computes) would add no noise at all.
    """
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 3, 4, 64, 64
    pattern = torch.randn(n, c, 1, w, generator=g).expand(n, c, h, w).clone()
    amplitude = (
        torch.tensor([0.01, 1.0, 10.0, 100.0])[None, :, None, None]
        * torch.tensor([1.0, 3.0, 0.5])[:, None, None, None]
    )
    return pattern * amplitude + 5.0


def test_channel_scale_is_per_sample_and_channel_over_height_and_width():
    x = _channel_input()
    n, c = x.shape[:2]
    assert x.std(dim=2).max() == 0  # std over H alone: zero
    expected = torch.tensor([[x[i, j].flatten().std().item() for j in range(c)] for i in range(n)])
    assert expected.min() > 0
    scale = noise_scale(x, "channel")
    assert scale.shape == (n, c, 1, 1)
    torch.testing.assert_close(scale[:, :, 0, 0], expected, rtol=1e-4, atol=0)


def test_channel_noise_residual_std_matches_each_channel():
    torch.manual_seed(0)
    x = _channel_input()
    sigma = 0.5
    residual = inject_noise(x, "channel", sigma) - x
    got = residual.flatten(2).std(dim=2)
    want = sigma * x.flatten(2).std(dim=2)
    ratio = got / want
    # 4096 draws per (sample, channel): the std estimate is within a few percent.
    assert ratio.min() > 0.92 and ratio.max() < 1.08, ratio


def test_spatial_noise_residual_std_matches_each_location():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, c, h, w = 2, 512, 4, 4
    amplitude = torch.logspace(-2, 2, h * w).view(1, 1, h, w)  # locations with scales 0.01 .. 100
    x = torch.randn(n, c, h, w, generator=g) * amplitude
    torch.testing.assert_close(noise_scale(x, "spatial"), x.std(dim=1, keepdim=True))
    assert noise_scale(x, "spatial").shape == (n, 1, h, w)
    sigma = 0.5
    residual = inject_noise(x, "spatial", sigma) - x
    ratio = residual.std(dim=1) / (sigma * x.std(dim=1))
    assert ratio.min() > 0.85 and ratio.max() < 1.15, ratio


@pytest.mark.parametrize("kind", ["global", "channel", "spatial"])
def test_gradient_is_identity_with_a_constant_scale(kind):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 5) * 2).requires_grad_()
    out = inject_noise(x, kind, 0.5, scale_grad=False)
    assert not torch.allclose(out, x)  # noise was added
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize(("kind", "dims"), [("global", None), ("channel", (2, 3)), ("spatial", 1)])
def test_gradient_flows_through_the_scale_as_in_the_reference(kind, dims):
    """The reference code's ``x + sigma * torch.std(x) * n``, its std differentiated (unbiased, over H and W for
    the channel variant: the reference's H-only std is the bug noted in noise_scale)."""
    x = (torch.randn(2, 3, 5, 5, dtype=torch.float64) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.manual_seed(7)
    inject_noise(x, kind, 0.5).backward(upstream)
    torch.manual_seed(7)
    std = x_ref.std() if dims is None else x_ref.std(dim=dims, keepdim=True)
    (x_ref + 0.5 * std * torch.randn(x_ref.shape, dtype=torch.float64)).backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(x.grad, upstream)  # not the identity


def test_channel_noise_on_one_by_one_maps_is_finite():
    x = torch.randn(4, 8, 1, 1)
    assert torch.isfinite(inject_noise(x, "channel", 0.25)).all()


@pytest.mark.parametrize("kind", ["global", "channel", "spatial"])
def test_same_seed_same_noise_whatever_the_memory_layout(kind):
    """channels_last (a GPU speed switch) must not change the run: the noise follows the logical layout."""
    x = torch.randn(2, 3, 5, 4)
    draws = []
    for layout in (torch.contiguous_format, torch.contiguous_format, torch.channels_last):
        torch.manual_seed(3)
        draws.append(inject_noise(x.contiguous(memory_format=layout), kind, 0.25))
    assert torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws[2], draws[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["global", "channel", "spatial"])
@pytest.mark.parametrize("shape", [(8, 16, 7, 7), (4, 8, 1, 1)])
def test_redrawn_noise_gives_the_stored_noise_gradient_bit_for_bit_and_stores_no_noise(kind, shape):
    """The noise is drawn again in backward from the generator's state instead of being kept: the gradient is the
    one of ``x + sigma * s(x) * noise`` through autograd (float32, bit for bit), and nothing of x's size but x itself
    is saved."""
    x = (torch.randn(*shape) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(*shape)
    with SavedTensorAccounting([], exclude=[x]) as saved:
        out = inject_noise(x, kind, 0.25, generator=torch.Generator().manual_seed(5))
        assert saved.held == noise_scale(x, kind).numel() * 4  # the scale; x is excluded here, the noise not kept
        out.backward(upstream)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    (x_ref + 0.25 * noise_scale(x_ref, kind) * noise).backward(upstream)
    assert torch.equal(out, (x_ref + 0.25 * noise_scale(x_ref, kind) * noise).detach())
    assert torch.equal(x.grad, x_ref.grad)
