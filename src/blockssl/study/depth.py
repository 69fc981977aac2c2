"""Blocks named by depth: ``blockN`` is the block that ends at the backbone's N-th stage after its stem (``layerN``
of a ResNet, ``blockN.j`` inside it at unit ``layerN.j``; a ViT's N-th transformer block, stage ``N - 1``: it has no
stem), whatever the grouping of the stages, so that groupings compare at equal depth."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import yaml

from blockssl.config import ModelConfig, parse_blocks
from blockssl.models.backbone import BackboneOptions, family_of, stage_names
from blockssl.names import block_name


def block_names(blocks: str, arch: str = "resnet50", options: BackboneOptions | None = None) -> dict[str, str]:
    """The block names (``block1``, ...) of a grouping ``model.blocks`` of ``arch``'s stages -> the name of the
    block that ends at the same stage in the one-stage-per-block grouping (``block2`` for a ResNet block ending at
    layer2; the stem's own name, ``stem``, for one ending there): another grouping of the stages then compares with
    the paper's four blocks at equal depth."""
    stages = stage_names(arch, options)
    depth = family_of(arch).depth_names(stages)
    return {block_name(k): depth[g[-1]] for k, g in enumerate(parse_blocks(blocks, stages))}


def model_block_names(model: ModelConfig) -> dict[str, str]:
    """``block_names`` of a model configuration's grouping, under its own backbone options (a ViT's depth)."""
    return block_names(model.blocks, model.arch, BackboneOptions.of(model))


def depth_names(run: Path) -> dict[str, str]:
    """``block_names`` of a run directory's saved grouping."""
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    known = {k: v for k, v in saved.items() if k in ModelConfig.__dataclass_fields__}
    return model_block_names(dataclasses.replace(ModelConfig(), **known))  # absent keys: their defaults, as loaded


def depth_key(block: str) -> tuple[float, float]:
    """Sort key of a block name: the stem, block1, ..., block3.2 (inside block 3, before it), block3, ..., then the
    concatenation."""
    if block == "stem":
        return (0.0, 0.0)
    number, _, unit = block.removeprefix("block").partition(".")
    if not number.isdigit():
        return (math.inf, math.inf)
    return (float(number), float(unit) if unit.isdigit() else math.inf)
