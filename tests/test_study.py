"""Studies: the run directories and result files, aggregation against hand-computed statistics, skipping and
resuming, the refusal of a changed study, and the job-array and SLURM entry points."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from blockssl import stats
from blockssl.checkpoint import load_checkpoint
from blockssl.cli import main
from blockssl.config import ConfigError, apply_overrides, load_config
from blockssl.eval.probe import pixel_probe
from blockssl.study import driver, render
from blockssl.study.depth import depth_key, depth_names
from blockssl.study.driver import parse_only, run_commands, run_one, run_study, submit_slurm
from blockssl.study.progress import format_status, status
from blockssl.study.render import difference_metrics, per_block_panels, write_results
from blockssl.study.results import summary as summarize
from blockssl.study.spec import Study, check_unchanged, load_study
from blockssl.train import pretrain
from tests.conftest import TINY, assert_same_tensors, run_metrics

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"probe": ["probe.epochs=2", "probe.label_fractions=[0.5]"],
        "robustness": ["robustness.corruptions=[gaussian_noise]", "robustness.severities=[1,3]"]}


PRIMARY = {"variant": "blockwise", "baseline": "end_to_end", "block": "block4", "metric": "linear_top1"}


def _write_study(root: Path, **changes: object) -> Path:
    (root / "base.yaml").write_text("data:\n  name: synthetic\n")
    spec = {"base": str(root / "base.yaml"), "out": str(root / "study"), "seeds": [0, 1],
            "overrides": [*TINY, "train.epochs=1", "data.synthetic_size=48"],
            "variants": {"end_to_end": ["train.scheme=end_to_end", "noise.type=none", "model.head=gap"],
                         "blockwise": []},
            "evaluate": ["probe", "robustness"], "baseline": "end_to_end", **EVAL}
    spec.update(changes)
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny study (two variants, two seeds) driven to the end; returns its study file."""
    path = _write_study(tmp_path_factory.mktemp("study"))
    run_study(load_study(path))
    return path


def test_the_study_writes_run_directories_and_results(finished):
    out = Path(load_study(finished).out)
    assert sorted(p.name for p in out.iterdir()) == [
        "blockwise", "differences.png", "end_to_end", "per_block_top1.png", "pixels", "results.csv",
        "results.json", "results.md", "study.yaml"]
    assert sorted(p.name for p in (out / "pixels").iterdir()) == ["seed0", "seed1"]
    for variant in ("blockwise", "end_to_end"):
        for seed in (0, 1):
            run = out / variant / f"seed{seed}"
            assert {"config.yaml", "backbone.pt", "probe.json", "robustness.json", "study_timing.json"} <= {
                p.name for p in run.iterdir()}
            assert load_config(run / "config.yaml").seed == seed
    md = (out / "results.md").read_text()
    assert "## Linear probe top-1 (%)" in md and "## Relative mCE (%)" in md and "![per_block_top1.png]" in md
    assert "Runs finished: 4 of 4." in md


def test_the_raw_pixel_probe_is_reported_per_seed_under_the_studys_probe_settings(finished):
    study = load_study(finished)
    rows = json.loads((Path(study.out) / "results.json").read_text())["rows"]
    pixels = {r["seed"]: r["value"] for r in rows if r["variant"] == "pixels" and r["metric"] == "linear_top1"}
    cfg = study.config(study.baseline, 1)
    apply_overrides(cfg, study.probe, ("probe", "data"))
    assert pixels[1] == pixel_probe(cfg, seed=1)["blocks"]["pixels"]["top1"] and set(pixels) == {0, 1}
    md = (Path(study.out) / "results.md").read_text()
    mean = statistics.fmean(pixels.values())
    assert f"Raw pixels under the same probe settings (no network): {mean:.2f} ± " in md
    assert "| pixels |" not in md  # one number, not a row of blocks


def test_a_metric_table_holds_only_the_variants_evaluated_for_it(finished, tmp_path):
    spec = yaml.safe_load(finished.read_text())
    shutil.copytree(spec["out"], tmp_path / "out")
    (tmp_path / "out/blockwise/seed0/robustness.json").unlink()
    (tmp_path / "out/blockwise/seed1/robustness.json").unlink()
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**spec, "out": str(tmp_path / "out")}, sort_keys=False))
    md = write_results(load_study(path)).read_text()
    mce = md[md.index("## mCE (%)"):md.index("## Relative mCE (%)")]
    assert "| end_to_end |" in mce and "| blockwise |" not in mce and "Difference" not in mce
    linear = md[md.index("## Linear probe"):md.index("## kNN")]
    assert "| end_to_end |" in linear and "| blockwise |" in linear and "| - |" not in linear


def test_aggregation_matches_hand_computed_statistics(finished):
    study = load_study(finished)
    out = Path(study.out)
    top1 = {(v, s): json.loads((out / v / f"seed{s}" / "probe.json").read_text())["run"]["blocks"]["block4"]["top1"]
            for v in study.variants for s in study.seeds}
    summary = {(r["variant"], r["block"], r["metric"]): r for r in json.loads((out / "results.json").read_text())[
        "summary"]}
    blockwise = summary[("blockwise", "block4", "linear_top1")]
    values = [top1[("blockwise", 0)], top1[("blockwise", 1)]]
    assert blockwise["mean"] == pytest.approx(statistics.fmean(values))
    assert blockwise["std"] == pytest.approx(statistics.stdev(values))
    diffs = [top1[("blockwise", s)] - top1[("end_to_end", s)] for s in (0, 1)]
    assert blockwise["diff_mean"] == pytest.approx(statistics.fmean(diffs))
    assert blockwise["diff_std"] == pytest.approx(statistics.stdev(diffs))
    # The baseline against itself: mCE and relative mCE 100, difference 0.
    base = summary[("end_to_end", "block4", "mce")]
    assert base["mean"] == pytest.approx(100) and base["diff_mean"] == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["metric"] for r in rows} == {"linear_top1", "knn_top1", "pool_linear_top1", "pool_knn_top1", "mce",
                                          "relative_mce", "weight_change", "rankme", "train_time_s"}
    # The diagnostics are the run's last logged line, the weight change in % of the initial norm.
    last = json.loads((out / "blockwise" / "seed1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert [float(r["value"]) for r in rows if r["metric"] == "weight_change" and r["variant"] == "blockwise"
            and r["seed"] == "1" and r["block"] == "block3"] == [pytest.approx(100 * last["weight_change/block3"])]
    # variants x seeds x (4 blocks + concat), and the raw-pixel probe of each seed
    assert len([r for r in rows if r["metric"] == "linear_top1"]) == 2 * 2 * 5 + 2


def test_a_second_drive_skips_everything(finished, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    for name in ("train.pretrain", "eval.probe.run_probe", "eval.robustness.run_robustness"):
        module, attr = name.rsplit(".", 1)
        monkeypatch.setattr(f"blockssl.{module}.{attr}", fail)
    run_study(load_study(finished))


def test_a_run_with_its_evaluation_files_but_no_checkpoints_is_done(finished, monkeypatch):
    """What a study keeps in version control (no checkpoints) is enough to skip its finished runs."""
    study = load_study(finished)
    run = study.run_dir("blockwise", 1)
    for name in ("backbone.pt", "probes.pt"):
        (run / name).unlink()
    monkeypatch.setattr("blockssl.train.pretrain", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run_one(study, "blockwise", 1) == run


def test_an_interrupted_run_is_resumed_to_the_uninterrupted_result(tmp_path, capsys):
    study = load_study(_write_study(tmp_path, variants={"blockwise": []}, baseline="blockwise", seeds=[0], evaluate=[]))
    cfg = study.config("blockwise", 0)
    pretrain(cfg, stop_after=1)  # killed after its first step's checkpoint
    run_study(study)
    log = capsys.readouterr().err.splitlines()
    assert log[0] == "[1/1] blockwise/seed0" and log[-1].startswith("[1/1] blockwise/seed0 done in ")
    run = study.run_dir("blockwise", 0)
    reference = pretrain(load_config(None, [*study.overrides, "data.name=synthetic", f"out={tmp_path / 'ref'}"]))
    assert_same_tensors(load_checkpoint(run / "checkpoints/last.pt")["model"],
                        load_checkpoint(reference / "checkpoints/last.pt")["model"])
    steps = [r["step"] for r in run_metrics(run)]
    assert steps == sorted(set(steps))  # no step logged twice


def test_status_tells_done_started_and_waiting_runs(finished, tmp_path, capsys):
    assert {r["state"] for r in status(load_study(finished))} == {"done"}
    assert main(["study", str(finished), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 of 4 runs done"
    study = load_study(_write_study(tmp_path, evaluate=["probe"]))
    pretrain(study.config("end_to_end", 0), stop_after=1)  # killed after its first step's checkpoint
    run_one(study, "blockwise", 0)
    rows = {(r["variant"], r["seed"]): r for r in status(study)}
    assert rows[("end_to_end", 0)]["state"] == "started" and rows[("end_to_end", 0)]["step"] == 1
    assert rows[("blockwise", 0)]["state"] == "done" and rows[("blockwise", 0)]["seconds"] > 0
    assert rows[("blockwise", 1)]["state"] == "not started"
    (study.run_dir("blockwise", 0) / "probe.json").unlink()
    assert status(study)[1]["state"] == "trained, to evaluate: probe"
    (study.run_dir("blockwise", 0) / "probe.json").write_text("{}")
    text = format_status(status(study))
    assert "end_to_end                  0         0  started (checkpoint at step 1)" in text
    # three runs left, each estimated at the only finished run's time
    seconds = rows[("blockwise", 0)]["seconds"]
    assert text.endswith(f"1 of 4 runs done\nabout {3 * seconds / 3600:.1f} h left at the pace of each variant's "
                         "fastest finished run")


def test_a_run_refused_before_its_directory_exists_leaves_nothing_behind(tmp_path, monkeypatch):
    study = load_study(_write_study(tmp_path, variants={"blockwise": []}, baseline="blockwise", seeds=[0],
                                    evaluate=[]))

    def refuse(*args, **kwargs):
        raise ConfigError("refused before any work")

    monkeypatch.setattr("blockssl.train.pretrain", refuse)
    with pytest.raises(ConfigError, match="refused before any work"):
        run_one(study, "blockwise", 0)
    assert not study.run_dir("blockwise", 0).exists()  # no folder holding only a timing file


def test_a_changed_study_or_recipe_is_an_error_listing_the_change(tmp_path):
    path = _write_study(tmp_path, variants={"blockwise": []}, baseline="blockwise", seeds=[0], evaluate=[])
    run_study(load_study(path))
    changed = _write_study(tmp_path, variants={"blockwise": ["noise.std=0.5"]}, baseline="blockwise", seeds=[0],
                           evaluate=[])
    with pytest.raises(ConfigError, match=r"variants: .*noise.std=0.5"):
        run_study(load_study(changed))
    _write_study(tmp_path, variants={"blockwise": []}, baseline="blockwise", seeds=[0], evaluate=[])
    (tmp_path / "base.yaml").write_text("data:\n  name: synthetic\nnoise:\n  std: 0.1\n")  # the recipe edited
    with pytest.raises(ConfigError, match=r"blockwise/seed0: noise.std: 0.25 -> 0.1"):
        run_study(load_study(path))


def test_a_study_may_grow_without_touching_its_runs(tmp_path, monkeypatch):
    """New variants and seeds (and named baselines) change no run made so far: they are accepted and recorded;
    dropping what was recorded is refused."""
    path = _write_study(tmp_path, variants={"blockwise": []}, baseline="blockwise", seeds=[0], evaluate=[])
    run_study(load_study(path))
    trained = []
    monkeypatch.setattr("blockssl.train.pretrain", lambda cfg, **k: trained.append((cfg.noise.type, cfg.seed)))
    grown = dict(variants={"blockwise": [], "quiet": ["noise.type=none"], "loud": ["noise.std=0.5"]},
                 baseline="blockwise", seeds=[0, 1], evaluate=[], baselines={"loud": "quiet"})
    study = load_study(_write_study(tmp_path, **grown))
    run_study(study)
    assert sorted(trained) == [("global", 0), ("global", 1), ("global", 1), ("none", 0), ("none", 1)]
    assert yaml.safe_load((Path(study.out) / "study.yaml").read_text())["seeds"] == [0, 1]
    assert study.baseline_of("loud") == "quiet" and study.baseline_of("quiet") == "blockwise"
    for shrunk, message in ((dict(grown, seeds=[1]), "seeds: "), (dict(grown, variants={"blockwise": []}),
                                                                   "variants: ")):
        with pytest.raises(ConfigError, match=message):
            run_study(load_study(_write_study(tmp_path, **{**shrunk, "baselines": {}})))


def test_a_variant_may_run_on_fewer_seeds(tmp_path, monkeypatch):
    """``variant_seeds`` runs a variant on a subset of the seeds (the budget series of a study at 3 of its 5);
    widening it later is growth, narrowing it or naming a seed outside the study is refused."""
    trained = []
    monkeypatch.setattr("blockssl.train.pretrain", lambda cfg, **k: trained.append((cfg.noise.type, cfg.seed)))
    spec = dict(variants={"blockwise": [], "quiet": ["noise.type=none"]}, baseline="blockwise", seeds=[0, 1, 2],
                evaluate=[], variant_seeds={"quiet": [0, 2]})
    study = load_study(_write_study(tmp_path, **spec))
    assert list(study.runs()) == [("blockwise", 0), ("quiet", 0), ("blockwise", 1), ("blockwise", 2), ("quiet", 2)]
    run_study(study)
    assert sorted(trained) == [("global", 0), ("global", 1), ("global", 2), ("none", 0), ("none", 2)]
    with pytest.raises(ConfigError, match=r"--only 'quiet/1'.*seed of \[0, 2\]"):
        parse_only(study, "quiet/1")
    check_unchanged(load_study(_write_study(tmp_path, **dict(spec, variant_seeds={"quiet": [0, 1, 2]}))))
    with pytest.raises(ConfigError, match="variant_seeds: "):
        check_unchanged(load_study(_write_study(tmp_path, **dict(spec, variant_seeds={"quiet": [0]}))))
    with pytest.raises(ConfigError, match="variant_seeds: "):  # blockwise ran on every seed already
        check_unchanged(load_study(_write_study(tmp_path, **dict(spec, variant_seeds={"blockwise": [0]}))))
    new = dict(spec, variants={**spec["variants"], "loud": ["noise.std=0.5"]}, variant_seeds={"loud": [1]})
    check_unchanged(load_study(_write_study(tmp_path, **new)))  # a new variant may start on fewer seeds
    with pytest.raises(ConfigError, match="variant_seeds must map"):
        load_study(_write_study(tmp_path, **dict(spec, variant_seeds={"quiet": [3]})))


def test_a_study_recorded_before_variant_seeds_still_loads(tmp_path):
    study = load_study(_write_study(tmp_path))
    check_unchanged(study)
    record = Path(study.out) / "study.yaml"
    saved = yaml.safe_load(record.read_text())
    del saved["variant_seeds"]
    record.write_text(yaml.safe_dump(saved, sort_keys=False))
    check_unchanged(study)
    assert yaml.safe_load(record.read_text())["variant_seeds"] == {}


def test_blocks_are_named_by_depth_so_groupings_compare_at_equal_depth(tmp_path):
    for blocks, names in (("stem+layer1,layer2,layer3,layer4", ["block1", "block2", "block3", "block4"]),
                          ("stem+layer1+layer2,layer3+layer4", ["block2", "block4"]),
                          ("stem,layer1+layer2+layer3,layer4", ["stem", "block3", "block4"])):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "resnet18", "blocks": blocks}}))
        assert depth_names(tmp_path) == {f"block{k + 1}": n for k, n in enumerate(names)}
    # A stage per residual unit (ResNet-18: two per layer): a block ending a layer keeps its name, one ending
    # inside it is named by its unit
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {
        "arch": "resnet18", "granularity": "unit", "blocks": "stem-layer2.0,layer2.1-layer3,layer4"}}))
    assert depth_names(tmp_path) == {"block1": "block2.0", "block2": "block3", "block3": "block4"}
    names = ["concat", "block4", "block3", "block3.1", "block10.0", "stem", "block3.0", "block2"]
    assert sorted(names, key=depth_key) == ["stem", "block2", "block3.0", "block3.1", "block3", "block4",
                                            "block10.0", "concat"]


def test_differences_figure_draws_every_declared_top1(tmp_path):
    values = {(v, "block4", m): {0: 1.0} for v in ("blockwise", "end_to_end")
              for m in ("linear_top1", "knn_top1", "pool_linear_top1", "pool_knn_top1", "mce")}
    plain = load_study(_write_study(tmp_path))
    assert difference_metrics(plain, values) == ["linear_top1", "knn_top1"]
    pooled = load_study(_write_study(tmp_path, primary=[
        {"variant": "blockwise", "baseline": "end_to_end", "block": "block4", "metric": "pool_linear_top1"},
        {"variant": "blockwise", "baseline": "end_to_end", "block": "block4", "metric": "mce"}]))
    assert difference_metrics(pooled, values) == ["linear_top1", "knn_top1", "pool_linear_top1"]
    del values[("blockwise", "block4", "knn_top1")], values[("end_to_end", "block4", "knn_top1")]
    assert difference_metrics(pooled, values) == ["linear_top1", "pool_linear_top1"]


def test_the_per_block_figure_sets_each_baseline_beside_its_variants_at_both_readouts(tmp_path):
    study = replace(_fake_study(tmp_path), baselines={"c": "a", "a_long": "base_long"})

    def stats(metrics: tuple[str, ...]) -> list[dict[str, object]]:
        return [{"variant": v, "block": "block4", "metric": m} for v in study.variants for m in metrics]

    rows = [("base", ["base", "a", "b", "base_long"]), ("a", ["a", "c"]), ("base_long", ["base_long", "a_long"])]
    # the raw-pixel probe's plain pooling (pixels have no head) makes no column of its own
    pixels = [{"variant": "pixels", "block": "pixels", "metric": "pool_linear_top1"}]
    assert per_block_panels(study, stats(("linear_top1", "knn_top1")) + pixels) == [
        (b, "linear_top1", m) for b, m in rows]
    assert per_block_panels(study, stats(("pool_linear_top1", "linear_top1"))) == [
        (b, metric, m) for b, m in rows for metric in ("linear_top1", "pool_linear_top1")]
    assert per_block_panels(study, stats(("knn_top1",))) == []


def test_robustness_variants_may_grow_but_not_shrink(tmp_path):
    """An empty list evaluates every variant: any list grows into it; narrowing a list, or the empty one, would leave
    runs evaluated for robustness that the study no longer asks for."""
    check_unchanged(load_study(_write_study(tmp_path, robustness_variants=["end_to_end"])))
    check_unchanged(load_study(_write_study(tmp_path, robustness_variants=["end_to_end", "blockwise"])))
    with pytest.raises(ConfigError, match="robustness_variants: "):
        check_unchanged(load_study(_write_study(tmp_path, robustness_variants=["end_to_end"])))
    check_unchanged(load_study(_write_study(tmp_path, robustness_variants=[])))  # every variant
    with pytest.raises(ConfigError, match="robustness_variants: "):
        check_unchanged(load_study(_write_study(tmp_path, robustness_variants=["end_to_end", "blockwise"])))


def test_differences_are_paired_with_each_variants_own_baseline():
    rows = [dict(variant=v, seed=s, block="block4", metric="linear_top1", value=x)
            for v, xs in {"e2e": (70.0, 72.0), "e2e_simclr": (60.0, 61.0), "simclr": (63.0, 65.0)}.items()
            for s, x in enumerate(xs)]
    stats = {r["variant"]: r for r in summarize(rows, lambda v: {"simclr": "e2e_simclr"}.get(v, "e2e"))}
    assert stats["simclr"]["baseline"] == "e2e_simclr"
    assert stats["simclr"]["diff_mean"] == pytest.approx(3.5) and stats["simclr"]["diff_std"] == pytest.approx(
        statistics.stdev([3.0, 4.0]))
    assert stats["simclr"]["diff_seeds"] == {0: 3.0, 1: 4.0}
    # the 95% interval of two paired differences: t(0.975, 1) = 12.706 standard errors
    half = 12.706 * statistics.stdev([3.0, 4.0]) / math.sqrt(2)
    assert stats["simclr"]["diff_ci95"] == pytest.approx(half)
    cell = render.difference_cell(stats["simclr"]["diff_mean"], half, stats["simclr"]["diff_seeds"])
    assert cell == f"+3.50 [{3.5 - half:.2f}, {3.5 + half:.2f}] (3.00, 4.00)"
    three = [dict(r, seed=2, value=r["value"] + (0.9 if r["variant"] == "simclr" else 0.0)) for r in rows
             if r["seed"] == 0]
    resolved = next(r for r in summarize(rows + three, lambda v: "e2e_simclr" if v == "simclr" else "e2e")
                    if r["variant"] == "simclr")
    half = 4.303 * statistics.stdev([3.0, 4.0, 3.9]) / math.sqrt(3)
    assert resolved["diff_ci95"] == pytest.approx(half)
    # exploratory: an interval that excludes zero is shown as it is, unstarred
    assert render.difference_cell(resolved["diff_mean"], half, resolved["diff_seeds"]) == (
        f"+3.63 [{3.63333 - half:.2f}, {3.63333 + half:.2f}] (3.00, 4.00, 3.90)")
    assert stats["e2e_simclr"]["diff_mean"] == pytest.approx(-10.5) and stats["e2e"]["diff_mean"] == 0
    # a baseline still missing a seed: the difference is paired over the seed both have
    partial = summarize([r for r in rows if (r["variant"], r["seed"]) != ("e2e_simclr", 1)],
                        lambda v: {"simclr": "e2e_simclr"}.get(v, "e2e"))
    simclr = next(r for r in partial if r["variant"] == "simclr")
    assert simclr["diff_seeds"] == {0: 3.0} and simclr["diff_mean"] == 3.0 and math.isnan(simclr["diff_std"])


@pytest.mark.parametrize(("change", "message"), [
    ({"baselines": {"blockwise": "nope"}}, "baselines must map variants to other variants"),
    ({"baselines": {"blockwise": "blockwise"}}, "baselines must map variants to other variants"),
    ({"variants": {}}, "'variants' is required"),
    ({"baseline": "nope"}, "baseline 'nope' is not a variant"),
    ({"seeds": [0, 0]}, "distinct integers"),
    ({"evaluate": ["probe", "fid"]}, "fid"),
    ({"colour": "blue"}, "unknown study keys colour"),
    ({"variants": {"a/b": []}, "baseline": "a/b"}, "names a folder"),
    ({"variants": {"bad": ["train.epochz=1"]}, "baseline": "bad"}, "variant .bad.*train.epochz"),
    ({"robustness_variants": ["blockwise"]}, "include the baseline 'end_to_end'"),
    ({"robustness_variants": ["end_to_end", "nope"]}, "robustness_variants"),
    ({"primary": [dict(PRIMARY, variant="nope")]},
     r"primary\[0\] \(nope - end_to_end, block4, linear_top1\): variant 'nope' is not a variant; choose one of "
     "end_to_end, blockwise"),
    ({"primary": [dict(PRIMARY, baseline="blockwise")]}, "a variant compared with itself"),
    ({"primary": [dict(PRIMARY, metric="top5")]},
     "metric 'top5' is not one both variants are evaluated for; choose one of linear_top1, knn_top1, "
     "pool_linear_top1, pool_knn_top1, mce, relative_mce"),
    ({"primary": [dict(PRIMARY, metric="mce")], "robustness_variants": ["end_to_end"]},
     "metric 'mce' .* choose one of linear_top1, knn_top1, pool_linear_top1, pool_knn_top1$"),
    ({"primary": [dict(PRIMARY, block="layer4")]},
     "block 'layer4' is not a block of both variants .* choose one of block1, block2, block3, block4, concat"),
    ({"primary": [dict(PRIMARY, block="block1")],
      "variants": {"end_to_end": [], "blockwise": ["model.blocks=stem+layer1+layer2,layer3+layer4"]}},
     "block 'block1' .* choose one of block2, block4, concat"),
    ({"primary": [{"variant": "blockwise", "baseline": "end_to_end"}]},
     r"primary\[0\]: expected a mapping of variant, baseline, block, metric"),
    ({"primary": [PRIMARY, PRIMARY]}, "declared twice"),
    ({"primary": PRIMARY}, "primary: expected a list of comparisons"),
    ({"budget": [["blockwise", "end_to_end"]]}, "budget: expected series names mapped to lists of"),
    ({"budget": {"gap": [["blockwise", "nope"]]}}, "budget 'gap': .*expected two different variants"),
    ({"budget": {"gap": [["blockwise", "end_to_end"]]}, "variants": {"end_to_end": ["train.scheme=end_to_end"],
                                                                    "blockwise": ["train.epochs=2"]}},
     r"budget 'gap': \[blockwise, end_to_end\]: train.epochs 2 against 1; a pair is one budget"),
])
def test_bad_study_files_are_clear_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_write_study(tmp_path, **change))


def test_robustness_can_be_limited_to_some_variants(tmp_path):
    study = load_study(_write_study(tmp_path, robustness_variants=["end_to_end"]))
    assert study.evaluations("end_to_end") == ["probe", "robustness"]
    assert study.evaluations("blockwise") == ["probe"]
    assert load_study(_write_study(tmp_path)).evaluations("blockwise") == ["probe", "robustness"]


def test_an_unparsable_study_file_says_how_to_quote(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base: b.yaml\nout: o\nvariants:\n  frozen: [train.frozen_blocks=[1]]\n")
    with pytest.raises(ConfigError, match=r"(?s)not valid YAML.*quote"):
        load_study(path)


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_committed_studies_reproduce_from_their_committed_runs(path, tmp_path, monkeypatch):
    """A committed study is what its record says, every committed run's configuration is what the study resolves to
    today (a changed default would make its results stale), and its committed results are exactly what the
    aggregation makes of its committed runs."""
    monkeypatch.chdir(ROOT)  # a study's paths are relative to the repository root
    study = load_study(path)
    # A study that makes claims has 3 seeds or more; a tuning study, scored on held-out training images
    # (data.holdout) and never on the test set, chooses a recipe from one seed per trial.
    tuning = study.config(study.baseline, study.seeds[0]).data.holdout > 0
    assert study.baseline in study.variants and (len(study.seeds) >= 3 or (tuning and not study.primary))
    out = Path(study.out)
    assert yaml.safe_load((out / "study.yaml").read_text()) == asdict(study)
    check_unchanged(study)
    if (out / "results.json").is_file():
        copy = tmp_path / "out"
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt", "checkpoints", "results.*"))
        write_results(replace(study, out=str(copy)))
        for name in ("results.json", "results.csv"):  # results.md names the folder
            assert (copy / name).read_text() == (out / name).read_text(), name


def test_print_gives_one_command_per_run_then_the_aggregation(tmp_path, capsys):
    path = _write_study(tmp_path)
    assert main(["study", str(path), "--print", "train.max_steps=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [*(f"blockssl study {path} train.max_steps=2 --only {v}/{s}" for s in (0, 1)
                       for v in ("end_to_end", "blockwise")), f"blockssl study {path} train.max_steps=2"]
    assert run_commands(path, load_study(path), []) [-1] == f"blockssl study {path}"
    assert main(["study", str(path), "--only", "blockwise/7"]) == 2  # not a seed of the study


def test_slurm_submission_runs_every_run_as_an_array_task(tmp_path, monkeypatch):
    """submitit's debug cluster runs the tasks in this process: the same runs as the driver would make."""
    study = load_study(_write_study(tmp_path, seeds=[0], evaluate=["probe"]))
    made = []
    monkeypatch.setattr(driver, "run_one", lambda s, v, seed: made.append((v, seed)) or run_one(s, v, seed))
    jobs = submit_slurm(study, {"timeout_min": 5}, cluster="debug")
    for job in jobs:
        job.result()
    assert sorted(made) == [("blockwise", 0), ("end_to_end", 0)]
    assert all((study.run_dir(v, 0) / "probe.json").is_file() for v, _ in made)


# ---------------------------------------------------------------------------------------------------------
# Primary comparisons: the t-test, Holm's correction, the tables and the figures


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, 40.0])
def test_the_t_test_p_value_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    # df 1 is the Cauchy distribution, df 2 has P(|T| >= t) = 1 - t / sqrt(2 + t^2)
    assert stats.t_test_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
    assert stats.t_test_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


def test_the_t_test_p_value_at_the_tabled_975_quantiles_is_005():
    for df, t in ((1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert stats.t_test_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert stats.t_test_p(math.inf, 3) == 0.0


def test_the_incomplete_beta_function_is_a_binomial_tail_at_integer_arguments():
    for a, b, x in ((2, 3, 0.4), (5, 1, 0.9), (1, 7, 0.05), (12, 9, 0.6)):
        n = a + b - 1  # I_x(a, b) = P(Binomial(a + b - 1, x) >= a)
        tail = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
        assert stats.betainc(a, b, x) == pytest.approx(tail, abs=1e-12)


def test_holm_adjusts_step_down_and_counts_untestable_comparisons():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])  # monotone: never below a smaller p's value
    adjusted = stats.holm([0.01, math.nan, 0.02])  # three declared, one not testable yet: it still counts
    assert adjusted[0] == pytest.approx(0.03) and adjusted[2] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert stats.paired({0: 2.0, 1: 2.0}).p == 0.0 and math.isnan(stats.paired({0: 2.0}).p)


def _fake_study(root: Path, **changes: object) -> Study:
    """A study whose runs are probe files written by hand (linear top-1 as below at every block, kNN one point
    lower): aggregation needs no training. Paired differences by seed: a - base 1, 2, 3; b - base 5, 5.5, 6;
    c - a 0, 1, -1; a_long - base_long 2, 3, 4."""
    variants = {"base": [], "a": [], "b": [], "c": [], "base_long": ["train.epochs=2"], "a_long": ["train.epochs=2"]}
    study = load_study(_write_study(root, variants=variants, baseline="base", seeds=[0, 1, 2], evaluate=["probe"],
                                    **changes))
    offsets = {"base": (0, 0, 0), "a": (1, 2, 3), "b": (5, 5.5, 6), "c": (1, 3, 2), "base_long": (2, 2, 2),
               "a_long": (4, 5, 6)}
    for variant, seed in study.runs():
        run = study.run_dir(variant, seed)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"blocks": "stem+layer1,layer2,layer3,layer4"}}))
        top1 = 70.0 + seed + offsets[variant][seed]
        blocks = {b: {"top1": top1, "knn20_top1": top1 - 1} for b in ("block1", "block2", "block3", "block4", "concat")}
        (run / "probe.json").write_text(json.dumps({"run": {"blocks": blocks}}))
    return study


def test_primary_comparisons_are_tested_and_holm_corrected_the_rest_is_exploratory(tmp_path):
    primary = [dict(variant="a", baseline="base", block="block4", metric="linear_top1"),
               dict(variant="b", baseline="base", block="block4", metric="knn_top1"),
               dict(variant="c", baseline="a", block="block2", metric="linear_top1")]
    study = _fake_study(tmp_path, primary=primary)
    md = write_results(study).read_text()
    results = json.loads((Path(study.out) / "results.json").read_text())["primary"]
    # paired t over 3 seeds (df 2, P(|T| >= t) = 1 - t / sqrt(2 + t^2)): t = 2 sqrt(3), 11 sqrt(3), 0
    p = [1 - t / math.sqrt(2 + t * t) for t in (2 * math.sqrt(3), 11 * math.sqrt(3), 0.0)]
    holm = [2 * p[0], 3 * p[1], 1.0]  # p[1] smallest (x 3), then p[0] (x 2), then p[2] (x 1)
    assert [r["p"] for r in results] == pytest.approx(p) and [r["p_holm"] for r in results] == pytest.approx(holm)
    assert [r["verdict"] for r in results] == ["not resolved", "holds", "not resolved"]
    assert [r["mean"] for r in results] == pytest.approx([2.0, 5.5, 0.0]) and results[0]["n"] == 3
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (results[0]["ci95_low"], results[0]["ci95_high"]) == pytest.approx((2 - half, 2 + half))
    assert results[0]["seeds"] == {"0": 1.0, "1": 2.0, "2": 3.0}
    assert md.index("## Primary comparisons (declared before running; Holm-corrected)") < md.index("## Linear probe")
    assert (f"| a - base, block4, linear_top1 | 3 | +2.00 | [{2 - half:.2f}, {2 + half:.2f}] | {p[0]:.3f} | "
            f"{holm[0]:.3f} | not resolved |") in md
    assert f"| b - base, block4, knn_top1 | 3 | +5.50 | [4.26, 6.74] | {p[1]:.3f} | {holm[1]:.3f} | holds |" in md
    # 5 compared variants x 5 blocks x 2 metrics, shown with their intervals and no star
    assert "Everything else is exploratory: the 50 differences" in md and "*" not in md.replace("**", "")


def test_primary_comparisons_have_no_verdict_until_every_one_has_its_seeds(tmp_path):
    # b's last seed is missing: Holm's family is incomplete, so even a's comparison, with all its seeds, waits
    primary = [dict(variant="a", baseline="base", block="block4", metric="linear_top1"),
               dict(variant="b", baseline="base", block="block4", metric="knn_top1")]
    study = _fake_study(tmp_path, primary=primary)
    (study.run_dir("b", 2) / "probe.json").unlink()
    md = write_results(study).read_text()
    results = json.loads((Path(study.out) / "results.json").read_text())["primary"]
    assert [r["verdict"] for r in results] == ["pending (3 of 3 seeds)", "pending (2 of 3 seeds)"]
    assert [r["n"] for r in results] == [3, 2] and "| holds |" not in md and "| pending (2 of 3 seeds) |" in md


def test_no_primary_declared_says_so(tmp_path):
    md = write_results(_fake_study(tmp_path)).read_text()
    assert "None declared (`primary:` in the study file, before its runs)." in md
    assert json.loads((tmp_path / "study/results.json").read_text())["primary"] == []


def test_the_figures_and_the_budget_series_are_written(tmp_path):
    study = _fake_study(tmp_path, primary=[dict(variant="a", baseline="base", block="block4", metric="knn_top1")],
                        budget={"a - base": [["a", "base"], ["a_long", "base_long"]]})
    out = Path(study.out)
    for seed in study.seeds:  # the long pair also read by plain pooling, 0.5 below; raw pixels beside
        for variant in ("a_long", "base_long"):
            path = study.run_dir(variant, seed) / "probe.json"
            probe = json.loads(path.read_text())
            probe["run"]["pooled"] = {b: {"top1": r["top1"] - 0.5} for b, r in probe["run"]["blocks"].items()}
            path.write_text(json.dumps(probe))
        (out / "pixels" / f"seed{seed}").mkdir(parents=True)
        (out / "pixels" / f"seed{seed}" / "probe.json").write_text(json.dumps(
            {"run": {"blocks": {"pixels": {"top1": 71.0, "knn20_top1": 70.0}}}}))
    md = write_results(study).read_text()
    for name in ("per_block_top1.png", "differences.png", "gap_vs_budget.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name})" in md
    budget = json.loads((out / "results.json").read_text())["budget"]
    assert [(r["epochs"], r["metric"], r["block"], r["mean"]) for r in budget] == [
        (1, "linear_top1", "block4", 2.0), (1, "knn_top1", "block4", 2.0),
        (2, "linear_top1", "block4", 3.0), (2, "knn_top1", "block4", 3.0), (2, "pool_linear_top1", "block4", 3.0)]
    assert "| comparison | block | Linear probe top-1 | kNN top-1 | Linear probe top-1, plain pooling |" in md
    # raw pixels have no head: the same probe under every readout's table
    pooled_table = md.split("## Linear probe top-1, plain pooling (%)")[1].split("\n## ")[0]
    assert "Raw pixels under the same probe settings (no network): 71.00 ± 0.00 (71.00, 71.00, 71.00)." in pooled_table
    assert "| a - base | 1 | a - base | block4 | +2.00 [-0.48, 4.48] (1.00, 2.00, 3.00) | " in md
    assert ("| a - base | 2 | a_long - base_long | block4 | +3.00 [0.52, 5.48] (2.00, 3.00, 4.00) | "
            "+3.00 [0.52, 5.48] (2.00, 3.00, 4.00) | +3.00 [0.52, 5.48] (2.00, 3.00, 4.00) |") in md


def test_primary_comparisons_and_budget_series_may_change_after_runs(tmp_path):
    """Only the aggregation reads them (declaring primaries before running is the study author's discipline)."""
    check_unchanged(load_study(_write_study(tmp_path)))
    study = load_study(_write_study(tmp_path, primary=[PRIMARY], budget={"gap": [["blockwise", "end_to_end"]]}))
    check_unchanged(study)
    assert yaml.safe_load((Path(study.out) / "study.yaml").read_text())["primary"] == [PRIMARY]


def test_the_frontier_sets_each_variants_accuracy_against_its_counted_cost(finished, capsys):
    from blockssl.cost import cost_report, device_memory
    from blockssl.study.frontier import write_frontier

    study = load_study(finished)
    assert main(["study", str(finished), "--frontier", "blockwise,end_to_end"]) == 0
    assert capsys.readouterr().out.strip() == str(Path(study.out) / "frontier.md")
    points = json.loads((Path(study.out) / "frontier.json").read_text())
    summary = json.loads((Path(study.out) / "results.json").read_text())["summary"]
    for point in points:
        cfg = study.config(point["variant"], 0)
        report = cost_report(cfg, devices=1)
        assert point["cost"]["train_flops"] == report.model.total.train_flops
        assert point["cost"]["device_memory"] == device_memory(report.model, cfg.train.batch_size).total
        for metric in ("linear_top1", "pool_linear_top1"):  # through the heads and the equal readout
            s = next(s for s in summary if (s["variant"], s["block"], s["metric"]) == (point["variant"], "block4",
                                                                                        metric))
            assert point["accuracy"]["block4"][metric]["mean"] == s["mean"]
            assert point["accuracy"]["block4"][metric]["diff_mean"] == s["diff_mean"]
    blockwise, end_to_end = points
    d = blockwise["accuracy"]["block4"]["pool_linear_top1"]  # the study's baseline is end to end
    row = next(line for line in (Path(study.out) / "frontier.md").read_text().splitlines()
               if "| plain pooling |" in line and f"{d['diff_mean']:+.2f} [" in line)
    per_seed = ", ".join(f"{v:.2f}" for v in d["diff_seeds"].values())
    assert (f"| {d['diff_mean']:+.2f} [{d['diff_mean'] - d['diff_ci95']:.2f}, {d['diff_mean'] + d['diff_ci95']:.2f}] "
            f"({per_seed}) vs end_to_end |") in row
    assert blockwise["cost"]["params"] > end_to_end["cost"]["params"]  # a head and projector per block
    assert (Path(study.out) / "frontier.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="not variants of the study"):
        write_frontier(study, ["blockwise", "nope"])


def test_the_frontier_gives_a_one_seed_difference_without_an_interval():
    from blockssl.study.frontier import _difference

    stats = {"baseline": "blockwise", "diff_mean": 1.73, "diff_ci95": math.nan, "diff_seeds": {"0": 1.73}}
    assert _difference("end_to_end", stats) == "+1.73 (1.73) vs blockwise"
    two = {**stats, "diff_ci95": 0.5, "diff_seeds": {"0": 1.5, "1": 1.96}}
    assert _difference("end_to_end", two) == "+1.73 [1.23, 2.23] (1.50, 1.96) vs blockwise"
    assert _difference("blockwise", {**stats, "baseline": "blockwise"}) == "-"
