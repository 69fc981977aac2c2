"""Training runs end to end on tiny synthetic data: run-directory files, resume, schemes, a falling loss."""

from __future__ import annotations

import json

import pytest
import torch

from blockssl.checkpoint import load_checkpoint
from blockssl.config import resume_config
from blockssl.data.datasets import dataset_info
from blockssl.method import build_model
from blockssl.runtime import seed_everything
from blockssl.train import pretrain
from tests.conftest import assert_same_model, assert_same_tensors, run_metrics, tiny_config


def test_run_directory_holds_exactly_the_promised_files(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run"))
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == ["backbone.pt", "checkpoints/last.pt", "checkpoints/step-00000004.pt",
                     "checkpoints/step-00000008.pt", "config.yaml", "metrics.jsonl", "run.json"]
    rows = run_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))  # 64 images / 16 per batch x 2 epochs
    for key in ["lr", "loss", "images_per_sec", *(f"{name}/block{k}" for name in ("loss", "std", "weight_change",
                                                                                "rankme") for k in range(1, 5))]:
        assert all(key in row for row in rows), key
    info = json.loads((run / "run.json").read_text())
    assert {"command", "git_revision", "torch"} <= info.keys()
    assert info["command"][0] == "blockssl"  # not the interpreter's absolute path to it (a committed run's record)
    assert resume_config(run).model.width == 0.125  # the saved config reads back


def test_resume_equals_uninterrupted_run(tmp_path):
    full = pretrain(tiny_config(tmp_path / "full", "noise.type=global", "train.epochs=3"))
    part = tiny_config(tmp_path / "part", "noise.type=global", "train.epochs=3")
    pretrain(part, stop_after=5)  # mid-epoch (4 steps per epoch), as a preempted job
    assert load_checkpoint(part.out + "/checkpoints/last.pt")["step"] == 5
    pretrain(resume_config(part.out), resume=True)
    a = load_checkpoint(full / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "part/checkpoints/last.pt")
    assert a["step"] == b["step"] == 12
    assert_same_tensors(a["model"], b["model"])
    assert [r["loss"] for r in run_metrics(full)] == [r["loss"] for r in run_metrics(tmp_path / "part")]
    # Weight change is measured from the seed's initialisation in the resumed call too, not from the checkpoint.
    measured = [[v for k, v in r.items() if k.startswith(("weight_change/", "rankme/"))] for r in run_metrics(full)]
    assert measured == [[v for k, v in r.items() if k.startswith(("weight_change/", "rankme/"))]
                        for r in run_metrics(tmp_path / "part")]


def test_sequential_scheme_freezes_earlier_blocks(tmp_path):
    cfg = tiny_config(tmp_path / "seq", "train.scheme=sequential", "train.epochs=2")  # 8 steps: 2 per block
    run = pretrain(cfg, stop_after=2)
    after_block1 = load_checkpoint(run / "checkpoints/last.pt")["model"]
    pretrain(resume_config(run), resume=True)
    final = load_checkpoint(run / "checkpoints/last.pt")["model"]
    block1 = [k for k in final if k.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "heads.0"))]
    assert block1 and all(torch.equal(final[k], after_block1[k]) for k in block1)
    later = [k for k in final if k.startswith("backbone.layer4") and k.endswith("weight")]
    assert any(not torch.equal(final[k], after_block1[k]) for k in later)
    losses = [[k for k in r if k.startswith("loss/")] for r in run_metrics(run)]
    assert losses == [["loss/block1"]] * 2 + [["loss/block2"]] * 2 + [["loss/block3"]] * 2 + [["loss/block4"]] * 2


def test_blocks_frozen_at_random_init_stay_at_init(tmp_path):
    cfg = tiny_config(tmp_path / "frozen", "train.frozen_blocks=[1,2]")
    seed_everything(cfg.seed)
    info = dataset_info(cfg.data)
    init = build_model(cfg, info.channels, info.image_size).state_dict()
    run = pretrain(cfg)
    final = load_checkpoint(run / "checkpoints/last.pt")["model"]
    for key in init:
        if key.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")):
            assert torch.equal(init[key], final[key]), key
    assert not torch.equal(init["backbone.layer3.0.conv1.weight"], final["backbone.layer3.0.conv1.weight"])
    assert set(run_metrics(run)[0]) >= {"loss/block3", "loss/block4"} and "loss/block1" not in run_metrics(run)[0]


@pytest.mark.parametrize("loss", ["barlow_twins", "simclr", "vicreg"])
def test_loss_falls(tmp_path, loss):
    cfg = tiny_config(tmp_path / loss, f"loss.name={loss}", "train.epochs=8", "noise.type=none",
                      "train.optimizer=adamw", "train.lr=0.5", "train.bias_lr=0", "train.warmup_epochs=1")
    rows = run_metrics(pretrain(cfg))
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.97 * first, (first, last)  # VICReg falls slowest here (about 5% in 32 steps)


def test_compiled_training_matches_eager(tmp_path):
    """train.compile=true (torch.compile of every stage, head and projector, in place) trains as eager mode does,
    and its checkpoints keep the plain parameter names. The slowest test (about a minute of compilation on CPU)."""
    runs = [pretrain(tiny_config(tmp_path / flag, f"train.compile={flag}", "train.max_steps=3"))
            for flag in ("false", "true")]
    assert_same_model(*runs)  # the same parameter names, weights within 1e-4 relative / 1e-5 absolute
    losses = [[r["loss"] for r in run_metrics(run)] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.parametrize(("switches", "rel"), [(["train.channels_last=true"], 1e-5),
                                               (["train.amp=bf16", "train.channels_last=true"], 0.01),
                                               (["train.amp=fp16", "train.channels_last=true"], 0.01)])
def test_gpu_switches_train_like_float32_on_the_cpu(tmp_path, switches, rel):
    """channels_last is a layout, not a change of computation (noise included); autocast (with a GradScaler for
    fp16) stays within 1% of float32's losses over a few steps, and the weights stay float32."""
    runs = [pretrain(tiny_config(tmp_path / name, *overrides, "train.max_steps=4"))
            for name, overrides in (("fp32", ()), ("switched", switches))]
    losses = [[r["loss"] for r in run_metrics(run)] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=rel)
    state = load_checkpoint(runs[1] / "checkpoints/last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
