"""The accuracy-cost frontier of some of a study's variants: each variant's block-4 and all-block (``concat``)
probe accuracy, mean and spread over its seeds, read through its heads and (where the study probed it) by plain
pooling, the equal readout, with its paired difference to the variant's baseline; against what its configuration
costs to train, counted by ``blockssl.cost`` on the variant's own model and step: training FLOPs per image and view,
and the memory of one device training it at the recipe's batch (weights, gradient peak, optimizer state, saved
activations).

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
from blockssl.study.render import difference_cell, summary_cell
from blockssl.study.results import summary_index
from blockssl.study.spec import PROBE_METRICS, Study

# Each readout's linear and kNN metric; a study without plain-pooling probes has only the first.
READOUTS = {"through its head": PROBE_METRICS[:2], "plain pooling": PROBE_METRICS[2:]}
BLOCKS = ("block4", CONCAT)


def frontier_points(study: Study, variants: list[str]) -> list[dict[str, Any]]:
    """One point per variant: its costs (``cost``: training FLOPs and saved peak per image and view, parameters,
    memory of one device at ``train.batch_size``) and its accuracies (``accuracy[block][metric]``: mean, std,
    seeds; ``diff_mean``, ``diff_ci95`` and ``baseline``: the paired difference to the variant's baseline) from the
    study's ``results.json``."""
    from blockssl.cost import count_model, device_memory

    unknown = [v for v in variants if v not in study.variants]
    if unknown:
        raise ConfigError(f"--frontier: {', '.join(unknown)} not variants of the study; choose among "
                          f"{', '.join(study.variants)}")
    results = Path(study.out) / "results.json"
    if not results.is_file():
        raise ConfigError(f"{results} does not exist: run the study (blockssl study STUDY.yaml) first")
    # results.json writes NaN (a spread or interval of one seed) as null; the tables' cells read NaN
    summary = [{k: math.nan if v is None else v for k, v in s.items()}
               for s in json.loads(results.read_text())["summary"]]
    index = summary_index(summary)
    points = []
    for variant in variants:
        cfg = study.config(variant, study.seeds_of(variant)[0])
        cost = count_model(cfg)  # this model's counts only: the end-to-end reference is not drawn
        total = cost.total
        accuracy = {block: {metric: {k: s[k] for k in ("mean", "std", "seeds", "baseline", "diff_mean", "diff_ci95",
                                                       "diff_seeds")}
                            for metric in PROBE_METRICS if (s := index.get((variant, block, metric))) is not None}
                    for block in BLOCKS}
        points.append({"variant": variant, "accuracy": accuracy, "cost": {
            "params": total.params, "train_flops": total.train_flops, "saved_peak": cost.saved_peak,
            "device_memory": device_memory(cost, cfg.train.batch_size).total}})
    return points


def write_frontier(study: Study, variants: list[str]) -> Path:
    """``frontier.json``, ``frontier.md`` and ``frontier.png`` in the study's ``out``; returns the Markdown's path."""
    from blockssl.eval.robustness import to_json

    points = frontier_points(study, variants)
    out = Path(study.out)
    atomic_write_text(out / "frontier.json", json.dumps(to_json(points), indent=1) + "\n")
    _figure(points, out / "frontier.png")
    readouts = [r for r, (linear, _) in READOUTS.items() if any(linear in p["accuracy"]["block4"] for p in points)]
    rows = []
    for p in points:
        b4, concat = p["accuracy"]["block4"], p["accuracy"][CONCAT]
        costs = [f"{p['cost']['train_flops'] / 1e6:.1f}", f"{p['cost']['device_memory'] / 2**20:.1f}",
                 f"{p['cost']['saved_peak'] / 2**10:.0f}", f"{p['cost']['params'] / 1e6:.2f}"]
        for i, readout in enumerate(readouts):
            linear, knn = READOUTS[readout]
            rows.append([p["variant"] if i == 0 else "", *(costs if i == 0 else [""] * len(costs)), readout,
                         summary_cell(b4.get(linear)), _difference(p["variant"], b4.get(linear)),
                         summary_cell(b4.get(knn)), summary_cell(concat.get(linear)), summary_cell(concat.get(knn))])
    header = ["variant", "train MFLOPs", "memory (MiB)", "saved peak (KiB)", "params (M)", "readout",
              "block4 linear top-1", "block4 linear: - baseline [95% interval] (per seed)", "block4 kNN top-1",
              f"{CONCAT} linear top-1", f"{CONCAT} kNN top-1"]
    text = ["# Accuracy against cost", "", *markdown_table(header, rows), "",
            "Costs counted by `blockssl cost` on each variant's model and training step: FLOPs and the "
            "saved-activation peak per image and view; memory of one device training the model at "
            "`train.batch_size` (weights, gradient peak, optimizer state, saved activations). Accuracies: mean ± std "
            "over the seeds (per-seed values), from results.json, read through each variant's heads and by plain "
            "pooling of the block outputs (the equal readout); the difference is paired by seed against the "
            "variant's baseline, with its 95% t interval (exploratory: not corrected for multiplicity).", "",
            "![Accuracy against cost](frontier.png)", ""]
    atomic_write_text(out / "frontier.md", "\n".join(text))
    return out / "frontier.md"


def _std(stats: dict[str, Any]) -> float:
    """The spread over seeds as an error bar; 0 where there is none (one seed)."""
    return 0.0 if math.isnan(stats["std"]) else float(stats["std"])


def _difference(variant: str, stats: dict[str, Any] | None) -> str:
    """The paired difference to the baseline with its 95% interval; none for the baseline itself."""
    if stats is None or stats["baseline"] == variant:
        return "-"
    return f"{difference_cell(stats['diff_mean'], stats['diff_ci95'], stats['diff_seeds'])} vs {stats['baseline']}"


def _figure(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = palette(len(points))
    # Through the heads filled, by plain pooling hollow and drawn 1.5% of the axis' span to the right, so that
    # neither hides the other
    markers = {"through its head": ("o", 0.0), "plain pooling": ("s", 0.015)}
    fig, axes = plt.subplots(len(BLOCKS), 2, figsize=(10, 4 * len(BLOCKS)), squeeze=False)
    for row, block in enumerate(BLOCKS):
        for col, (key, label, scale) in enumerate((("train_flops", "training MFLOPs per image and view", 1e6),
                                                   ("device_memory", "memory of one device (MiB)", 2**20))):
            ax = axes[row][col]
            xs = [p["cost"][key] / scale for p in points]
            span = max(xs) - min(xs) or max(xs)
            for p, color in zip(points, colors, strict=True):
                for readout, (linear, _) in READOUTS.items():
                    stats = p["accuracy"][block].get(linear)
                    if stats is None:
                        continue
                    marker, shift = markers[readout]
                    x = p["cost"][key] / scale + shift * span
                    face = color if readout == "through its head" else "white"
                    ax.errorbar(x, stats["mean"], yerr=_std(stats), fmt=marker, color=color, mfc=face, capsize=3,
                                label=f"{p['variant']}, {readout}")
                    ax.scatter([x] * len(stats["seeds"]), list(stats["seeds"].values()), color=color, s=8, alpha=0.5)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{block} linear top-1 (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("Accuracy against training cost (mean ± std over seeds, per-seed points)")
    fig.tight_layout(rect=(0, 0.025 * math.ceil(len(labels) / 2) + 0.01, 1, 1))  # room for the legend
    fig.savefig(path, dpi=110)
    plt.close(fig)
