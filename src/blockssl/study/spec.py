"""A study file: the resolved ``Study`` and its declared ``Comparison``s, checked when loaded, and
refused once its runs exist if it changed in anything but growth (``check_unchanged``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from blockssl.checkpoint import atomic_write_text
from blockssl.config import Config, ConfigError, diff_configs, from_dict, load_config
from blockssl.names import CONCAT
from blockssl.study.depth import model_block_names

EVALUATIONS = ("probe", "robustness")
PIXELS = "pixels"  # the raw-pixel probe: its folder under out, its row in the results
AT_INIT = "@init"  # suffix of a variant's rows probed at random initialisation (probe.random_init=true)
TIMING = "study_timing.json"  # seconds spent per stage on a run, summed over resumptions
# The probe's metrics: through each block's head, then by plain pooling of its output (probe.readouts)
PROBE_METRICS = ("linear_top1", "knn_top1", "pool_linear_top1", "pool_knn_top1")
EVALUATION_OF = {**dict.fromkeys(PROBE_METRICS, "probe"), "mce": "robustness", "relative_mce": "robustness"}


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
        also normalises robustness for every variant). A network at random initialisation (``v@init``) is compared
        with ``v`` trained: what training added, at the same architecture and readout."""
        if variant.endswith(AT_INIT):
            return variant.removesuffix(AT_INIT)
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
        theirs = [model_block_names(configs[v].model).values() for v in (c.variant, c.baseline)]
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
