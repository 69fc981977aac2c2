"""How blocks are named outside the model: numbered from 1 in configurations, metrics, probes and studies (from 0
inside the code), and ``concat`` for the probe of every block's features together."""

from __future__ import annotations

CONCAT = "concat"


def block_name(k: int) -> str:
    """``block{k + 1}``: block k (numbered from 0) as configurations, metrics and probes name it."""
    return f"block{k + 1}"


def probe_names(num_blocks: int) -> list[str]:
    """What a probe reads and a table lists: every block, then all of them concatenated."""
    return [*(block_name(k) for k in range(num_blocks)), CONCAT]
