"""Command line: parse, build the config, call the library. ``blockssl --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockssl.checkpoint import CheckpointError
from blockssl.config import ConfigError, describe_keys, load_config, resume_config


def _pretrain(args: argparse.Namespace) -> None:
    from blockssl.train import pretrain

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's own config.yaml; drop --config")
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    out = pretrain(cfg, resume=bool(args.resume), command=sys.argv)
    print(f"run directory: {out}")


def _probe(args: argparse.Namespace) -> None:
    from blockssl.eval.probe import print_probe_table, run_probe

    results = run_probe(args.run_dir, args.overrides, random_init=args.random_init)
    print_probe_table(results)


def _export(args: argparse.Namespace) -> None:
    from blockssl.export import export_run

    paths = export_run(args.run_dir, args.out)
    for p in paths:
        print(p)


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
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=10")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("probe", help="linear probes and kNN on every block of a pretrained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--random-init", action="store_true",
                   help="also probe the same architecture at random initialisation, as a reference")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="probe settings, e.g. probe.epochs=50")
    p.set_defaults(func=_probe)

    p = sub.add_parser("export", help="write a torchvision-loadable backbone and the heads of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.set_defaults(func=_export)

    p = sub.add_parser("config", help="print the resolved configuration of a recipe and overrides")
    p.add_argument("--config", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (argparse stops collecting positionals at an option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"blockssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
