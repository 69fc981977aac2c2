"""Blocks named by depth: ``blockN`` is the block that ends at ResNet stage N (layer N), whatever the grouping of
the stages, so that groupings compare at equal depth."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from blockssl.config import parse_blocks

CONCAT = "concat"  # the probe of all blocks concatenated: a block of every run, at no depth


def block_names(blocks: str) -> dict[str, str]:
    """The block names (``block1``, ...) of a grouping ``model.blocks`` -> the name of the paper's block that ends
    at the same stage (``block2`` for a block ending at layer2; ``stem`` for one ending there): another grouping of
    the stages then compares with the four paper blocks at equal depth."""
    return {f"block{k + 1}": "stem" if g[-1] == "stem" else f"block{g[-1].removeprefix('layer')}"
            for k, g in enumerate(parse_blocks(blocks))}


def depth_names(run: Path) -> dict[str, str]:
    """``block_names`` of a run directory's saved grouping."""
    return block_names(yaml.safe_load((run / "config.yaml").read_text())["model"]["blocks"])


def depth_key(block: str) -> float:
    """Sort key of a block name: the stem, block1, block2, ..., then the concatenation."""
    if block == "stem":
        return 0.0
    number = block.removeprefix("block")
    return float(number) if number.isdigit() else math.inf
