"""The ResNet trunk: torchvision compatibility, stage metadata, zero-init residuals and stage groupings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from blockssl.config import ConfigError, parse_blocks
from blockssl.models.backbone import ARCHS, ResNet, StageInfo, group_stages
from tests.conftest import assert_same_tensors

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_matches_torchvision(arch):
    # Built on the meta device: keys and shapes only, no memory and no initialisation cost for the big ones.
    with torch.device("meta"):
        ours = ResNet(arch).state_dict()
        theirs = getattr(torchvision.models, arch)(weights=None).state_dict()
    expected = {k: tuple(v.shape) for k, v in theirs.items() if not k.startswith("fc.")}
    assert len(theirs) > len(expected)  # torchvision's fc was there and was removed from the comparison
    assert list(ours) == list(expected)
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_unknown_arch_and_stem_are_rejected():
    with pytest.raises(ValueError, match="resnet50"):
        ResNet("resnet51")
    with pytest.raises(ValueError, match="small"):
        ResNet("resnet18", stem="tiny")
    with pytest.raises(KeyError, match="layer4"):
        ResNet("resnet18", width=0.125).stage("layer5")


@pytest.mark.parametrize(
    ("arch", "channels"),
    [
        ("resnet18", (64, 64, 128, 256, 512)),
        ("resnet34", (64, 64, 128, 256, 512)),
        ("resnet50", (64, 256, 512, 1024, 2048)),
        ("wide_resnet50_2", (64, 256, 512, 1024, 2048)),
        ("resnext50_32x4d", (64, 256, 512, 1024, 2048)),
    ],
)
@pytest.mark.parametrize(
    ("stem", "reductions"), [("imagenet", (4, 4, 8, 16, 32)), ("small", (1, 1, 2, 4, 8))]
)
def test_stage_info(arch, channels, stem, reductions):
    with torch.device("meta"):
        model = ResNet(arch, stem=stem)
    assert all(isinstance(s, StageInfo) for s in model.stage_info)
    assert tuple(s.name for s in model.stage_info) == STAGE_NAMES
    assert tuple(s.channels for s in model.stage_info) == channels
    assert tuple(s.reduction for s in model.stage_info) == reductions


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("stem", "size"), [("small", 16), ("imagenet", 64)])
def test_forward_shapes_follow_stage_info(arch, stem, size):
    torch.manual_seed(0)
    model = ResNet(arch, in_channels=1, stem=stem, width=0.25).eval()
    base = {"resnet18": (16, 16, 32, 64, 128), "resnet50": (16, 64, 128, 256, 512)}[arch]
    assert tuple(s.channels for s in model.stage_info) == base
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        h = x
        for info in model.stage_info:
            h = model.stage(info.name)(h)
            assert h.shape == (2, info.channels, size // info.reduction, size // info.reduction), info
        out = model(x)
    assert out.shape == (
        2,
        base[-1],
        size // model.stage_info[-1].reduction,
        size // model.stage_info[-1].reduction,
    )
    torch.testing.assert_close(out, h)


def _residual_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    bns = []
    for m in model.modules():
        if isinstance(m, Bottleneck):
            bns.append(m.bn3)
        elif isinstance(m, BasicBlock):
            bns.append(m.bn2)
    return bns


def _branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a torchvision block, without the skip connection."""
    if isinstance(block, BasicBlock):
        return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out))


@pytest.mark.parametrize(("arch", "n_blocks"), [("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(arch, n_blocks):
    torch.manual_seed(0)
    zero = ResNet(arch, width=0.25, stem="small", zero_init_residual=True)
    plain = ResNet(arch, width=0.25, stem="small", zero_init_residual=False)
    zero_bns, plain_bns = _residual_bns(zero), _residual_bns(plain)
    assert len(zero_bns) == n_blocks
    assert all(torch.all(bn.weight == 0) for bn in zero_bns)
    assert all(torch.all(bn.weight == 1) for bn in plain_bns)
    # Only the last BN of each residual branch is zeroed.
    others = [
        m for m in zero.modules() if isinstance(m, nn.BatchNorm2d) and all(m is not b for b in zero_bns)
    ]
    assert others and all(torch.all(bn.weight == 1) for bn in others)

    # A fresh block's residual branch outputs zero, so a block without downsampling is relu(identity).
    block = zero.layer1[1]
    channels = zero.stage_info[1].channels
    x = torch.randn(2, channels, 8, 8)
    assert torch.count_nonzero(_branch(block, x)) == 0
    torch.testing.assert_close(block(x), torch.relu(x))
    assert _branch(plain.layer1[1], x).abs().max() > 0.1  # the check above is not vacuous
    # A downsampling block reduces to its (relu'd) shortcut.
    first = zero.layer2[0]
    torch.testing.assert_close(first(x), torch.relu(first.downsample(x)))


@pytest.mark.parametrize(
    "spec",
    [
        "stem+layer1,layer2,layer3,layer4",
        "stem+layer1+layer2,layer3+layer4",
        "stem,layer1,layer2,layer3,layer4",
        "stem+layer1+layer2+layer3+layer4",
    ],
)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_group_stages_compose_to_forward(spec, arch):
    torch.manual_seed(0)
    model = ResNet(arch, width=0.125, stem="small", zero_init_residual=False).eval()
    blocks = parse_blocks(spec)
    modules, infos = group_stages(model, blocks)
    assert len(modules) == len(blocks)
    assert [i.name for i in infos] == [b[-1] for b in blocks]
    by_name = {s.name: s for s in model.stage_info}
    assert infos == [by_name[b[-1]] for b in blocks]
    # The blocks are views: they share the backbone's parameters, none are copied.
    backbone_ptrs = {p.data_ptr() for p in model.parameters()}
    block_params = [p for m in modules for p in m.parameters()]
    assert {p.data_ptr() for p in block_params} == backbone_ptrs
    assert len(block_params) == len(list(model.parameters()))

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = x
        for module, info in zip(modules, infos, strict=True):
            h = module(h)
            assert h.shape[1] == info.channels
        torch.testing.assert_close(h, model(x), rtol=0, atol=0)


def test_state_dict_loads_into_torchvision_resnet18_with_identical_outputs():
    torch.manual_seed(0)
    ours = ResNet("resnet18", zero_init_residual=False)
    # Non-trivial BatchNorm statistics and affine parameters so eval mode exercises every buffer.
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours.eval()
    theirs = torchvision.models.resnet18(weights=None)
    theirs.fc = nn.Identity()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = ours(x).mean(dim=(2, 3))  # torchvision pools and flattens before fc
        b = theirs(x)
    assert a.shape == b.shape == (2, 512)
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_too_narrow_bottlenecks_are_a_clear_error_and_narrow_resnets_work():
    with pytest.raises(ValueError, match="zero channels"):
        ResNet("resnext50_32x4d", width=0.125, stem="small")  # 32 groups x 4 channels x 0.125 = 0 per bottleneck
    model = ResNet("resnet50", width=0.125, stem="small")
    assert model(torch.randn(2, 3, 16, 16)).shape[:2] == (2, model.stage_info[-1].channels)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_unit_granularity_is_the_same_network_cut_finer(arch):
    """A stage per residual unit: the same modules, initialisation and state dict, and groupings that end inside a
    layer compose to the same forward."""
    torch.manual_seed(0)
    layers = ResNet(arch, width=0.125, stem="small", zero_init_residual=False).eval()
    torch.manual_seed(0)
    units = ResNet(arch, width=0.125, stem="small", zero_init_residual=False, granularity="unit").eval()
    assert_same_tensors(layers.state_dict(), units.state_dict())
    names = [s.name for s in units.stage_info]
    assert names == ["stem", *(f"layer{i}.{j}" for i, n in enumerate(ARCHS[arch][1], 1) for j in range(n))]
    assert units.stage("layer3.1") is units.layer3[1] and units.stage_modules("layer2.0") == [units.layer2[0]]
    by_layer = {s.name: s for s in layers.stage_info}
    assert [s for s in units.stage_info if s.name.endswith(".0")] == [
        dataclasses.replace(by_layer[f"layer{i}"], name=f"layer{i}.0") for i in range(1, 5)]
    with pytest.raises(ConfigError, match="exactly once"):  # layer3 stands for all its units, layer3.0 included
        parse_blocks("stem+layer1.0,layer1.1-layer3.0,layer3,layer4", tuple(names))
    assert parse_blocks("stem+layer1,layer2,layer3,layer4", tuple(names))[1] == [n for n in names
                                                                                 if n.startswith("layer2.")]
    modules, _ = group_stages(units, parse_blocks("stem+layer1.0,layer1.1-layer3.0,layer3.1-layer4", tuple(names)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = x
        for module in modules:
            h = module(h)
        torch.testing.assert_close(h, layers(x), rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"stages are stem, layer1\.0"):
        units.stage("layer1")
    with pytest.raises(ValueError, match="choose layer or unit"):
        ResNet(arch, granularity="block")
