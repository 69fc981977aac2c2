"""Memory and throughput of one training step, side by side: end to end (plain and with activation
checkpointing), the authors' structure, memory-lean blockwise with and without the lean CbE head, and with the
LARS momentum in bfloat16; and the two-view data pipeline alone, to say which of the two bounds a step.

Settings, each on every selected model (``--settings``):

- ``end_to_end``: ``train.scheme=end_to_end model.head=gap noise.type=none`` (the standard Barlow Twins model:
  the last block average-pooled into the projector, full backpropagation, no noise);
- ``e2e_checkpointed``: the same with ``train.checkpoint_stages=true`` (each backbone stage recomputed in backward:
  the cheapest way to cut end-to-end memory);
- ``reference``: ``train.execution=reference model.lean_head=false`` (the authors' structure: all blocks forward,
  the summed loss backward once, every block's graph alive together);
- ``lean_plain_head``: ``train.execution=lean model.lean_head=false`` (each block's backward and step before the
  next block runs; the CbE heads store their full-resolution maps);
- ``lean``: ``train.execution=lean`` with the lean CbE head (the default);
- ``lean_bf16_momentum``: ``lean`` with ``train.momentum_dtype=bfloat16``;
- ``lean_checkpointed``: ``lean`` with ``train.checkpoint_stages=true`` (set against ``e2e_checkpointed``).

Models (``--models``; ``--quick`` swaps in tiny versions for a smoke run):

- ``fashion_mnist``: the default recipe's model (``configs/fashion_mnist.yaml``: quarter-width ResNet-18, 28 px,
  one channel, batch 256, CbE 128 + projector 512-512);
- ``resnet18``: 32 px, small stem, batch 64, CbE head 512 wide, projector 2048-2048-2048;
- ``resnet50``: 224 px, ImageNet stem, batch 32, the paper's heads: CbE 2048 wide, projector 8192-8192-8192.

Everything else is the library default (Barlow Twins, global noise 0.25, LARS, fp32; ``--set key=value`` adds
overrides to every run, e.g. ``train.amp=bf16 train.channels_last=true`` on a GPU); inputs are random N(0, 1)
images, created before the model so they are part of the baseline; the learning rate is 0.1 x the peak.

Each (model, setting) pair runs in a fresh subprocess, so its memory numbers are its own. What is measured:

- ``saved``: the exact bytes saved for backward (``blockssl.memory``, saved-tensor hooks; device-independent),
  counted on the first (warm-up) step: ``saved peak`` is the most held at once, ``saved/blockK`` what each
  block's forward saved. Activation checkpointing keeps what it recomputes in its own frame: there the accounting
  sees the stage boundaries only, and the measured peak below is the figure to compare.
- ``images/s``: ``batch / mean step time`` over the timed steps, after ``warmup`` untimed steps (hooks off). A step
  is the execution strategy's step (``blockssl.execution``); on CUDA it is bracketed by ``torch.cuda.synchronize``.
- ``peak incr``: peak memory during the steps minus memory once the model, its optimizers and the inputs exist:
  activations, gradients, optimizer state (allocated by the first step) and temporaries. On CPU, memory is the
  process's resident set size (Linux ``/proc``; its high-water mark is reset before the first step, else
  ``ru_maxrss`` over the process: the JSON says which); RSS counts what the allocator holds, an upper bound on
  what the tensors need. On CUDA it is ``torch.cuda.max_memory_allocated`` (and ``memory_allocated`` before).
- ``vs e2e`` / ``vs ckpt``: a setting's figure over ``end_to_end``'s / ``e2e_checkpointed``'s on the same model.
- ``others``: the share of the machine's CPU time (all cores, /proc/stat) used by other processes during the
  timed steps; images/s of a run with a high share are not comparable (flagged); memory figures are unaffected.

The data pipeline (``--data``, default ``fashion_mnist,imagenet,imagenet_device``): the two-view loader of a recipe
alone, images/s with the loading in the main process (one worker's rate) and with one worker per CPU.
``fashion_mnist`` is the default recipe (Debian's Fashion-MNIST, or the 28 px synthetic set when it is missing: the
JSON says which); ``imagenet`` is the ImageNet recipe on generated 224+ px JPEGs (ImageNet's mean size, about 400 x
350, with texture so that they decode like photographs); ``imagenet_device`` is the same with
``data.photometric=device``: the workers decode, crop and flip, and ``finish/s`` is the rate of the colour
operations of both views, batched, on ``--device``. Each is set against the matching model's ``lean`` step
(``fashion_mnist``, ``resnet50``): a step is data-bound when the recipe's workers (``data.num_workers``, at most
the CPUs) deliver fewer images per second than the model consumes.

The JSON (``benchmarks/results/step_throughput_memory.json``, or ``--output``; ``--quick`` writes ``*_quick.json``)
holds every figure, the per-step times and losses, and the torch version, device and thread count. Reference and
lean execution are the same update, so from the same seed they must give the same losses (warned otherwise).

Usage: ``python benchmarks/step_throughput_memory.py [--quick] [--models ...] [--settings ...] [--data ...]
[--device auto] [--set key=value ...]``
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
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "step_throughput_memory.json"
MARKER = "BENCH_RESULT "
MB = 2**20
BUSY = 0.10  # share of the machine's CPU used by other processes above which throughput is flagged

# name -> recipe file (or None: the defaults), config overrides, input channels and size, batch, timing.
MODELS: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"recipe": "configs/fashion_mnist.yaml", "overrides": [], "channels": 1, "image_size": 28,
                      "batch": 256, "warmup": 1, "steps": 5},
    "resnet18": {"recipe": None, "overrides": ["model.arch=resnet18", "model.stem=small", "model.head_dim=512",
                                               "model.projector=2048-2048-2048"],
                 "channels": 3, "image_size": 32, "batch": 64, "warmup": 1, "steps": 5},
    "resnet50": {"recipe": None, "overrides": ["model.arch=resnet50", "model.stem=imagenet", "model.head_dim=2048",
                                               "model.projector=8192-8192-8192"],
                 "channels": 3, "image_size": 224, "batch": 32, "warmup": 1, "steps": 2},
}
# --quick: the same structure at toy sizes, to check that the benchmark runs (numbers are meaningless).
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"recipe": "configs/fashion_mnist.yaml", "overrides": ["model.width=0.125"], "channels": 1,
                      "image_size": 28, "batch": 16, "warmup": 1, "steps": 1},
    "resnet18": {"recipe": None, "overrides": ["model.arch=resnet18", "model.stem=small", "model.width=0.25",
                                               "model.head_dim=64", "model.projector=128-128-128"],
                 "channels": 3, "image_size": 16, "batch": 8, "warmup": 1, "steps": 2},
    "resnet50": {"recipe": None, "overrides": ["model.arch=resnet50", "model.stem=imagenet", "model.width=0.125",
                                               "model.head_dim=64", "model.projector=256-256-256"],
                 "channels": 3, "image_size": 64, "batch": 4, "warmup": 1, "steps": 1},
}
SETTINGS: dict[str, list[str]] = {
    "end_to_end": ["train.scheme=end_to_end", "model.head=gap", "noise.type=none"],
    "e2e_checkpointed": ["train.scheme=end_to_end", "model.head=gap", "noise.type=none",
                         "train.checkpoint_stages=true"],
    "reference": ["train.scheme=simultaneous", "train.execution=reference", "model.lean_head=false"],
    "lean_plain_head": ["train.scheme=simultaneous", "train.execution=lean", "model.lean_head=false"],
    "lean": ["train.scheme=simultaneous", "train.execution=lean", "model.lean_head=true"],
    "lean_bf16_momentum": ["train.scheme=simultaneous", "train.execution=lean", "model.lean_head=true",
                           "train.momentum_dtype=bfloat16"],
    "lean_checkpointed": ["train.scheme=simultaneous", "train.execution=lean", "model.lean_head=true",
                          "train.checkpoint_stages=true"],
}
# The data pipelines and the model whose lean step each feeds.
DATA: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"recipe": "configs/fashion_mnist.yaml", "model": "fashion_mnist", "batch": 256, "batches": 8},
    "imagenet": {"recipe": "configs/imagenet/barlow_twins_blockwise_noise.yaml", "model": "resnet50", "batch": 32,
                 "batches": 6, "generated": True},
}
# the same pipeline with the colour operations moved to the training device (data.photometric=device)
DATA["imagenet_device"] = {**DATA["imagenet"], "overrides": ["data.photometric=device"]}
QUICK_DATA = {"fashion_mnist": {**DATA["fashion_mnist"], "batch": 16, "batches": 2},
              "imagenet": {**DATA["imagenet"], "batch": 4, "batches": 2},
              "imagenet_device": {**DATA["imagenet_device"], "batch": 4, "batches": 2}}


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

    from blockssl.config import load_config
    from blockssl.config.plan import execution_strategy, loss_blocks
    from blockssl.execution import STEPS, Trainer, build_optimizers
    from blockssl.memory import model_accounting
    from blockssl.method import build_model
    from blockssl.optim import set_lr
    from blockssl.runtime import autocast_context, resolve_device

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    cuda = device.type == "cuda"
    batch, size, channels = spec["batch"], spec["image_size"], spec["channels"]
    overrides = [*spec["overrides"], *SETTINGS[spec["setting"]], *spec["extra"], f"train.batch_size={batch}",
                 f"train.device={spec['device']}", "train.progress=false"]
    recipe = ROOT.parent / spec["recipe"] if spec["recipe"] else None
    cfg = load_config(recipe, overrides)
    strategy = STEPS[execution_strategy(cfg)]
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    x1 = torch.randn(batch, channels, size, size, device=device).to(memory_format=memory_format)
    x2 = torch.randn(batch, channels, size, size, device=device).to(memory_format=memory_format)
    model = build_model(cfg, in_channels=channels, image_size=size).to(device, memory_format=memory_format)
    model.train()
    optimizers = build_optimizers(model, cfg.train)
    for opt in optimizers.values():
        set_lr(opt, 0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    trainer = Trainer(model, optimizers, scaler, autocast_context(cfg.train.amp, device), cfg.seed)
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
        if i == 0:  # the exact saved bytes, on an untimed step (the hooks cost a little time)
            with model_accounting(model) as accounting:
                step = strategy(trainer, x1, x2, i)
            saved = accounting.result()
        else:
            step = strategy(trainer, x1, x2, i)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        loss = step.terms.logged()["loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at step {i}")
        losses.append(loss)
        if i >= spec["warmup"]:
            times.append(dt)
        print(f"  [{spec['model']}/{spec['setting']}] step {i + 1}/{spec['warmup'] + spec['steps']}: "
              f"{dt:.2f} s{' (warm-up)' if i < spec['warmup'] else ''}, loss {loss:.4g}", file=sys.stderr, flush=True)
        del step

    others_during = load.share()
    rss_peak = peak_rss()
    state_bytes = sum(t.numel() * t.element_size() for opt in optimizers.values() for s in opt.state.values()
                      for t in s.values() if torch.is_tensor(t))
    mean_step = sum(times) / len(times)
    result: dict[str, Any] = {
        "model": spec["model"], "setting": spec["setting"], "overrides": overrides,
        "execution": execution_strategy(cfg), "loss_blocks": [k + 1 for k in loss_blocks(cfg)], "batch": batch,
        "image_size": size, "warmup_steps": spec["warmup"], "timed_steps": spec["steps"], "step_times_s": times,
        "mean_step_s": mean_step, "images_per_s": batch / mean_step, "losses": losses,
        "params_total": total_params, "params_trained": trained_params, "optimizer_state_mb": state_bytes / MB,
        "saved_peak_mb": saved.peak / MB, "saved_total_mb": saved.total / MB,
        "saved_block_mb": {f"block{k + 1}": v / MB for k, v in sorted(saved.blocks().items())},
        "saved_part_mb": {k: v / MB for k, v in saved.parts.items()},
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
    """Each run's added memory, saved bytes and images/s over those of ``end_to_end`` (``_vs_e2e``) and of
    ``e2e_checkpointed`` (``_vs_ckpt``) on the same model, where measured."""
    by_key = {(r["model"], r["setting"]): r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            continue
        for suffix, baseline in (("vs_e2e", "end_to_end"), ("vs_ckpt", "e2e_checkpointed")):
            base = by_key.get((r["model"], baseline))
            for key in ("peak_increase_mb", "saved_peak_mb", "images_per_s"):
                r[f"{key}_{suffix}"] = r[key] / base[key] if base and base[key] else None


# ---------------------------------------------------------------------------------------------------------
# The two-view data pipeline alone


def generated_imagefolder(root: Path, images: int) -> Path:
    """An ImageNet-layout folder of ``images`` JPEGs of ImageNet's typical size (about 400 x 350, varied), smooth
    colour fields with fine texture so they compress and decode like photographs (quality 90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(4):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        w, h = int(rng.integers(300, 500)), int(rng.integers(260, 440))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        for split in ("train", "val") if i < 4 else ("train",):
            image.save(root / split / f"class{i % 4}" / f"{i:05d}.jpg", quality=90)
    return root


def measure_loader(name: str, spec: dict[str, Any], workers: int, root: str, device: str) -> dict[str, Any]:
    """Images/s of the recipe's two-view loader alone (both views of each image decoded and augmented), over
    ``batches`` batches after one untimed batch (worker start-up excluded); with ``data.photometric=device``, also
    the images/s of finishing those batches (both views' colour operations) on ``device``."""
    import torch

    from blockssl.config import load_config
    from blockssl.data.datasets import DatasetInfo
    from blockssl.data.loader import EpochSampler, pretrain_loader, two_view_dataset
    from blockssl.data.photometric import to_device
    from blockssl.runtime import resolve_device

    overrides = [*spec.get("overrides", []), f"data.num_workers={workers}", f"train.batch_size={spec['batch']}"]
    source = "recipe"
    if root:
        overrides.append(f"data.root={root}")
    cfg = load_config(ROOT.parent / spec["recipe"], overrides)
    recipe_workers = load_config(ROOT.parent / spec["recipe"]).data.num_workers
    try:
        views = two_view_dataset(cfg)
    except FileNotFoundError:  # no Fashion-MNIST here: the synthetic set at its size and channels
        cfg = load_config(ROOT.parent / spec["recipe"], [*overrides, "data.name=synthetic", "data.image_size=28",
                                                          f"data.synthetic_size={spec['batch'] * 4}"])
        views, source = two_view_dataset(cfg), "synthetic (Fashion-MNIST not installed)"
    info: DatasetInfo = views.info
    sampler = EpochSampler(len(views), spec["batch"], cfg.seed)
    loader = pretrain_loader(views, sampler, num_workers=workers, pin_memory=False, persistent_workers=False)
    batches = iter(loader)
    next(batches)
    t0 = time.perf_counter()
    loaded = [next(batches) for _ in range(spec["batches"])]
    elapsed = time.perf_counter() - t0
    del batches
    count = spec["batches"] * spec["batch"]
    finish = None
    if cfg.data.photometric == "device" and workers == 0:  # the same batches whatever loaded them: measured once
        target = resolve_device(device)
        sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
        to_device(views.transforms[0], loaded[0][0], target)  # warm-up (kernels, allocator)
        sync()
        t0 = time.perf_counter()
        for x1, x2, _, _ in loaded:
            to_device(views.transforms[0], x1, target)
            to_device(views.transforms[1], x2, target)
        sync()
        finish = count / (time.perf_counter() - t0)
    return {"data": name, "workers": workers, "source": source, "image_size": info.image_size,
            "photometric": cfg.data.photometric, "finish_images_per_s": finish,
            "batch": spec["batch"], "images": count, "seconds": elapsed, "images_per_s": count / elapsed,
            "images_per_s_per_worker": count / elapsed / max(1, workers), "recipe_workers": recipe_workers,
            "torch_threads": torch.get_num_threads()}


def data_bounds(loaders: list[dict[str, Any]], results: list[dict[str, Any]], table: dict[str, dict[str, Any]],
                cpus: int) -> list[dict[str, Any]]:
    """Per data pipeline: one worker's images/s, what the recipe's workers deliver (at most one per CPU), the
    matching model's lean step, and which of the two bounds a step."""
    lean = {r["model"]: r for r in results if r.get("setting") == "lean" and "error" not in r}
    out = []
    for name in dict.fromkeys(r["data"] for r in loaders):
        one = next(r for r in loaders if r["data"] == name and r["workers"] == 0)
        many = [r for r in loaders if r["data"] == name and r["workers"] > 0]
        workers = min(one["recipe_workers"], cpus) or 1
        supply = one["images_per_s"] * workers
        model = lean.get(table[name]["model"])
        demand = model["images_per_s"] if model else None
        out.append({"data": name, "per_worker_images_per_s": one["images_per_s"],
                    "all_cpus_images_per_s": many[0]["images_per_s"] if many else None,
                    "recipe_workers": one["recipe_workers"], "workers": workers, "supply_images_per_s": supply,
                    "model": table[name]["model"], "model_images_per_s": demand,
                    "workers_needed": demand / one["images_per_s"] if demand else None,
                    "bound": None if demand is None else ("data" if supply < demand else "model")})
    return out


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
    header = (f"{'model':<13} {'setting':<18} {'batch':>5} {'images/s':>9} {'vs e2e':>6} {'peak incr MB':>12} "
              f"{'vs e2e':>6} {'vs ckpt':>7} {'saved peak MB':>13} {'vs e2e':>6} {'state MB':>8} {'others':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<13} {r['setting']:<18} failed: {r['error']}")
            continue
        lines.append(f"{r['model']:<13} {r['setting']:<18} {r['batch']:>5} {r['images_per_s']:>9.2f} "
                     f"{_ratio(r['images_per_s_vs_e2e']):>6} {r['peak_increase_mb']:>12.0f} "
                     f"{_ratio(r['peak_increase_mb_vs_e2e']):>6} {_ratio(r['peak_increase_mb_vs_ckpt']):>7} "
                     f"{r['saved_peak_mb']:>13.0f} {_ratio(r['saved_peak_mb_vs_e2e']):>6} "
                     f"{r['optimizer_state_mb']:>8.0f} {_percent(r['other_cpu_share_timed']):>6}")
    by_key = {(r["model"], r["setting"]): r for r in results if "error" not in r}
    blocks = [r for r in results if "error" not in r and r["setting"] in ("lean", "lean_plain_head")]
    if blocks:
        lines.append("\nsaved for backward per block (MB): " + "; ".join(
            f"{r['model']}/{r['setting']}: " + ", ".join(f"{v:.0f}" for v in r["saved_block_mb"].values())
            for r in blocks))
    for model in dict.fromkeys(r["model"] for r in results):
        ref, lean = by_key.get((model, "reference")), by_key.get((model, "lean_plain_head"))
        if ref and lean and not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(ref["losses"], lean["losses"],
                                                                                     strict=True)):
            lines.append(f"\nwarning: {model}: reference and lean losses differ ({ref['losses']} vs "
                         f"{lean['losses']}); they should be the same update")
    busy = [r for r in results if (r.get("other_cpu_share_timed") or 0) > BUSY]
    if busy:
        lines.append(f"\nwarning: other processes used more than {BUSY:.0%} of the CPU during {len(busy)} run(s) "
                     "(column 'others'): their images/s are not comparable; the memory numbers are unaffected")
    return "\n".join(lines)


def format_data(loaders: list[dict[str, Any]], bounds: list[dict[str, Any]]) -> str:
    lines = [f"{'data':<16} {'workers':>7} {'px':>4} {'images/s':>9} {'per worker':>10} {'finish/s':>9}  source"]
    for r in loaders:
        finish = "-" if r["finish_images_per_s"] is None else f"{r['finish_images_per_s']:.1f}"
        lines.append(f"{r['data']:<16} {r['workers']:>7} {r['image_size']:>4} {r['images_per_s']:>9.1f} "
                     f"{r['images_per_s_per_worker']:>10.1f} {finish:>9}  {r['source']}")
    for b in bounds:
        if b["model_images_per_s"] is None:
            continue
        lines.append(f"{b['data']}: {b['workers']} worker(s) (the recipe's {b['recipe_workers']}, at most one per CPU) "
                     f"deliver {b['supply_images_per_s']:.1f} images/s, the {b['model']} lean step takes "
                     f"{b['model_images_per_s']:.2f}: bound by the {b['bound']} ({b['workers_needed']:.2f} workers' "
                     "worth of loading needed)")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: "
                        + ", ".join(SETTINGS))
    parser.add_argument("--data", default=",".join(DATA), help="data pipelines to measure (comma-separated subset "
                        f"of: {', '.join(DATA)}; empty: none)")
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke test of the benchmark")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=0, help="batch size of every model (0 = each model's default)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (0 = the model's default)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed warm-up steps (-1 = the model's default; at "
                        "least 1: the first step is the one whose saved bytes are counted)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run, e.g. "
                        "train.amp=bf16 train.channels_last=true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per (model, setting) run")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON results (default {RESULTS.relative_to(ROOT.parent)}; --quick: *_quick.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # inside the subprocess: measure one pair, report it on stdout
        print(MARKER + json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0

    table = QUICK_MODELS if args.quick else MODELS
    data_table = QUICK_DATA if args.quick else DATA
    chosen = {}
    for flag, known in (("models", table), ("settings", SETTINGS), ("data", data_table)):
        chosen[flag] = [c.strip() for c in getattr(args, flag).split(",") if c.strip()]
        bad = [c for c in chosen[flag] if c not in known]
        if bad or (not chosen[flag] and flag != "data"):
            parser.error(f"--{flag}: {', '.join(bad) or 'empty'}; choose from {', '.join(known)}")

    import torch

    from blockssl.runtime import git_revision, resolve_device

    device = resolve_device(args.device)
    threads = args.threads or torch.get_num_threads()
    cpus = os.cpu_count() or 1
    print(f"torch {torch.__version__}, device {device}, {threads} threads, {cpus} CPUs"
          f"{', quick (toy sizes)' if args.quick else ''}", flush=True)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for model in chosen["models"]:
        m = table[model]
        warmup = max(1, m["warmup"] if args.warmup < 0 else args.warmup)
        steps = args.steps or m["steps"]
        batch = args.batch or m["batch"]
        print(f"{model}: {m['image_size']} px, batch {batch}, {warmup} warm-up + {steps} timed steps, "
              f"overrides: {' '.join([*m['overrides'], *args.set]) or 'none'}", flush=True)
        for setting in chosen["settings"]:
            spec = {"model": model, "setting": setting, "recipe": m["recipe"], "overrides": m["overrides"],
                    "extra": args.set, "channels": m["channels"], "image_size": m["image_size"], "batch": batch,
                    "warmup": warmup, "steps": steps, "device": args.device, "threads": args.threads}
            results.append(run_worker(spec, args.timeout))
    add_ratios(results)

    loaders: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        generated: dict[int, str] = {}  # image count -> folder: imagenet and imagenet_device read the same images
        for name in chosen["data"]:
            spec = data_table[name]
            images = spec["batch"] * (spec["batches"] + 1)  # one untimed batch, then the timed ones
            if spec.get("generated") and images not in generated:
                generated[images] = str(generated_imagefolder(Path(tmp) / f"generated{images}", images))
            root = generated[images] if spec.get("generated") else ""
            for workers in (0, cpus):
                print(f"data {name}: {workers} workers", flush=True)
                loaders.append(measure_loader(name, spec, workers, root, args.device))
    bounds = data_bounds(loaders, results, data_table, cpus)
    elapsed = time.perf_counter() - start

    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS high-water mark"
    print(f"\npeak incr = peak ({memory}) during the steps - memory after building model, optimizers and inputs; "
          "saved peak = most bytes held for backward at once (exact, saved-tensor hooks); state = optimizer state\n")
    print(format_table(results))
    if loaders:
        print("\n" + format_data(loaders, bounds))
    print(f"\ntotal time {elapsed:.0f} s")

    output = args.output or (RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "step_throughput_memory", "quick": args.quick, "torch": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": threads, "cpu_count": cpus, "python": platform.python_version(),
        "platform": platform.platform(), "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "total_time_s": elapsed, "overrides": args.set,
        "models": {name: table[name] for name in chosen["models"]},
        "settings": {s: SETTINGS[s] for s in chosen["settings"]},
        "results": results, "data": loaders, "data_bounds": bounds,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
