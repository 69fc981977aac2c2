"""Studies: named variants of a base recipe x seeds, each an ordinary run directory, aggregated over seeds.

A study file (YAML) names the base recipe, overrides for every run, the variants (lists of ``key=value``), the seeds,
the evaluations and the baseline variant::

    base: configs/fashion_mnist.yaml        # paths relative to the current directory, like --config
    out: runs/study
    seeds: [0, 1, 2]
    variant_seeds: {end_to_end_e8: [0, 1]}  # optional: variants run on fewer of the seeds
    overrides: [train.epochs=4]
    variants:
      end_to_end: [train.scheme=end_to_end, noise.type=none]
      blockwise: []
    evaluate: [probe, robustness]
    baseline: end_to_end
    probe: []                               # optional probe.* / data.* overrides of the evaluations
    robustness: [robustness.max_images=2000]
    robustness_variants: [end_to_end, blockwise]  # optional: only these are evaluated for robustness
    baselines: {simclr: end_to_end_simclr}  # optional: a variant compared with another than the baseline
    primary:                                # optional: the comparisons the study tests, declared before running
      - {variant: blockwise, baseline: end_to_end, block: block4, metric: linear_top1}
    budget:                                 # optional: series of [variant, baseline] pairs at growing train.epochs
      blockwise - end_to_end: [[blockwise_e3, end_to_end_e3], [blockwise, end_to_end]]

``primary`` comparisons (a metric of ``results.json``: linear_top1, knn_top1, their plain-pooling readouts
pool_linear_top1 and pool_knn_top1, mce, relative_mce; a block both
variants have, named by depth as in ``results.json``, or concat) are paired by seed, tested (two-sided paired
t-test) and corrected together for multiplicity (Holm, family-wise error 0.05): declare them before the runs exist,
for a family chosen after seeing the results corrects nothing. Every other difference is exploratory: its mean,
95% interval and per-seed values, untested. Each ``budget`` series draws the last block's paired difference of
each pair against the pair's ``train.epochs`` (``gap_vs_budget.png``); both variants of a pair train as long.

Run (variant, seed) lives in ``<out>/<variant>/seed<seed>``. Driving the study is idempotent: evaluated runs are
skipped (their evaluation files suffice, checkpoints may be gone), interrupted ones resumed from their last
checkpoint. The resolved study is saved as
``<out>/study.yaml``; a study file (or command-line overrides, or a base recipe) that no longer matches it, or a run
whose saved configuration differs from what the study now resolves to, is an error listing the differences. A study
may grow (new variants, seeds, robustness variants) and change its ``baselines``, ``primary`` and ``budget``, which
only the aggregation reads: that changes no run made so far.
Robustness is evaluated per run without a baseline and normalised at aggregation (CE and relative CE against the
baseline variant's run of the same seed), so runs never wait for each other and can be spread over a job array.
With fast-protocol probes, the aggregation also probes raw pixels under the same settings once per seed
(``<out>/pixels/seed<k>``), the row that shows where the learned features stand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from blockssl.checkpoint import atomic_write_text
from blockssl.config import (
    Config,
    ConfigError,
    apply_overrides,
    diff_configs,
    from_dict,
    load_config,
    parse_blocks,
)
from blockssl.stats import ALPHA, Paired, holm, mean_std, paired

EVALUATIONS = ("probe", "robustness")
PIXELS = "pixels"  # the raw-pixel probe: its folder under out, its row in the results
TIMING = "study_timing.json"  # seconds spent per stage on a run, summed over resumptions
# pool_*: each block read by plain global pooling of its output (probe.readouts), the same readout for every scheme
METRIC_TITLES = {"linear_top1": "Linear probe top-1 (%)", "knn_top1": "kNN top-1 (%)",
                 "pool_linear_top1": "Linear probe top-1, plain pooling (%)",
                 "pool_knn_top1": "kNN top-1, plain pooling (%)", "mce": "mCE (%)", "relative_mce": "Relative mCE (%)",
                 "weight_change": "Weight change from initialisation (%)", "rankme": "RankMe of the features"}
EVALUATION_OF = {"linear_top1": "probe", "knn_top1": "probe", "pool_linear_top1": "probe", "pool_knn_top1": "probe",
                 "mce": "robustness", "relative_mce": "robustness"}
CONCAT = "concat"  # the probe of all blocks concatenated: a block of every run, at no depth


@dataclass(frozen=True)
class Comparison:
    """``variant`` minus ``baseline`` in ``metric`` at ``block`` (names as in ``results.json``), paired by seed."""

    variant: str
    baseline: str
    block: str
    metric: str

    def __str__(self) -> str:
        return f"{self.variant} - {self.baseline}, {self.block}, {self.metric}"


@dataclass
class Study:
    """A resolved study: every field a run's configuration or evaluation depends on."""

    base: str
    out: str
    variants: dict[str, list[str]]
    seeds: list[int] = field(default_factory=lambda: [0])
    variant_seeds: dict[str, list[int]] = field(default_factory=dict)  # variant -> a subset of seeds (default: all)
    overrides: list[str] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=lambda: ["probe"])
    baseline: str = ""
    probe: list[str] = field(default_factory=list)
    robustness: list[str] = field(default_factory=list)
    robustness_variants: list[str] = field(default_factory=list)  # empty: every variant
    baselines: dict[str, str] = field(default_factory=dict)  # variant -> the variant its differences are taken to
    primary: list[Comparison] = field(default_factory=list)  # tested and Holm-corrected; the rest is exploratory
    budget: dict[str, list[list[str]]] = field(default_factory=dict)  # series -> [variant, baseline] pairs

    def baseline_of(self, variant: str) -> str:
        """The variant ``variant`` is compared with: its entry in ``baselines``, else the study's baseline (which
        also normalises robustness for every variant)."""
        return self.baselines.get(variant, self.baseline)

    def evaluations(self, variant: str) -> list[str]:
        """The evaluations of ``variant``'s runs."""
        if not self.robustness_variants or variant in self.robustness_variants:
            return list(self.evaluate)
        return [e for e in self.evaluate if e != "robustness"]

    def seeds_of(self, variant: str) -> list[int]:
        """The seeds ``variant`` runs with: its ``variant_seeds`` entry, else every seed of the study."""
        return self.variant_seeds.get(variant, self.seeds)

    def run_dir(self, variant: str, seed: int) -> Path:
        return Path(self.out) / variant / f"seed{seed}"

    def runs(self) -> Iterator[tuple[str, int]]:
        """Every (variant, seed), seed by seed, the baseline variant first."""
        order = [self.baseline, *(v for v in self.variants if v != self.baseline)]
        for seed in self.seeds:
            for variant in order:
                if seed in self.seeds_of(variant):
                    yield variant, seed

    def config(self, variant: str, seed: int) -> Config:
        try:
            return load_config(self.base, [*self.overrides, *self.variants[variant], f"seed={seed}",
                                           f"out={self.run_dir(variant, seed)}"])
        except ConfigError as e:
            raise ConfigError(f"study variant {variant!r}: {e}") from None


def _string_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"study {key}: expected a list of key=value strings, e.g. [train.epochs=4], got {value!r}")
    return list(value)


def _comparisons(path: Path, value: Any) -> list[Comparison]:
    """The ``primary`` list, checked for shape (names are checked against the resolved study)."""
    example = "[{variant: blockwise, baseline: end_to_end, block: block4, metric: linear_top1}]"
    keys = [f.name for f in fields(Comparison)]
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: primary: expected a list of comparisons, e.g. {example}, got {value!r}")
    comparisons = []
    for k, entry in enumerate(value):
        if not isinstance(entry, dict) or sorted(entry) != sorted(keys) or not all(
                isinstance(v, str) for v in entry.values()):
            raise ConfigError(f"{path}: primary[{k}]: expected a mapping of {', '.join(keys)} to names, e.g. "
                              f"{example}, got {entry!r}")
        comparisons.append(Comparison(**entry))
    duplicates = sorted({str(c) for c in comparisons if comparisons.count(c) > 1})
    if duplicates:
        raise ConfigError(f"{path}: primary: {'; '.join(duplicates)} declared twice (it would count twice in the "
                          "correction)")
    return comparisons


def _check_comparisons(path: Path, study: Study, configs: dict[str, Config]) -> None:
    """Every primary names two variants, a metric both are evaluated for and a block both have."""
    for k, c in enumerate(study.primary):
        where = f"{path}: primary[{k}] ({c})"
        for role, name in (("variant", c.variant), ("baseline", c.baseline)):
            if name not in study.variants:
                raise ConfigError(f"{where}: {role} {name!r} is not a variant; choose one of "
                                  f"{', '.join(study.variants)}")
        if c.variant == c.baseline:
            raise ConfigError(f"{where}: a variant compared with itself")
        metrics = [m for m, e in EVALUATION_OF.items()
                   if e in study.evaluations(c.variant) and e in study.evaluations(c.baseline)]
        if c.metric not in metrics:
            raise ConfigError(f"{where}: metric {c.metric!r} is not one both variants are evaluated for; choose one "
                              f"of {', '.join(metrics) or 'none (the study evaluates nothing)'}")
        theirs = [block_names(configs[v].model.blocks).values() for v in (c.variant, c.baseline)]
        blocks = [b for b in theirs[0] if b in theirs[1]] + [CONCAT]
        if c.block not in blocks:
            raise ConfigError(f"{where}: block {c.block!r} is not a block of both variants (blocks are named by the "
                              f"stage they end at); choose one of {', '.join(blocks)}")


def _budget(path: Path, value: Any, configs: dict[str, Config]) -> dict[str, list[list[str]]]:
    """The ``budget`` series, checked: pairs of two variants trained for as many epochs."""
    example = "{blockwise - end_to_end: [[blockwise_e3, end_to_end_e3], [blockwise, end_to_end]]}"
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(label, str) and isinstance(pairs, list) and pairs
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, str) for v in p) for p in pairs)
            for label, pairs in value.items()):
        raise ConfigError(f"{path}: budget: expected series names mapped to lists of [variant, baseline] pairs, e.g. "
                          f"{example}, got {value!r}")
    for label, pairs in value.items():
        for variant, baseline in pairs:
            where = f"{path}: budget {label!r}: [{variant}, {baseline}]"
            unknown = [v for v in (variant, baseline) if v not in configs]
            if unknown or variant == baseline:
                raise ConfigError(f"{where}: expected two different variants of {', '.join(configs)}")
            epochs = configs[variant].train.epochs, configs[baseline].train.epochs
            if epochs[0] != epochs[1]:
                raise ConfigError(f"{where}: train.epochs {epochs[0]} against {epochs[1]}; a pair is one budget")
    return {label: [list(p) for p in pairs] for label, pairs in value.items()}


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read and check a study file; ``overrides`` (``key=value``) apply to every run, after the study's own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({e}); quote overrides holding ',' or '[', e.g. "
                          "\"train.frozen_blocks=[1]\"") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys at the top level")
    known = {f for f in Study.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    for key in ("base", "out", "variants"):
        if not raw.get(key):
            raise ConfigError(f"{path}: '{key}' is required (see `blockssl study --help`)")
    variants = raw["variants"]
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: variants must map names to lists of key=value overrides")
    for name in variants:
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits, '_' or '-' (it names a folder)")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    variant_seeds = raw.get("variant_seeds") or {}
    if not isinstance(variant_seeds, dict) or not all(
            k in variants and isinstance(v, list) and v and len(set(v)) == len(v) and set(v) <= set(seeds)
            for k, v in variant_seeds.items()):
        raise ConfigError(f"{path}: variant_seeds must map variants to non-empty lists of distinct seeds among "
                          f"{seeds} (e.g. {{blockwise_e8: [0, 1, 2]}}), got {variant_seeds!r}")
    evaluate = _string_list("evaluate", raw.get("evaluate", ["probe"]))
    bad = [e for e in evaluate if e not in EVALUATIONS]
    if bad:
        raise ConfigError(f"{path}: evaluate: {bad} not among {', '.join(EVALUATIONS)}")
    if "robustness" in evaluate and "probe" not in evaluate:
        evaluate.insert(0, "probe")  # robustness evaluates the probes
    baseline = raw.get("baseline") or next(iter(variants))
    if baseline not in variants:
        raise ConfigError(f"{path}: baseline {baseline!r} is not a variant; choose one of {', '.join(variants)}")
    baselines = raw.get("baselines") or {}
    if not isinstance(baselines, dict) or not all(k in variants and v in variants and k != v
                                                  for k, v in baselines.items()):
        raise ConfigError(f"{path}: baselines must map variants to other variants (e.g. {{simclr: end_to_end_simclr}}),"
                          f" got {baselines!r}")
    study = Study(base=str(raw["base"]), out=str(raw["out"]),
                  variants={k: _string_list(f"variants.{k}", v) for k, v in variants.items()}, seeds=seeds,
                  variant_seeds={k: list(v) for k, v in variant_seeds.items()},
                  overrides=[*_string_list("overrides", raw.get("overrides")), *overrides], evaluate=evaluate,
                  baseline=baseline, probe=_string_list("probe", raw.get("probe")),
                  robustness=_string_list("robustness", raw.get("robustness")),
                  robustness_variants=_string_list("robustness_variants", raw.get("robustness_variants")),
                  baselines=dict(baselines), primary=_comparisons(path, raw.get("primary")))
    unknown_variants = [v for v in study.robustness_variants if v not in variants]
    if unknown_variants or (study.robustness_variants and baseline not in study.robustness_variants):
        raise ConfigError(f"{path}: robustness_variants {study.robustness_variants} must be variants and include the "
                          f"baseline {baseline!r} (relative mCE is normalised by it)")
    # every configuration resolves before any run starts
    configs = {variant: study.config(variant, study.seeds[0]) for variant in study.variants}
    _check_comparisons(path, study, configs)
    study.budget = _budget(path, raw.get("budget"), configs)
    return study


def check_unchanged(study: Study) -> None:
    """Record the study in ``<out>/study.yaml`` on first use; afterwards refuse any difference but growth (see
    ``_grown``), and any run whose saved configuration is not what the study resolves to now (an edited base recipe,
    for instance)."""
    saved_path = Path(study.out) / "study.yaml"
    current = asdict(study)
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else None
    if saved is not None:
        changes = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
                   if saved.get(k) != current[k] and not _grown(k, saved.get(k), current[k], saved)]
        if changes:
            raise ConfigError(f"the study differs from the one recorded in {saved_path}:\n  " + "\n  ".join(changes)
                              + "\nrevert the change, or give the changed study a new out=")
    problems = []
    for variant, seed in study.runs():
        run_config = study.run_dir(variant, seed) / "config.yaml"
        if run_config.is_file():
            diffs = diff_configs(from_dict(yaml.safe_load(run_config.read_text())), study.config(variant, seed))
            problems += [f"{variant}/seed{seed}: {d}" for d in diffs]
    if problems:
        raise ConfigError("runs of this study were made with other configurations (saved -> now):\n  "
                          + "\n  ".join(problems) + "\nrevert the recipe, or give the changed study a new out=")
    if saved != current:
        saved_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, yaml.safe_dump(current, sort_keys=False))


def _grown(key: str, saved: Any, current: Any, record: dict[str, Any]) -> bool:
    """Whether ``current`` only adds to ``saved`` (or, for ``baselines``, ``primary`` and ``budget``, which
    aggregation alone reads, changes it): no run made so far changes. An empty ``robustness_variants`` means every
    variant: any list grows into it, and it grows into nothing else."""
    if key in ("baselines", "primary", "budget"):
        return True
    if key == "variants":
        return isinstance(saved, dict) and all(current.get(k) == v for k, v in saved.items())
    if key == "robustness_variants" and not current:
        return True
    if key == "seeds" or (key == "robustness_variants" and saved):
        return isinstance(saved, list) and set(saved) <= set(current)
    if key == "variant_seeds":  # a restricted variant may widen or lift its subset; a new variant may start with one
        saved, recorded = saved or {}, record.get("variants") or {}  # (studies recorded before the key: none)
        return isinstance(saved, dict) and all(k not in current or set(v) <= set(current[k])
                                                for k, v in saved.items()) and all(k in saved or k not in recorded
                                                                                   for k in current)
    return False


def _timed(run_dir: Path, stage: str, work: Callable[[], object]) -> None:
    """Run ``work`` and add its seconds to the run's ``study_timing.json`` (also when it is interrupted, as long as
    the run directory exists: a run refused before it was created has nothing to time)."""
    start = time.perf_counter()
    try:
        work()
    finally:
        path = run_dir / TIMING
        if run_dir.is_dir():
            timing = json.loads(path.read_text()) if path.is_file() else {}
            timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
            atomic_write_text(path, json.dumps(timing, indent=2) + "\n")


def run_one(study: Study, variant: str, seed: int) -> Path:
    """Train (or resume) and evaluate one run of the study; what is already done is skipped.

    A run whose evaluation files exist is done even without its checkpoints, so a study can keep only its small
    files (``config.yaml``, ``metrics.jsonl``, ``probe.json``, ``robustness.json``, ...) in version control and
    finish over several machines.
    """
    from blockssl.config import resume_config
    from blockssl.eval.probe import run_probe
    from blockssl.eval.robustness import run_robustness
    from blockssl.train import pretrain

    run_dir = study.run_dir(variant, seed)
    if _done(study, variant, seed):
        return run_dir
    missing = _missing_evaluations(study, variant, seed)
    if not (run_dir / "backbone.pt").is_file():
        if (run_dir / "checkpoints" / "last.pt").is_file():
            _timed(run_dir, "pretrain_s", lambda: pretrain(resume_config(run_dir), resume=True))
        else:  # nothing to lose: a run killed before its first checkpoint starts again
            cfg = study.config(variant, seed)
            _timed(run_dir, "pretrain_s", lambda: pretrain(cfg, overwrite=True))
    if "probe" in missing or ("robustness" in missing and not (run_dir / "probes.pt").is_file()):
        _timed(run_dir, "probe_s", lambda: run_probe(run_dir, study.probe, progress=False))
    if "robustness" in missing:
        _timed(run_dir, "robustness_s", lambda: run_robustness(run_dir, study.robustness, progress=False))
    return run_dir


def _missing_evaluations(study: Study, variant: str, seed: int) -> list[str]:
    wanted = {"probe": "probe.json", "robustness": "robustness.json"}
    return [e for e in study.evaluations(variant) if not (study.run_dir(variant, seed) / wanted[e]).is_file()]


def _done(study: Study, variant: str, seed: int) -> bool:
    """Evaluated (its evaluation files suffice), or trained when the study evaluates nothing."""
    trained = (study.run_dir(variant, seed) / "backbone.pt").is_file()
    return not _missing_evaluations(study, variant, seed) and (bool(study.evaluate) or trained)


def status(study: Study) -> list[dict[str, Any]]:
    """Per run: ``state`` (done; trained, evaluations missing; started, at ``step``; or not started) and the
    ``seconds`` spent on it so far (``study_timing.json``)."""
    from blockssl.checkpoint import load_checkpoint

    rows = []
    for variant, seed in study.runs():
        run = study.run_dir(variant, seed)
        timing = json.loads((run / TIMING).read_text()) if (run / TIMING).is_file() else {}
        step = None
        if _done(study, variant, seed):
            state = "done"
        elif (run / "backbone.pt").is_file():
            state = "trained, to evaluate: " + ", ".join(_missing_evaluations(study, variant, seed))
        elif (run / "checkpoints" / "last.pt").is_file():  # mapped: only the step is read
            state, step = "started", load_checkpoint(run / "checkpoints" / "last.pt", mmap=True)["step"]
        else:
            state = "not started"
        rows.append(dict(variant=variant, seed=seed, state=state, step=step, seconds=sum(timing.values())))
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status table, and how many runs are done; the time left is estimated from each variant's fastest
    finished run (the median run of any variant when none of it has finished): a resumed or shared-machine run
    counts its stalls, the fastest one is closest to what a quiet machine takes."""
    lines = [f"{'variant':<24}{'seed':>5}  {'seconds':>8}  state"]
    lines += [f"{r['variant']:<24}{r['seed']:>5}  {r['seconds']:>8.0f}  {r['state']}"
              + (f" (checkpoint at step {r['step']})" if r["step"] is not None else "") for r in rows]
    done = [r for r in rows if r["state"] == "done"]
    lines.append(f"{len(done)} of {len(rows)} runs done")
    if done and len(done) < len(rows):
        fastest: dict[str, float] = {}
        for r in done:
            fastest[r["variant"]] = min(r["seconds"], fastest.get(r["variant"], math.inf))
        typical = statistics.median(r["seconds"] for r in done)
        left = sum(max(0.0, fastest.get(r["variant"], typical) - r["seconds"]) for r in rows if r["state"] != "done")
        lines.append(f"about {left / 3600:.1f} h left at the pace of each variant's fastest finished run")
    return "\n".join(lines)


def pixel_baseline(study: Study, seed: int) -> Path | None:
    """The linear probe and kNN of raw pixels (``blockssl.eval.probe.pixel_probe``) on the study's data under its
    probe settings, once per seed, in ``<out>/pixels/seed<k>/probe.json``: where the learned features stand. None
    when the study has no probes or they follow the paper protocol (the raw-pixel probe is the fast protocol's)."""
    cfg = study.config(study.baseline, seed)
    apply_overrides(cfg, study.probe, ("probe", "data"))
    if "probe" not in study.evaluate or cfg.probe.protocol != "fast":
        return None
    path = Path(study.out) / PIXELS / f"seed{seed}" / "probe.json"
    if not path.is_file():
        from blockssl.eval.probe import pixel_probe

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"run": pixel_probe(cfg, seed=cfg.seed)}, indent=2) + "\n")
    return path


def run_commands(study_file: str | Path, study: Study, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """One shell command per run (for a job array), then the command that aggregates."""
    tail = " ".join(shlex.quote(o) for o in overrides)
    base = f"blockssl study {shlex.quote(str(study_file))}" + (f" {tail}" if tail else "")
    return [f"{base} --only {variant}/{seed}" for variant, seed in study.runs()] + [base]


def parse_only(study: Study, spec: str) -> tuple[str, int]:
    """``"variant/seed"`` of ``--only``, checked against the study."""
    variant, _, seed = spec.partition("/")
    if variant not in study.variants or not seed.lstrip("-").isdigit() or int(seed) not in study.seeds_of(variant):
        seeds = study.seeds_of(variant) if variant in study.variants else study.seeds
        raise ConfigError(f"--only {spec!r}: expected VARIANT/SEED with a variant of {', '.join(study.variants)} "
                          f"and a seed of {seeds}")
    return variant, int(seed)


# ---------------------------------------------------------------------------------------------------------
# Aggregation


def block_names(blocks: str) -> dict[str, str]:
    """The block names (``block1``, ...) of a grouping ``model.blocks`` -> the name of the paper's block that ends
    at the same stage (``block2`` for a block ending at layer2; ``stem`` for one ending there): another grouping of
    the stages then compares with the four paper blocks at equal depth."""
    return {f"block{k + 1}": "stem" if g[-1] == "stem" else f"block{g[-1].removeprefix('layer')}"
            for k, g in enumerate(parse_blocks(blocks))}


def depth_names(run: Path) -> dict[str, str]:
    """``block_names`` of a run directory's saved grouping."""
    return block_names(yaml.safe_load((run / "config.yaml").read_text())["model"]["blocks"])


def collect_rows(study: Study) -> list[dict[str, Any]]:
    """One tidy row per (variant, seed, block, metric) of every evaluated run, blocks named by depth
    (``depth_names``); robustness normalised by the baseline variant's run of the same seed."""
    from blockssl.eval.robustness import int_keys, summarize

    def load(run: Path, name: str) -> dict[str, Any] | None:
        path = run / name
        return json.loads(path.read_text()) if path.is_file() else None

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
        probe = load(run, "probe.json")
        if probe is None:
            continue
        names = depth_names(run)
        rows += probe_rows(variant, seed, probe, names)
        base_run = study.run_dir(study.baseline, seed)
        robust, base = load(run, "robustness.json"), load(base_run, "robustness.json")
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
        timing = load(run, TIMING) or {}
        if "pretrain_s" in timing:
            rows.append(dict(variant=variant, seed=seed, block="", metric="train_time_s", value=timing["pretrain_s"]))
    for seed in study.seeds:
        pixels = load(Path(study.out) / PIXELS / f"seed{seed}", "probe.json")
        rows += probe_rows(PIXELS, seed, pixels, {}) if pixels is not None else []
    return rows


def diagnostic_rows(variant: str, seed: int, run: Path, names: dict[str, str]) -> list[dict[str, Any]]:
    """The training diagnostics of the run's last logged line (``blockssl.diagnostics``): did each block's weights
    move (``weight_change``, in % of their initial norm) and do its features span many directions (``rankme``)?
    None for runs logged before they existed."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
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


def _depth(block: str) -> float:
    """Sort key of a block name: the stem, block1, block2, ..., then the concatenation."""
    if block == "stem":
        return 0.0
    number = block.removeprefix("block")
    return float(number) if number.isdigit() else math.inf


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


def _interval(d: Paired) -> dict[str, Any]:
    return dict(n=len(d.seeds), mean=d.mean, ci95_low=d.mean - d.ci95, ci95_high=d.mean + d.ci95, seeds=d.seeds)


def primary_results(study: Study, values: Values) -> list[dict[str, Any]]:
    """The declared comparisons: their paired differences with the 95% interval, the paired t-test's p-value and
    Holm's adjustment of it over the declared family; one holds where its adjusted p-value is below ``ALPHA``."""
    tested = [paired(differences(values, c)) for c in study.primary]
    adjusted = holm([d.p for d in tested])
    return [dict(asdict(c), **_interval(d), p=d.p, p_holm=h, verdict="holds" if h < ALPHA else "not resolved")
            for c, d, h in zip(study.primary, tested, adjusted, strict=True)]


def budget_results(study: Study, values: Values) -> list[dict[str, Any]]:
    """Per ``budget`` series, pair and probe metric: the pair's ``train.epochs`` and its paired difference at the
    deepest block both variants have (pairs with no paired seed yet are left out)."""
    out = []
    for series, pairs in study.budget.items():
        for variant, baseline in pairs:
            epochs = study.config(variant, study.seeds[0]).train.epochs
            for metric in ("linear_top1", "knn_top1"):
                blocks = [b for (v, b, m) in values if v == variant and m == metric and b != CONCAT
                          and (baseline, b, metric) in values]
                if not blocks:
                    continue
                c = Comparison(variant, baseline, max(blocks, key=_depth), metric)
                d = paired(differences(values, c))
                if d.seeds:
                    out.append(dict(series=series, epochs=epochs, **asdict(c), **_interval(d)))
    return out


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _cell(stats: dict[str, Any] | None) -> str:
    """``mean ± std (per-seed values)`` of a summary row."""
    if stats is None or not stats["seeds"]:
        return "-"
    return _pm(stats["mean"], stats["std"]) + " (" + ", ".join(f"{x:.2f}" for x in stats["seeds"].values()) + ")"


def _diff_cell(mean: float, half_width: float, seeds: dict[int, float]) -> str:
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
    lines += ["| comparison | seeds | mean difference | 95% interval | p | Holm p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in primary:
        interval = "-" if math.isnan(r["ci95_low"]) else f"[{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]"
        lines.append(f"| {r['variant']} - {r['baseline']}, {r['block']}, {r['metric']} | {r['n']} | "
                     + ("-" if math.isnan(r["mean"]) else f"{r['mean']:+.2f}")
                     + f" | {interval} | {_p(r['p'])} | {_p(r['p_holm'])} | {r['verdict']} |")
    return [*lines, "", f"Differences paired by seed (variant - baseline). p: two-sided paired t-test over the seeds; "
            f"Holm p: Holm's step-down adjustment over the {len(primary)} declared comparisons. A comparison holds, in "
            f"the direction of its mean, where its Holm p is below {ALPHA} (family-wise error {ALPHA}); its interval "
            "is the unadjusted 95% interval (Student's t)."]


def _markdown(study: Study, stats: list[dict[str, Any]], primary: list[dict[str, Any]],
              budget: list[dict[str, Any]], figures: list[str]) -> str:
    index = {(s["variant"], s["block"], s["metric"]): s for s in stats}
    tables: list[str] = []
    explored = 0  # exploratory differences shown: how many intervals could exclude zero by chance
    for metric, title in METRIC_TITLES.items():
        # a table holds the variants evaluated for its metric; the raw-pixel probe is one number, not a block
        blocks = sorted({s["block"] for s in stats if s["metric"] == metric and s["variant"] != PIXELS}, key=_depth)
        variants = [v for v in study.variants if any((v, b, metric) in index for b in blocks)]
        if not variants:
            continue
        header = ["| variant | " + " | ".join(blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
        tables += ["", f"## {title}", "", *header]
        tables += [f"| {v} | " + " | ".join(_cell(index.get((v, b, metric))) for b in blocks) + " |" for v in variants]
        pixels = index.get((PIXELS, PIXELS, metric))
        if pixels is not None:
            tables += ["", f"Raw pixels under the same probe settings (no network): {_cell(pixels)}."]
        compared = [v for v in variants if v != study.baseline]
        cells = {(v, b): _diff_cell(s["diff_mean"], s["diff_ci95"], s["diff_seeds"]) if s else "-"
                 for v in compared for b in blocks for s in [index.get((v, b, metric))]}
        explored += sum(cell != "-" for cell in cells.values())
        if compared:
            tables += ["", "Difference to the variant's baseline, paired by seed (exploratory): mean [95% interval] "
                       "(per-seed differences).", "", *header]
            tables += [f"| {v} - {study.baseline_of(v)} | " + " | ".join(cells[(v, b)] for b in blocks) + " |"
                       for v in compared]
    if budget:
        tables += ["", "## Gap against training budget (exploratory)", "",
                   "The paired difference (variant - baseline) of each pair of a `budget` series at the deepest block "
                   "both have, against the pair's `train.epochs`: mean [95% interval] (per-seed differences).", "",
                   "| series | train.epochs | comparison | block | linear top-1 | kNN top-1 |",
                   "|---|---|---|---|---|---|"]
        points = {(r["series"], r["variant"], r["baseline"], r["metric"]): r for r in budget}
        for series, pairs in study.budget.items():
            for variant, baseline in pairs:
                found = [points.get((series, variant, baseline, m)) for m in ("linear_top1", "knn_top1")]
                if any(found):
                    first = next(r for r in found if r)
                    tables.append(f"| {series} | {first['epochs']} | {variant} - {baseline} | {first['block']} | "
                                  + " | ".join(_diff_cell(r["mean"], r["mean"] - r["ci95_low"], r["seeds"]) if r
                                               else "-" for r in found) + " |")
    lines = [f"# Study `{study.out}`", "",
             f"Base recipe `{study.base}`, overrides `{' '.join(study.overrides) or 'none'}`, seeds "
             f"{study.seeds}{_fewer_seeds(study)}; baseline variant `{study.baseline}`.", "",
             *_primary_lines(primary), "",
             f"Everything else is exploratory: the {explored} differences to a variant's baseline below are shown "
             "with their mean, 95% interval (Student's t over the seeds, not corrected for their number: about 1 in 20 "
             "excludes zero by chance where there is no difference) and per-seed values, and tested for nothing.", "",
             "Cells: mean ± standard deviation over seeds (per-seed values in parentheses); differences to a "
             "variant's baseline are paired by seed, over the seeds both have run. Block k is the block that ends at "
             "ResNet stage k (layer k), whatever the grouping, so groupings compare at equal depth.", "",
             f"Runs finished: {sum(_done(study, v, seed) for v, seed in study.runs())} of "
             f"{len(list(study.runs()))}.", "",
             "| variant | overrides | baseline |", "|---|---|---|"]
    lines += [f"| {v} | `{' '.join(study.variants[v]) or '(base)'}` | "
              f"{'-' if v == study.baseline else study.baseline_of(v)} |" for v in study.variants]
    lines += tables
    times = [(v, index[(v, "", "train_time_s")]) for v in study.variants if (v, "", "train_time_s") in index]
    if times:
        lines += ["", "## Training time (s per run)", "",
                  "Wall-clock seconds of pretraining on the machine that ran it, summed over resumptions: it counts "
                  "whatever else shared that machine.", "", "| variant | seconds |", "|---|---|"]
        lines += [f"| {v} | {_pm(s['mean'], s['std'], 0)} |" for v, s in times]
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def _per_block_figure(study: Study, stats: list[dict[str, Any]], out: Path) -> str | None:
    """Per-block linear top-1 with error bars, a panel per baseline with the variants compared with it (the
    raw-pixel probe as a line)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    linear = [s for s in stats if s["metric"] == "linear_top1" and s["variant"] != PIXELS]
    pixels = next((s for s in stats if s["metric"] == "linear_top1" and s["variant"] == PIXELS), None)
    if not linear:
        return None
    blocks = sorted({s["block"] for s in linear}, key=_depth)
    index = {(s["variant"], s["block"]): s for s in linear}
    # one panel per baseline, holding it and the variants compared with it: each panel answers its own question
    panels: dict[str, list[str]] = {study.baseline: [study.baseline]}
    for v in study.variants:
        if v != study.baseline:
            panels.setdefault(study.baseline_of(v), [study.baseline_of(v)]).append(v)
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(7.5 * columns, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    colors = colormaps["tab20"]  # 20 distinct colours, one per variant in every panel
    number = {v: i for i, v in enumerate(study.variants)}
    for ax, (baseline, members) in zip(axes, panels.items(), strict=False):
        for position, v in enumerate(members):
            i = number[v]
            offset = (position - (len(members) - 1) / 2) * 0.05
            xs = [j + offset for j, b in enumerate(blocks) if (v, b) in index]
            ss = [index[(v, b)] for b in blocks if (v, b) in index]
            # a line through the blocks; the concatenation of all blocks is no next block, so its point stands apart
            chained = [k for k, s in enumerate(ss) if s["block"] != CONCAT]
            style: dict[str, Any] = dict(color=colors(i % 20), marker="os^Dv<>p"[i % 8], capsize=3, markersize=5)
            for part, line in ((chained, "-"), ([k for k in range(len(ss)) if k not in chained], "none")):
                ax.errorbar([xs[k] for k in part], [ss[k]["mean"] for k in part],
                            yerr=[ss[k]["std"] for k in part], linestyle=line,
                            label=v if line == "-" else None, **style)
        if pixels is not None:
            ax.axhline(pixels["mean"], color="gray", linestyle="--", linewidth=1, label="raw pixels")
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_title(f"against {baseline}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::columns]:
        ax.set_ylabel("linear probe top-1 (%)")
    fig.suptitle("Per-block accuracy (mean ± std over seeds), each variant beside its baseline")
    fig.savefig(out / "per_block_top1.png", dpi=110)
    return "per_block_top1.png"


def _differences_figure(study: Study, values: Values, out: Path) -> str | None:
    """Paired differences (variant - baseline) per block: the mean with its 95% interval and the per-seed
    differences, a row of panels per baseline (the variants compared with it, and the primaries against it), linear
    and kNN top-1 side by side; primary comparisons on a shaded band."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    metrics = [m for m in ("linear_top1", "knn_top1") if any(k[2] == m for k in values)]
    groups: dict[str, list[str]] = {}
    for v in study.variants:
        if v != study.baseline:
            groups.setdefault(study.baseline_of(v), []).append(v)
    for c in study.primary:
        if c.metric in metrics and c.variant not in groups.get(c.baseline, []):
            groups.setdefault(c.baseline, []).append(c.variant)
    blocks = sorted({b for (v, b, m) in values if v != PIXELS and m in metrics}, key=_depth)
    found = {(v, base, b, m): d for base, members in groups.items() for v in members for b in blocks for m in metrics
             if (d := paired(differences(values, Comparison(v, base, b, m)))).seeds}
    groups = {base: kept for base, members in groups.items()
              if (kept := [v for v in members if any(k[:2] == (v, base) for k in found)])}
    if not groups:
        return None
    primaries = {(c.variant, c.baseline, c.block, c.metric) for c in study.primary}
    colors = {b: colormaps["tab10"](i % 10) for i, b in enumerate(blocks)}
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


def _budget_figure(budget: list[dict[str, Any]], out: Path) -> str | None:
    """Each budget series' paired difference at its deepest block against ``train.epochs``: mean and 95% interval,
    points per seed; linear and kNN top-1 side by side."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    metrics = [m for m in ("linear_top1", "knn_top1") if any(r["metric"] == m for r in budget)]
    if not metrics:
        return None
    series = list(dict.fromkeys(r["series"] for r in budget))
    epochs = sorted({r["epochs"] for r in budget})
    log = epochs[-1] >= 4 * epochs[0]  # budgets that grow by factors
    step = 0.02 * ((math.log2(epochs[-1] / epochs[0]) if log else epochs[-1] - epochs[0]) or 1.0)

    def shifted(x: float, k: int) -> float:
        """Series side by side at each budget, so that their intervals do not hide each other."""
        offset = step * (k - (len(series) - 1) / 2)
        return x * 2 ** offset if log else x + offset

    fig = Figure(figsize=(4.8 * len(metrics), 3.8), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False).ravel(), metrics, strict=True):
        points = [r for r in budget if r["metric"] == metric]
        for k, name in enumerate(series):
            mine = sorted((r for r in points if r["series"] == name), key=lambda r: r["epochs"])
            color = colormaps["tab10"](k % 10)
            ax.errorbar([shifted(r["epochs"], k) for r in mine], [r["mean"] for r in mine],
                        yerr=[r["mean"] - r["ci95_low"] for r in mine], color=color, marker="o", capsize=3,
                        label=name)
            for r in mine:
                ax.scatter([shifted(r["epochs"], k)] * r["n"], list(r["seeds"].values()), s=14, color=color,
                           alpha=0.5, linewidths=0)
        if log:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
        blocks = ", ".join(dict.fromkeys(r["block"] for r in points))
        ax.set_title(f"{METRIC_TITLES[metric].removesuffix(' (%)')} at {blocks}", fontsize=10)
        ax.set_xlabel("train.epochs")
        ax.set_ylabel("variant - baseline (points)")
    fig.legend(handles=ax.get_legend_handles_labels()[0], loc="outside lower center", ncol=len(series), fontsize=9,
               frameon=False)
    fig.suptitle("Gap against budget: mean and 95% interval, points per seed", fontsize=11)
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
                                 _budget_figure(budget, out) if budget else None) if name]
    atomic_write_text(out / "results.md", _markdown(study, stats, primary, budget, figures))
    return out / "results.md"


class SlurmTask:
    """One run of a study as a task of a SLURM job array (submitit). On preemption or timeout submitit calls
    ``checkpoint`` and requeues the task, which resumes its run from the last checkpoint."""

    def __init__(self, study: Study) -> None:
        self.study = study

    def __call__(self, variant: str, seed: int) -> str:
        return str(run_one(self.study, variant, seed))

    def checkpoint(self, variant: str, seed: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, variant, seed)


def submit_slurm(study: Study, parameters: dict[str, Any], cluster: str | None = None) -> list[Any]:
    """Submit every run as one SLURM job array through submitit (logs in ``<out>/slurm``); returns the jobs.
    ``parameters`` go to ``AutoExecutor.update_parameters`` (e.g. slurm_partition, timeout_min, gpus_per_node)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--slurm needs submitit: pip install 'blockssl[slurm]' (or pip install submitit)") from None
    check_unchanged(study)
    executor = submitit.AutoExecutor(folder=Path(study.out) / "slurm", cluster=cluster)
    executor.update_parameters(name=f"blockssl-study-{Path(study.out).name}", **parameters)
    runs = list(study.runs())
    return executor.map_array(SlurmTask(study), [v for v, _ in runs], [s for _, s in runs])


def run_study(study: Study, only: tuple[str, int] | None = None) -> Path:
    """Drive the study (or one run of it): skip what is done, resume what was interrupted, then aggregate."""
    check_unchanged(study)
    if only is not None:
        return run_one(study, *only)
    runs = list(study.runs())
    for number, (variant, seed) in enumerate(runs, 1):
        if _done(study, variant, seed):
            continue
        start = time.perf_counter()
        print(f"[{number}/{len(runs)}] {variant}/seed{seed}", file=sys.stderr, flush=True)  # runs report nothing else
        run_one(study, variant, seed)
        print(f"[{number}/{len(runs)}] {variant}/seed{seed} done in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    for seed in study.seeds:
        pixel_baseline(study, seed)
    return write_results(study)
