"""Loggers: TensorBoard receives exactly what metrics.jsonl does, a resumed run leaves no step twice, evaluation
results land at the run's final step, a missing optional package is a clear error before any work, and wandb logs
offline (when installed)."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from blockssl.cli import main
from blockssl.config import ConfigError, resume_config
from blockssl.eval.probe import run_probe
from blockssl.eval.robustness import run_robustness
from blockssl.loggers import TensorBoardLogger
from blockssl.train import pretrain
from tests.conftest import TINY, run_metrics, tiny_config

Series = dict[str, list[tuple[int, float]]]  # name -> (step, value) in logging order


def tensorboard_scalars(run: Path) -> Series:
    """Every scalar of ``<run>/tensorboard`` as TensorBoard shows it (events a resumed run purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def jsonl_scalars(run: Path) -> Series:
    series: Series = {}
    for row in run_metrics(run):
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((row["step"], value))
    return series


def assert_same_scalars(tensorboard: Series, jsonl: Series) -> None:
    """Same names, same steps, same values to float32 precision (what TensorBoard stores)."""
    assert tensorboard.keys() == jsonl.keys()
    for name, points in jsonl.items():
        assert [s for s, _ in tensorboard[name]] == [s for s, _ in points], name
        assert np.array_equal(np.float32([v for _, v in tensorboard[name]]), np.float32([v for _, v in points])), name


def test_tensorboard_gets_what_metrics_jsonl_gets_and_a_resume_purges_the_steps_it_repeats(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.loggers=[jsonl,tensorboard]", "online_probe.enabled=true",
                      "train.log_saved_memory=true")
    run = pretrain(cfg)
    logged = tensorboard_scalars(run)
    assert {"loss", "loss/block1", "std/block4", "online/block1_top1", "saved_mb/block2", "weight_change/block3",
            "rankme/block4", "lr", "epoch", "images_per_sec", "nonfinite_skipped"} <= logged.keys()
    assert_same_scalars(logged, jsonl_scalars(run))
    # Roll the run back to its checkpoint of step 4, as if killed after logging step 8 but before saving it: the
    # resumed call logs steps 5-8 again (images/s differs), and TensorBoard must show only the new ones.
    (run / "checkpoints" / "last.pt").unlink()  # a hard link to step 8's file: replaced, not written through
    shutil.copy(run / "checkpoints" / "step-00000004.pt", run / "checkpoints" / "last.pt")
    pretrain(resume_config(run), resume=True)
    assert [r["step"] for r in run_metrics(run)] == list(range(1, 9))
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per call
    assert_same_scalars(tensorboard_scalars(run), jsonl_scalars(run))


def test_evaluation_results_reach_the_runs_tensorboard_at_its_final_step(tmp_path, monkeypatch):
    run = pretrain(tiny_config(tmp_path / "run", "train.loggers=[tensorboard]", "data.synthetic_size=256",
                               "train.epochs=1"))
    # jsonl, left out, is written all the same, and the saved configuration says so.
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["loggers"] == ["jsonl", "tensorboard"]
    final = run_metrics(run)[-1]["step"]
    probe = run_probe(run, ["probe.weight_decays=[1e-2]", "probe.knn_k=[5]", "probe.label_fractions=[0.1]"])
    robustness = run_robustness(run, ["robustness.corruptions=[contrast]", "robustness.severities=[2]",
                                      "robustness.max_images=32"])
    logged = tensorboard_scalars(run)
    blocks = probe["run"]["blocks"]
    expected = {"probe/block1_linear_top1": blocks["block1"]["top1"],
                "probe/concat_linear_top5": blocks["concat"]["top5"],
                "probe/block2_knn5_top1": blocks["block2"]["knn5_top1"],
                "probe/block3_labels10pct_top1": blocks["block3"]["labels10pct_top1"],
                "probe/pooled/block4_linear_top1": probe["run"]["pooled"]["block4"]["top1"],
                "robustness/block1_clean_error": robustness["blocks"]["block1"]["clean_error"],
                "robustness/concat_mean_corruption_error": robustness["blocks"]["concat"]["mean_corruption_error"],
                "robustness/block4/contrast_error": robustness["blocks"]["block4"]["errors"]["contrast"]["2"]}
    for name, value in expected.items():
        assert logged[name] == [(final, pytest.approx(value, rel=1e-6))], name
    assert not any(name.startswith("probe/val") or "grid" in name for name in logged)  # accuracies only
    assert not any(key.startswith(("probe/", "robustness/")) for row in run_metrics(run) for key in row)
    # The run's loggers are built before evaluating: a missing package fails before any work.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    (run / "probe.json").unlink()
    with pytest.raises(ConfigError, match=r"pip install 'blockssl\[tensorboard\]'"):
        run_probe(run)
    assert not (run / "probe.json").exists()


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_logger_package_names_its_extra_before_any_work(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: its import fails
    with pytest.raises(ConfigError, match=rf"train.loggers: {name} needs .* pip install 'blockssl\[{name}\]'"):
        pretrain(tiny_config(tmp_path / "run", f"train.loggers=[{name}]"))
    assert not (tmp_path / "run").exists()
    assert main(["pretrain", *TINY, f"out={tmp_path / 'run'}", f"train.loggers=[{name}]"]) == 2
    assert f"pip install 'blockssl[{name}]'" in capsys.readouterr().err


def test_loggers_are_listed_once_with_jsonl_first_and_typos_suggest_the_name(tmp_path):
    assert tiny_config(tmp_path, "train.loggers=[tensorboard,jsonl,tensorboard]").train.loggers == [
        "jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match=r"train\.loggers.*did you mean 'tensorboard'"):
        tiny_config(tmp_path, "train.loggers=[tensorbord]")


def test_tensorboard_skips_what_is_not_a_number_and_keeps_non_finite_values(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tensorboard")
    logger.log({"step": 3, "loss/block1": math.nan, "lr": 0.5, "nonfinite_skipped": 2, "note": "text", "none": None})
    logger.close()
    logged = tensorboard_scalars(tmp_path)
    assert logged.keys() == {"loss/block1", "lr", "nonfinite_skipped"}
    assert math.isnan(logged["loss/block1"][0][1]) and logged["lr"] == [(3, 0.5)]


def test_wandb_logs_offline_into_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = pretrain(tiny_config(tmp_path / "run", "train.loggers=[wandb]", "train.max_steps=2"))
    assert (run / "wandb" / "blockssl-run-id").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
