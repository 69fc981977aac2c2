"""The command line: subcommands, a run directory from `pretrain`, clear errors with exit status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blockssl.cli import main
from blockssl.eval.probe import run_probe
from blockssl.train import pretrain
from tests.conftest import TINY, tiny_config


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "probe", "export", "config"):
        assert command in out


def test_pretrain_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.scheme = 'simultaneous'" in out and "loss.lambd = 0.0051" in out


def test_pretrain_resume_and_export(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"out={run}", "train.epochs=1"]) == 0
    assert (run / "backbone.pt").is_file()
    assert main(["pretrain", "--resume", str(run), "data.num_workers=0"]) == 0  # finished: nothing to do
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["backbone.pt", "config.yaml", "heads.pt"]


@pytest.mark.parametrize(("args", "message"), [
    (["train.epohcs=3"], "did you mean 'train.epochs'"),
    (["loss.name=barlowtwins"], "barlow_twins, simclr, vicreg"),
    (["train.batch_size=1"], "at least 2"),
    (["model.blocks=stem,layer2,layer3"], "each stage"),
    (["--config", "missing.yaml"], "does not exist"),
])
def test_bad_configuration_fails_with_a_clear_message(tmp_path, capsys, args, message):
    assert main(["pretrain", *TINY, f"out={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory) -> Path:
    """A finished tiny run with its probes, and beside it copies that stop short: ``unsaved`` (config.yaml only, as a
    pretraining before its first checkpoint) and ``unprobed`` (no probes.pt)."""
    root = tmp_path_factory.mktemp("cli")
    run = pretrain(tiny_config(root / "run", "train.epochs=1"))
    run_probe(run, ["probe.weight_decays=[1e-2]", "probe.knn_k=[5]", "probe.label_fractions=[]"], progress=False)
    for name in ("unsaved", "unprobed"):
        (root / name).mkdir()
        shutil.copy(run / "config.yaml", root / name)
    shutil.copytree(run / "checkpoints", root / "unprobed" / "checkpoints")
    (root / "a_file").write_text("")
    return run


def _forbid(monkeypatch, targets: list[str]) -> None:
    def computed(*args, **kwargs):
        raise AssertionError("a command computed before checking its arguments")

    for target in targets:
        monkeypatch.setattr(target, computed)


# Reading data, extracting features or building a model to train: minutes on a real run.
COMPUTE = ["blockssl.eval.probe.build_dataset", "blockssl.eval.robustness.build_dataset",
              "blockssl.eval.probe.extract_readouts", "blockssl.eval.probe.extract_features",
              "blockssl.eval.robustness.extract_features", "blockssl.train.build_model"]


# {run}: the probed run; {root}: the folder holding it, unsaved, unprobed and a_file.
@pytest.mark.parametrize(("args", "messages"), [
    (["probe", "{root}/missing"], ["{root}/missing is not a blockssl run directory (it does not exist); pass the run "
                                   "directory of a pretraining (the out= of `blockssl pretrain`), e.g. `blockssl "
                                   "probe runs/demo`"]),
    (["probe", "{root}"], ["{root} is not a blockssl run directory (no config.yaml in it)"]),
    (["probe", "{root}/a_file"], ["{root}/a_file is not a blockssl run directory (it is a file)"]),
    (["probe", "{root}/unsaved"], ["{root}/unsaved has no checkpoints/last.pt: its pretraining has not saved a "
                                   "checkpoint yet; let it run, or continue it with `blockssl pretrain --resume "
                                   "{root}/unsaved`"]),
    (["probe", "{run}", "--out", "{root}/a_file"], ["--out {root}/a_file is a file; give a folder to write into"]),
    (["robustness", "{root}/missing"], ["{root}/missing is not a blockssl run directory", "e.g. `blockssl robustness "
                                        "runs/demo`"]),
    (["robustness", "{root}/unprobed"], ["{root}/unprobed has no probes.pt: run `blockssl probe {root}/unprobed` "
                                         "first"]),
    (["robustness", "{run}", "--baseline", "{root}/missing"],
     ["--baseline {root}/missing is not a blockssl run directory (it does not exist); pass the run directory of a "
      "pretraining (the out= of `blockssl pretrain`), e.g. `blockssl robustness {run} --baseline runs/e2e`"]),
    (["robustness", "{run}", "--baseline", "{root}/unprobed"],
     ["--baseline {root}/unprobed has no probes.pt: run `blockssl probe {root}/unprobed` first"]),
    (["export", "{root}/missing", "{root}/exported"], ["{root}/missing is not a blockssl run directory",
                                                       "e.g. `blockssl export runs/demo exported/`"]),
    (["export", "{run}", "{root}/a_file"], ["OUT_DIR {root}/a_file is a file; give a folder to write into"]),
    (["report", "{run}", "{root}/missing"], ["{root}/missing is not a blockssl run directory",
                                             "e.g. `blockssl report runs/demo runs/e2e`"]),
    (["report", "{run}", "--out", "{root}/a_file"], ["--out {root}/a_file is a file; give a folder to write into"]),
    (["pretrain", "--resume", "{root}/missing"], ["--resume {root}/missing: no config.yaml there"]),
    (["study", "{root}/missing.yaml"], ["study file '{root}/missing.yaml' does not exist"]),
    (["cost", "--config", "{root}/missing.yaml"], ["config file '{root}/missing.yaml' does not exist; recipes are in "
                                                   "configs/"]),
    (["config", "--config", "{root}/missing.yaml"], ["config file '{root}/missing.yaml' does not exist"]),
])
def test_a_bad_path_is_refused_before_any_model_is_built_with_the_commands_own_fix(probed_run, monkeypatch, capsys,
                                                                                   args, messages):
    _forbid(monkeypatch, [*COMPUTE, "blockssl.runtime.build_model"])
    where = {"run": probed_run, "root": probed_run.parent}
    assert main([a.format(**where) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blockssl {args[0]}: error: ")
    for message in messages:
        assert message.format(**where) in err
    assert "without --resume" not in err  # pretrain's advice, wrong for every other command


@pytest.mark.parametrize(("args", "message"), [
    (["probe", "{run}", "probe.epohcs=3"], "did you mean 'probe.epochs'"),
    (["probe", "{run}", "train.epochs=3"], "only probe.*, data.* keys"),
    (["probe", "{run}", "probe.protocol=fats"], "fast, paper"),
    (["probe", "{run}", "--pixels", "probe.protocol=paper"], "--pixels: the raw-pixel probe follows the fast protocol"),
    (["probe", "{run}", "probe.label_subset_dir={root}"], "probe.label_subset_dir lists ImageNet file names"),
    (["robustness", "{run}", "robustness.severities=[0,6]"], "robustness.severities"),
    (["robustness", "{run}", "robustness.corruptions=[fgo]"], "did you mean 'fog'"),
    (["robustness", "{run}", "robustness.source=folder", "robustness.root={root}/missing"],
     "robustness.root='{root}/missing' is not a folder"),
    (["robustness", "{run}", "--baseline", "{run}", "robustness.baseline_block=block9"], "no block9"),
    (["robustness", "{run}", "--baseline", "alexnet"], "--baseline alexnet"),
])
def test_bad_evaluation_settings_are_refused_before_any_image_is_read(probed_run, monkeypatch, capsys, args,
                                                                       message):
    _forbid(monkeypatch, COMPUTE)
    where = {"run": probed_run, "root": probed_run.parent}
    assert main([a.format(**where) for a in args]) == 2
    assert message.format(**where) in capsys.readouterr().err
