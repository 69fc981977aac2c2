"""Throughput and peak memory of one training step: end-to-end vs simultaneous blockwise (reference and lean).

Three settings, each on every selected model:

- ``end_to_end``: ``train.scheme=end_to_end`` (one loss at the last block, full backpropagation; the execution is
  necessarily ``reference``);
- ``reference``: ``train.scheme=simultaneous train.execution=reference`` (all blocks forward, the summed loss
  backward once, one optimizer step; the authors' code);
- ``lean``: ``train.scheme=simultaneous train.execution=lean`` (block k's backward and optimizer step run as soon
  as its loss exists and its gradients are freed before block k+1 runs).

Models (``--models``; ``--quick`` swaps in tiny versions of both for a smoke run):

- ``resnet18``: 32 px, small stem, batch 64, CbE head 512 wide, projector 2048-2048-2048 (the paper's
  2048/8192 heads are out of proportion for a 32 px ResNet-18 and too slow on a CPU);
- ``resnet50``: 224 px, ImageNet stem, batch 32, the paper's heads: CbE 2048 wide, projector 8192-8192-8192.

Everything else is the library default (Barlow Twins, global noise 0.25, LARS, fp32); inputs are random
N(0, 1) images with 3 channels, created before the model so they are part of the baseline. The learning rate is
0.1 x the peak, as in the warm-up.

Each (model, setting) pair runs in a fresh subprocess, so its memory numbers are its own. What is measured:

- ``images/s``: ``batch / mean step time`` over the timed steps, after ``warmup`` untimed steps. A step is
  the execution strategy's step (``blockssl.execution``: forward of both views, backward, LARS step, zero_grad);
  on CUDA it is bracketed by ``torch.cuda.synchronize``.
- On CPU, memory is the process's resident set size (RSS, Linux ``/proc/self/status``):
  ``rss_built`` is the RSS once the model, its optimizers and the input batch exist, before any step;
  ``peak`` is the highest RSS during the steps (warm-up included; the warm-up step allocates the LARS
  momentum, so the optimizer state is in the peak). Before the first step the kernel's high-water mark is reset
  (``/proc/self/clear_refs``), so a transient of model construction cannot mask the steps' peak; where that is
  unavailable, ``peak`` falls back to ``ru_maxrss`` over the whole process (the JSON says which).
  ``peak increase`` = ``peak - rss_built``: what training adds on top of the weights, i.e. activations,
  gradients, optimizer state and temporaries. RSS counts memory the allocator holds, not only live tensors, so
  it is an upper bound on what the tensors need, but it is what the machine must provide.
- On CUDA, ``peak`` is ``torch.cuda.max_memory_allocated`` over the steps and ``built`` is
  ``torch.cuda.memory_allocated`` before the first step (the process RSS is reported beside them in the JSON).
- ``vs e2e``: a setting's peak increase divided by that of end-to-end training on the same model.
- ``others``: the share of the machine's CPU time (all cores, /proc/stat) used by other processes during the
  timed steps. Another process on the same cores slows the steps down, so images/s of a run with a high share
  are not comparable (a warning is printed); the memory numbers are unaffected.

The JSON (``benchmarks/results/step_throughput_memory.json``; ``--quick`` writes ``*_quick.json``) also
records parameter and optimizer-state sizes, per-step times and losses, the load average, and the torch
version, device and thread count. Reference and lean execution are the same update, so from the same seed they
must give the same losses at every step; the benchmark checks this and warns otherwise.

Usage: ``python benchmarks/step_throughput_memory.py [--quick] [--models resnet18,resnet50] [--device auto]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "step_throughput_memory.json"
MARKER = "BENCH_RESULT "
MB = 2**20
BUSY = 0.10  # share of the machine's CPU used by other processes above which throughput is flagged

# name -> config overrides, image size, timing; batch is set through train.batch_size.
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"overrides": ["model.arch=resnet18", "model.stem=small", "model.head_dim=512",
                               "model.projector=2048-2048-2048"],
                 "image_size": 32, "batch": 64, "warmup": 1, "steps": 5},
    "resnet50": {"overrides": ["model.arch=resnet50", "model.stem=imagenet", "model.head_dim=2048",
                               "model.projector=8192-8192-8192"],
                 "image_size": 224, "batch": 32, "warmup": 1, "steps": 2},
}
# --quick: the same structure at toy sizes, to check that the benchmark runs (numbers are meaningless).
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"overrides": ["model.arch=resnet18", "model.stem=small", "model.width=0.25", "model.head_dim=64",
                               "model.projector=128-128-128"],
                 "image_size": 16, "batch": 8, "warmup": 1, "steps": 2},
    "resnet50": {"overrides": ["model.arch=resnet50", "model.stem=imagenet", "model.width=0.125",
                               "model.head_dim=64", "model.projector=256-256-256"],
                 "image_size": 64, "batch": 4, "warmup": 1, "steps": 1},
}
SETTINGS: dict[str, list[str]] = {
    "end_to_end": ["train.scheme=end_to_end"],
    "reference": ["train.scheme=simultaneous", "train.execution=reference"],
    "lean": ["train.scheme=simultaneous", "train.execution=lean"],
}


# ---------------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc where available)


def current_rss() -> int:
    """Resident set size of this process in bytes (``ru_maxrss`` if /proc is missing: an overestimate)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """High-water mark of the resident set size in bytes (since the last reset, if any)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat; steal included), None if unavailable."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Share of the machine's CPU time used by everything but this process over a window (0 = quiet machine).

    Other processes on the same cores slow the steps down (and compete for memory bandwidth), so the
    throughput of a run with a high share is not comparable; the memory numbers are unaffected.
    """

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()

    def share(self) -> float | None:
        busy = machine_busy_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        others = (busy - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------------------
# One (model, setting) pair, in its own process


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from blockssl.config import execution_strategy, load_config, loss_blocks
    from blockssl.execution import STRATEGIES, Trainer, build_optimizers
    from blockssl.method import build_model
    from blockssl.optim import set_lr
    from blockssl.runtime import resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    cuda = device.type == "cuda"
    batch, size = spec["batch"], spec["image_size"]
    overrides = [*spec["overrides"], *SETTINGS[spec["setting"]], f"train.batch_size={batch}",
                 f"train.device={spec['device']}", "train.progress=false"]
    cfg = load_config(None, overrides)
    strategy = STRATEGIES[execution_strategy(cfg)]

    x1 = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.randn(batch, 3, size, size, device=device)
    model = build_model(cfg, in_channels=3, image_size=size).to(device)
    model.train()
    optimizers = build_optimizers(model, cfg.train)
    for opt in optimizers.values():
        set_lr(opt, 0.1)
    trainer = Trainer(model, optimizers, torch.amp.GradScaler(device.type, enabled=False), nullcontext(), cfg.seed)
    trained = {id(p): p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]}
    total_params = sum(p.numel() for p in model.parameters())
    trained_params = sum(p.numel() for p in trained.values())

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_built = torch.cuda.memory_allocated(device)
    rss_built = current_rss()
    peak_scope = "steps" if reset_peak_rss() else "process"

    times: list[float] = []
    losses: list[float] = []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            load = OtherLoad()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result, _ = strategy(trainer, x1, x2, i)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        loss = result.scalars()["loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at step {i}")
        losses.append(loss)
        if i >= spec["warmup"]:
            times.append(dt)
        print(f"  [{spec['model']}/{spec['setting']}] step {i + 1}/{spec['warmup'] + spec['steps']}: "
              f"{dt:.2f} s{' (warm-up)' if i < spec['warmup'] else ''}, loss {loss:.4g}", file=sys.stderr, flush=True)
        del result

    others_during = load.share()
    rss_peak = peak_rss()
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers.values() for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t))
    mean_step = sum(times) / len(times)
    result: dict[str, Any] = {
        "model": spec["model"], "setting": spec["setting"], "overrides": overrides,
        "lean": execution_strategy(cfg) == "lean",
        "loss_blocks": [k + 1 for k in loss_blocks(cfg)], "batch": batch, "image_size": size,
        "warmup_steps": spec["warmup"], "timed_steps": spec["steps"], "step_times_s": times,
        "mean_step_s": mean_step, "images_per_s": batch / mean_step, "losses": losses,
        "params_total": total_params, "params_trained": trained_params,
        "optimizer_state_mb": state_bytes / MB,
        "rss_built_mb": rss_built / MB, "rss_peak_mb": rss_peak / MB, "rss_peak_scope": peak_scope,
        "threads": torch.get_num_threads(), "other_cpu_share_timed": others_during,
    }
    if cuda:
        gpu_peak = torch.cuda.max_memory_allocated(device)
        result |= {"memory": "cuda_allocated", "built_mb": gpu_built / MB, "peak_mb": gpu_peak / MB}
    else:
        result |= {"memory": "rss", "built_mb": rss_built / MB, "peak_mb": rss_peak / MB}
    result["peak_increase_mb"] = result["peak_mb"] - result["built_mb"]
    return result


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``peak_increase_vs_end_to_end``: each run's added memory over the end-to-end run of the same model."""
    e2e = {r["model"]: r.get("peak_increase_mb") for r in results if r["setting"] == "end_to_end"}
    for r in results:
        if "error" not in r:
            base = e2e.get(r["model"])
            r["peak_increase_vs_end_to_end"] = r["peak_increase_mb"] / base if base else None


# ---------------------------------------------------------------------------------------------------------
# Driver


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": spec["model"], "setting": spec["setting"], "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line.removeprefix(MARKER))
    return {"model": spec["model"], "setting": spec["setting"], "error": f"worker exited with {proc.returncode}"}


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'model':<10} {'setting':<11} {'batch':>5} {'images/s':>9} {'step s':>7} {'built MB':>9} "
              f"{'peak MB':>9} {'peak incr MB':>12} {'vs e2e':>7} {'others':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<10} {r['setting']:<11} failed: {r['error']}")
            continue
        vs = r["peak_increase_vs_end_to_end"]
        ratio = "n/a" if vs is None else f"{vs:.2f}x"
        lines.append(f"{r['model']:<10} {r['setting']:<11} {r['batch']:>5} {r['images_per_s']:>9.2f} "
                     f"{r['mean_step_s']:>7.2f} {r['built_mb']:>9.0f} {r['peak_mb']:>9.0f} "
                     f"{r['peak_increase_mb']:>12.0f} {ratio:>7} {_percent(r['other_cpu_share_timed']):>6}")
    by_key = {(r["model"], r["setting"]): r for r in results if "error" not in r}
    for model in dict.fromkeys(r["model"] for r in results):
        ref, lean = by_key.get((model, "reference")), by_key.get((model, "lean"))
        if ref and lean and not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(ref["losses"], lean["losses"],
                                                                                     strict=True)):
            lines.append(f"\nwarning: {model}: reference and lean losses differ ({ref['losses']} vs "
                         f"{lean['losses']}); they should be the same update")
    busy = [r for r in results if (r.get("other_cpu_share_timed") or 0) > BUSY]
    if busy:
        lines.append(f"\nwarning: other processes used more than {BUSY:.0%} of the CPU during {len(busy)} run(s) "
                     "(column 'others'): their images/s are not comparable; the memory numbers are unaffected")
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50", help="comma-separated subset of: "
                        + ", ".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: "
                        + ", ".join(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke test of the benchmark")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (0 = the model's default)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed warm-up steps (-1 = the model's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per (model, setting) run")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON results (default {RESULTS.relative_to(ROOT.parent)}; --quick: *_quick.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # inside the subprocess: measure one pair, report it on stdout
        print(MARKER + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0

    table = QUICK_MODELS if args.quick else MODELS
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for name, chosen, known in (("--models", models, table), ("--settings", settings, SETTINGS)):
        bad = [c for c in chosen if c not in known]
        if bad or not chosen:
            parser.error(f"{name}: {', '.join(bad) or 'empty'}; choose from {', '.join(known)}")

    import torch

    from blockssl.runtime import git_revision, resolve_device

    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, device {device}, {threads} threads, {os.cpu_count()} CPUs"
          f"{', quick (toy sizes)' if args.quick else ''}")
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for model in models:
        m = table[model]
        warmup = m["warmup"] if args.warmup < 0 else args.warmup
        steps = args.steps or m["steps"]
        print(f"{model}: {m['image_size']} px, batch {m['batch']}, {warmup} warm-up + {steps} timed steps, "
              f"overrides: {' '.join(m['overrides'])}", flush=True)
        for setting in settings:
            spec = {"model": model, "setting": setting, "overrides": m["overrides"], "image_size": m["image_size"],
                    "batch": m["batch"], "warmup": warmup, "steps": steps, "device": args.device,
                    "threads": args.threads}
            results.append(run_worker(spec, args.timeout))
    elapsed = time.perf_counter() - start
    add_ratios(results)

    memory = "peak = torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak = process RSS high-water mark"
    print(f"\n{memory} during the steps; built = the same after building model, optimizer and inputs; "
          "peak incr = peak - built\n")
    print(format_table(results))
    print(f"\ntotal time {elapsed:.0f} s")

    output = args.output or (RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "step_throughput_memory", "quick": args.quick, "torch": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": threads, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "total_time_s": elapsed,
        "models": {name: table[name] for name in models}, "settings": {s: SETTINGS[s] for s in settings},
        "results": results,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
