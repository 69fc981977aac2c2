"""LARS against its definition, parameter groups, and the schedule as a pure function of the step."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from blockssl import optim
from blockssl.config import ConfigError, TrainConfig, from_dict, load_config
from blockssl.method import build_loss
from blockssl.optim import LARS, build_optimizer, lr_factor, param_groups, set_lr
from tests.conftest import authors_barlow_twins


def test_lr_factor_warmup_then_cosine_to_min():
    assert lr_factor(0, 100, 10, 0.001) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.001) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.001) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_factor(mid, 100, 10, 0.001) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(100, 100, 10, 0.001) == pytest.approx(0.001)
    values = [lr_factor(s, 100, 10, 0.001) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_param_groups_scale_lr_by_batch_and_exclude_1d():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = TrainConfig(batch_size=512, lr=0.2, bias_lr=0.0048, weight_decay=1e-6)
    groups = param_groups(model.parameters(), cfg)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert len(groups[1]["params"]) == 3  # linear bias, bn weight, bn bias
    assert groups[0]["base_lr"] == pytest.approx(0.4)
    assert groups[1]["base_lr"] == pytest.approx(0.0096)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]


def test_lars_step_matches_definition():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 5))
    b = nn.Parameter(torch.randn(3))
    gw, gb = torch.randn(3, 5), torch.randn(3)
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, momentum=0.9, eta=0.01)
    w0, b0 = w.detach().clone(), b.detach().clone()
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # Reference: two steps by hand.
    mu_w, mu_b, wr, br = torch.zeros_like(w0), torch.zeros_like(b0), w0.clone(), b0.clone()
    for _ in range(2):
        d = gw + 0.1 * wr
        d = d * (0.01 * wr.norm() / d.norm())
        mu_w = 0.9 * mu_w + d
        wr = wr - 0.5 * mu_w
        mu_b = 0.9 * mu_b + gb
        br = br - 0.5 * mu_b
    torch.testing.assert_close(w.detach(), wr)
    torch.testing.assert_close(b.detach(), br)


def _lars_per_parameter(params, grads, mus, lr, weight_decay, momentum, eta, exclude, momentum_dtype):
    """LARS one parameter at a time, as Barlow Twins' code writes it: the definition the optimizer is held to."""
    for p, g in zip(params, grads, strict=True):
        dp = g
        if not exclude:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            dp = dp.mul(torch.where(param_norm > 0, torch.where(update_norm > 0, eta * param_norm / update_norm, one),
                                    one))
        mu = mus.setdefault(p, torch.zeros_like(p, dtype=momentum_dtype or p.dtype))
        update = mu.to(p.dtype).mul_(momentum).add_(dp)
        p.add_(update, alpha=-lr)
        mu.copy_(update)


@pytest.mark.parametrize(("foreach", "bucket_elements"), [(True, optim.BUCKET_ELEMENTS), (True, 5000), (False, 0)])
@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16])
def test_the_batched_lars_step_is_bit_identical_to_the_per_parameter_definition(momentum_dtype, foreach,
                                                                                 bucket_elements, monkeypatch):
    """A small ResNet with a projector, three steps, both parameter groups, a zero weight (trust ratio 1) and a
    parameter without a gradient (skipped): every weight and momentum buffer equal bit for bit, batched (in one
    bucket per group, or in buckets split mid-group) or not."""
    from blockssl.models.backbone import ResNet

    monkeypatch.setattr(optim, "BUCKET_ELEMENTS", bucket_elements)
    torch.manual_seed(0)
    model = nn.Sequential(ResNet("resnet18", width=0.25, stem="small"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(128, 64), nn.BatchNorm1d(64), nn.Linear(64, 32))
    with torch.no_grad():
        model[3].weight.zero_()
    frozen = model[5].bias
    reference = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(lr=0.3, weight_decay=1e-4)
    opt = LARS(param_groups(model.parameters(), cfg), lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta,
               momentum_dtype=momentum_dtype, foreach=foreach)
    set_lr(opt, 1.0)
    mus: dict = {}
    x = torch.randn(8, 3, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        frozen.grad = None
        grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
        opt.step()
        by_id = dict(zip((id(p) for p in model.parameters()), reference, strict=True))
        for group in opt.param_groups:
            params = [by_id[id(p)] for p in group["params"] if id(p) in grads]
            _lars_per_parameter(params, [grads[id(p)] for p in group["params"] if id(p) in grads], mus,
                                group["lr"], group["weight_decay"], cfg.momentum, cfg.lars_eta,
                                group.get("lars_exclude", False), momentum_dtype)
    for (name, p), r in zip(model.named_parameters(), reference, strict=True):
        assert torch.equal(p, r), name
        assert p not in opt.state if p is frozen else torch.equal(opt.state[p]["mu"], mus[r]), name


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer_decreases_a_quadratic(name):
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    cfg = TrainConfig(optimizer=name, lr=0.05, bias_lr=0.0, batch_size=256, lars_eta=0.02)
    opt = build_optimizer(model.parameters(), cfg)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"]
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    first = last = math.inf
    for i in range(50):
        loss = (model(x) - y).pow(2).mean()
        first = loss.item() if i == 0 else first
        last = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert last < first


def _authors_lars_step(model: nn.Module, lr: float, weight_decay: float, eta: float = 0.001) -> None:
    """The authors' update from zero momentum (blockwise_ssl main.py): one lr for every parameter; 1-d ones get
    neither weight decay nor the trust ratio."""
    with torch.no_grad():
        for p in model.parameters():
            d = p.grad
            if p.ndim > 1:
                d = d + weight_decay * p
                d = d * (eta * p.norm() / d.norm())
            p -= lr * d


@pytest.mark.parametrize("recipe", [None, "configs/fashion_mnist_faithful.yaml",
                                    "configs/imagenet/barlow_twins_blockwise.yaml"])
def test_one_step_of_the_defaults_is_the_authors_update(recipe):
    """Biases and norm parameters included: the defaults and recipes scale the loss by 0.024 and give every
    parameter lr 0.2 x batch/256, as the authors' code (a pre-scaled bias lr on top would move them 42x less)."""
    cfg = load_config(recipe, ["data.root=unused"] if recipe else [])
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 16, bias=False))
    theirs = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 16, bias=False))
    theirs.load_state_dict(ours.state_dict())
    x1, x2 = torch.randn(32, 6), torch.randn(32, 6)
    factor = 0.5  # somewhere in warm-up
    opt = build_optimizer(ours.parameters(), cfg.train)
    set_lr(opt, factor)
    build_loss(cfg)(ours(x1), ours(x2)).backward()
    opt.step()
    authors_barlow_twins(theirs(x1), theirs(x2), batch_size=32).backward()
    _authors_lars_step(theirs, lr=0.2 * cfg.train.batch_size / 256 * factor, weight_decay=1e-6)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)


def test_a_loss_scale_with_a_prescaled_bias_lr_is_refused():
    with pytest.raises(ConfigError, match=r"train.bias_lr=0.0048.*42x slower.*loss.scale=1"):
        load_config(None, ["train.bias_lr=0.0048"])
    assert load_config(None, ["loss.scale=1", "train.bias_lr=0.0048"]).train.bias_lr == 0.0048  # current BT
    assert load_config(None, ["loss.name=vicreg", "train.bias_lr=0.0048"])  # no loss scale there
    with pytest.warns(UserWarning, match="twice"):  # a run made that way still loads, to be evaluated or resumed
        from_dict({"train": {"bias_lr": 0.0048}})


def test_bfloat16_momentum_stays_within_one_percent_of_float32():
    """Twenty LARS steps on a regression problem with momentum kept in bfloat16: each parameter's total change
    within 1% (in norm) of float32's; the buffers are half the size. (The bias before the BatchNorm, whose gradient
    is zero up to rounding, does not move.)"""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(base)
        cfg = load_config(None, [f"train.momentum_dtype={dtype}", "train.batch_size=256", "train.lr=2.0",
                                 "train.weight_decay=1e-4"])
        opt = build_optimizer(model.parameters(), cfg.train)
        set_lr(opt, 1.0)
        for _ in range(20):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs[dtype] = model, opt
    (exact, opt32), (low, opt16) = runs["float32"], runs["bfloat16"]
    for (name, p0), p32, p16 in zip(base.named_parameters(), exact.parameters(), low.parameters(), strict=True):
        change = (p32 - p0).norm()
        if change > 1e-4:
            assert (p16 - p32).norm() <= 0.01 * change, name
        else:
            assert name == "0.bias"
    sizes = [sum(s["mu"].numel() * s["mu"].element_size() for s in o.state.values()) for o in (opt32, opt16)]
    assert sizes[1] * 2 == sizes[0] and all(s["mu"].dtype == torch.bfloat16 for s in opt16.state.values())


def test_bfloat16_momentum_is_refused_for_other_optimizers():
    with pytest.raises(ConfigError, match="optimizer=lars only"):
        load_config(None, ["train.momentum_dtype=bfloat16", "train.optimizer=sgd"])
