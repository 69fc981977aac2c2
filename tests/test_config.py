"""The typed configuration: strict keys and values, block groupings, scheme presets, files and resume."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from blockssl.config import (
    Config,
    ConfigError,
    describe_keys,
    dump_config,
    from_dict,
    load_config,
    parse_blocks,
    resume_config,
    to_dict,
)
from blockssl.config.plan import detach_inputs, execution_strategy, loss_blocks, parse_stages
from blockssl.models.backbone import stage_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in values.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


# ---------------------------------------------------------------------------------------------------------
# Keys and values


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert cfg == dataclasses.replace(Config(), model=dataclasses.replace(Config().model, blocks=cfg.model.blocks))
    assert Config().model.blocks == "auto"  # resolved on loading, to the paper's four blocks for a ResNet-50
    assert (cfg.model.arch, cfg.model.blocks, cfg.model.head, cfg.model.head_dim) == (
        "resnet50",
        "stem+layer1,layer2,layer3,layer4",
        "cbe",
        2048,
    )
    assert (cfg.loss.name, cfg.loss.lambd, cfg.loss.scale) == ("barlow_twins", 0.0051, 0.024)
    assert (cfg.noise.type, cfg.noise.std) == ("global", 0.25)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.scheme) == (300, 2048, "simultaneous")


def test_overrides_are_typed():
    cfg = load_config(
        overrides=[
            "train.epochs=3",
            "train.lr=1",
            "data.pin_memory=false",
            "noise.std=0.5",
            "train.frozen_blocks=[1]",
            "model.block_head_dims=[8,16,32,64]",
            "seed=7",
        ]
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.pin_memory is False
    assert cfg.noise.std == 0.5
    assert cfg.train.frozen_blocks == [1]
    assert cfg.model.block_head_dims == [8, 16, 32, 64]
    assert cfg.seed == 7


def test_yaml_booleans_become_literal_strings():
    assert load_config(overrides=["train.detach=true"]).train.detach == "true"
    assert load_config(overrides=["train.detach=false"]).train.detach == "false"


def test_unknown_key_names_it_and_suggests_a_close_match():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.epohcs=3"])
    message = str(err.value)
    assert "train.epohcs" in message
    assert "did you mean 'train.epochs'" in message


def test_unknown_section():
    with pytest.raises(ConfigError, match="trian"):
        load_config(overrides=["trian.epochs=3"])


def test_bad_literal_lists_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["loss.name=barlowtwins"])
    message = str(err.value)
    assert "loss.name" in message and "barlowtwins" in message
    for choice in ("barlow_twins", "simclr", "vicreg"):
        assert choice in message


def test_section_cannot_be_set_to_a_value():
    with pytest.raises(ConfigError, match="train"):
        load_config(overrides=["train=3"])


def test_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.epochs"])


@pytest.mark.parametrize("override", [
    # wrong types
    "train.epochs=abc", "train.epochs=1.5", "train.lr=fast", "data.pin_memory=maybe", "model.width=[1]",
    "out=[1, 2]", "train.frozen_blocks=[a]",
    # out of range
    "train.epochs=-1", "train.epochs=0", "train.batch_size=1", "train.max_steps=-5", "data.subset=-1",
    "model.head_kernel=2", "model.head_grid=0", "model.width=0", "noise.std=-0.1", "model.projector=512-x",
    "probe.epochs=0", "probe.lr=0", "probe.lrs=[0.1,-1]", "probe.val_fraction=1", "probe.label_fractions=[0]",
    "data.min_crop_scale=0", "data.min_crop_scale=1.5", "data.blur=sometimes",
])
def test_bad_values_name_the_key(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides=[override])


def test_reference_allreduce_is_barlow_twins_only():
    with pytest.raises(ConfigError, match=r"loss.reference_allreduce.*vicreg"):
        load_config(overrides=["loss.name=vicreg", "loss.reference_allreduce=true"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Block groupings


PAPER_BLOCKS = [["stem", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


@pytest.mark.parametrize(("spec", "blocks"), [
    ("stem+layer1,layer2,layer3,layer4", PAPER_BLOCKS),
    (" stem + layer1 , layer2,layer3,layer4 ", PAPER_BLOCKS),
    ("stem+layer1+layer2,layer3+layer4", [["stem", "layer1", "layer2"], ["layer3", "layer4"]]),
    ("stem+layer1+layer2+layer3+layer4", [["stem", "layer1", "layer2", "layer3", "layer4"]]),
])
def test_parse_blocks(spec, blocks):
    assert parse_blocks(spec) == blocks


@pytest.mark.parametrize(
    "spec",
    [
        "stem,layer2,layer3,layer4",  # skips layer1
        "stem+layer1,layer1,layer2,layer3,layer4",  # repeats layer1
        "stem+layer2,layer1,layer3,layer4",  # reorders
        "stem+layer1,,layer2,layer3,layer4",  # empty block
        "stem+layer1,layer2,layer3,layer4,layer5",  # unknown stage
        "layer1,layer2,layer3,layer4",  # no stem
    ],
)
def test_bad_block_groupings(spec):
    with pytest.raises(ConfigError, match=r"model\.blocks"):
        parse_blocks(spec, stage_names("resnet50"))
    with pytest.raises(ConfigError, match=r"model\.blocks"):
        load_config(overrides=[f"model.blocks={spec}"])


@pytest.mark.parametrize(
    "key", ["model.block_head_dims=[64,64]", "model.block_projectors=[8-8,8-8,8-8,8-8,8-8]"]
)
def test_per_block_lists_of_the_wrong_length(key):
    with pytest.raises(ConfigError, match=r"4 blocks"):
        load_config(overrides=[key])


def test_per_block_lists_follow_the_grouping():
    cfg = load_config(
        overrides=[
            "model.blocks=stem+layer1+layer2,layer3+layer4",
            "model.block_head_dims=[32,64]",
            "model.block_projectors=[16-16,32]",
        ]
    )
    assert cfg.model.block_head_dims == [32, 64]
    assert cfg.model.block_projectors == ["16-16", "32"]
    with pytest.raises(ConfigError, match="2 blocks"):
        load_config(
            overrides=["model.blocks=stem+layer1+layer2,layer3+layer4", "model.block_head_dims=[1,2,3,4]"]
        )


# ---------------------------------------------------------------------------------------------------------
# Schemes: which blocks carry a loss, and the stop-gradient switch


def test_end_to_end_preset():
    cfg = load_config(overrides=["train.scheme=end_to_end"])
    assert loss_blocks(cfg) == [3]
    assert detach_inputs(cfg) is False
    assert execution_strategy(cfg) == "reference"  # auto falls back to reference when gradients cross blocks


def test_simultaneous_preset():
    cfg = load_config(overrides=["train.scheme=simultaneous"])
    assert loss_blocks(cfg) == [0, 1, 2, 3]
    assert detach_inputs(cfg) is True
    assert execution_strategy(cfg) == "lean"


def test_sequential_preset():
    cfg = load_config(overrides=["train.scheme=sequential"])
    assert loss_blocks(cfg) == [0, 1, 2, 3]
    assert detach_inputs(cfg) is True


def test_presets_follow_the_number_of_blocks():
    two = "model.blocks=stem+layer1+layer2,layer3+layer4"
    assert loss_blocks(load_config(overrides=[two, "train.scheme=end_to_end"])) == [1]
    assert loss_blocks(load_config(overrides=[two])) == [0, 1]


def test_explicit_loss_blocks_and_detach():
    assert loss_blocks(load_config(overrides=["train.loss_blocks=1,3"])) == [0, 2]
    assert loss_blocks(load_config(overrides=["train.loss_blocks=3,1,3"])) == [0, 2]
    assert loss_blocks(load_config(overrides=["train.loss_blocks=2"])) == [1]
    assert loss_blocks(load_config(overrides=["train.loss_blocks=last"])) == [3]
    assert loss_blocks(load_config(overrides=["train.scheme=end_to_end", "train.loss_blocks=all"])) == [
        0,
        1,
        2,
        3,
    ]
    # Detach set explicitly overrides the scheme's preset, both ways.
    cfg = load_config(overrides=["train.scheme=end_to_end", "train.detach=true"])
    assert detach_inputs(cfg) is True and loss_blocks(cfg) == [3]
    cfg = load_config(overrides=["train.scheme=simultaneous", "train.detach=false"])
    assert detach_inputs(cfg) is False and loss_blocks(cfg) == [0, 1, 2, 3]
    assert execution_strategy(cfg) == "reference"


@pytest.mark.parametrize("spec", ["5", "0", "1,9", "one", "1,,x"])
def test_bad_loss_blocks(spec):
    with pytest.raises(ConfigError, match=r"train\.loss_blocks"):
        load_config(overrides=[f"train.loss_blocks={spec}"])


def test_frozen_blocks():
    cfg = load_config(overrides=["train.frozen_blocks=[1,2]"])
    assert loss_blocks(cfg) == [2, 3]  # frozen blocks carry no loss
    for bad in ("[5]", "[0]", "[-1]"):
        with pytest.raises(ConfigError, match=r"train\.frozen_blocks"):
            load_config(overrides=[f"train.frozen_blocks={bad}"])
    with pytest.raises(ConfigError, match=r"train\.frozen_blocks"):
        load_config(overrides=["model.blocks=stem+layer1+layer2,layer3+layer4", "train.frozen_blocks=[3]"])
    with pytest.raises(ConfigError, match="loss_blocks"):  # every block frozen: nothing to train
        load_config(overrides=["train.frozen_blocks=[1,2,3,4]"])


def test_execution_strategy():
    assert execution_strategy(load_config(overrides=["train.execution=lean"])) == "lean"
    assert execution_strategy(load_config(overrides=["train.execution=reference"])) == "reference"
    assert execution_strategy(load_config(overrides=["train.execution=pipeline"])) == "pipeline"
    for overrides in (
        ["train.scheme=end_to_end", "train.execution=lean"],
        ["train.detach=false", "train.execution=lean"],
        ["train.scheme=end_to_end", "train.execution=pipeline"],
    ):
        with pytest.raises(ConfigError, match=r"train\.execution=(lean|pipeline) needs detached"):
            load_config(overrides=overrides)
    with pytest.raises(ConfigError, match="sequential scheme"):
        load_config(overrides=["train.scheme=sequential", "train.execution=pipeline"])
    # A detached end-to-end-style run may be lean.
    cfg = load_config(overrides=["train.scheme=end_to_end", "train.detach=true", "train.execution=lean"])
    assert execution_strategy(cfg) == "lean"


def test_pipeline_stages():
    assert parse_stages("blocks", 4) == [[0], [1], [2], [3]]
    assert parse_stages("1+2,3+4", 4) == [[0, 1], [2, 3]]
    assert parse_stages("1,2+3+4", 4) == [[0], [1, 2, 3]]
    assert parse_stages("auto", 4) is None
    for bad in ("1+3,2+4", "1,2,3", "1,2,3,4,5", "2+1,3+4", "a,b", "1,,2+3+4"):
        with pytest.raises(ConfigError, match=r"train\.stages"):
            load_config(overrides=[f"train.stages={bad}"])
    with pytest.raises(ConfigError, match=r"train\.in_flight"):
        load_config(overrides=["train.in_flight=0"])


# ---------------------------------------------------------------------------------------------------------
# Files, round trips, resume


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"name": "synthetic", "synthetic_size": 64},
                "train": {"epochs": 4, "batch_size": 16},
                "loss": {"name": "vicreg"},
            }
        )
    )
    cfg = load_config(path)
    assert (cfg.data.name, cfg.data.synthetic_size, cfg.train.epochs, cfg.loss.name) == (
        "synthetic",
        64,
        4,
        "vicreg",
    )
    assert cfg.train.lr == Config().train.lr  # untouched keys keep their defaults
    cfg = load_config(str(path), ["train.epochs=9", "data.synthetic_size=32"])
    assert cfg.train.epochs == 9 and cfg.data.synthetic_size == 32 and cfg.loss.name == "vicreg"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config()


def test_every_recipe_in_configs_loads():
    files = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
    assert files, f"no recipes found under {CONFIGS}"
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
        raw = yaml.safe_load(path.read_text()) or {}
        raw.pop("base", None)  # the parent recipe's values are checked when it is loaded itself
        # Every value written in the recipe is the value loaded.
        loaded = to_dict(cfg)
        for key in _leaf_keys(raw):
            want, got = raw, loaded
            for part in key.split("."):
                want, got = want[part], got[part]
            if isinstance(got, float):
                assert got == pytest.approx(float(want)), (path, key)
            elif isinstance(got, list):
                assert len(got) == len(want), (path, key)
            else:
                assert got == want, (path, key)


def test_recipes_follow_the_references():
    """The paper's SyncBatchNorm, the standard end-to-end model, and each loss's own optimiser settings."""
    recipes = {p.relative_to(CONFIGS).as_posix(): load_config(p) for p in CONFIGS.rglob("*.yaml")}
    for name, cfg in recipes.items():
        assert cfg.train.bias_lr == 0, name  # one lr for every parameter (the authors' code; VICReg; SimCLR)
        if name.startswith(("imagenet/", "cifar10/")):
            assert cfg.train.sync_bn, name
        if cfg.train.scheme == "end_to_end":
            assert cfg.model.head == "gap", name  # Barlow Twins: pooled layer4 into the projector
    simclr = recipes["imagenet/simclr_blockwise.yaml"]
    assert (simclr.train.lr, simclr.train.weight_decay, simclr.loss.temperature, simclr.model.projector,
            simclr.train.min_lr_ratio) == (0.3, 1e-6, 0.1, "2048-128", 0.0)
    vicreg = recipes["imagenet/vicreg_blockwise.yaml"]
    assert (vicreg.train.lr, vicreg.train.weight_decay, vicreg.model.projector) == (0.2, 1e-6, "8192-8192-8192")


def test_dump_and_from_dict_round_trip():
    cfg = load_config(
        overrides=[
            "data.name=synthetic",
            "train.epochs=2",
            "train.batch_size=8",
            "model.width=0.25",
            'model.block_projectors=[8-8,8,16-4,""]',
            "train.detach=true",
            "probe.lrs=[0.5,0.05]",
            "train.frozen_blocks=[2]",
            "noise.type=none",
        ]
    )
    text = dump_config(cfg)
    again = from_dict(yaml.safe_load(text))
    assert again == cfg
    assert dump_config(again) == text
    assert again != Config()


def test_from_dict_validates():
    values = to_dict(Config())
    values["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        from_dict(values)


def test_describe_keys_lists_every_key_with_default_and_type():
    text = describe_keys()
    for key in _leaf_keys(to_dict(Config())):
        assert f"  {key} = " in text, key
    assert "barlow_twins|simclr|vicreg" in text
    assert "train.epochs = 300  (int)" in text


def test_resume_config(tmp_path):
    cfg = load_config(
        overrides=["data.name=synthetic", "train.epochs=2", "train.batch_size=8", "out=elsewhere"]
    )
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    resumed = resume_config(tmp_path)
    assert resumed == dataclasses.replace(cfg, out=str(tmp_path))
    resumed = resume_config(tmp_path, ["data.num_workers=0", "train.device=cpu", "train.progress=false"])
    assert (resumed.data.num_workers, resumed.train.device, resumed.train.progress) == (0, "cpu", False)
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        resume_config(tmp_path, ["train.epochs=5"])
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        resume_config(tmp_path / "missing")


def test_single_float_for_a_float_list():
    assert load_config(overrides=["probe.lrs=0.1"]).probe.lrs == [0.1]


def test_malformed_negative_integer_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(overrides=["train.epochs=--3"])


@pytest.mark.parametrize("override", ["train.lr=nan", "noise.std=nan", "model.width=nan"])
def test_nan_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])
