"""The LARS step, batched (``foreach``: multi-tensor kernels per parameter group) against one parameter at a time,
side by side on the same model and optimizer state.

    python benchmarks/optimizer_step.py                 # the default recipe's model, ResNet-50 with paper heads
    python benchmarks/optimizer_step.py --quick         # a smoke run on a tiny model
    python benchmarks/optimizer_step.py --set train.momentum_dtype=bfloat16

Models: ``fashion_mnist`` (``configs/fashion_mnist.yaml``: quarter-width ResNet-18, CbE 128, projectors 512-512)
and ``resnet50`` (ResNet-50, CbE 2048, the paper's 8192-8192-8192 projectors: 4 blocks, 600 M trained
parameters). Every block's optimizer steps (``blockssl.execution.build_optimizers``, as in training); gradients
are fixed random tensors, so only the update is timed. The two settings alternate step by step on one optimizer
(the update is the same arithmetic either way), after ``--warmup`` untimed steps that allocate the momentum; on
CUDA each step is bracketed by ``torch.cuda.synchronize``. Per setting: the median step time in ms; and the ratio.
Writes ``benchmarks/results/optimizer_step.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from blockssl.config import load_config
from blockssl.execution import build_optimizers
from blockssl.method import build_model
from blockssl.optim import LARS, set_lr
from blockssl.runtime import resolve_device

ROOT = Path(__file__).resolve().parent
# name -> recipe (relative to the repository root, or None: the defaults), overrides, input channels and size
MODELS: dict[str, tuple[str | None, list[str], int, int]] = {
    "fashion_mnist": ("configs/fashion_mnist.yaml", [], 1, 28),
    "resnet50": (None, ["model.arch=resnet50", "model.stem=imagenet", "model.head_dim=2048",
                        "model.projector=8192-8192-8192"], 3, 224),
}
QUICK: dict[str, tuple[str | None, list[str], int, int]] = {
    "fashion_mnist": ("configs/fashion_mnist.yaml", ["model.width=0.125", "model.projector=64-64"], 1, 28)}


def measure(name: str, spec: tuple[str | None, list[str], int, int], extra: list[str], device: torch.device,
            warmup: int, steps: int) -> dict[str, Any]:
    recipe, overrides, channels, size = spec
    cfg = load_config(ROOT.parent / recipe if recipe else None, [*overrides, *extra])
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=channels, image_size=size).to(device)
    optimizers = build_optimizers(model, cfg.train)
    params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for opt in optimizers.values():
        assert isinstance(opt, LARS), "the benchmark times LARS (train.optimizer=lars)"
        set_lr(opt, 0.1)

    def step(foreach: bool) -> float:
        for opt in optimizers.values():
            opt.foreach = foreach  # type: ignore[attr-defined]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for opt in optimizers.values():
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        step(True)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for foreach in (True, False):
            times[foreach].append(step(foreach))
    batched, looped = (statistics.median(times[f]) * 1e3 for f in (True, False))
    return {"model": name, "tensors": len(params), "parameters": sum(p.numel() for p in params),
            "foreach_ms": batched, "per_parameter_ms": looped, "speedup": looped / batched,
            "foreach_times_ms": [t * 1e3 for t in times[True]],
            "per_parameter_times_ms": [t * 1e3 for t in times[False]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="a tiny model, to check that the benchmark runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    models = QUICK if args.quick else {m: MODELS[m] for m in args.models.split(",")}
    results = [measure(name, spec, args.extra, device, args.warmup, 2 if args.quick else args.steps)
               for name, spec in models.items()]
    print(f"LARS step on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads), median of "
          f"{2 if args.quick else args.steps} steps each, alternating")
    print(f"{'model':<14}{'tensors':>8}{'parameters':>13}{'foreach ms':>12}{'per-param ms':>14}{'speedup':>9}")
    for r in results:
        print(f"{r['model']:<14}{r['tensors']:>8}{r['parameters']:>13,}{r['foreach_ms']:>12.2f}"
              f"{r['per_parameter_ms']:>14.2f}{r['speedup']:>8.2f}x")
    output = args.output or ROOT / "results" / ("optimizer_step_quick.json" if args.quick else "optimizer_step.json")
    output.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "machine": platform.processor() or platform.machine(), "overrides": args.extra,
                                  "results": results}, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
