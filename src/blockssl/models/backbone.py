"""Backbones as stages with metadata, so blocks can be any grouping of stages, and the registry of backbone families.

The protocol a backbone follows (``Backbone``): ``stage_info``, one ``StageInfo`` per stage in network order (its
name, output channels, reduction from the input image, output layout ``NCHW`` for feature maps or ``NLC`` for
tokens); ``stage(name)``, the module that computes a stage; ``stage_modules(name)``, the registered modules it is
made of. Heads, noise, configuration checks, study naming and export read this metadata and the family's entry in
``FAMILIES``; nothing outside a family's module names its stages. A new family is a module with its backbone and
one ``register_family`` call (``blockssl.models.vit`` registers timm's Vision Transformers).

torchvision ResNets:

The module keeps torchvision's attribute names (``conv1, bn1, relu, maxpool, layer1..layer4``), so with the
standard stem and width its ``state_dict`` loads into ``torchvision.models.<arch>()`` (which adds ``fc``).
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# arch -> (block type, blocks per layer, groups, width per group); the values of torchvision's builders.
ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int], int, int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
}


Layout = Literal["NCHW", "NLC"]  # feature maps (batch, channels, height, width) or tokens (batch, tokens, channels)


@dataclass(frozen=True)
class StageInfo:
    """What a head needs to know about a stage's output."""

    name: str
    channels: int
    reduction: int  # total stride from the input image (a ViT's patch size)
    layout: Layout = "NCHW"
    prefix_tokens: int = 0  # NLC: tokens before the patch tokens (a ViT's class token)


class Backbone(Protocol):
    """What blockssl needs of a backbone (an ``nn.Module``): its stages in order and the modules computing them."""

    stage_info: tuple[StageInfo, ...]

    def stage(self, name: str) -> nn.Module: ...

    def stage_modules(self, name: str) -> list[nn.Module]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BackboneOptions:
    """The ``model.*`` settings a family's builder may read (``Family.options`` names those it reads), and the
    dataset's channels and image size."""

    in_channels: int = 3
    image_size: int = 224
    stem: str = "auto"
    width: float = 1.0
    zero_init_residual: bool = True
    patch_size: int = 0
    depth: int = 0
    embed_dim: int = 0
    num_heads: int = 0
    drop_path: float = 0.0
    granularity: str = "layer"

    @classmethod
    def of(cls, model: Any, in_channels: int = 3, image_size: int = 224) -> BackboneOptions:
        """The options of a ``ModelConfig`` (``model.in_channels`` 0: the dataset's)."""
        fields = {f: getattr(model, f) for f in cls.__dataclass_fields__ if f not in ("in_channels", "image_size")}
        return cls(model.in_channels or in_channels, image_size, **fields)


@dataclass(frozen=True)
class Family:
    """A registered backbone family.

    ``archs``: its architecture names, listed in errors (a family too large to list, such as timm's ViTs, gives a
    few and ``accepts`` for the rest); ``stages``: an architecture's stage names under the options (known without
    building it, for configuration checks); ``build``; ``loads_into``: what its exported ``backbone.pt`` loads into;
    ``library_names``: the backbone's state dict under that library's names; ``default_blocks``: the grouping of
    ``model.blocks=auto`` given the stages; ``stem``: studies name blocks by depth counting from the stage after
    it (``blockssl.study.depth``), or by ``depths``, each stage's depth name, where given; ``options``: the
    family-specific ``model.*`` keys it reads (another family's must keep their defaults: a setting is never
    silently ignored).
    """

    archs: tuple[str, ...]
    stages: Callable[[str, BackboneOptions], tuple[str, ...]]
    build: Callable[[str, BackboneOptions], nn.Module]
    loads_into: Callable[[str, BackboneOptions], str]
    default_blocks: Callable[[tuple[str, ...]], str] = lambda stages: equal_runs(stages)
    options: tuple[str, ...] = ()
    stem: str = ""  # the stage before the first of the network's repeated units (a ResNet's), if any
    accepts: Callable[[str], bool] | None = None  # default: ``arch in archs``
    depths: Callable[[tuple[str, ...]], dict[str, str]] | None = None
    library_names: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict

    def has(self, arch: str) -> bool:
        return arch in self.archs or (self.accepts is not None and self.accepts(arch))

    def depth_names(self, stages: tuple[str, ...]) -> dict[str, str]:
        """Each stage's depth name: ``depths`` where given, else ``blockN`` for the N-th stage after the stem."""
        if self.depths is not None:
            return self.depths(stages)
        after = (s for s in stages if s != self.stem)
        return {self.stem: self.stem, **{name: f"block{i}" for i, name in enumerate(after, 1)}}


FAMILIES: dict[str, Family] = {}


def equal_runs(stages: tuple[str, ...], n: int = 4) -> str:
    """A ``model.blocks`` grouping of ``stages`` into ``n`` runs as equal as they can be (fewer stages: one block
    each): ``0-2,3-5,6-8,9-11`` for twelve."""
    n = min(n, len(stages))
    bounds = [round(i * len(stages) / n) for i in range(n + 1)]
    return ",".join(run_spec(stages[a:b]) for a, b in itertools.pairwise(bounds))


def run_spec(run: Sequence[str]) -> str:
    """One block of a ``model.blocks`` grouping: its stages joined by ``+``, or ``first-last`` for more than two."""
    return "+".join(run) if len(run) <= 2 else f"{run[0]}-{run[-1]}"


def register_family(name: str, family: Family) -> None:
    """Add a family; its architecture names must be new."""
    taken = {a for f in FAMILIES.values() for a in family.archs if f.has(a)}
    if taken:
        raise ValueError(f"backbone family {name!r}: architectures {sorted(taken)} are already registered")
    FAMILIES[name] = family


def family_of(arch: str) -> Family:
    """The family of ``arch``; an unknown name is an error that lists the registered architectures."""
    for family in FAMILIES.values():
        if family.has(arch):
            return family
    known = [a for f in FAMILIES.values() for a in f.archs]
    close = difflib.get_close_matches(arch, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown model.arch {arch!r}{hint}; choose one of {', '.join(known)}")


def stage_names(arch: str, options: BackboneOptions | None = None) -> tuple[str, ...]:
    """The stages of ``arch`` in network order (what ``model.blocks`` groups)."""
    return family_of(arch).stages(arch, options or BackboneOptions())


def library_state_dict(arch: str, backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone's state dict as ``backbone.pt`` holds it: on the CPU, under the names of the library its family
    loads into (``Family.loads_into``)."""
    return family_of(arch).library_names({k: v.detach().cpu().contiguous() for k, v in backbone.items()})


def build_backbone(arch: str, options: BackboneOptions) -> Backbone:
    backbone: Backbone = family_of(arch).build(arch, options)  # type: ignore[assignment]
    return backbone


class ResNet(nn.Module):
    """A torchvision-compatible ResNet trunk (no ``fc``) with stage metadata in ``stage_info``.

    ``stem="small"`` replaces the 7x7 stride-2 convolution and max-pool by a 3x3 stride-1 convolution, the usual
    choice for 32 px images (the paper's CIFAR-10 runs); ``width`` scales every stage for CPU-scale models.
    ``granularity="unit"`` makes every residual unit a stage (``layer3.2``: ``layer3[2]``) instead of every layer, so
    a block can end inside a layer; the modules and the state dict are the same.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
        zero_init_residual: bool = True,
        granularity: str = "layer",
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"unknown stem {stem!r}; choose imagenet or small")
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; choose {' or '.join(GRANULARITIES)}")
        block, layers, groups, width_per_group = ARCHS[arch]
        if block is Bottleneck and int(round(64 * width) * width_per_group / 64) < 1:
            raise ValueError(f"{arch} at width {width} has bottlenecks of zero channels; use a larger model.width")
        self.arch, self.stem_kind = arch, stem
        self.groups, self.base_width = groups, width_per_group
        self.inplanes = max(1, round(64 * width))
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        stem_reduction = 4 if stem == "imagenet" else 1
        infos = [StageInfo("stem", self.inplanes, stem_reduction)]
        reduction = stem_reduction
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            layer = self._make_layer(block, max(1, round(planes * width)), n, stride)
            setattr(self, f"layer{i + 1}", layer)
            names = [f"layer{i + 1}"] if granularity == "layer" else [f"layer{i + 1}.{j}" for j in range(n)]
            infos += [StageInfo(name, self.inplanes, reduction) for name in names]
        self.stage_info: tuple[StageInfo, ...] = tuple(infos)
        self._stage_names = frozenset(s.name for s in infos)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = out_channels
        layers += [block(out_channels, planes, groups=self.groups, base_width=self.base_width) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation; zero_init_residual makes every residual branch start as identity
        # (Goyal et al. 2017), as in the Barlow Twins and blockwise reference code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.zeros_(m.bn2.weight)

    def stage(self, name: str) -> nn.Module:
        """The module that computes stage ``name`` (the stem is built from torchvision's top-level layers)."""
        if name == "stem":
            return nn.Sequential(*self.stage_modules(name))
        if name not in self._stage_names:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(s.name for s in self.stage_info)}")
        layer, _, unit = name.partition(".")
        return getattr(self, layer)[int(unit)] if unit else getattr(self, layer)

    def stage_modules(self, name: str) -> list[nn.Module]:
        """The registered modules that compute stage ``name``, in order (``stage`` wraps the stem's in a new
        ``nn.Sequential`` on every call: hooks and ``compile`` need these)."""
        if name == "stem":
            return [self.conv1, self.bn1, self.relu, self.maxpool]
        return [self.stage(name)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for info in self.stage_info:
            x = self.stage(info.name)(x)
        return x


GRANULARITIES = ("layer", "unit")


def resnet_stages(arch: str, options: BackboneOptions) -> tuple[str, ...]:
    """``stem, layer1, ..., layer4``, or with ``granularity="unit"`` one stage per residual unit: ``stem, layer1.0,
    layer1.1, ..., layer4.2`` for ResNet-50."""
    if options.granularity == "layer":
        return ("stem", *(f"layer{i}" for i in range(1, 5)))
    return ("stem", *(f"layer{i}.{j}" for i, n in enumerate(ARCHS[arch][1], 1) for j in range(n)))


def resnet_depths(stages: tuple[str, ...]) -> dict[str, str]:
    """Depth names of a ResNet's stages in either granularity: ``block{i}`` ends layer i, so that unit groupings
    compare with the paper's blocks; ``block{i}.{j}`` ends inside it, at unit j (``layer{i}.{j}``)."""
    last = {s.partition(".")[0]: s for s in stages}  # each layer's last stage
    names = {"stem": "stem"}
    for stage in stages[1:]:
        layer = stage.partition(".")[0]
        names[stage] = f"block{(layer if last[layer] == stage else stage).removeprefix('layer')}"
    return names


def _build_resnet(arch: str, options: BackboneOptions) -> nn.Module:
    """``model.stem=auto``: the small stem up to 64 px images (CIFAR, STL-10 crops, Fashion-MNIST), else ImageNet's."""
    stem = options.stem if options.stem != "auto" else ("small" if options.image_size <= 64 else "imagenet")
    return ResNet(arch, in_channels=options.in_channels, stem=stem, width=options.width,
                  zero_init_residual=options.zero_init_residual, granularity=options.granularity)


register_family("resnet", Family(
    tuple(ARCHS), resnet_stages, _build_resnet,
    lambda arch, options: f"torchvision.models.{arch}() with fc = Identity (the standard stem)",
    default_blocks=lambda stages: "stem+layer1,layer2,layer3,layer4",  # the paper's
    options=("stem", "width", "zero_init_residual", "granularity"), stem="stem", depths=resnet_depths))


def group_stages(backbone: Backbone, blocks: list[list[str]]) -> tuple[list[nn.Sequential], list[StageInfo]]:
    """Blocks as ``nn.Sequential`` views over the backbone's stages, and each block's output metadata.

    The views share parameters with ``backbone``; register them under a name that ``state_dict`` skips or the
    weights appear twice.
    """
    info = {s.name: s for s in backbone.stage_info}
    modules = [nn.Sequential(*(backbone.stage(name) for name in group)) for group in blocks]
    return modules, [info[group[-1]] for group in blocks]
