"""A study's result files in its ``out`` folder: ``results.json``, ``results.csv``, ``results.md`` and its figures
(``per_block_top1.png``, ``differences.png``, ``gap_vs_budget.png``). matplotlib is imported only to draw."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from blockssl.checkpoint import atomic_write_text
from blockssl.names import CONCAT
from blockssl.reporting import markdown_table, palette
from blockssl.stats import ALPHA, paired
from blockssl.study.depth import depth_key
from blockssl.study.progress import is_done
from blockssl.study.results import (
    SummaryIndex,
    Values,
    budget_results,
    by_seed,
    collect_rows,
    differences,
    primary_results,
    summary,
    summary_index,
)
from blockssl.study.spec import AT_INIT, PIXELS, PROBE_METRICS, Comparison, Study

# pool_*: each block read by plain global pooling of its output (probe.readouts), the same readout for every scheme
METRIC_TITLES = {"linear_top1": "Linear probe top-1 (%)", "knn_top1": "kNN top-1 (%)",
                 "pool_linear_top1": "Linear probe top-1, plain pooling (%)",
                 "pool_knn_top1": "kNN top-1, plain pooling (%)", "mce": "mCE (%)", "relative_mce": "Relative mCE (%)",
                 "weight_change": "Weight change from initialisation (%)", "rankme": "RankMe of the features"}


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _pixel_stats(index: SummaryIndex, metric: str) -> dict[str, Any] | None:
    """The raw-pixel probe's summary under ``metric``'s readout, from a (variant, block, metric) index: pixels have
    no head, so every readout reads the one probe."""
    return index.get((PIXELS, PIXELS, metric.removeprefix("pool_")))


def summary_cell(stats: dict[str, Any] | None) -> str:
    """``mean ± std (per-seed values)`` of a summary row."""
    if stats is None or not stats["seeds"]:
        return "-"
    return _pm(stats["mean"], stats["std"]) + " (" + ", ".join(f"{x:.2f}" for x in stats["seeds"].values()) + ")"


def difference_cell(mean: float, half_width: float, seeds: dict[int, float]) -> str:
    """Paired differences as ``mean [95% interval] (per-seed differences)``; no interval below two seeds."""
    if not seeds:
        return "-"
    interval = "" if math.isnan(half_width) else f" [{mean - half_width:.2f}, {mean + half_width:.2f}]"
    return ("-" if math.isnan(mean) else f"{mean:+.2f}") + interval + " (" + ", ".join(
        f"{x:.2f}" for x in seeds.values()) + ")"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fewer_seeds(study: Study) -> str:
    """`` (v: [0, 1]; ...)`` for the variants run on fewer seeds, else nothing."""
    fewer = "; ".join(f"{v}: {seeds}" for v, seeds in study.variant_seeds.items())
    return f" ({fewer})" if fewer else ""


def _primary_lines(primary: list[dict[str, Any]]) -> list[str]:
    lines = ["## Primary comparisons (declared before running; Holm-corrected)", ""]
    if not primary:
        return [*lines, "None declared (`primary:` in the study file, before its runs)."]
    rows = []
    for r in primary:
        interval = "-" if math.isnan(r["ci95_low"]) else f"[{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
        rows.append([f"{r['variant']} - {r['baseline']}, {r['block']}, {r['metric']}", str(r["n"]),
                     "-" if math.isnan(r["mean"]) else f"{r['mean']:+.2f}", interval, _p(r["p"]), _p(r["p_holm"]),
                     r["verdict"]])
    lines += markdown_table(["comparison", "seeds", "mean difference", "95% interval", "p", "Holm p", "verdict"], rows)
    return [*lines, "", f"Differences paired by seed (variant - baseline). p: two-sided paired t-test over the seeds; "
            f"Holm p: Holm's step-down adjustment over the {len(primary)} declared comparisons. A comparison holds, in "
            f"the direction of its mean, where its Holm p is below {ALPHA} (family-wise error {ALPHA}); its interval "
            "is the unadjusted 95% interval (Student's t). The adjustment is over the whole family, so none has a "
            "verdict until every one has all its declared seeds (`pending` until then)."]


def _markdown(study: Study, stats: list[dict[str, Any]], primary: list[dict[str, Any]],
              budget: list[dict[str, Any]], figures: list[str]) -> str:
    index = summary_index(stats)
    tables: list[str] = []
    explored = 0  # exploratory differences shown: how many intervals could exclude zero by chance
    for metric, title in METRIC_TITLES.items():
        # a table holds the variants evaluated for its metric; the raw-pixel probe is one number, not a block
        blocks = sorted({s["block"] for s in stats if s["metric"] == metric and s["variant"] != PIXELS}, key=depth_key)
        # each variant, then its network at random initialisation where the probes read it (probe.random_init)
        variants = [x for v in study.variants for x in (v, f"{v}{AT_INIT}") if any((x, b, metric) in index
                                                                                    for b in blocks)]
        if not variants:
            continue
        header = ["variant", *blocks]
        rows = [[v, *(summary_cell(index.get((v, b, metric))) for b in blocks)] for v in variants]
        tables += ["", f"## {title}", "", *markdown_table(header, rows)]
        pixels = _pixel_stats(index, metric)
        if pixels is not None:
            tables += ["", f"Raw pixels under the same probe settings (no network): {summary_cell(pixels)}."]
        compared = [v for v in variants if v != study.baseline]
        cells = {(v, b): difference_cell(s["diff_mean"], s["diff_ci95"], s["diff_seeds"]) if s else "-"
                 for v in compared for b in blocks for s in [index.get((v, b, metric))]}
        explored += sum(cell != "-" for cell in cells.values())
        if compared:
            at_init = any(v.endswith(AT_INIT) for v in compared)
            tables += ["", "Difference to the variant's baseline, paired by seed (exploratory): mean [95% interval] "
                       "(per-seed differences)." + (f" A `VARIANT{AT_INIT}` row is the variant's network at random "
                                                   "initialisation, compared with the same network trained."
                                                   if at_init else ""), "",
                       *markdown_table(header, [[f"{v} - {study.baseline_of(v)}", *(cells[(v, b)] for b in blocks)]
                                                for v in compared])]
    if budget:
        tables += ["", "## Gap against training budget (exploratory)", "",
                   "The paired difference (variant - baseline) of each pair of a `budget` series at the deepest block "
                   "both have, against the pair's `train.epochs`: mean [95% interval] (per-seed differences).", ""]
        points = {(r["series"], r["variant"], r["baseline"], r["metric"]): r for r in budget}
        metrics = [m for m in PROBE_METRICS if any(r["metric"] == m for r in budget)]
        rows = []
        for series, pairs in study.budget.items():
            for variant, baseline in pairs:
                found = [points.get((series, variant, baseline, m)) for m in metrics]
                if any(found):
                    first = next(r for r in found if r)
                    rows.append([series, str(first["epochs"]), f"{variant} - {baseline}", first["block"],
                                 *(difference_cell(r["mean"], r["mean"] - r["ci95_low"], r["seeds"]) if r else "-"
                                   for r in found)])
        tables += markdown_table(["series", "train.epochs", "comparison", "block",
                                  *(METRIC_TITLES[m].removesuffix(" (%)") for m in metrics)], rows)
    lines = [f"# Study `{study.out}`", "",
             f"Base recipe `{study.base}`, overrides `{' '.join(study.overrides) or 'none'}`, seeds "
             f"{study.seeds}{_fewer_seeds(study)}; baseline variant `{study.baseline}`.", "",
             *_primary_lines(primary), "",
             f"Everything else is exploratory: the {explored} differences to a variant's baseline below are shown "
             "with their mean, 95% interval (Student's t over the seeds, not corrected for their number: about 1 in 20 "
             "excludes zero by chance where there is no difference) and per-seed values, and tested for nothing.", "",
             "Cells: mean ± standard deviation over seeds (per-seed values in parentheses); differences to a "
             "variant's baseline are paired by seed, over the seeds both have run. Block k is the block that ends at "
             "the backbone's k-th stage after its stem (a ResNet's layer k, a ViT's k-th transformer block), "
             "whatever the grouping, so groupings compare at equal depth.", "",
             f"Runs finished: {sum(is_done(study, v, seed) for v, seed in study.runs())} of "
             f"{len(list(study.runs()))}.", "",
             *markdown_table(["variant", "overrides", "baseline"],
                             [[v, f"`{' '.join(study.variants[v]) or '(base)'}`",
                               "-" if v == study.baseline else study.baseline_of(v)] for v in study.variants]),
             *tables]
    times = [(v, index[(v, "", "train_time_s")]) for v in study.variants if (v, "", "train_time_s") in index]
    if times:
        lines += ["", "## Training time (s per run)", "",
                  "Wall-clock seconds of pretraining on the machine that ran it, summed over resumptions: it counts "
                  "whatever else shared that machine.", "",
                  *markdown_table(["variant", "seconds"], [[v, _pm(s["mean"], s["std"], 0)] for v, s in times])]
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


# the per-block figure's readouts: through each block's trained head, and plain pooling, the same for every scheme
PER_BLOCK_READOUTS = {"linear_top1": "through each block's head", "pool_linear_top1": "plain pooling (equal readout)"}


def per_block_panels(study: Study, stats: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """The per-block figure's panels, in reading order: (baseline, readout metric, the variants drawn). One row per
    baseline, holding it and the variants compared with it, so that each row answers its own question; one column
    per readout the study has, so that schemes whose heads differ are also seen at the equal readout."""
    groups: dict[str, list[str]] = {study.baseline: [study.baseline]}
    for v in study.variants:
        if v != study.baseline:
            groups.setdefault(study.baseline_of(v), [study.baseline_of(v)]).append(v)
    readouts = [m for m in PER_BLOCK_READOUTS if any(s["metric"] == m and s["variant"] != PIXELS for s in stats)]
    return [(baseline, metric, members) for baseline, members in groups.items() for metric in readouts]


def _per_block_figure(study: Study, stats: list[dict[str, Any]], out: Path) -> str | None:
    """Per-block linear top-1 with error bars (``per_block_panels``), each variant beside its network at random
    initialisation where probed (dotted, hollow markers), the raw-pixel probe as a line."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = per_block_panels(study, stats)
    if not panels:
        return None
    index = summary_index(stats)
    blocks = sorted({b for v, b, m in index if m in PER_BLOCK_READOUTS and v != PIXELS}, key=depth_key)
    readouts = len({metric for _, metric, _ in panels})
    columns = readouts if readouts > 1 else min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7.5 * columns, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    colors = colormaps["tab20"]  # 20 distinct colours, one per variant in every panel
    number = {v: i for i, v in enumerate(study.variants)}
    for place, (ax, (baseline, metric, members)) in enumerate(zip(axes, panels, strict=False)):
        lines = [(row, row == m) for m in members for row in (m, f"{m}{AT_INIT}")]  # (row, trained)
        for position, (v, trained) in enumerate(lines):
            i = number[v.removesuffix(AT_INIT)]
            offset = (position - (len(lines) - 1) / 2) * 0.04
            xs = [j + offset for j, b in enumerate(blocks) if (v, b, metric) in index]
            ss = [index[(v, b, metric)] for b in blocks if (v, b, metric) in index]
            # a line through the blocks; the concatenation of all blocks is no next block, so its point stands apart
            chained = [k for k, s in enumerate(ss) if s["block"] != CONCAT]
            style: dict[str, Any] = dict(color=colors(i % 20), marker="os^Dv<>p"[i % 8], capsize=3, markersize=5,
                                         markerfacecolor=None if trained else "none")
            for part, line in ((chained, "-" if trained else ":"), ([k for k in range(len(ss)) if k not in chained],
                                                                     "none")):
                ax.errorbar([xs[k] for k in part], [ss[k]["mean"] for k in part],
                            yerr=[ss[k]["std"] for k in part], linestyle=line,
                            label=(v if trained else f"{v.removesuffix(AT_INIT)} at random init")
                            if line != "none" and part else None, **style)
        if (pixels := _pixel_stats(index, metric)) is not None:
            ax.axhline(pixels["mean"], color="gray", linestyle="--", linewidth=1, label="raw pixels")
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_title(f"against {baseline}, {PER_BLOCK_READOUTS[metric]}", fontsize=10)
        ax.grid(alpha=0.3)
        if readouts == 1 or place % columns == columns - 1:  # a row's readouts draw the same variants: one legend
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::columns]:
        ax.set_ylabel("linear probe top-1 (%)")
    fig.suptitle("Per-block accuracy (mean ± std over seeds), each variant beside its baseline")
    fig.savefig(out / "per_block_top1.png", dpi=110)
    return "per_block_top1.png"


def difference_metrics(study: Study, values: Values) -> list[str]:
    """The differences figure's panels: linear and kNN top-1, then any other top-1 a primary is declared on (plain
    pooling's), each where the study has values for it."""
    shown = dict.fromkeys(["linear_top1", "knn_top1", *(c.metric for c in study.primary if c.metric.endswith("top1"))])
    return [m for m in shown if any(k[2] == m for k in values)]


def _differences_figure(study: Study, values: Values, out: Path) -> str | None:
    """Paired differences (variant - baseline) per block: the mean with its 95% interval and the per-seed
    differences, a row of panels per baseline (the variants compared with it, and the primaries against it), linear
    and kNN top-1 side by side, and beside them the other metrics that primaries are declared on (plain pooling's
    top-1); primary comparisons on a shaded band."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    metrics = difference_metrics(study, values)
    groups: dict[str, list[str]] = {}
    for v in study.variants:
        if v != study.baseline:
            groups.setdefault(study.baseline_of(v), []).append(v)
    for c in study.primary:
        if c.metric in metrics and c.variant not in groups.get(c.baseline, []):
            groups.setdefault(c.baseline, []).append(c.variant)
    blocks = sorted({b for (v, b, m) in values if v != PIXELS and m in metrics}, key=depth_key)
    found = {(v, base, b, m): d for base, members in groups.items() for v in members for b in blocks for m in metrics
             if (d := paired(differences(values, Comparison(v, base, b, m)))).seeds}
    groups = {base: kept for base, members in groups.items()
              if (kept := [v for v in members if any(k[:2] == (v, base) for k in found)])}
    if not groups:
        return None
    primaries = {(c.variant, c.baseline, c.block, c.metric) for c in study.primary}
    colors = dict(zip(blocks, palette(len(blocks)), strict=True))
    spread = 0.8 / len(blocks)  # the blocks of one variant share its row
    fig = Figure(figsize=(6.0 * len(metrics) + 1.5, 1.2 + sum(0.5 * len(vs) + 0.8 for vs in groups.values())),
                 layout="constrained")
    grid = fig.add_gridspec(len(groups), len(metrics), height_ratios=[len(vs) + 1.6 for vs in groups.values()])
    columns: list[Any] = [None] * len(metrics)  # a scale per metric: equal differences look equal in every row
    for row, (baseline, members) in enumerate(groups.items()):
        first = None
        for col, metric in enumerate(metrics):
            ax = fig.add_subplot(grid[row, col], sharey=first, sharex=columns[col])
            first, columns[col] = first or ax, columns[col] or ax
            for i, v in enumerate(members):
                for j, b in enumerate(blocks):
                    diff = found.get((v, baseline, b, metric))
                    if diff is None:
                        continue
                    y = i + (j - (len(blocks) - 1) / 2) * spread
                    primary = (v, baseline, b, metric) in primaries
                    if primary:
                        ax.axhspan(y - spread / 2, y + spread / 2, color="gold", alpha=0.4, linewidth=0)
                    ax.scatter(list(diff.seeds.values()), [y] * len(diff.seeds), s=14, color=colors[b], alpha=0.6,
                               linewidths=0, zorder=2)
                    ax.errorbar(diff.mean, y, xerr=None if math.isnan(diff.ci95) else diff.ci95,
                                fmt="D" if primary else "o", color=colors[b], markersize=5,
                                markeredgecolor="black" if primary else colors[b], capsize=2, linewidth=1.2, zorder=3)
            for i in range(len(members) - 1):
                ax.axhline(i + 0.5, color="0.8", linewidth=0.6)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_yticks(range(len(members)), members)
            ax.set_ylim(len(members) - 0.5, -0.5)  # the first variant on top
            ax.tick_params(axis="y", labelleft=col == 0, length=0)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{METRIC_TITLES[metric].removesuffix(' (%)')}: variant - {baseline}", fontsize=10)
            if row == len(groups) - 1:
                ax.set_xlabel("difference (points)")
    handles: list[Any] = [Line2D([], [], marker="o", linestyle="none", color=colors[b], label=b) for b in blocks]
    handles.append(Line2D([], [], marker="o", linestyle="none", color="gray", alpha=0.5, markersize=4,
                          label="one seed"))
    if primaries:
        handles.append(Patch(color="gold", alpha=0.4, label="primary comparison"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("Paired differences by seed: mean and 95% interval (Student's t), points per seed")
    fig.savefig(out / "differences.png", dpi=110)
    return "differences.png"


def _budget_figure(budget: list[dict[str, Any]], stats: list[dict[str, Any]], out: Path) -> str | None:
    """Each budget series against ``train.epochs``, a column per probe metric (through the heads, then by plain
    pooling; linear, then kNN): above, its paired difference at the deepest block (mean and 95% interval, points per
    seed); below, what each side of it reads there (mean ± std over seeds, points per seed) beside raw pixels under
    the same probe, so that the figure says both how the gap and how each scheme's level move with the budget."""
    from matplotlib.figure import Figure

    metrics = [m for m in PROBE_METRICS if any(r["metric"] == m for r in budget)]
    if not metrics:
        return None
    index = summary_index(stats)
    series = list(dict.fromkeys(r["series"] for r in budget))
    epochs = sorted({r["epochs"] for r in budget})
    log = epochs[-1] >= 4 * epochs[0]  # budgets that grow by factors
    step = 0.02 * ((math.log2(epochs[-1] / epochs[0]) if log else epochs[-1] - epochs[0]) or 1.0)
    colors = palette(len(series))

    def shifted(x: float, k: int, of: int) -> float:
        """Lines side by side at each budget, so that their intervals do not hide each other."""
        offset = step * (k - (of - 1) / 2)
        return x * 2 ** offset if log else x + offset

    def seeds(ax: Any, xs: list[float], entries: list[dict[str, Any]], color: Any) -> None:
        for x, entry in zip(xs, entries, strict=True):
            ax.scatter([x] * len(entry["seeds"]), list(entry["seeds"].values()), s=14, color=color, alpha=0.5,
                       linewidths=0)

    fig = Figure(figsize=(4.2 * len(metrics), 7.2), layout="constrained")
    axes = fig.subplots(2, len(metrics), squeeze=False, sharex=True)
    for col, metric in enumerate(metrics):
        gap, level = axes[0][col], axes[1][col]
        points = [r for r in budget if r["metric"] == metric]
        for k, (name, color) in enumerate(zip(series, colors, strict=True)):
            mine = sorted((r for r in points if r["series"] == name), key=lambda r: r["epochs"])
            xs = [shifted(r["epochs"], k, len(series)) for r in mine]
            gap.errorbar(xs, [r["mean"] for r in mine], yerr=[r["mean"] - r["ci95_low"] for r in mine], color=color,
                         marker="o", capsize=3)  # named in the legend by its sides, drawn below
            seeds(gap, xs, mine, color)
            # Each side of the series: the pairs' variants solid, their baselines dashed and hollow
            left, _, right = name.partition(" - ")
            for j, (side, style, face) in enumerate((("variant", "-", color), ("baseline", "--", "white"))):
                found = [(r["epochs"], e) for r in mine if (e := index.get((r[side], r["block"], metric))) is not None]
                if not found:
                    continue
                xs = [shifted(epochs, 2 * k + j, 2 * len(series)) for epochs, _ in found]
                entries = [entry for _, entry in found]
                level.errorbar(xs, [e["mean"] for e in entries], yerr=[e["std"] for e in entries], color=color,
                               linestyle=style, marker="o", mfc=face, capsize=3,
                               label=(left if side == "variant" else right) if right else f"{name}: {side}")
                seeds(level, xs, entries, color)
        pixels = _pixel_stats(index, metric)
        if pixels is not None:
            level.axhline(pixels["mean"], color="gray", linestyle=":", label="raw pixels")
        for ax in (gap, level):
            if log:
                ax.set_xscale("log", base=2)
                ax.minorticks_off()
            ax.set_xticks(epochs, [str(e) for e in epochs])
            ax.grid(alpha=0.3)
        gap.axhline(0, color="black", linewidth=0.8)
        blocks = ", ".join(dict.fromkeys(r["block"] for r in points))
        gap.set_title(f"{METRIC_TITLES[metric].removesuffix(' (%)')} at {blocks}", fontsize=10)
        gap.set_ylabel("variant - baseline (points)")
        level.set_ylabel(METRIC_TITLES[metric])
        level.set_xlabel("train.epochs")
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("Against the training budget: the gap (mean and 95% interval) and each side's level (mean ± std), "
                 "points per seed", fontsize=11)
    fig.savefig(out / "gap_vs_budget.png", dpi=110)
    return "gap_vs_budget.png"


def write_results(study: Study) -> Path:
    """``results.json`` (tidy rows, their summary, the primary comparisons and the budget series),
    ``results.csv`` (the rows), ``results.md`` and its figures, in ``out``."""
    out = Path(study.out)
    rows = collect_rows(study)
    values = by_seed(rows)
    stats = summary(rows, study.baseline_of)
    primary = primary_results(study, values)
    budget = budget_results(study, values)
    from blockssl.eval.robustness import to_json

    atomic_write_text(out / "results.json", json.dumps(to_json(
        {"rows": rows, "summary": stats, "primary": primary, "budget": budget}), indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["variant", "seed", "block", "metric", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    figures = [name for name in (_per_block_figure(study, stats, out), _differences_figure(study, values, out),
                                 _budget_figure(budget, stats, out) if budget else None) if name]
    atomic_write_text(out / "results.md", _markdown(study, stats, primary, budget, figures))
    return out / "results.md"
