"""`blockssl report`: report.md with its PNG figures and tables, from real (tiny) run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from blockssl.cli import main
from blockssl.eval.probe import run_probe
from blockssl.eval.robustness import run_robustness
from blockssl.report import FIGURES, throughput, write_report
from blockssl.reporting import read_metrics
from blockssl.train import pretrain
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A blockwise run (online probe on, probed with random init, robustness against the other) and an end-to-end
    run (probed)."""
    root = tmp_path_factory.mktemp("report")
    blockwise = pretrain(tiny_config(root / "blockwise", "online_probe.enabled=true"))
    end_to_end = pretrain(tiny_config(root / "end_to_end", "train.scheme=end_to_end"))
    probe = ["probe.epochs=3", "probe.batch_size=16", "probe.lrs=[0.1]", "probe.knn_k=[20]"]
    run_probe(blockwise, probe, random_init=True)
    run_probe(end_to_end, probe)
    run_robustness(blockwise, ["robustness.corruptions=[gaussian_noise,fog]", "robustness.severities=[1,3,5]"],
                   baseline=end_to_end)
    return blockwise, end_to_end


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 20, f"{path} looks blank"


def test_report_of_two_runs_has_every_figure_and_table(runs, tmp_path):
    blockwise, end_to_end = runs
    path = write_report([blockwise, end_to_end], tmp_path / "out")
    assert path == tmp_path / "out" / "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["report.md", *FIGURES.values()])
    for name in FIGURES.values():
        _check_png(path.parent / name)
    text = path.read_text()
    for name in FIGURES.values():
        assert f"]({name})" in text
    assert "`train.scheme: 'simultaneous' -> 'end_to_end'`" in text
    assert "random init" in text and "mCE" in text
    probe = json.loads((blockwise / "probe.json").read_text())["run"]["blocks"]
    assert f"| concat | {probe['concat']['top1']:.1f} / {probe['concat']['knn20_top1']:.1f}" in text
    mce = json.loads((blockwise / "robustness.json").read_text())["blocks"]["block4"]["mce"]
    assert f"/ {mce:.1f} /" in text
    ips = throughput(read_metrics(blockwise / "metrics.jsonl"))
    assert ips is not None and f"| {ips:.0f} |" in text


def test_report_defaults_to_the_first_run_and_says_what_is_missing(runs, tmp_path):
    bare = pretrain(tiny_config(tmp_path / "bare", "train.epochs=1"))
    stale = bare / FIGURES["probe"]
    stale.write_bytes(b"old")  # a figure from an earlier report without data now is removed
    assert main(["report", str(bare)]) == 0
    text = (bare / "report.md").read_text()
    assert "run `blockssl probe RUN_DIR` first" in text and "run `blockssl robustness RUN_DIR` first" in text
    _check_png(bare / FIGURES["loss"])
    assert not stale.exists() and not (bare / FIGURES["severity"]).exists()
    assert not (bare / FIGURES["online"]).exists() and "## Online probe" not in text


def test_torn_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "images_per_sec": 10.0}\n{"step": 2, "images_per_sec": 30.0}\n{"step": 3, "ima')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert throughput(read_metrics(path)) == pytest.approx(20.0)


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
