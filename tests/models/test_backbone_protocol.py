"""The backbone protocol, proved by a second family defined here alone: a tiny token backbone (patches to tokens,
then residual MLP stages, outputs in NLC layout) registered beside the ResNets trains blockwise, with CbE heads and
noise on tokens, is probed by both readouts, named by depth in studies and exported, with nothing else changed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from blockssl.checkpoint import load_checkpoint
from blockssl.config import ConfigError
from blockssl.export import export_run, loads_into
from blockssl.method import build_model
from blockssl.models.backbone import FAMILIES, BackboneOptions, Family, StageInfo, register_family, stage_names
from blockssl.models.heads import Head
from blockssl.models.noise import inject_noise, noise_scale
from blockssl.study.depth import block_names
from blockssl.train import pretrain
from tests.conftest import tiny_config


class Tokens(nn.Module):
    """(N, C, H, W) -> (N, H*W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class Mix(nn.Module):
    """A pre-norm residual MLP over each token's channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TinyMixer(nn.Module):
    STAGES = ("embed", "mix1", "mix2")

    def __init__(self, in_channels: int = 3, width: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(in_channels, width, patch, stride=patch), Tokens())
        self.mix1, self.mix2 = Mix(width), Mix(width)
        self.stage_info = tuple(StageInfo(name, width, patch, "NLC") for name in self.STAGES)

    def stage(self, name: str) -> nn.Module:
        return getattr(self, name)

    def stage_modules(self, name: str) -> list[nn.Module]:
        return [self.stage(name)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.STAGES:
            x = self.stage(name)(x)
        return x


def _build(arch: str, options: BackboneOptions) -> nn.Module:
    return TinyMixer(options.in_channels, width=round(16 * options.width) or 1)


@pytest.fixture
def mixer() -> Iterator[str]:
    register_family("tinymixer", Family(("tinymixer",), lambda arch, options: TinyMixer.STAGES, _build,
                                        lambda arch, options: "TinyMixer()", options=("width",), stem="embed"))
    yield "tinymixer"
    del FAMILIES["tinymixer"]


MIXER = ["model.arch=tinymixer", "model.blocks=embed+mix1,mix2", "model.head=cbe", "noise.type=channel",
         "noise.std=0.25", "model.width=1", "train.epochs=1"]


def test_an_unknown_architecture_lists_the_registered_ones(tmp_path, mixer):
    known = r"unknown model.arch 'resnet51' \(did you mean 'resnet50'\?\); choose one of resnet18, .*tinymixer"
    with pytest.raises(ConfigError, match=known):
        tiny_config(tmp_path, "model.arch=resnet51")
    with pytest.raises(ConfigError, match=r"each stage of embed\+mix1\+mix2 exactly once"):
        tiny_config(tmp_path, *MIXER, "model.blocks=mix1,embed+mix2")
    assert stage_names(mixer) == TinyMixer.STAGES


def test_a_second_family_trains_blockwise_and_is_read_named_and_exported(tmp_path, mixer):
    cfg = tiny_config(tmp_path / "run", *MIXER)
    initial = build_model(cfg, 3, 16).state_dict()  # the seed's model (conftest seeds every test the same)
    torch.manual_seed(0)
    run = pretrain(cfg)
    trained = load_checkpoint(run / "checkpoints/last.pt")["model"]
    for name in ("backbone.mix1.mlp.1.weight", "backbone.mix2.mlp.3.weight", "heads.1.expand.0.weight"):
        assert not torch.equal(trained[name], initial[name]), name  # both blocks and their token heads learned
    model = build_model(cfg, 3, 16)
    model.load_state_dict(trained)
    readouts = model.eval().readouts(torch.randn(4, 3, 16, 16), ("head", "pool"))
    assert [f.shape for f in readouts["head"]] == [(4, 16), (4, 16)]  # model.head_dim=16 in the tiny config
    assert [f.shape for f in readouts["pool"]] == [(4, 16), (4, 16)]  # the mean over the 16 tokens
    assert block_names("embed+mix1,mix2", mixer) == {"block1": "block1", "block2": "block2"}
    assert block_names("embed,mix1+mix2", mixer) == {"block1": "embed", "block2": "block2"}
    paths = export_run(run, tmp_path / "exported")
    TinyMixer().load_state_dict(torch.load(paths[0]))  # strict: every key, none extra
    assert loads_into(run) == "TinyMixer()"


def test_heads_and_noise_read_tokens_by_their_layout():
    x = torch.randn(4, 9, 6)  # 4 images, 9 tokens, 6 channels
    torch.testing.assert_close(Head(6, "gap", layout="NLC")(x), x.mean(dim=1))
    cbe = Head(6, "cbe", dim=10, layout="NLC").eval()
    linear, norm = cbe.expand[0], cbe.expand[1]
    per_token = nn.functional.batch_norm((x @ linear.weight.T).flatten(0, 1), norm.running_mean, norm.running_var,
                                         norm.weight, norm.bias)  # statistics per channel over every token
    expected = torch.relu(per_token).view(4, 9, 10).mean(dim=1)
    torch.testing.assert_close(cbe(x), expected)
    with pytest.raises(ValueError, match="cbe_pooled pools a feature map"):
        Head(6, "cbe_pooled", layout="NLC")
    torch.testing.assert_close(noise_scale(x, "channel", "NLC"), x.std(dim=1, keepdim=True))  # per channel
    torch.testing.assert_close(noise_scale(x, "spatial", "NLC"), x.std(dim=2, keepdim=True))  # per token
    torch.testing.assert_close(noise_scale(x, "global", "NLC").flatten(), x.std().flatten())
    g = torch.Generator().manual_seed(3)
    residual = inject_noise(x, "spatial", 0.5, generator=g, layout="NLC") - x
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(residual, 0.5 * x.std(dim=2, keepdim=True) * noise)
