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
each pair against the pair's ``train.epochs``, and each side's level beside raw pixels, for every probe metric and
readout (``gap_vs_budget.png``); both variants of a pair train as long.

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

A module a concern: ``spec`` (the study file, resolved and checked), ``driver`` (running it: in this process, one
command per run, or a SLURM job array), ``progress`` (where it stands), ``results`` (tidy rows and their statistics),
``render`` (the result files: tables and figures) and ``depth`` (blocks named by depth).
"""

from blockssl.study.driver import parse_only, run_commands, run_one, run_study, submit_slurm
from blockssl.study.progress import format_status, status
from blockssl.study.render import write_results
from blockssl.study.spec import Comparison, Study, check_unchanged, load_study

__all__ = ["Comparison", "Study", "check_unchanged", "format_status", "load_study", "parse_only", "run_commands",
           "run_one", "run_study", "status", "submit_slurm", "write_results"]
