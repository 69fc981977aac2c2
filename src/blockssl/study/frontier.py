"""The accuracy-cost frontier of some of a study's variants: each variant's block-4 and all-block (``concat``)
probe accuracy, mean and spread over its seeds, against what its configuration costs to train, counted by
``blockssl.cost`` on the variant's own model and step: training FLOPs per image and view, and the memory of one
device training it at the recipe's batch (weights, gradient peak, optimizer state, saved activations).

``blockssl study STUDY.yaml --frontier blockwise,head_gap,head_pooled`` writes ``frontier.json``, ``frontier.md``
and ``frontier.png`` beside the study's results, from its aggregated ``results.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from blockssl.checkpoint import atomic_write_text
from blockssl.config import ConfigError
from blockssl.names import CONCAT
from blockssl.reporting import markdown_table, palette
from blockssl.study.spec import Study

METRICS = {"linear_top1": "linear top-1", "knn_top1": "kNN top-1"}
BLOCKS = ("block4", CONCAT)


def frontier_points(study: Study, variants: list[str]) -> list[dict[str, Any]]:
    """One point per variant: its costs (``cost``: training FLOPs and saved peak per image and view, parameters,
    memory of one device at ``train.batch_size``) and its accuracies (``accuracy[block][metric]``: mean, std,
    seeds) from the study's ``results.json``."""
    from blockssl.cost import count_model, device_memory

    unknown = [v for v in variants if v not in study.variants]
    if unknown:
        raise ConfigError(f"--frontier: {', '.join(unknown)} not variants of the study; choose among "
                          f"{', '.join(study.variants)}")
    results = Path(study.out) / "results.json"
    if not results.is_file():
        raise ConfigError(f"{results} does not exist: run the study (blockssl study STUDY.yaml) first")
    summary = json.loads(results.read_text())["summary"]
    index = {(s["variant"], s["block"], s["metric"]): s for s in summary}
    points = []
    for variant in variants:
        cfg = study.config(variant, study.seeds_of(variant)[0])
        cost = count_model(cfg)  # this model's counts only: the end-to-end reference is not drawn
        total = cost.total
        accuracy = {block: {metric: {k: s[k] for k in ("mean", "std", "seeds")}
                            for metric in METRICS if (s := index.get((variant, block, metric))) is not None}
                    for block in BLOCKS}
        points.append({"variant": variant, "accuracy": accuracy, "cost": {
            "params": total.params, "train_flops": total.train_flops, "saved_peak": cost.saved_peak,
            "device_memory": device_memory(cost, cfg.train.batch_size).total}})
    return points


def write_frontier(study: Study, variants: list[str]) -> Path:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in the study's ``out``; returns the Markdown's path."""
    points = frontier_points(study, variants)
    out = Path(study.out)
    atomic_write_text(out / "frontier.json", json.dumps(points, indent=1) + "\n")
    _figure(points, out / "frontier.png")
    rows = [[p["variant"], f"{p['cost']['train_flops'] / 1e6:.1f}", f"{p['cost']['device_memory'] / 2**20:.1f}",
             f"{p['cost']['saved_peak'] / 2**10:.0f}", f"{p['cost']['params'] / 1e6:.2f}",
             *(_cell(p["accuracy"][block].get(metric)) for block in BLOCKS for metric in METRICS)] for p in points]
    header = ["variant", "train MFLOPs", "memory (MiB)", "saved peak (KiB)", "params (M)",
              *(f"{block} {name}" for block in BLOCKS for name in METRICS.values())]
    text = ["# Accuracy against cost", "", *markdown_table(header, rows), "",
            "Costs counted by `blockssl cost` on each variant's model and training step: FLOPs and the "
            "saved-activation peak per image and view; memory of one device training the model at "
            "`train.batch_size` (weights, gradient peak, optimizer state, saved activations). Accuracies: mean ± std "
            "over the seeds (per-seed values), from results.json.", "", "![Accuracy against cost](frontier.png)", ""]
    atomic_write_text(out / "frontier.md", "\n".join(text))
    return out / "frontier.md"


def _std(stats: dict[str, Any]) -> float:
    """The spread over seeds; 0 where there is none (one seed: results.json holds null)."""
    std = stats["std"]
    return 0.0 if std is None or math.isnan(std) else float(std)


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.2f} ± {_std(stats):.2f} ({', '.join(f'{v:.2f}' for v in stats['seeds'].values())})"


def _figure(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = palette(len(points))
    fig, axes = plt.subplots(len(BLOCKS), 2, figsize=(10, 4 * len(BLOCKS)), squeeze=False)
    for row, block in enumerate(BLOCKS):
        for col, (key, label, scale) in enumerate((("train_flops", "training MFLOPs per image and view", 1e6),
                                                   ("device_memory", "memory of one device (MiB)", 2**20))):
            ax = axes[row][col]
            for p, color in zip(points, colors, strict=True):
                stats = p["accuracy"][block].get("linear_top1")
                if stats is None:
                    continue
                x = p["cost"][key] / scale
                ax.errorbar(x, stats["mean"], yerr=_std(stats), fmt="o", color=color, capsize=3, label=p["variant"])
                ax.scatter([x] * len(stats["seeds"]), list(stats["seeds"].values()), color=color, s=8, alpha=0.5)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{block} linear top-1 (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Accuracy against training cost (mean ± std over seeds, per-seed points)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
