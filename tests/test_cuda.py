"""The CUDA path, skipped without a GPU (CI has none): on a GPU machine, ``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from blockssl.execution import Trainer, build_optimizers, lean_step
from blockssl.memory import model_accounting
from blockssl.train import pretrain
from tests.conftest import run_metrics, tiny_config
from tests.models.test_lean_head import _heads, _rel, assert_same_heads
from tests.test_method import _model, _views

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel", [1, 3])
def test_lean_head_on_cuda_matches_the_plain_head_in_float64(kernel):
    plain, lean = (h.cuda() for h in _heads(kernel))
    x = torch.randn(7, 5, 6, 7, dtype=torch.float64, device="cuda") * 2 + 0.5
    xp, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_l = plain(xp), lean(xl)
    g = torch.randn_like(out_p)
    out_p.backward(g)
    out_l.backward(g)
    assert _rel(out_l, out_p) < 1e-10
    assert_same_heads(plain, lean, xp, xl)


def test_lean_head_under_bf16_autocast_on_cuda_stays_close():
    plain, lean = (h.float().cuda() for h in _heads(1))
    x = torch.randn(16, 5, 12, 12, device="cuda", requires_grad=True)
    xl = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_p, out_l = plain(x), lean(xl)
    assert out_l.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_l.float(), out_p.float(), rtol=0.03, atol=0.03)
    g = torch.randn(out_p.shape, device="cuda")
    out_p.float().backward(g)
    out_l.float().backward(g)
    assert (xl.grad - x.grad).norm() < 0.05 * x.grad.norm()  # bf16 convolutions in both


@pytest.mark.parametrize(("switches", "rel"), [(["train.amp=bf16", "train.channels_last=true"], 0.02),
                                               (["train.amp=fp16", "train.momentum_dtype=bfloat16"], 0.02),
                                               (["train.log_saved_memory=true"], 1e-4),
                                               (["train.compile=true"], 1e-3)])
def test_training_on_cuda_follows_float32_eager(tmp_path, switches, rel):
    """Four steps on the GPU with each switch: the losses of the plain float32 eager run, to a tolerance."""
    runs = [pretrain(tiny_config(tmp_path / name, "train.device=cuda", "train.max_steps=4", *overrides))
            for name, overrides in (("plain", ()), ("switched", switches))]
    losses = [[r["loss"] for r in run_metrics(run)] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=rel)
    if "train.log_saved_memory=true" in switches:
        assert all("saved_mb/block1" in r for r in run_metrics(runs[1]))


def test_checkpointed_stages_on_cuda_train_like_plain_end_to_end(tmp_path):
    runs = [pretrain(tiny_config(tmp_path / flag, "train.device=cuda", "train.max_steps=4", "train.scheme=end_to_end",
                                 f"train.checkpoint_stages={flag}")) for flag in ("false", "true")]
    losses = [[r["loss"] for r in run_metrics(run)] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_saved_bytes_on_cuda_equal_the_cpu_count(tmp_path):
    model, cfg = _model(tmp_path)
    saved = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device).train()
        trainer = Trainer(m, build_optimizers(m, cfg.train), torch.amp.GradScaler(device, enabled=False),
                          nullcontext(), cfg.seed)
        with model_accounting(m) as acc:
            lean_step(trainer, *(v.to(device) for v in _views()), 0)
        saved[device] = acc.result().parts
    assert saved["cuda"] == saved["cpu"]


def test_colour_operations_on_cuda_equal_the_cpu():
    from blockssl.data.photometric import to_device
    from blockssl.data.transforms import two_view_transforms
    from tests.data.test_datasets import INFOS, _random_image

    view, _ = two_view_transforms("simclr", INFOS["rgb96"], blur="true", photometric="device")
    image = _random_image(3, 110)
    rows = []
    for seed in range(16):
        torch.manual_seed(seed)
        rows.append(view(image))
    batch = [torch.stack([c for c, _ in rows]), torch.stack([p for _, p in rows])]
    torch.testing.assert_close(to_device(view, batch, torch.device("cuda")).cpu(),
                               to_device(view, batch, torch.device("cpu")), atol=1e-4, rtol=0)


def test_a_run_with_colour_operations_on_cuda(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "train.device=cuda", "data.photometric=device", "data.blur=true",
                               "train.epochs=1", "train.channels_last=true"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in run_metrics(run))
