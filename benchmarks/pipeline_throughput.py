"""Pipeline training against one process, side by side on this machine, and an analytic model of the pipeline.

    python benchmarks/pipeline_throughput.py            # the default recipe (configs/fashion_mnist.yaml)
    python benchmarks/pipeline_throughput.py --quick    # a smoke test on tiny inputs
    python benchmarks/pipeline_throughput.py --paper    # also ResNet-50 at 224 px for the 16-device prediction
    python benchmarks/pipeline_throughput.py --paper --set model.head=cbe_pooled \
        --output benchmarks/results/pipeline_throughput_cbe_pooled.json           # both under another head

Settings, each in fresh processes (gloo on the CPU, one thread per stage process): one process with 1 and with 2
threads (lean execution), and 2 pipeline stages with the even grouping ``1+2,3+4`` and with ``auto`` (balanced by
measured per-block step time). A step is the lean/pipeline strategy of ``blockssl.execution`` on in-memory
batches of the recipe's shape (the data pipeline is measured apart, it is not what the stages share), after
``--warmup`` untimed steps and a barrier. Per stage: busy seconds (its blocks' forward, backward and step),
idle seconds (the rest of the timed wall time: waiting for the previous stage, or for a send slot), bytes sent
per image, and peak resident memory (RSS, which includes about 0.3 GB of Python and torch).

The analytic model takes each block's step time t_k (measured in one single-thread process, batch as in the
run) and the bytes of its output per image a_k, and predicts a pipeline stage's time per batch as
max(sum of its t_k, bytes sent / link bandwidth), the pipeline's as that of its slowest stage (sends are
asynchronous, so communication overlaps compute). It is checked against the 2-stage measurements here and
applied to K = 2 and 4 stages. ``--paper`` measures ResNet-50's per-block and end-to-end step times on this CPU
(batch 8) and predicts, relative to one device training end to end, the throughput of the paper's 16 devices as
4 stages x 4 replicas against 16-way data-parallel end-to-end training, with per-device parameter memory. ``--set
KEY=VALUE`` changes the recipe and the ResNet-50 model alike (a head, projectors); the end-to-end model is
``blockssl.cost.end_to_end_config`` of the ResNet-50 one. Writes ``benchmarks/results/pipeline_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_throughput_memory import peak_rss, reset_peak_rss

SETTINGS: dict[str, dict[str, Any]] = {
    "1 process, 1 thread": {"world": 1, "threads": 1, "stages": None},
    "1 process, 2 threads": {"world": 1, "threads": 2, "stages": None},
    "2 stages, 1+2,3+4": {"world": 2, "threads": 1, "stages": "1+2,3+4"},
    "2 stages, auto": {"world": 2, "threads": 1, "stages": "auto"},
}
RECIPE = "configs/fashion_mnist.yaml"
QUICK = ["model.width=0.125", "model.head_dim=16", "model.projector=32-32", "train.batch_size=32"]
LINK_GBPS = 25.0  # assumed link between stages for the 16-device prediction: 200 Gb/s InfiniBand


def _config(overrides: list[str], stages: str | None) -> Any:
    from blockssl.config import load_config

    execution = ["train.execution=pipeline", f"train.stages={stages}"] if stages else ["train.execution=lean"]
    return load_config(RECIPE, [*overrides, *execution, "train.device=cpu", "train.progress=false",
                                "online_probe.enabled=false"])


def _worker(rank: int, world: int, port: int, spec: dict[str, Any], overrides: list[str], steps: int, warmup: int,
            out: str) -> None:
    from blockssl import dist
    from blockssl.data.datasets import dataset_info
    from blockssl.execution import StepTerms, Trainer, build_optimizers, lean_step
    from blockssl.method import build_model
    from blockssl.optim import set_lr
    from blockssl.pipeline import (
        Link,
        Message,
        init_groups,
        measure_block_seconds,
        plan_layout,
        single_stage,
    )
    from blockssl.runtime import seed_everything

    torch.set_num_threads(spec["threads"])
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _config(overrides, spec["stages"])
    info = dataset_info(cfg.data)
    cpu = torch.device("cpu")
    n = 4
    layout = (plan_layout(cfg, n, world, rank, lambda: measure_block_seconds(cfg, cpu)) if spec["stages"]
              else single_stage(n, 1, 0))
    init_groups(layout)
    block_seconds = measure_block_seconds(cfg, cpu) if spec.get("measure_blocks") else None
    seed_everything(cfg.seed)
    model = build_model(cfg, info.channels, info.image_size).train()
    optimizers = build_optimizers(model, cfg.train, layout.blocks)
    for opt in optimizers.values():
        set_lr(opt, 0.1)
    trainer = Trainer(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), nullcontext(), cfg.seed,
                      stage_blocks=layout.blocks)
    link = Link(layout, cpu, cfg.train.in_flight, n) if layout.pipelined else None
    batch = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, batch, info.channels, info.image_size, info.image_size, generator=g) for _ in range(4)]
    labels = torch.zeros(batch, dtype=torch.int64)
    output_bytes = []
    busy = start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if world > 1:
                tdist.barrier()
            reset_peak_rss()
            busy, start = 0.0, time.perf_counter()
            if link is not None:
                link.wait_s, link.bytes_sent = 0.0, 0
        if layout.first:
            x1, x2 = inputs[i % len(inputs)]
        else:
            assert link is not None
            msg = link.receive()
            x1, x2 = msg.h1, msg.h2
        t0 = time.perf_counter()
        step = lean_step(trainer, x1, x2, i)
        busy += time.perf_counter() - t0 if i >= warmup else 0.0
        if i == 0:
            output_bytes = [step.outputs[0][0].numel() * 4 * 2]  # both views of one image, float32
        if link is not None and not layout.last:
            link.send(Message(*step.outputs, labels, StepTerms()))
    if link is not None:
        link.flush()
    wall = time.perf_counter() - start
    report = {"rank": rank, "stage": layout.stage, "blocks": [k + 1 for k in layout.blocks], "busy_s": busy,
              "idle_s": wall - busy, "wall_s": wall, "images": steps * batch,
              "bytes_sent": link.bytes_sent if link else 0, "peak_rss_bytes": peak_rss(),
              "output_bytes_per_image": output_bytes[0], "block_seconds": block_seconds,
              "stages": [[k + 1 for k in s] for s in layout.stages]}
    Path(f"{out}.{rank}").write_text(json.dumps(report))
    if world > 1:
        dist.barrier()
        tdist.destroy_process_group()


def run_setting(name: str, overrides: list[str], steps: int, warmup: int, tmp: Path) -> dict[str, Any]:
    spec = {**SETTINGS[name], "measure_blocks": name == "1 process, 1 thread"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / name.replace(" ", "_").replace(",", "")
    print(f"  {name} ...", file=sys.stderr, flush=True)
    mp.spawn(_worker, args=(spec["world"], port, spec, overrides, steps, warmup, str(out)), nprocs=spec["world"],
             join=True)
    stages = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(spec["world"])]
    wall = max(s["wall_s"] for s in stages)
    return {"setting": name, **{k: v for k, v in spec.items() if k != "measure_blocks"},
            "images_per_s": stages[0]["images"] / wall, "stage_reports": stages}


def predict(block_seconds: list[float], batch: int, stages: list[list[int]],
            sent: tuple[list[float], float] | None = None) -> float:
    """Images/s of a pipeline: its slowest stage's max(compute, send) per batch; ``sent`` gives each block's output
    bytes per image and the link's bytes/s (None: communication never bounds, as measured here)."""
    per_batch = []
    for s, blocks in enumerate(stages):
        compute = sum(block_seconds[k] for k in blocks)
        send = sent[0][blocks[-1]] * batch / sent[1] if sent and s < len(stages) - 1 else 0.0
        per_batch.append(max(compute, send))
    return batch / max(per_batch)


def resnet50_figures(steps: int, overrides: list[str]) -> dict[str, Any]:
    """Per-block and end-to-end step seconds of the paper's model at 224 px, batch 8, on this CPU, with
    ``overrides``, and the parameters each block (with head and projector) and the end-to-end model train."""
    from blockssl.config import load_config
    from blockssl.cost import end_to_end_config
    from blockssl.execution import Trainer, build_optimizers, reference_step
    from blockssl.method import build_model
    from blockssl.pipeline import measure_block_seconds

    torch.set_num_threads(os.cpu_count() or 1)
    base = ["model.arch=resnet50", "model.width=1", "model.head_dim=2048", "model.projector=8192-8192-8192",
            "data.name=synthetic", "data.image_size=224", "train.batch_size=8", "train.device=cpu"]
    cfg = load_config(None, [*base, *overrides])
    blocks = measure_block_seconds(cfg, torch.device("cpu"), steps)
    e2e_cfg = end_to_end_config(cfg)
    model = build_model(e2e_cfg, 3, 224).train()
    trainer = Trainer(model, build_optimizers(model, e2e_cfg.train), torch.amp.GradScaler("cpu", enabled=False),
                      nullcontext(), 0)
    x = torch.randn(8, 3, 224, 224)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        reference_step(trainer, x, x, i)
        times.append(time.perf_counter() - t0)
    bw = build_model(cfg, 3, 224)
    params = [sum(p.numel() for m in bw.block_modules(k) for p in m.parameters()) for k in range(4)]
    with torch.no_grad():
        h, out_bytes = torch.zeros(1, 3, 224, 224), []
        for block in bw.blocks:
            h = block(h)
            out_bytes.append(h.numel() * 4 * 2)
    m = cfg.model
    projectors = ", ".join(dict.fromkeys(m.block_projectors or [m.projector]))
    return {"model": f"head {m.head} {m.head_dim}, projectors {projectors}",
            "batch": 8, "block_seconds": blocks, "end_to_end_seconds": sum(times[1:]) / steps,
            "block_params": params, "end_to_end_params": sum(p.numel() for p in model.parameters()),
            "block_output_bytes_per_image": out_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the barrier")
    parser.add_argument("--quick", action="store_true", help="a narrower model and batch 32: a smoke test")
    parser.add_argument("--paper", action="store_true", help="also measure ResNet-50 for the 16-device prediction")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the recipe and the ResNet-50 model, e.g. model.head=cbe_pooled")
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/pipeline_throughput"
                        "[_quick].json")
    args = parser.parse_args(argv)
    overrides = [*(QUICK if args.quick else []), *args.set]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"blockssl-pipeline-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    results = [run_setting(name, overrides, args.steps, args.warmup, tmp) for name in SETTINGS]

    base = results[0]
    block_seconds = base["stage_reports"][0]["block_seconds"]
    batch = _config(overrides, None).train.batch_size
    recipe = " ".join([RECIPE, *(["(quick)"] if args.quick else []), *args.set])
    lines = [f"Pipeline vs one process, {recipe}, batch {batch}, "
             f"{args.steps} timed steps, torch {torch.__version__}, {os.cpu_count()} CPUs", "",
             f"{'setting':<22} {'images/s':>9} {'vs 1 thread':>11}  per stage: blocks, busy s, idle s, "
             "sent bytes/image, peak RSS GB"]
    for r in results:
        stages = "; ".join(f"{s['blocks']} {s['busy_s']:.1f} {s['idle_s']:.1f} "
                           f"{s['bytes_sent'] / s['images']:.0f} {s['peak_rss_bytes'] / 2**30:.2f}"
                           for s in r["stage_reports"])
        lines.append(f"{r['setting']:<22} {r['images_per_s']:>9.1f} {r['images_per_s'] / base['images_per_s']:>10.2f}x"
                     f"  {stages}")
    # The analytic model on this machine: the link (shared memory through gloo) is not what bounds a stage.
    lines += ["", f"per-block step seconds at 1 thread (batch {batch}): "
              + ", ".join(f"{t:.3f}" for t in block_seconds)]
    predictions = {}
    for r in results[2:]:
        stages = [[k - 1 for k in s] for s in r["stage_reports"][0]["stages"]]
        p = predict(block_seconds, batch, stages)
        predictions[r["setting"]] = p
        lines.append(f"model: {r['setting']:<20} predicted {p:7.1f} images/s, measured {r['images_per_s']:7.1f} "
                     f"({r['images_per_s'] / p:.2f} of the prediction)")
    four = predict(block_seconds, batch, [[0], [1], [2], [3]])
    predictions["4 stages, one block each"] = four
    lines.append(f"model: 4 stages, one block each: {four:.1f} images/s "
                 f"({four / base['images_per_s']:.2f}x one single-thread process)")
    paper = None
    if args.paper:
        print("  ResNet-50 per-block times ...", file=sys.stderr, flush=True)
        paper = resnet50_figures(steps=2, overrides=args.set)
        t, b = paper["block_seconds"], paper["block_output_bytes_per_image"]
        one = paper["batch"] / paper["end_to_end_seconds"]  # one device, end to end
        # 16 devices: pipeline = 4 stages x 4 replicas (each replica chain its own batch); DP = 16 x one device.
        pipe16 = 4 * predict(t, paper["batch"], [[0], [1], [2], [3]], (b, LINK_GBPS * 1e9))
        dp16 = 16 * one
        state = [3 * 4 * n for n in paper["block_params"]]  # weights, gradients, LARS momentum (fp32)
        paper.update(one_device_e2e_images_per_s=one, pipeline_4x4_images_per_s=pipe16,
                     data_parallel_16_e2e_images_per_s=dp16, stage_state_bytes=state,
                     e2e_state_bytes=3 * 4 * paper["end_to_end_params"])
        lines += ["", f"ResNet-50, 224 px, {paper['model']} (this CPU, batch 8; ratios carry over, not "
                  "seconds): per-block step s " + ", ".join(f"{x:.2f}" for x in t)
                  + f"; end to end {paper['end_to_end_seconds']:.2f} s",
                  f"16 devices, relative to one device end to end: pipeline 4 stages x 4 replicas "
                  f"{pipe16 / one:.1f}x, data-parallel end to end {dp16 / one:.1f}x (no all-reduce cost counted)",
                  "per-device weights+gradients+momentum: pipeline stages "
                  + ", ".join(f"{s / 2**30:.2f}" for s in state)
                  + f" GiB; end to end {paper['e2e_state_bytes'] / 2**30:.2f} GiB; activation sent per image "
                  + ", ".join(f"{x / 2**20:.1f}" for x in b[:3]) + f" MiB (at {LINK_GBPS:.0f} GB/s)"]
    print("\n".join(lines))
    name = f"pipeline_throughput{'_quick' if args.quick else ''}.json"
    output = args.output or Path(__file__).parent / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    from blockssl.runtime import git_revision

    output.write_text(json.dumps({
        "command": sys.argv, "git_revision": git_revision(), "torch": torch.__version__,
        "platform": platform.platform(), "cpus": os.cpu_count(), "recipe": RECIPE, "overrides": overrides,
        "batch": batch, "steps": args.steps, "warmup": args.warmup, "results": results,
        "block_seconds": block_seconds, "predictions": predictions, "paper": paper, "table": lines}, indent=2) + "\n")
    print(f"\nwrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
