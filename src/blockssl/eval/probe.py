"""Per-block linear probes on frozen features, all blocks trained in one pass (fast protocol).

Features of block k are its head's pooled output, as in the paper. The backbone is frozen, in eval mode (noise
off), and its weights are checked bit-identical after evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from blockssl.config import Config, ProbeConfig, _apply, validate
from blockssl.data.datasets import build_dataset, dataset_info
from blockssl.data.transforms import eval_transform
from blockssl.method import BlockwiseSSL, build_model
from blockssl.train import checkpoint_model, seed_everything


class Transformed(Dataset):
    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


@torch.no_grad()
def extract_features(model: BlockwiseSSL, dataset: Dataset, batch_size: int, num_workers: int = 0,
                     device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's features for every image of ``dataset`` (in order) and the labels."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats: list[list[torch.Tensor]] = [[] for _ in range(model.num_blocks)]
    labels = []
    for x, y in loader:
        for k, f in enumerate(model.features(x.to(device))):
            feats[k].append(f.float().cpu())
        labels.append(y)
    return [torch.cat(f) for f in feats], torch.cat(labels)


def _weights_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """The sanity check of Barlow Twins / MoCo v3: evaluation must not touch the backbone."""
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    if changed:
        raise AssertionError(f"the frozen model changed during evaluation: {changed[:5]}")


def train_linear_probes(train_feats: list[torch.Tensor], train_labels: torch.Tensor, num_classes: int,
                        cfg: ProbeConfig, lr: float, seed: int) -> list[nn.Linear]:
    """One linear classifier per feature set, all trained in the same pass over shuffled mini-batches.

    SGD with momentum 0.9 and a cosine schedule, on features standardised with the training statistics.
    """
    g = torch.Generator().manual_seed(seed)
    probes = [nn.Linear(f.shape[1], num_classes) for f in train_feats]
    params = [p for probe in probes for p in probe.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    n = len(train_labels)
    steps_per_epoch = max(1, n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size: (s + 1) * cfg.batch_size]
            loss = sum(F.cross_entropy(probe(f[idx]), train_labels[idx]) for probe, f in zip(probes, train_feats,
                                                                                               strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
    return probes


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks if k <= logits.shape[1]}


def _standardize(train: list[torch.Tensor], *others: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    stats = [(f.mean(0), f.std(0) + 1e-6) for f in train]
    return [[(f - m) / s for f, (m, s) in zip(feats, stats, strict=True)] for feats in (train, *others)]


def fast_probe(model: BlockwiseSSL, cfg: Config, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Fast protocol: cached features, an lr per block chosen on a held-out split of the training set."""
    info = dataset_info(cfg.data)
    transform = eval_transform(info)
    pc = cfg.probe
    snapshot = _weights_snapshot(model)
    train_set = Transformed(build_dataset(cfg.data, "train"), transform)
    test_set = Transformed(build_dataset(cfg.data, "test"), transform)
    workers = min(cfg.data.num_workers, 4)
    train_feats, train_labels = extract_features(model, train_set, pc.eval_batch_size, workers, device)
    test_feats, test_labels = extract_features(model, test_set, pc.eval_batch_size, workers, device)
    assert_unchanged(model, snapshot)
    train_feats.append(torch.cat(train_feats, dim=1))  # every block together
    test_feats.append(torch.cat(test_feats, dim=1))
    names = [f"block{k + 1}" for k in range(model.num_blocks)] + ["concat"]

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_labels), generator=g)
    n_val = max(1, int(pc.val_fraction * len(perm)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    fit, val, test = _standardize([f[fit_idx] for f in train_feats], [f[val_idx] for f in train_feats], test_feats)
    best: dict[str, dict[str, Any]] = {}
    for lr in pc.lrs:
        probes = train_linear_probes(fit, train_labels[fit_idx], info.num_classes, pc, lr, seed)
        with torch.no_grad():
            for name, probe, fv, ft in zip(names, probes, val, test, strict=True):
                val_acc = topk_accuracy(probe(fv), train_labels[val_idx])["top1"]
                if name not in best or val_acc > best[name]["val_top1"]:
                    best[name] = {"lr": lr, "val_top1": val_acc, **topk_accuracy(probe(ft), test_labels)}
    return {"protocol": "fast", "epochs": pc.epochs, "train_images": len(fit_idx), "val_images": n_val,
            "test_images": len(test_labels), "blocks": best}


def run_probe(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *, random_init: bool = False
              ) -> dict[str, Any]:
    """Probe a run's last checkpoint (and optionally the same architecture at random initialisation).

    Writes ``probe.json`` in the run directory and returns its content.
    """
    from blockssl.config import parse_override

    run_dir = Path(run_dir)
    model, cfg = checkpoint_model(run_dir)
    for text in overrides:
        override = parse_override(text)
        if set(override) - {"probe", "data"}:
            raise ValueError(f"{text!r}: probe accepts probe.* and data.* keys only")
        _apply(cfg, override)
    validate(cfg)
    results: dict[str, Any] = {"run": fast_probe(model, cfg, seed=cfg.seed)}
    if random_init:
        seed_everything(cfg.seed)
        info = dataset_info(cfg.data)
        results["random_init"] = fast_probe(build_model(cfg, info.channels, info.image_size), cfg, seed=cfg.seed)
    (run_dir / "probe.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_probe_table(results: dict[str, Any]) -> None:
    """Top-1 / top-5 per block; with a random-init reference, its top-1 beside the run's."""
    run = results["run"]["blocks"]
    rand = results.get("random_init", {}).get("blocks")
    header = f"{'features':<10} {'top-1':>7} {'top-5':>7}" + (f" {'random-init top-1':>18}" if rand else "")
    print(f"linear probe ({results['run']['protocol']} protocol, test set of {results['run']['test_images']} images)")
    print(header)
    for name, r in run.items():
        line = f"{name:<10} {r['top1']:>7.2f} {r.get('top5', float('nan')):>7.2f}"
        if rand:
            line += f" {rand[name]['top1']:>18.2f}"
        print(line)
