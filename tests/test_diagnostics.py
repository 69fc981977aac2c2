"""Training diagnostics: RankMe and the relative weight change against hand computations, and a tiny run that logs
both for every block at every logging step, shows them in its report and trains exactly as without them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blockssl.checkpoint import load_checkpoint
from blockssl.diagnostics import block_weights, rankme, relative_change, snapshot
from blockssl.method import build_model
from blockssl.report import write_report
from blockssl.train import pretrain
from tests.conftest import assert_same_tensors, run_metrics, tiny_config


def _orthonormal(n: int, d: int, seed: int) -> torch.Tensor:
    """An (n, d) matrix with orthonormal columns (n >= d)."""
    return torch.linalg.qr(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_rankme_of_r_equal_singular_values_is_r(r):
    u, v = _orthonormal(64, 16, 0), _orthonormal(16, 16, 1)
    z = 2.5 * u[:, :r] @ v[:, :r].T  # singular values: r times 2.5, then zeros
    assert torch.linalg.matrix_rank(z) == r
    assert rankme(z).item() == pytest.approx(r, rel=1e-4)  # eps = 1e-7 shifts it by about 1e-5


def test_rankme_of_a_rank_one_matrix_is_one_and_of_a_gaussian_close_to_its_width():
    g = torch.Generator().manual_seed(0)
    assert rankme(torch.outer(torch.randn(256, generator=g), torch.randn(32, generator=g))).item() == pytest.approx(
        1.0, abs=1e-3)
    # N >> D: the singular values are all about sqrt(N) (within 1 +- sqrt(D/N)), so RankMe is close to D.
    assert 0.97 * 32 < rankme(torch.randn(8192, 32, generator=g)).item() <= 32
    # Bounded by min(N, D): a batch of 8 images shows at most 8 directions of 32.
    assert rankme(torch.randn(8, 32, generator=g)).item() <= 8


def test_rankme_dtype_device_and_degenerate_inputs():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    value = rankme(z)
    assert value.dim() == 0 and value.dtype == torch.float32 and value.device == z.device
    assert rankme(z.bfloat16()).dtype == torch.float32  # computed in float32, not bfloat16
    assert rankme(z.bfloat16()).item() == pytest.approx(value.item(), rel=1e-2)
    assert rankme(z.double()).dtype == torch.float64
    assert rankme(torch.zeros(8, 4)).item() == pytest.approx(1.0, abs=1e-4)  # all collapsed: 1, not NaN
    z[3, 2] = math.nan
    assert math.isnan(rankme(z).item())  # instead of the SVD's error


def test_relative_change_by_hand():
    initial = [torch.tensor([[3.0, 0.0]]), torch.tensor([[[0.0]], [[4.0]]])]  # ||W0|| = 5
    current = [torch.tensor([[3.0, 1.0]]), torch.tensor([[[2.0]], [[4.0]]])]  # W - W0 = (0, 1, 2, 0)
    assert relative_change(current, initial).item() == pytest.approx(math.sqrt(5) / 5)
    assert relative_change(initial, initial).item() == 0


def test_snapshot_holds_copies_of_each_blocks_convolutions(tmp_path):
    cfg = tiny_config(tmp_path, "model.zero_init_residual=true")
    model = build_model(cfg, 3, 16)
    weights = block_weights(model, 1)
    convs = [m for m in model.blocks[1].modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(weights) == len(convs) and all(w is c.weight for w, c in zip(weights, convs, strict=True))
    initial = snapshot(model, [1, 3])
    assert list(initial) == [1, 3]
    with torch.no_grad():
        weights[0].mul_(1.1)  # the snapshot is a copy: it keeps the initialisation
    assert relative_change(block_weights(model, 1), initial[1]).item() > 0
    assert relative_change(block_weights(model, 3), initial[3]).item() == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # No warm-up: the first step already moves the weights.
    return pretrain(tiny_config(tmp_path_factory.mktemp("diagnostics") / "run", "train.warmup_epochs=0"))


def test_every_logged_line_holds_every_blocks_weight_change_and_rankme(run):
    rows = run_metrics(run)
    assert len(rows) == 8
    for row in rows:
        for k in range(1, 5):
            assert row[f"weight_change/block{k}"] > 0
            assert 1 <= row[f"rankme/block{k}"] <= 16 + 1e-3  # min(batch 16, model.head_dim=16)
    for k in range(1, 5):
        assert rows[-1][f"weight_change/block{k}"] > rows[0][f"weight_change/block{k}"]


def test_report_tabulates_the_last_logged_diagnostics(run, tmp_path):
    text = write_report([run], tmp_path).read_text()
    last = run_metrics(run)[-1]
    assert "## Training diagnostics" in text and "| block | run: weight change (%) / RankMe |" in text
    for k in range(1, 5):
        assert f"| block{k} | {100 * last[f'weight_change/block{k}']:.2f} / {last[f'rankme/block{k}']:.1f} |" in text
    assert (tmp_path / "report_weight_change.png").is_file() and (tmp_path / "report_rankme.png").is_file()


@pytest.mark.parametrize("scheme", ["simultaneous", "end_to_end", "sequential"])
def test_measuring_at_every_step_changes_no_weight(tmp_path, scheme):
    """Logging asks the step for features (a head forward in eval mode for blocks without a loss): logging at
    every step or at the last one only trains bit-identically."""
    runs = [pretrain(tiny_config(tmp_path / str(every), f"train.scheme={scheme}", "noise.type=global",
                                 f"train.log_every={every}")) for every in (1, 8)]
    a, b = (load_checkpoint(r / "checkpoints/last.pt") for r in runs)
    assert_same_tensors(a["model"], b["model"])
    last = [{k: v for k, v in run_metrics(r)[-1].items() if k != "images_per_sec"} for r in runs]
    assert last[0] == last[1]  # the diagnostics themselves included
