"""The command line: subcommands, a run directory from `pretrain`, clear errors with exit status 2."""

from __future__ import annotations

import pytest

from blockssl.cli import main
from tests.conftest import TINY


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
