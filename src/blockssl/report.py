"""A Markdown report comparing runs: ``report.md`` with PNG figures beside it.

Figures (each written only when some run has the data):
- ``report_loss.png``: every block's training loss against the step, one panel per block, one line per run
  (from ``metrics.jsonl``);
- ``report_online_probe.png``: the online probe's per-block top-1 against the step, when pretraining ran it;
- ``report_weight_change.png``, ``report_rankme.png``: each block's relative weight change from initialisation and
  the RankMe of its features against the step (``blockssl.diagnostics``);
- ``report_probe.png``: linear-probe and kNN (k=20) top-1 accuracy per block, runs side by side, random
  initialisation marked when ``blockssl probe --random-init`` measured it (from ``probe.json``);
- ``report_robustness_severity.png``: top-1 error against corruption severity (0 = clean), one line per block,
  averaged over corruptions (from ``robustness.json``);
- ``report_robustness_heatmap.png``: error increase over clean per corruption and block, averaged over
  severities.

Figures use matplotlib's object-oriented API (``Figure``, Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from blockssl.config import Config, ConfigError, diff_configs, from_dict
from blockssl.data.datasets import dataset_info
from blockssl.eval.robustness import CORRUPTIONS, fmt_number
from blockssl.reporting import markdown_table, palette, read_json, read_metrics
from blockssl.runtime import require_out_dir, require_run_dir

FIGURES = {"loss": "report_loss.png", "online": "report_online_probe.png", "weight_change": "report_weight_change.png",
           "rankme": "report_rankme.png", "probe": "report_probe.png", "severity": "report_robustness_severity.png",
           "heatmap": "report_robustness_heatmap.png"}
DPI = 130


@dataclass
class RunData:
    """What the report reads from one run directory (missing files give empty fields)."""

    path: Path
    name: str
    cfg: Config | None = None
    config_error: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None

    @property
    def loss_name(self) -> str:
        return self.cfg.loss.name if self.cfg else "?"

    @property
    def num_classes(self) -> int | None:
        try:
            return dataset_info(self.cfg.data).num_classes if self.cfg else None
        except ValueError:
            return None


def load_run(path: str | Path, name: str) -> RunData:
    path = Path(path)
    run = RunData(path, name, metrics=read_metrics(path / "metrics.jsonl"), probe=read_json(path / "probe.json"),
                  robustness=read_json(path / "robustness.json"))
    try:
        run.cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except ConfigError as e:  # a run of an older version with keys that no longer exist
        run.config_error = str(e)
    return run


def _names(paths: list[Path]) -> list[str]:
    """Short unique names: the directory name, with its parent when two runs share it."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _block_key(name: str) -> tuple[int, str]:
    """block1 < block2 < ... < block10 < concat (also for metric names such as ``loss/block2``)."""
    match = re.search(r"block(\d+)", name)
    return (int(match.group(1)), name) if match else (1 << 30, name)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------------------
# Figures


def _block_curves(runs: list[RunData], path: Path, pattern: str, *, title: str, ylabel: str, suptitle: str
                  ) -> bool:
    """One panel per block: the ``metrics.jsonl`` series matching ``pattern`` (one ``(\\d+)``, the block) against
    the training step, one line per run."""
    regex = re.compile(pattern)
    keys = sorted({k for r in runs for rec in r.metrics for k in rec if regex.fullmatch(k)}, key=_block_key)
    if not keys:
        return False
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = palette(len(runs))
    for ax, key in zip(axes, keys, strict=False):
        for run, color in zip(runs, colors, strict=True):
            points = [(rec["step"], rec[key]) for rec in run.metrics if key in rec and "step" in rec]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, color=color, lw=1.2, label=f"{run.name} ({run.loss_name})")
        ax.set_title(title.format(block=_block_key(key)[0]))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(keys)]:  # runs missing from the first panel (e.g. end-to-end: last block only)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), title="run (loss)")
    fig.suptitle(suptitle)
    _save(fig, path)
    return True


def plot_losses(runs: list[RunData], path: Path) -> bool:
    """Every block's training loss against the step (blocks without a loss have no panel)."""
    return _block_curves(runs, path, r"loss/block(\d+)", title="block{block} loss",
                         ylabel="loss (per-block objective)",
                         suptitle="Training loss of each block (blocks without a loss are absent)")


def plot_online(runs: list[RunData], path: Path) -> bool:
    """The online probe's training-batch top-1 per block against the step (``online_probe.enabled``)."""
    return _block_curves(runs, path, r"online/block(\d+)_top1", title="block{block} online probe",
                         ylabel="train-batch top-1 (%)",
                         suptitle="Online linear probe during pretraining (detached features, own optimiser)")


def plot_weight_change(runs: list[RunData], path: Path) -> bool:
    """Each block's ||W - W0|| / ||W0|| (convolutions) against the step."""
    return _block_curves(runs, path, r"weight_change/block(\d+)", title="block{block} weight change",
                         ylabel="||W - W0|| / ||W0||",
                         suptitle="Relative change of each block's convolutions from their initialisation")


def plot_rankme(runs: list[RunData], path: Path) -> bool:
    """Each block's RankMe (effective rank of its features on a training batch) against the step."""
    return _block_curves(runs, path, r"rankme/block(\d+)", title="block{block} RankMe", ylabel="RankMe",
                         suptitle="Effective rank of each block's features (RankMe, one training batch)")


def _probe_blocks(runs: list[RunData]) -> list[str]:
    return sorted({b for r in runs if r.probe for b in r.probe["run"]["blocks"]}, key=_block_key)


def plot_probes(runs: list[RunData], path: Path) -> bool:
    """Grouped bars: linear-probe and kNN (k=20) top-1 per block, one bar per run; random init as a black tick."""
    probed = [r for r in runs if r.probe]
    if not probed:
        return False
    blocks = _probe_blocks(probed)
    metrics = [("top1", "linear probe top-1")]
    if any("knn20_top1" in v for r in probed if r.probe for v in r.probe["run"]["blocks"].values()):
        metrics.append(("knn20_top1", "weighted kNN (k=20) top-1"))
    fig = Figure(figsize=(max(6.0, 1.1 * len(blocks) * max(1, len(probed)) * 0.6 + 3) * len(metrics) / 1.4, 4.4),
                 layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / len(probed)
    x = np.arange(len(blocks))
    colors = palette(len(runs))
    marked = False
    top = max((v.get(k, 0.0) for r in probed if r.probe for part in ("run", "random_init")
               for v in r.probe.get(part, {}).get("blocks", {}).values() for k, _ in metrics), default=100.0)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, run in enumerate(probed):
            assert run.probe is not None
            scores = run.probe["run"]["blocks"]
            values = [scores.get(b, {}).get(key, np.nan) for b in blocks]
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, values, width * 0.92, color=colors[runs.index(run)], label=run.name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
            rand = run.probe.get("random_init", {}).get("blocks")
            if rand:
                rv = [rand.get(b, {}).get(key, np.nan) for b in blocks]
                ax.hlines(rv, pos - width * 0.46, pos + width * 0.46, colors="black", lw=2,
                          label=None if marked else "random init (same architecture)")
                marked = True
        classes = {n for r in probed if (n := r.num_classes)}
        if len(classes) == 1:
            chance = 100.0 / next(iter(classes))
            ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.0f}%)" if ax is axes[0] else None)
        ax.set_xticks(x, blocks)
        ax.set_xlabel("features probed")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_ylim(0, min(105.0, top * 1.15 + 3))
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    sizes = sorted({r.probe["run"].get("test_images") for r in probed if r.probe} - {None})
    fig.suptitle("Accuracy of each block's features (frozen backbone" + (
        f"; {'/'.join(map(str, sizes))} test images)" if sizes else ")"))
    _save(fig, path)
    return True


def _mean_over_corruptions(block: dict[str, Any], severities: list[int]) -> list[float]:
    errors = block["errors"]
    return [float(np.mean([errors[c][str(s)] for c in errors if str(s) in errors[c]])) for s in severities]


def plot_robustness_severity(runs: list[RunData], path: Path) -> bool:
    """One panel per run: top-1 error against severity (0 = clean), one line per block, mean over corruptions."""
    rob = [r for r in runs if r.robustness]
    if not rob:
        return False
    fig = Figure(figsize=(4.4 * len(rob), 3.8), layout="constrained")
    axes = fig.subplots(1, len(rob), squeeze=False, sharey=True)[0]
    for ax, run in zip(axes, rob, strict=True):
        assert run.robustness is not None
        severities = sorted(run.robustness["settings"]["severities"])
        blocks = run.robustness["blocks"]
        colors = palette(len(blocks))
        for (name, block), color in zip(blocks.items(), colors, strict=True):
            ys = [block["clean_error"], *_mean_over_corruptions(block, severities)]
            style = {"ls": "--", "lw": 2.0} if name == "concat" else {"lw": 1.5}
            ax.plot([0, *severities], ys, marker="o", ms=4, color=color, label=name, **style)
        if run.num_classes:
            ax.axhline(100 * (1 - 1 / run.num_classes), color="grey", ls=":", lw=1, label="chance")
        st = run.robustness["settings"]
        ax.set_title(f"{run.name}\n{len(st['corruptions'])} corruptions, {st['images']} images", fontsize=10)
        ax.set_xticks([0, *severities], ["clean", *map(str, severities)])
        ax.set_xlabel("corruption severity")
        ax.set_ylabel("top-1 error (%), mean over corruptions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="features", title_fontsize=8)
    fig.suptitle("Error under corruption (ImageNet-C protocol)")
    _save(fig, path)
    return True


def plot_robustness_heatmap(runs: list[RunData], path: Path) -> bool:
    """One panel per run: corruption x block, the error increase over clean (points), mean over severities."""
    rob = [r for r in runs if r.robustness]
    if not rob:
        return False
    known = set(CORRUPTIONS)  # rows: every corruption any run measured, in the benchmark's order
    measured = {c for r in rob if r.robustness for c in r.robustness["settings"]["corruptions"]}
    corruptions = [c for c in CORRUPTIONS if c in measured] + sorted(measured - known)
    tables = []
    for run in rob:
        assert run.robustness is not None
        blocks = run.robustness["blocks"]
        cells = np.array([[np.mean(list(b["errors"][c].values())) - b["clean_error"] if c in b["errors"] else np.nan
                           for b in blocks.values()] for c in corruptions])
        tables.append((run, list(blocks), corruptions, cells))
    lim = max(1.0, max(float(np.nanmax(np.abs(t[3]))) for t in tables))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    width = sum(0.75 * len(t[1]) + 1.6 for t in tables) + 1.5
    height = 0.32 * max(len(t[2]) for t in tables) + 1.6
    fig = Figure(figsize=(max(width, 5.0), max(height, 3.0)), layout="constrained")
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    image = None
    for ax, (run, blocks, corruptions, cells) in zip(axes, tables, strict=True):
        image = ax.imshow(np.ma.masked_invalid(cells), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_facecolor("0.85")  # not measured
        for (i, j), v in np.ndenumerate(cells):
            text = "n/a" if np.isnan(v) else f"{round(v):d}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 * lim else "black")
        ax.set_xticks(range(len(blocks)), blocks, rotation=45, ha="right")
        ax.set_yticks(range(len(corruptions)), corruptions if ax is axes[0] else [""] * len(corruptions))
        ax.set_xlabel("features")
        ax.set_title(run.name, fontsize=10)
    assert image is not None
    fig.colorbar(image, ax=list(axes), label="top-1 error increase over clean (% points)", shrink=0.9)
    fig.suptitle("Error increase per corruption, mean over severities")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------------
# Tables


def throughput(metrics: list[dict[str, Any]]) -> float | None:
    """Mean ``images_per_sec`` over the logged steps."""
    values = [rec["images_per_sec"] for rec in metrics if "images_per_sec" in rec]
    return float(np.mean(values)) if values else None


def _runs_table(runs: list[RunData]) -> list[str]:
    rows = []
    for r in runs:
        c = r.cfg
        last = r.metrics[-1] if r.metrics else {}
        rows.append([r.name, f"`{r.path}`", c.train.scheme if c else "?", r.loss_name,
                     f"{c.model.arch} ×{c.model.width:g}" if c else "?", f"`{c.model.blocks}`" if c else "?",
                     c.data.name if c else "?", fmt_number(last.get("step")), fmt_number(throughput(r.metrics), 0)])
    return markdown_table(["run", "directory", "scheme", "loss", "model", "blocks", "data", "steps", "images/s (mean)"],
                          rows)


def _config_diffs(runs: list[RunData]) -> list[str]:
    ref = runs[0]
    lines: list[str] = []
    for r in runs[1:]:
        if ref.cfg is None or r.cfg is None:
            lines.append(f"- **{r.name}** vs **{ref.name}**: a config could not be read "
                         f"({ref.config_error or r.config_error})")
            continue
        diffs = [d for d in diff_configs(ref.cfg, r.cfg) if not d.startswith("out:")]
        lines.append(f"- **{r.name}** vs **{ref.name}**" + (": same configuration" if not diffs else ":"))
        lines += [f"  - `{d}`" for d in diffs]
    return lines


def last_logged(metrics: list[dict[str, Any]], key: str) -> float | None:
    """The last value of ``key`` in a run's metrics (a block's terms may be missing from some lines)."""
    return next((rec[key] for rec in reversed(metrics) if key in rec), None)


def _diagnostics_table(runs: list[RunData]) -> list[str]:
    keys = {r.name: {k for rec in r.metrics for k in rec if k.startswith(("weight_change/", "rankme/"))} for r in runs}
    logged = [r for r in runs if keys[r.name]]
    blocks = sorted({k.split("/")[1] for r in logged for k in keys[r.name]}, key=_block_key)
    header = ["block"] + [f"{r.name}: weight change (%) / RankMe" for r in logged]
    rows = []
    for b in blocks:
        row = [b]
        for r in logged:
            change = last_logged(r.metrics, f"weight_change/{b}")
            row.append(f"{fmt_number(None if change is None else 100 * change, 2)} / "
                       f"{fmt_number(last_logged(r.metrics, f'rankme/{b}'))}")
        rows.append(row)
    return markdown_table(header, rows)


def _probe_table(runs: list[RunData]) -> list[str]:
    probed = [r for r in runs if r.probe]
    blocks = _probe_blocks(probed)
    header = ["features"] + [f"{r.name}: linear / kNN-20" for r in probed]
    rows = []
    for b in blocks:
        row = [b]
        for r in probed:
            assert r.probe is not None
            s = r.probe["run"]["blocks"].get(b, {})
            rand = r.probe.get("random_init", {}).get("blocks", {}).get(b)
            cell = f"{fmt_number(s.get('top1'))} / {fmt_number(s.get('knn20_top1'))}"
            if rand:
                cell += f" (random init {fmt_number(rand.get('top1'))} / {fmt_number(rand.get('knn20_top1'))})"
            row.append(cell)
        rows.append(row)
    return markdown_table(header, rows)


def _robustness_table(runs: list[RunData]) -> list[str]:
    rob = [(r.name, r.robustness) for r in runs if r.robustness]
    blocks = sorted({b for _, res in rob for b in res["blocks"]}, key=_block_key)
    header = ["features"] + [f"{name}: clean / mean corr. err / mCE / rel. mCE" for name, _ in rob]
    rows = []
    for b in blocks:
        row = [b]
        for _, res in rob:
            s = res["blocks"].get(b, {})
            row.append(" / ".join(fmt_number(s.get(k)) for k in ("clean_error", "mean_corruption_error", "mce",
                                                          "relative_mce")))
        rows.append(row)
    notes = []
    for name, res in rob:
        base = res.get("baseline")
        notes.append(f"- {name}: normalisation {res['normalisation']}"
                     + (f"; baseline `{base['run']}`, block {base['block']}" if base else ""))
    return [*markdown_table(header, rows), "", *notes]


# ---------------------------------------------------------------------------------------------------------


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write ``report.md`` and its figures into ``out`` (default: the first run directory); return its path."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    # A run still training has config.yaml and metrics.jsonl, enough for a report.
    paths = [require_run_dir(p, "blockssl report runs/demo runs/e2e", needs=()) for p in run_dirs]
    out_dir = require_out_dir(out, "--out") if out is not None else paths[0]
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths), strict=True)]
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "loss": plot_losses(runs, out_dir / FIGURES["loss"]),
        "online": plot_online(runs, out_dir / FIGURES["online"]),
        "weight_change": plot_weight_change(runs, out_dir / FIGURES["weight_change"]),
        "rankme": plot_rankme(runs, out_dir / FIGURES["rankme"]),
        "probe": plot_probes(runs, out_dir / FIGURES["probe"]),
        "severity": plot_robustness_severity(runs, out_dir / FIGURES["severity"]),
        "heatmap": plot_robustness_heatmap(runs, out_dir / FIGURES["heatmap"]),
    }
    for key, done in made.items():  # a figure from an earlier report that has no data now would mislead
        if not done:
            (out_dir / FIGURES[key]).unlink(missing_ok=True)

    md = ["# blockssl report", "", "## Runs", "", *_runs_table(runs), ""]
    if len(runs) > 1:
        md += ["Configuration differences from the first run:", "", *_config_diffs(runs), ""]
    md += ["## Training loss", ""]
    md += [f"![per-block training loss]({FIGURES['loss']})", ""] if made["loss"] else ["No metrics.jsonl records.", ""]
    if made["weight_change"] or made["rankme"]:
        md += ["## Training diagnostics", "", "Last logged value per block: the relative change of its convolutions "
               "from their initialisation, ||W - W0|| / ||W0|| in % (`weight_change/block{k}`), and the effective "
               "rank of its features on a training batch (`rankme/block{k}`; RankMe, Garrido et al. 2023), at most "
               "min(batch per process, feature width). Weights that barely move, or a RankMe falling towards 1 "
               "(collapse), can go with a falling loss.", "", *_diagnostics_table(runs), ""]
        for key, name in (("weight_change", "weight change"), ("rankme", "RankMe")):
            if made[key]:
                md += [f"![{name}]({FIGURES[key]})", ""]
    if made["online"]:
        md += ["## Online probe", "", "Top-1 of a linear head per block trained during pretraining on detached "
               "features, measured on each training batch before its update (`online/block{k}_top1`).", "",
               f"![online probe accuracy]({FIGURES['online']})", ""]
    md += ["## Linear probe and kNN accuracy", ""]
    if made["probe"]:
        md += ["Test top-1 accuracy in %; linear probes at their final epoch.", "", *_probe_table(runs), "",
               f"![probe accuracy]({FIGURES['probe']})", ""]
    else:
        md += ["No probe.json: run `blockssl probe RUN_DIR` first.", ""]
    md += ["## Corruption robustness", ""]
    if made["severity"]:
        md += ["Top-1 error in %; mCE and relative mCE (Hendrycks & Dietterich 2019) in % of a baseline run's, "
               "when `blockssl robustness --baseline` gave one.", "", *_robustness_table(runs), "",
               f"![error against severity]({FIGURES['severity']})", "",
               f"![error increase per corruption]({FIGURES['heatmap']})", ""]
    else:
        md += ["No robustness.json: run `blockssl robustness RUN_DIR` first.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
