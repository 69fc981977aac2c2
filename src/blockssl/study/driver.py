"""Driving a study: train (or resume) and evaluate each run, skipping what is done, in this process, as one command
per run for a job array, or as a SLURM job array (submitit); then the raw-pixel probes and the aggregation."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockssl.checkpoint import atomic_write_text
from blockssl.config import ConfigError, apply_overrides
from blockssl.reporting import read_json
from blockssl.study.progress import is_done, missing_evaluations
from blockssl.study.render import write_results
from blockssl.study.spec import PIXELS, TIMING, Study, check_unchanged


def _timed(run_dir: Path, stage: str, work: Callable[[], object]) -> None:
    """Run ``work`` and add its seconds to the run's ``study_timing.json`` (also when it is interrupted, as long as
    the run directory exists: a run refused before it was created has nothing to time)."""
    start = time.perf_counter()
    try:
        work()
    finally:
        path = run_dir / TIMING
        if run_dir.is_dir():
            timing = read_json(path) or {}
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
    if is_done(study, variant, seed):
        return run_dir
    missing = missing_evaluations(study, variant, seed)
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
        if is_done(study, variant, seed):
            continue
        start = time.perf_counter()
        print(f"[{number}/{len(runs)}] {variant}/seed{seed}", file=sys.stderr, flush=True)  # runs report nothing else
        run_one(study, variant, seed)
        print(f"[{number}/{len(runs)}] {variant}/seed{seed} done in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    for seed in study.seeds:
        pixel_baseline(study, seed)
    return write_results(study)
