"""Command line: parse, build the config, call the library. ``blockssl --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockssl.checkpoint import CheckpointError
from blockssl.config import ConfigError, describe_keys, load_config, resume_config


def _pretrain(args: argparse.Namespace) -> None:
    from blockssl.train import pretrain

    overrides = [*args.overrides, *(["train.progress=false"] if args.quiet else [])]
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop --config")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    out = pretrain(cfg, resume=bool(args.resume), overwrite=args.overwrite, command=sys.argv)
    print(f"run directory: {out}")


def _probe(args: argparse.Namespace) -> None:
    from blockssl.eval.probe import print_probe_table, run_probe

    results = run_probe(args.run_dir, args.overrides, random_init=args.random_init, pixels=args.pixels,
                        progress=not args.quiet, out=args.out)
    print_probe_table(results)


def _robustness(args: argparse.Namespace) -> None:
    from blockssl.eval.robustness import print_robustness_table, run_robustness

    results = run_robustness(args.run_dir, args.overrides, baseline=args.baseline, progress=not args.quiet)
    print_robustness_table(results)


def _report(args: argparse.Namespace) -> None:
    from blockssl.report import write_report

    print(write_report(args.run_dirs, args.out))


def _export(args: argparse.Namespace) -> None:
    from blockssl.export import export_run, loads_into

    paths = export_run(args.run_dir, args.out)
    for p in paths:
        print(p)
    print(f"{paths[0].name} loads into {loads_into(args.run_dir)}")


def _study(args: argparse.Namespace) -> None:
    import yaml

    from blockssl.study import format_status, load_study, parse_only, run_commands, run_study, status, submit_slurm

    study = load_study(args.study, args.overrides)
    if args.status:
        print(format_status(status(study)))
    elif args.print:
        print("\n".join(run_commands(args.study, study, args.overrides)))
    elif args.frontier:
        from blockssl.study.frontier import write_frontier

        print(write_frontier(study, [v.strip() for v in args.frontier.split(",") if v.strip()]))
    elif args.slurm:
        parameters = {}
        for item in args.slurm_param:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--slurm-param {item!r}: expected KEY=VALUE, e.g. slurm_partition=gpu")
            parameters[key] = yaml.safe_load(value)
        jobs = submit_slurm(study, parameters)
        print(f"submitted {len(jobs)} runs as job array {jobs[0].job_id.split('_')[0]}; when they are done, "
              f"`blockssl study {args.study}` writes {study.out}/results.md")
    else:
        print(run_study(study, parse_only(study, args.only) if args.only else None))


def _cost(args: argparse.Namespace) -> None:
    from blockssl.cost import balanced_blocks, cost_report, format_cost

    cfg = load_config(args.config, args.overrides)
    if args.balance:
        blocks = balanced_blocks(cfg, args.balance)
        print(f"model.blocks={blocks}\n")
        cfg = load_config(args.config, [*args.overrides, f"model.blocks={blocks}"])
    print(format_cost(cost_report(cfg, args.devices)))


def _config(args: argparse.Namespace) -> None:
    from blockssl.config import dump_config

    print(dump_config(load_config(args.config, args.overrides)), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockssl", description="Blockwise self-supervised pretraining of ResNets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a model into a run directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain with a recipe and key=value overrides, e.g.\n"
                                   "  blockssl pretrain --config configs/fashion_mnist.yaml train.epochs=5\n"
                                   "  blockssl pretrain --resume runs/demo",
                       epilog="configuration keys (defaults: the paper's ImageNet recipe):\n" + describe_keys())
    p.add_argument("--config", type=Path, help="a YAML recipe (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in `out` and start afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar (train.progress=false)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=10")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("probe", help="linear probes and kNN on every block of a pretrained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--random-init", action="store_true",
                   help="also probe the same architecture at random initialisation, as a reference")
    p.add_argument("--pixels", action="store_true",
                   help="also probe raw pixels under the same protocol (fast protocol), as a reference")
    p.add_argument("--out", metavar="DIR", help="write probe.json and probes.pt into DIR, leaving the run's own "
                   "(read by robustness and studies) as they are: for trying other probe settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="probe settings, e.g. probe.epochs=50")
    p.set_defaults(func=_probe)

    p = sub.add_parser("robustness", help="per-block probe error under the 15 ImageNet-C corruptions (mCE)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate a probed run under corruptions; writes robustness.json and .csv, e.g.\n"
                                   "  blockssl robustness runs/demo robustness.max_images=1000\n"
                                   "  blockssl robustness runs/demo --baseline runs/e2e robustness.corruptions=[fog]")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--baseline", metavar="RUN_DIR", help="normalise errors by this run's (CE, mCE, relative mCE); "
                   "'alexnet': by AlexNet's published ImageNet-C errors, as the original benchmark")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="robustness.* and data.* settings, e.g. robustness.source=folder robustness.root=DIR")
    p.set_defaults(func=_robustness)

    p = sub.add_parser("report", help="report.md with figures comparing runs (loss, probes, robustness)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="folder for report.md and its figures (default: the first RUN_DIR)")
    p.set_defaults(func=_report)

    p = sub.add_parser("export", help="write a torchvision-loadable backbone and the heads of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.set_defaults(func=_export)

    p = sub.add_parser("study", help="variants x seeds of a recipe, trained, evaluated and aggregated",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a study file (see blockssl/study/ and studies/): every (variant, seed) is a "
                                   "run directory under its out; finished runs are skipped, interrupted ones resumed; "
                                   "then results.md, results.json and results.csv are written, e.g.\n"
                                   "  blockssl study studies/fashion_mnist.yaml\n"
                                   "  blockssl study studies/fashion_mnist.yaml --print   # one command per run\n"
                                   "  blockssl study studies/fashion_mnist.yaml --status  # what is left\n"
                                   "  blockssl study studies/fashion_mnist.yaml --slurm --slurm-param "
                                   "slurm_partition=gpu --slurm-param timeout_min=720")
    p.add_argument("study", type=Path, metavar="STUDY.yaml")
    p.add_argument("--only", metavar="VARIANT/SEED", help="train and evaluate this one run (a job-array task)")
    p.add_argument("--print", action="store_true", help="print one command per run, then the aggregating one")
    p.add_argument("--status", action="store_true",
                   help="which runs are done, started (at which checkpoint) or not started, and the time left")
    p.add_argument("--frontier", metavar="V1,V2,...",
                   help="accuracy against training FLOPs and memory of these variants, from the study's results "
                        "(frontier.md, frontier.png)")
    p.add_argument("--slurm", action="store_true", help="submit the runs as a SLURM job array with submitit")
    p.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor parameter, e.g. slurm_partition=gpu, timeout_min=600, gpus_per_node=1")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    p.set_defaults(func=_study)

    p = sub.add_parser("cost", help="parameters, FLOPs, optimizer state, communication and activation memory per "
                       "block and part, beside the end-to-end model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Count what a recipe costs on its own training step (blockssl/cost.py), e.g.\n"
                                   "  blockssl cost --config configs/imagenet/barlow_twins_blockwise_noise.yaml\n"
                                   "  blockssl cost --config configs/fashion_mnist.yaml model.head=cbe_pooled\n"
                                   "  blockssl cost --config configs/imagenet/barlow_twins_blockwise.yaml --balance 4 "
                                   "model.granularity=unit\n"
                                   "Counted at train.batch_size, on the meta device (no memory, no arithmetic).")
    p.add_argument("--config", type=Path, help="a YAML recipe (see configs/)")
    p.add_argument("--devices", type=int, default=16, metavar="N",
                   help="data-parallel devices sharing train.batch_size in the memory estimate per device (default "
                        "16, the paper's)")
    p.add_argument("--balance", type=int, default=0, metavar="N",
                   help="group the backbone's stages into N blocks whose largest costs the fewest training FLOPs, "
                        "print that model.blocks, then its costs (for pipelines across devices)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for pretrain")
    p.set_defaults(func=_cost)

    p = sub.add_parser("config", help="print the resolved configuration of a recipe and overrides")
    p.add_argument("--config", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_config)
    return parser


# Exit statuses: 2 = bad input (nothing computed), 3 = non-finite loss, 75 = preempted by a signal after saving a
# checkpoint (EX_TEMPFAIL: resubmit with --resume).
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, 75


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (argparse stops collecting positionals at an option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from blockssl.data.datasets import BadImageError
    from blockssl.execution import NonFiniteLossError
    from blockssl.train import Preempted

    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"blockssl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadImageError as e:  # raised in a loader worker: keep our message, not the worker's traceback
        print(f"blockssl {args.command}: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        print(f"blockssl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"blockssl {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
