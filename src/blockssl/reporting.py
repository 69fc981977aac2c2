"""What the run report (``blockssl.report``) and a study's results (``blockssl.study``) share: reading a run's
result files, Markdown tables and the colours of figures. Light to import (matplotlib only once a colour is asked
for), so that the study's commands that draw nothing start quickly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON document at ``path`` (``probe.json``, ``robustness.json``, ...); None where there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: the header, its rule, a line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def palette(n: int) -> list[Any]:
    """``n`` colours of matplotlib's ``tab10``, repeating after ten."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
