"""The online probe: never reaches the model, learns above chance, logs per-block metrics, resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from blockssl.checkpoint import load_checkpoint
from blockssl.config import ConfigError, OnlineProbeConfig, resume_config
from blockssl.eval.online import NO_LABEL, OnlineProbe
from blockssl.train import pretrain
from tests.conftest import DDP_RUN, assert_same_model, assert_same_tensors, run_metrics, spawn, tiny_config


def _online_keys(blocks: range) -> list[str]:
    return [f"online/block{k}_{m}" for k in blocks for m in ("top1", "loss")]


# ---------------------------------------------------------------------------------------------------------
# The probe alone


def _clusters(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_probe_learns_separable_features_and_skips_unlabelled_images():
    probe = OnlineProbe([8, 12], num_classes=4, cfg=OnlineProbeConfig(lr=0.1))
    for step in range(30):
        x, y = _clusters(64, 8, 4, seed=step)
        y[:16] = NO_LABEL  # a quarter without labels (STL-10's unlabeled images): no loss, not counted
        batch = probe.step([x, torch.randn(64, 12)], y)  # block 2: noise, nothing to learn
    assert batch["online/block1_top1"] > 90
    window = probe.window_metrics()
    assert set(window) == {0, 1}  # blocks, each with (top1, loss)
    assert window[0][0] > 70 and window[1][0] < 50
    assert probe.seen.sum() == 0  # the window restarted
    assert probe.window_metrics() == {}  # nothing seen since: no keys rather than 0/0


def test_probe_takes_fewer_blocks_no_gradient_to_features_and_rejects_bad_labels():
    probe = OnlineProbe([8, 8, 8], num_classes=3, cfg=OnlineProbeConfig())
    features = torch.randn(10, 8, requires_grad=True)
    out = probe.step([features], torch.randint(3, (10,)))  # blocks after the last loss block are not run
    assert set(out) == set(_online_keys(range(1, 2)))
    assert features.grad is None
    assert probe.classifiers[1].weight.abs().sum() == 0  # untouched
    assert set(probe.window_metrics()) == {0}
    all_unlabelled = probe.step([torch.randn(10, 8)], torch.full((10,), NO_LABEL))
    assert all(math.isfinite(v) for v in all_unlabelled.values())
    assert all(torch.isfinite(p).all() for p in probe.parameters())
    with pytest.raises(ValueError, match="classes"):
        probe.step([torch.randn(4, 8)], torch.tensor([0, 1, 2, 3]))


def test_probe_construction_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    OnlineProbe([8, 16], num_classes=10, cfg=OnlineProbeConfig())
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("override", ["online_probe.lr=0", "online_probe.momentum=1", "online_probe.weight_decay=-1",
                                      "online_probe.every=0"])
def test_bad_values_are_rejected(tmp_path, override):
    with pytest.raises(ConfigError, match="online_probe"):
        tiny_config(tmp_path, override)


# ---------------------------------------------------------------------------------------------------------
# In pretraining


@pytest.mark.parametrize("scheme", ["simultaneous", "end_to_end", "sequential"])
def test_probe_never_changes_the_model(tmp_path, scheme):
    """Same seed, probe off and on: every weight and buffer (BatchNorm statistics of heads without a loss
    included) and every logged loss are bit-identical."""
    runs = [pretrain(tiny_config(tmp_path / str(on), f"train.scheme={scheme}", "noise.type=global",
                                 f"online_probe.enabled={on}")) for on in ("false", "true")]
    off, on = (load_checkpoint(run / "checkpoints/last.pt") for run in runs)
    assert_same_tensors(off["model"], on["model"])
    assert "online_probe" not in off and "online_probe" in on
    rows_off, rows_on = run_metrics(runs[0]), run_metrics(runs[1])
    for a, b in zip(rows_off, rows_on, strict=True):
        assert {k: v for k, v in a.items() if k.startswith(("loss", "std/"))} == \
            {k: v for k, v in b.items() if k.startswith(("loss", "std/"))}
        assert not any(k.startswith(("online/", "feat/")) for k in a)


def test_metrics_hold_every_blocks_online_accuracy(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "online_probe.enabled=true", "train.epochs=1"))
    rows = run_metrics(run)
    assert len(rows) == 4
    for row in rows:
        assert set(_online_keys(range(1, 5))) <= row.keys()
        assert not any(k.startswith("feat/") for k in row)
        assert all(0 <= row[f"online/block{k}_top1"] <= 100 for k in range(1, 5))


def test_every_n_steps(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "online_probe.enabled=true", "online_probe.every=2", "train.epochs=1"))
    assert ["online/block1_top1" in r for r in run_metrics(run)] == [True, False, True, False]  # after steps 0 and 2


def test_sequential_scheme_probes_the_blocks_run_so_far(tmp_path):
    run = pretrain(tiny_config(tmp_path / "seq", "online_probe.enabled=true", "train.scheme=sequential"))
    probed = [sorted(k for k in r if k.startswith("online/") and k.endswith("_top1")) for r in run_metrics(run)]
    assert probed[0] == ["online/block1_top1"]  # phase 1 runs block 1 only
    assert probed[-1] == [f"online/block{k}_top1" for k in range(1, 5)]


def test_online_accuracy_rises_above_chance(tmp_path):
    # 32 steps of 16 images (64 images, 10 classes, chance 10%). Deterministic on the CPU; measured: the best
    # block averages about 27% over the second half (256 images; chance would give 10 +- 1.9), up from about 16%.
    run = pretrain(tiny_config(tmp_path / "run", "online_probe.enabled=true", "train.epochs=8"))
    rows = run_metrics(run)

    def mean_top1(part: list[dict], k: int) -> float:
        return sum(r[f"online/block{k}_top1"] for r in part) / len(part)

    half = len(rows) // 2
    late = {k: mean_top1(rows[half:], k) for k in range(1, 5)}
    best = max(late, key=late.__getitem__)
    assert late[best] > 18, late
    assert late[best] > mean_top1(rows[:half], best) + 3, late
    late_loss = sum(r[f"online/block{best}_loss"] for r in rows[half:]) / (len(rows) - half)
    assert late_loss < math.log(10), late_loss  # below the loss of a uniform guess


def test_resume_equals_uninterrupted_run_with_the_probe(tmp_path):
    # log_every=2 and a stop after step 5: the checkpoint falls inside a metrics window, which must carry over.
    overrides = ("noise.type=global", "train.epochs=3", "online_probe.enabled=true", "train.log_every=2")
    full = pretrain(tiny_config(tmp_path / "full", *overrides))
    part = tiny_config(tmp_path / "part", *overrides)
    pretrain(part, stop_after=5)
    pretrain(resume_config(part.out), resume=True)
    a = load_checkpoint(full / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "part/checkpoints/last.pt")
    assert a["step"] == b["step"] == 12
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["online_probe"]["module"], b["online_probe"]["module"])
    rows_full, rows_part = run_metrics(full), run_metrics(tmp_path / "part")
    assert [r["step"] for r in rows_full] == [r["step"] for r in rows_part] == [2, 4, 6, 8, 10, 12]
    for x, y in zip(rows_full, rows_part, strict=True):
        assert {k: v for k, v in x.items() if k.startswith(("loss", "online/"))} == \
            {k: v for k, v in y.items() if k.startswith(("loss", "online/"))}


def test_probe_can_be_switched_on_when_resuming(tmp_path):
    full = pretrain(tiny_config(tmp_path / "full", "train.epochs=3"))
    part = pretrain(tiny_config(tmp_path / "part", "train.epochs=3"), stop_after=5)
    pretrain(resume_config(part, ["online_probe.enabled=true", "online_probe.lr=0.05"]), resume=True)
    a, b = (load_checkpoint(run / "checkpoints/last.pt") for run in (full, part))
    assert_same_tensors(a["model"], b["model"])
    assert b["online_probe"]["optimizer"]["param_groups"][0]["lr"] == 0.05
    rows = run_metrics(part)
    assert not any("online/block1_top1" in r for r in rows if r["step"] <= 5)
    assert all("online/block1_top1" in r for r in rows if r["step"] > 5)


# ---------------------------------------------------------------------------------------------------------
# Two gloo processes


def _two_process_worker(rank: int, world: int, out: str, run: list[str]) -> None:
    # The probe alone: each process steps on its own half of the batch; the averaged gradients keep the two
    # copies identical, and the window's counts are global.
    probe = OnlineProbe([8], num_classes=4, cfg=OnlineProbeConfig())
    for step in range(3):
        x, y = _clusters(16, 8, 4, seed=step)
        probe.step([x[rank * 8: (rank + 1) * 8]], y[rank * 8: (rank + 1) * 8])
    local = {"seen": probe.seen.item(), "correct": probe.correct.item()}
    torch.save({"weight": probe.classifiers[0].weight.detach(), **local, "window": probe.window_metrics()},
               f"{out}.{rank}")
    pretrain(tiny_config(run[0], *run[1:]))


def test_two_processes_average_the_probe_and_leave_the_model_alone(tmp_path):
    single = pretrain(tiny_config(tmp_path / "one", *DDP_RUN))  # probe off
    spawn(_two_process_worker, 2, str(tmp_path / "r"), [str(tmp_path / "two"), *DDP_RUN, "online_probe.enabled=true"])
    a, b = (torch.load(tmp_path / f"r.{rank}", weights_only=True) for rank in range(2))
    assert a["weight"].abs().sum() > 0 and torch.equal(a["weight"], b["weight"])
    assert a["seen"] == b["seen"] == 24 and a["window"] == b["window"]  # 8 local images x 3 steps; summed: 48
    assert a["window"][0][0] == pytest.approx(100 * (a["correct"] + b["correct"]) / 48)
    assert_same_model(single, tmp_path / "two")
    rows = run_metrics(tmp_path / "two")
    assert rows and all(set(_online_keys(range(1, 5))) <= r.keys() for r in rows)
