"""A study's results: one tidy row per (variant, seed, block, metric) of its run directories, blocks named by
depth, and their statistics over seeds: summaries, the declared comparisons (tested, Holm-corrected) and the budget
series."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from blockssl.names import CONCAT
from blockssl.reporting import read_json, read_metrics
from blockssl.stats import ALPHA, Paired, holm, mean_std, paired
from blockssl.study.depth import depth_key, depth_names
from blockssl.study.spec import AT_INIT, PIXELS, PROBE_METRICS, TIMING, Comparison, Study


def collect_rows(study: Study) -> list[dict[str, Any]]:
    """One tidy row per (variant, seed, block, metric) of every evaluated run, blocks named by depth
    (``depth_names``); robustness normalised by the baseline variant's run of the same seed."""
    from blockssl.eval.robustness import int_keys, summarize

    def probe_rows(variant: str, seed: int, probe: dict[str, Any], names: dict[str, str]) -> list[dict[str, Any]]:
        out = []
        for readout, prefix in (("blocks", ""), ("pooled", "pool_")):
            for name, r in probe["run"].get(readout, {}).items():
                block = names.get(name, name)
                out.append(dict(variant=variant, seed=seed, block=block, metric=f"{prefix}linear_top1",
                                value=r["top1"]))
                knn = sorted((k for k in r if k.startswith("knn") and k.endswith("_top1")),
                             key=lambda k: int(k[3:-5]))
                if knn:
                    out.append(dict(variant=variant, seed=seed, block=block, metric=f"{prefix}knn_top1",
                                    value=r[knn[0]]))
        return out

    rows: list[dict[str, Any]] = []
    for variant, seed in study.runs():
        run = study.run_dir(variant, seed)
        probe = read_json(run / "probe.json")
        if probe is None:
            continue
        names = depth_names(run)
        rows += probe_rows(variant, seed, probe, names)
        if "random_init" in probe:
            rows += probe_rows(f"{variant}{AT_INIT}", seed, {"run": probe["random_init"]}, names)
        base_run = study.run_dir(study.baseline, seed)
        robust, base = read_json(run / "robustness.json"), read_json(base_run / "robustness.json")
        if robust is not None and base is not None:
            # each block is normalised by the baseline's block of the same depth
            base_names = depth_names(base_run)
            by_depth = {base_names.get(b, b): b for b in base["blocks"]}
            pairs = {names.get(b, b): (b, by_depth[names.get(b, b)]) for b in robust["blocks"]
                     if names.get(b, b) in by_depth}
            scores = summarize({d: int_keys(robust["blocks"][b]["errors"]) for d, (b, _) in pairs.items()},
                               {d: robust["blocks"][b]["clean_error"] for d, (b, _) in pairs.items()},
                               {d: int_keys(base["blocks"][c]["errors"]) for d, (_, c) in pairs.items()},
                               {d: base["blocks"][c]["clean_error"] for d, (_, c) in pairs.items()})
            for d, s in scores.items():
                rows += [dict(variant=variant, seed=seed, block=d, metric=m, value=s[m])
                         for m in ("mce", "relative_mce")]
        rows += diagnostic_rows(variant, seed, run, names)
        timing = read_json(run / TIMING) or {}
        if "pretrain_s" in timing:
            rows.append(dict(variant=variant, seed=seed, block="", metric="train_time_s", value=timing["pretrain_s"]))
    for seed in study.seeds:
        pixels = read_json(Path(study.out) / PIXELS / f"seed{seed}" / "probe.json")
        rows += probe_rows(PIXELS, seed, pixels, {}) if pixels is not None else []
    return rows


def diagnostic_rows(variant: str, seed: int, run: Path, names: dict[str, str]) -> list[dict[str, Any]]:
    """The training diagnostics of the run's last logged line (``blockssl.diagnostics``): did each block's weights
    move (``weight_change``, in % of their initial norm) and do its features span many directions (``rankme``)?
    None for runs logged before they existed."""
    records = read_metrics(run / "metrics.jsonl")
    last = records[-1] if records else {}
    rows = []
    for key, value in last.items():
        metric, _, block = key.partition("/")
        if metric in ("weight_change", "rankme"):
            rows.append(dict(variant=variant, seed=seed, block=names.get(block, block), metric=metric,
                             value=100 * value if metric == "weight_change" else value))
    return rows


Values = dict[tuple[str, str, str], dict[int, float]]  # (variant, block, metric) -> seed -> value


def by_seed(rows: list[dict[str, Any]]) -> Values:
    """The tidy rows indexed by (variant, block, metric), then seed."""
    values: Values = {}
    for r in rows:
        values.setdefault((r["variant"], r["block"], r["metric"]), {})[r["seed"]] = r["value"]
    return values


def differences(values: Values, c: Comparison) -> dict[int, float]:
    """``c.variant - c.baseline`` in every seed both have, by seed."""
    a, b = values.get((c.variant, c.block, c.metric), {}), values.get((c.baseline, c.block, c.metric), {})
    return {s: a[s] - b[s] for s in sorted(a) if s in b}


def summary(rows: list[dict[str, Any]], baseline_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """Per (variant, block, metric): mean and std over seeds, the per-seed values, and the difference to the
    variant's baseline (``baseline_of``), paired by seed (per seed both have; its mean, std and 95% confidence
    half-width over them)."""
    values = by_seed(rows)
    out = []
    for (variant, block, metric), per_seed in values.items():
        mean, std = mean_std(list(per_seed.values()))
        d = paired(differences(values, Comparison(variant, baseline_of(variant), block, metric)))
        out.append(dict(variant=variant, block=block, metric=metric, mean=mean, std=std, n=len(per_seed),
                        seeds=dict(sorted(per_seed.items())), baseline=baseline_of(variant), diff_mean=d.mean,
                        diff_std=d.std, diff_ci95=d.ci95, diff_seeds=d.seeds))
    return out


SummaryIndex = dict[tuple[str, str, str], dict[str, Any]]


def summary_index(stats: list[dict[str, Any]]) -> SummaryIndex:
    """``summary``'s rows by (variant, block, metric)."""
    return {(s["variant"], s["block"], s["metric"]): s for s in stats}


def _interval(d: Paired) -> dict[str, Any]:
    return dict(n=len(d.seeds), mean=d.mean, ci95_low=d.mean - d.ci95, ci95_high=d.mean + d.ci95, seeds=d.seeds)


def primary_results(study: Study, values: Values) -> list[dict[str, Any]]:
    """The declared comparisons: their paired differences with the 95% interval, the paired t-test's p-value and
    Holm's adjustment of it over the declared family; one holds where its adjusted p-value is below ``ALPHA``.

    Holm's adjustment is over the whole family, so no comparison gets a verdict until every one has all the seeds its
    two variants are declared with: before that each is ``pending (n of m seeds)``, and reading a verdict off a
    study stopped early is not possible."""
    tested = [paired(differences(values, c)) for c in study.primary]
    declared = [len(set(study.seeds_of(c.variant)) & set(study.seeds_of(c.baseline))) for c in study.primary]
    complete = all(len(d.seeds) == m for d, m in zip(tested, declared, strict=True))
    adjusted = holm([d.p for d in tested])
    verdicts = [("holds" if h < ALPHA else "not resolved") if complete else f"pending ({len(d.seeds)} of {m} seeds)"
                for d, m, h in zip(tested, declared, adjusted, strict=True)]
    return [dict(asdict(c), **_interval(d), p=d.p, p_holm=h, verdict=v)
            for c, d, h, v in zip(study.primary, tested, adjusted, verdicts, strict=True)]


def budget_results(study: Study, values: Values) -> list[dict[str, Any]]:
    """Per ``budget`` series, pair and probe metric (``PROBE_METRICS``, those probed): the pair's ``train.epochs``
    and its paired difference at the deepest block both variants have (pairs with no paired seed yet are left
    out)."""
    out = []
    for series, pairs in study.budget.items():
        for variant, baseline in pairs:
            epochs = study.config(variant, study.seeds[0]).train.epochs
            for metric in PROBE_METRICS:
                blocks = [b for (v, b, m) in values if v == variant and m == metric and b != CONCAT
                          and (baseline, b, metric) in values]
                if not blocks:
                    continue
                c = Comparison(variant, baseline, max(blocks, key=depth_key), metric)
                d = paired(differences(values, c))
                if d.seeds:
                    out.append(dict(series=series, epochs=epochs, **asdict(c), **_interval(d)))
    return out
