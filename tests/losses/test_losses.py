"""The three SSL losses against independent reference formulas, their invariances and their gradients.

The references below are deliberately written with explicit Python loops (no shared helper with the library),
so a vectorisation slip in ``src/blockssl/losses`` cannot be mirrored here.
"""

from __future__ import annotations

import math

import pytest
import torch

from blockssl.losses import BarlowTwinsLoss, SimCLRLoss, VICRegLoss

# ---------------------------------------------------------------------------------------------------------
# Independent references (float64, explicit loops)


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    n, d = z.shape
    out = torch.empty_like(z)
    for j in range(d):
        col = [float(z[b, j]) for b in range(n)]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n  # biased, as BatchNorm
        for b in range(n):
            out[b, j] = (col[b] - mean) / math.sqrt(var + eps)
    return out


def barlow_twins_reference(z1, z2, lambd=0.0051, scale=0.024):
    z1n, z2n = _standardise(z1.double()), _standardise(z2.double())
    n, d = z1.shape
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(float(z1n[b, i]) * float(z2n[b, j]) for b in range(n)) / n
            if i == j:
                on += (1 - c_ij) ** 2
            else:
                off += c_ij**2
    return scale * (on + lambd * off)


def simclr_reference(z1, z2, temperature=0.1):
    n = z1.shape[0]
    views = [v / v.norm() for v in torch.cat([z1, z2]).double()]  # 2N unit vectors: view 1 then view 2
    total = 0.0
    for k in range(2 * n):
        partner = (k + n) % (2 * n)
        sims = {j: float(views[k] @ views[j]) / temperature for j in range(2 * n) if j != k}
        denominator = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[partner]) / denominator)
    return total / (2 * n)


def vicreg_reference(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    invariance = sum(float(z1[b, j] - z2[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        means = [sum(float(z[b, j]) for b in range(n)) / n for j in range(d)]
        cov = [
            [
                sum((float(z[b, i]) - means[i]) * (float(z[b, j]) - means[j]) for b in range(n)) / (n - 1)
                for j in range(d)
            ]
            for i in range(d)
        ]
        variance = sum(max(0.0, 1 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d
        covariance = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return variance, covariance

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    return sim_coeff * invariance + std_coeff * (v1 + v2) / 2 + cov_coeff * (c1 + c2)


def _pair(n=8, d=5, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    if correlated:  # features with unequal scales, offsets and cross-correlations: every term is non-trivial
        z1 = z1 @ torch.randn(d, d, generator=g) * 0.7 + torch.randn(d, generator=g)
    z2 = 0.6 * z1 + 0.8 * torch.randn(n, d, generator=g)
    return z1, z2


# ---------------------------------------------------------------------------------------------------------
# Barlow Twins


class TestBarlowTwins:
    def test_defaults_and_keyword_names(self):
        loss = BarlowTwinsLoss()
        assert loss.lambd == 0.0051 and loss.scale == 0.024
        custom = BarlowTwinsLoss(lambd=0.1, scale=2.0)
        assert custom.lambd == 0.1 and custom.scale == 2.0

    @pytest.mark.parametrize("seed", [0, 1])
    def test_matches_loop_reference(self, seed):
        z1, z2 = _pair(seed=seed)
        out = BarlowTwinsLoss()(z1, z2)
        assert out.dim() == 0
        expected = barlow_twins_reference(z1, z2)
        assert expected > 0.01  # far from a degenerate value
        assert float(out) == pytest.approx(expected, rel=1e-5)

    def test_matches_reference_with_custom_weights(self):
        z1, z2 = _pair(n=6, d=4, seed=3)
        out = BarlowTwinsLoss(lambd=0.5, scale=1.3)(z1, z2)
        assert float(out) == pytest.approx(barlow_twins_reference(z1, z2, lambd=0.5, scale=1.3), rel=1e-5)

    def test_scale_is_linear_and_lambd_weighs_off_diagonal(self):
        z1, z2 = _pair(seed=4)
        base = float(BarlowTwinsLoss(lambd=0.0, scale=1.0)(z1, z2))
        assert float(BarlowTwinsLoss(lambd=0.0, scale=3.0)(z1, z2)) == pytest.approx(3 * base, rel=1e-6)
        with_off = float(BarlowTwinsLoss(lambd=1.0, scale=1.0)(z1, z2))
        with_half_off = float(BarlowTwinsLoss(lambd=0.5, scale=1.0)(z1, z2))
        off = with_off - base
        assert off > 1e-3
        assert with_half_off == pytest.approx(base + 0.5 * off, rel=1e-5)

    def test_invariant_to_per_feature_affine_rescaling(self):
        z1, z2 = _pair(n=16, d=6, seed=5)
        g = torch.Generator().manual_seed(9)
        a1, b1 = torch.rand(6, generator=g) * 4 + 0.5, torch.randn(6, generator=g) * 10
        a2, b2 = torch.rand(6, generator=g) * 4 + 0.5, torch.randn(6, generator=g) * 10
        loss = BarlowTwinsLoss()
        ref = float(loss(z1, z2))
        assert float(loss(z1 * a1 + b1, z2 * a2 + b2)) == pytest.approx(ref, rel=1e-4)
        # Not trivially invariant: a negative scale flips correlations and changes the loss.
        assert float(loss(-z1, z2)) > ref + 0.01

    def test_invariant_to_common_permutation_of_samples(self):
        z1, z2 = _pair(n=16, d=6, seed=6)
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
        loss = BarlowTwinsLoss()
        assert float(loss(z1[perm], z2[perm])) == pytest.approx(float(loss(z1, z2)), rel=1e-5)
        # Permuting only one view breaks the pairing and changes the loss.
        assert abs(float(loss(z1[perm], z2)) - float(loss(z1, z2))) > 1e-3

    def test_symmetric_in_views(self):
        z1, z2 = _pair(seed=7)
        loss = BarlowTwinsLoss()
        assert float(loss(z1, z2)) == pytest.approx(float(loss(z2, z1)), rel=1e-6)

    def test_identical_views_zero_on_diagonal_term(self):
        z, _ = _pair(n=32, d=6, seed=8)  # correlated features: off-diagonal term is large
        on_diag_only = BarlowTwinsLoss(lambd=0.0, scale=1.0)(z, z)
        assert float(on_diag_only) < 1e-6
        assert float(BarlowTwinsLoss(lambd=1.0, scale=1.0)(z, z)) > 0.1

    def test_identical_whitened_views_give_near_zero_loss(self):
        g = torch.Generator().manual_seed(10)
        z = torch.randn(64, 8, generator=g, dtype=torch.float64) @ torch.randn(
            8, 8, generator=g, dtype=torch.float64
        )
        z = z - z.mean(0)
        cov = z.T @ z / z.shape[0]  # biased covariance, as the loss's standardisation
        evals, evecs = torch.linalg.eigh(cov)
        white = (z @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T).float()  # ZCA: decorrelated, unit variance
        loss = BarlowTwinsLoss(lambd=1.0, scale=1.0)
        assert float(loss(white, white)) < 1e-5
        assert float(loss(z.float(), z.float())) > 0.1  # the un-whitened version is not


# ---------------------------------------------------------------------------------------------------------
# SimCLR


class TestSimCLR:
    def test_defaults_and_keyword_names(self):
        assert SimCLRLoss().temperature == 0.1
        assert SimCLRLoss(temperature=0.2).temperature == 0.2

    @pytest.mark.parametrize("temperature", [0.1, 0.5])
    def test_matches_loop_reference(self, temperature):
        z1, z2 = _pair(n=6, d=4, seed=11)
        out = SimCLRLoss(temperature=temperature)(z1, z2)
        assert out.dim() == 0
        assert float(out) == pytest.approx(simclr_reference(z1, z2, temperature), rel=1e-5)

    def test_default_temperature_is_used(self):
        z1, z2 = _pair(n=6, d=4, seed=12)
        assert float(SimCLRLoss()(z1, z2)) == pytest.approx(simclr_reference(z1, z2, 0.1), rel=1e-5)
        assert abs(float(SimCLRLoss()(z1, z2)) - simclr_reference(z1, z2, 0.2)) > 1e-2

    def test_invariant_to_per_sample_scaling(self):
        z1, z2 = _pair(n=8, d=5, seed=13)
        g = torch.Generator().manual_seed(2)
        s1, s2 = torch.rand(8, 1, generator=g) * 10 + 0.1, torch.rand(8, 1, generator=g) * 10 + 0.1
        loss = SimCLRLoss()
        assert float(loss(z1 * s1, z2 * s2)) == pytest.approx(float(loss(z1, z2)), rel=1e-5)

    def test_symmetric_and_permutation_invariant(self):
        z1, z2 = _pair(n=8, d=5, seed=14)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
        loss = SimCLRLoss()
        ref = float(loss(z1, z2))
        assert float(loss(z2, z1)) == pytest.approx(ref, rel=1e-5)
        assert float(loss(z1[perm], z2[perm])) == pytest.approx(ref, rel=1e-5)

    def test_aligned_views_score_lower_than_random_views(self):
        g = torch.Generator().manual_seed(15)
        z1 = torch.randn(32, 16, generator=g)
        aligned = z1 + 0.05 * torch.randn(32, 16, generator=g)
        random = torch.randn(32, 16, generator=g)
        loss = SimCLRLoss()
        low, high = float(loss(z1, aligned)), float(loss(z1, random))
        assert low < 0.1
        # Random partners sit near chance: about log(2N - 1) or more.
        assert high > 0.8 * math.log(63)


# ---------------------------------------------------------------------------------------------------------
# VICReg


class TestVICReg:
    def test_defaults_and_keyword_names(self):
        loss = VICRegLoss()
        assert (loss.sim_coeff, loss.std_coeff, loss.cov_coeff) == (25.0, 25.0, 1.0)
        loss = VICRegLoss(sim_coeff=1.0, std_coeff=2.0, cov_coeff=3.0)
        assert (loss.sim_coeff, loss.std_coeff, loss.cov_coeff) == (1.0, 2.0, 3.0)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_matches_loop_reference(self, seed):
        z1, z2 = _pair(n=8, d=5, seed=seed)
        z1 = z1 * 0.4  # some features below unit std so the variance hinge is active
        out = VICRegLoss()(z1, z2)
        assert out.dim() == 0
        assert float(out) == pytest.approx(vicreg_reference(z1, z2), rel=1e-5)

    @pytest.mark.parametrize("coeffs", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
    def test_each_term_matches_reference(self, coeffs):
        z1, z2 = _pair(n=8, d=5, seed=2)
        z1 = z1 * 0.3
        sim, std, cov = coeffs
        out = float(VICRegLoss(sim_coeff=sim, std_coeff=std, cov_coeff=cov)(z1, z2))
        expected = vicreg_reference(z1, z2, sim, std, cov)
        assert expected > 1e-3  # each term is active on this example
        assert out == pytest.approx(expected, rel=1e-5)

    def test_variance_hinge_is_zero_for_wide_features(self):
        g = torch.Generator().manual_seed(3)
        z = torch.randn(256, 4, generator=g) * 5  # std far above 1
        assert float(VICRegLoss(sim_coeff=0.0, std_coeff=1.0, cov_coeff=0.0)(z, z)) == 0.0
        assert float(VICRegLoss(sim_coeff=0.0, std_coeff=1.0, cov_coeff=0.0)(z * 0.01, z * 0.01)) > 0.9


# ---------------------------------------------------------------------------------------------------------
# Gradients
#
# The losses compute in float32 (``.float()``, for mixed precision), so float64 ``gradcheck`` cannot pass:
# finite differences of a float32 function are too noisy for its tolerances. Instead: (1) autograd gradients
# equal those of the vectorised float64 formula, (2) autograd agrees with central finite differences of the
# loss itself, at a loose tolerance.


def _vector_barlow(z1, z2, lambd=0.0051, scale=0.024):
    def std(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = std(z1).T @ std(z2) / z1.shape[0]
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return scale * (((1 - torch.diagonal(c)) ** 2).sum() + lambd * ((c * (1 - eye)) ** 2).sum())


def _vector_simclr(z1, z2, temperature=0.1):
    n = z1.shape[0]
    u = torch.cat([z1, z2])
    u = u / u.norm(dim=1, keepdim=True)
    s = u @ u.T / temperature
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(s, partner)


def _vector_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0):
    def var_cov(z):
        n, d = z.shape
        zc = z - z.mean(0)
        c = zc.T @ zc / (n - 1)
        off = c * (1 - torch.eye(d, dtype=c.dtype))
        return torch.relu(1 - torch.sqrt(torch.diagonal(c) + 1e-4)).mean(), (off**2).sum() / d

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    return sim * ((z1 - z2) ** 2).mean() + std * (v1 + v2) / 2 + cov * (c1 + c2)


CASES = [
    (BarlowTwinsLoss(), _vector_barlow, barlow_twins_reference),
    (
        SimCLRLoss(temperature=0.5),
        lambda a, b: _vector_simclr(a, b, 0.5),
        lambda a, b: simclr_reference(a, b, 0.5),
    ),
    (VICRegLoss(), _vector_vicreg, vicreg_reference),
]
IDS = ["barlow_twins", "simclr", "vicreg"]


def _scaled_pair(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z1, z2 = _pair(n=n, d=d, seed=seed)
    return z1 * 0.4, z2  # views of different scales


def _autograd(loss, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's gradients with respect to both views."""
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss(a1, a2).backward()
    return a1.grad, a2.grad


@pytest.mark.parametrize(("loss", "vector", "loops"), CASES, ids=IDS)
def test_vectorised_reference_equals_loop_reference(loss, vector, loops):
    # Ties the float64 gradient reference below to the loop references above.
    z1, z2 = _scaled_pair(n=6, d=4, seed=20)
    assert float(vector(z1.double(), z2.double())) == pytest.approx(loops(z1, z2), rel=1e-9)


@pytest.mark.parametrize(("loss", "vector", "loops"), CASES, ids=IDS)
def test_gradients_match_reference_formula(loss, vector, loops):
    z1, z2 = _scaled_pair(n=6, d=4, seed=21)
    pairs = zip(_autograd(loss, z1, z2), _autograd(vector, z1.double(), z2.double()), strict=True)
    for got, want in pairs:
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("loss", "vector", "loops"), CASES, ids=IDS)
def test_gradients_match_finite_differences(loss, vector, loops):
    z1, z2 = _scaled_pair(n=5, d=3, seed=22)
    eps = 1e-2
    for which, grad in enumerate(_autograd(loss, z1, z2)):
        z = (z1, z2)[which]
        numeric = torch.zeros_like(z)
        for idx in range(z.numel()):
            plus, minus = [z1, z2], [z1, z2]
            plus[which], minus[which] = z.clone(), z.clone()
            plus[which].view(-1)[idx] += eps
            minus[which].view(-1)[idx] -= eps
            with torch.no_grad():
                numeric.view(-1)[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=2e-3)
