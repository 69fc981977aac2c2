"""Per-block linear probes on frozen features, all blocks trained in one pass (fast and paper protocols), and kNN.

Features of block k are its head's pooled output, as in the paper. The backbone is frozen, in eval mode (noise
off), and its weights are checked bit-identical after evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from blockssl import dist
from blockssl.checkpoint import CheckpointError, atomic_save, atomic_write_text
from blockssl.config import Config, ConfigError, ProbeConfig, apply_overrides
from blockssl.data.datasets import build_dataset, dataset_info
from blockssl.data.transforms import eval_transform, probe_train_transform
from blockssl.loggers import Loggers, evaluation_loggers
from blockssl.method import BlockwiseSSL, build_model
from blockssl.models.heads import Head
from blockssl.names import probe_names
from blockssl.runtime import (
    autocast_context,
    checkpoint_model,
    progress_bar,
    require_out_dir,
    require_run_dir,
    resolve_device,
    seed_everything,
)


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
                     device: torch.device | str = "cpu", progress: bool = False
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's head features for every image of ``dataset`` (in order) and the labels."""
    feats, labels = extract_readouts(model, dataset, batch_size, num_workers, device, progress=progress)
    return feats["head"], labels


@torch.no_grad()
def extract_readouts(model: BlockwiseSSL, dataset: Dataset, batch_size: int, num_workers: int = 0,
                     device: torch.device | str = "cpu", readouts: Sequence[str] = ("head",), progress: bool = False
                     ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Every block's features under each readout (``BlockwiseSSL.readouts``) for every image of ``dataset`` (in
    order), and the labels; ``progress``: a progress bar over the batches.

    Under torch.distributed each process reads every world_size-th image (no padding, so no image is counted
    twice or dropped) and the shards are gathered back into dataset order in every process.
    """
    model.eval()
    shard = dist.shard_indices(len(dataset))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats: dict[str, list[list[torch.Tensor]]] = {r: [[] for _ in range(model.num_blocks)] for r in readouts}
    labels = []
    for x, y in progress_bar(loader, enabled=progress, desc="features", unit="batch", leave=False):
        for readout, blocks in model.readouts(x.to(device), readouts).items():
            for k, f in enumerate(blocks):
                feats[readout][k].append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    gathered = {readout: [dist.gather_in_order(torch.cat(f), shard, len(dataset)) for f in blocks]  # type: ignore[arg-type]
                for readout, blocks in feats.items()}
    return gathered, dist.gather_in_order(torch.cat(labels), shard, len(dataset))  # type: ignore[arg-type]


def _weights_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """The sanity check of Barlow Twins / MoCo v3: evaluation must not touch the backbone."""
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    if changed:
        raise AssertionError(f"the frozen model changed during evaluation: {changed[:5]}")


class LinearProbe(nn.Module):
    """A linear classifier on features standardised by ``mean`` and ``std`` (0 and 1: raw features)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def train_linear_probes(train_feats: list[torch.Tensor], train_labels: torch.Tensor, num_classes: int,
                        cfg: ProbeConfig, lr: float, seed: int,
                        on_epoch: Callable[[list[LinearProbe]], None] | None = None) -> list[LinearProbe]:
    """One linear probe per feature set, all trained in the same pass over shuffled mini-batches.

    SGD with momentum 0.9 and a cosine schedule; ``on_epoch`` sees the probes after every epoch.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if cfg.standardize:
        probes = [LinearProbe(f.mean(0), f.std(0) + 1e-6, num_classes) for f in train_feats]
    else:
        probes = [raw_probe(f.shape[1], num_classes) for f in train_feats]
    params = [p for probe in probes for p in probe.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    n = len(train_labels)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch: (s + 1) * batch]
            loss = sum(F.cross_entropy(probe(f[idx]), train_labels[idx]) for probe, f in zip(probes, train_feats,
                                                                                               strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(probes)
    return probes


def raw_probe(dim: int, num_classes: int) -> LinearProbe:
    """A probe on raw features, initialised as the reference evaluate.py: weights N(0, 0.01), zero bias."""
    probe = LinearProbe(torch.zeros(dim), torch.ones(dim), num_classes)
    nn.init.normal_(probe.linear.weight, std=0.01)
    nn.init.zeros_(probe.linear.bias)
    return probe


def with_concat(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each block's features, then all blocks concatenated (the "concat" probe)."""
    return [*features, torch.cat(features, dim=1)]


def load_probes(run_dir: str | Path, step: int) -> dict[str, LinearProbe]:
    """The probes ``blockssl probe`` saved in ``probes.pt`` (for robustness evaluation), which must have been
    trained on the features of the checkpoint of ``step``."""
    path = Path(run_dir) / "probes.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `blockssl probe {run_dir}` first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("step") != step:
        raise CheckpointError(f"{path} was trained on the checkpoint of step {saved.get('step')}, the run's last "
                              f"checkpoint is step {step}: run `blockssl probe {run_dir}` again")
    probes = {}
    for name, state in saved["probes"].items():
        probe = LinearProbe(state["mean"], state["std"], saved["num_classes"])
        probe.load_state_dict(state)
        probes[name] = probe.eval()
    return probes


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks if k <= logits.shape[1]}


@torch.no_grad()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, k: int, num_classes: int,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores of weighted kNN (Wu et al. 2018, as in DINO): cosine similarity, the k nearest vote with
    weight exp(sim / temperature)."""
    train = F.normalize(train, dim=1)
    scores = []
    for q in F.normalize(query, dim=1).split(chunk):
        sims, idx = (q @ train.T).topk(min(k, len(train)), dim=1)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def fast_probe(model: BlockwiseSSL, cfg: Config, seed: int = 0, device: str = "cpu", progress: bool = False
               ) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """Fast protocol: cached features, each probe's hyperparameter chosen per block on a held-out split of the
    training set.

    Returns the results (linear probe and kNN per block, through the heads in ``blocks`` and, with the ``pool``
    readout, by plain global pooling in ``pooled``) and the chosen probes of the head readout. ``progress``: progress
    bars of the feature extraction, kNN and fits.
    """
    pc = cfg.probe
    snapshot = _weights_snapshot(model)
    train_set, test_set = _eval_sets(cfg)
    workers = min(cfg.data.num_workers, 4)
    train_feats, train_labels = extract_readouts(model, train_set, pc.eval_batch_size, workers, device, pc.readouts,
                                                 progress)
    test_feats, test_labels = extract_readouts(model, test_set, pc.eval_batch_size, workers, device, pc.readouts,
                                               progress)
    assert_unchanged(model, snapshot)
    names = probe_names(model.num_blocks)
    results, chosen = fast_protocol(with_concat(train_feats["head"]), train_labels, with_concat(test_feats["head"]),
                                    test_labels, names, train_set.base, cfg, seed, progress)
    if "pool" in pc.readouts:
        # A block whose head is plain pooling reads the same features both ways: probed once, reported under both.
        plain = [cast(Head, head).plain for head in model.heads]
        plain.append(all(plain))  # the concatenation
        todo = [i for i, same in enumerate(plain) if not same]
        fit, test = ([feats[i] for i in todo] for feats in (with_concat(train_feats["pool"]),
                                                            with_concat(test_feats["pool"])))
        pooled = fast_protocol(fit, train_labels, test, test_labels, [names[i] for i in todo], train_set.base, cfg,
                               seed, progress)[0]["blocks"] if todo else {}
        results["pooled"] = {name: dict(results["blocks"][name]) if same else pooled[name]
                             for name, same in zip(names, plain, strict=True)}
    return results, chosen


def pixel_probe(cfg: Config, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """The raw-pixel baseline of the fast protocol: the evaluation transform's normalised image, flattened, is the
    feature vector (``pixels``), probed exactly as a block's features are. One process."""
    if cfg.probe.protocol != "fast":
        raise ConfigError("the raw-pixel probe follows the fast protocol only (probe.protocol=fast)")
    train_set, test_set = _eval_sets(cfg)
    (train_pixels, train_labels), (test_pixels, test_labels) = (
        _pixels(d, cfg.probe.eval_batch_size) for d in (train_set, test_set))
    return fast_protocol([train_pixels], train_labels, [test_pixels], test_labels, ["pixels"], train_set.base, cfg,
                         seed, progress)[0]


def _eval_sets(cfg: Config) -> tuple[Transformed, Transformed]:
    """The probes' training set and the set they are scored on: the test set, or while a recipe is tuned
    (``data.holdout``) held-out training images."""
    transform = eval_transform(dataset_info(cfg.data))
    return (Transformed(build_dataset(cfg.data, "train"), transform),
            Transformed(build_dataset(cfg.data, "holdout" if cfg.data.holdout else "test"), transform))


def _pixels(dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return torch.cat([x.flatten(1) for x, _ in batches]), torch.cat([torch.as_tensor(y) for _, y in batches])


def fast_protocol(train_feats: list[torch.Tensor], train_labels: torch.Tensor, test_feats: list[torch.Tensor],
                  test_labels: torch.Tensor, names: list[str], train_base: Dataset, cfg: Config, seed: int,
                  progress: bool = False) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """Linear probes (the solver's hyperparameter chosen on held-out training images), kNN and label-fraction probes
    on cached features, one set per name; ``train_base`` is the training set the features came from (for label
    subsets). ``progress``: progress bars of the kNN and the probes' fits."""
    info = dataset_info(cfg.data)
    pc = cfg.probe
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_labels), generator=g)
    n_val = max(1, int(pc.val_fraction * len(perm)))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    val = ([f[val_idx] for f in train_feats], train_labels[val_idx])
    best: dict[str, dict[str, Any]] = {name: {} for name in names}
    with progress_bar(total=len(names) * len(pc.knn_k), enabled=progress, desc="kNN", leave=False) as bar:
        for name, f_train, f_test in zip(names, train_feats, test_feats, strict=True):
            for k in pc.knn_k:
                scores = knn_predict(f_train, train_labels, f_test, k, info.num_classes, pc.knn_temperature)
                best[name][f"knn{k}_top1"] = topk_accuracy(scores, test_labels, (1,))["top1"]
                bar.update()
    fitted = select_linear_probes([f[fit_idx] for f in train_feats], train_labels[fit_idx], val, info.num_classes,
                                  pc, seed, test=(test_feats, test_labels), progress=progress)
    chosen: dict[str, LinearProbe] = {}
    with torch.no_grad():
        for name, (probe, choice), ft in zip(names, fitted, test_feats, strict=True):
            best[name].update(**choice, **topk_accuracy(probe(ft), test_labels))
            chosen[name] = probe
    for fraction in pc.label_fractions:
        subset = label_subset(train_base, fit_idx, train_labels, fraction, pc.label_subset_dir, seed)
        # SGD: as many steps as with all labels (few labels, more epochs)
        sub_cfg = dataclasses.replace(pc, epochs=math.ceil(pc.epochs * len(fit_idx) / len(subset)))
        fitted = select_linear_probes([f[subset] for f in train_feats], train_labels[subset], val, info.num_classes,
                                      sub_cfg, seed, progress=progress, desc=f"linear probes, {fraction:.0%} labels")
        with torch.no_grad():
            for name, (probe, _), ft in zip(names, fitted, test_feats, strict=True):
                best[name][f"labels{fraction * 100:g}pct_top1"] = topk_accuracy(probe(ft), test_labels, (1,))["top1"]
    results = {"protocol": "fast", "solver": pc.solver, **({"epochs": pc.epochs} if pc.solver == "sgd" else {}),
               "train_images": len(fit_idx), "val_images": n_val, "test_images": len(test_labels),
               "scored_on": "holdout" if cfg.data.holdout else "test", "blocks": best}
    return results, chosen


Choice = dict[str, Any]  # the chosen hyperparameter, its held-out top-1, the grid's held-out top-1s, whether on edge


def select_linear_probes(fit: list[torch.Tensor], fit_labels: torch.Tensor,
                         val: tuple[list[torch.Tensor], torch.Tensor], num_classes: int, pc: ProbeConfig, seed: int,
                         test: tuple[list[torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
                         desc: str = "linear probes") -> list[tuple[LinearProbe, Choice]]:
    """One probe per feature set, fitted on ``fit`` by ``pc.solver`` at every value of its grid (``weight_decays``
    for lbfgs, ``lrs`` for sgd) and chosen by top-1 on ``val`` (held-out training images). ``test``: also record the
    SGD probes' test curves, for the optimistic best-epoch figure of the reference scripts. ``progress``: a progress
    bar (``desc``) over the lbfgs fits, or the SGD epochs."""
    key, grid = ("weight_decay", pc.weight_decays) if pc.solver == "lbfgs" else ("lr", pc.lrs)
    # Strongest regularisation first: each lbfgs fit starts from the previous one's solution, and a tie goes to it.
    order = sorted(grid, reverse=key == "weight_decay")
    scores: list[list[float]] = [[] for _ in fit]
    candidates: list[list[tuple[LinearProbe, dict[str, Any]]]] = [[] for _ in fit]
    previous: list[LinearProbe | None] = [None] * len(fit)
    bar = progress_bar(total=len(order) * (len(fit) if pc.solver == "lbfgs" else pc.epochs), enabled=progress,
                       desc=desc, unit="fit" if pc.solver == "lbfgs" else "epoch", leave=False)
    for value in order:
        if pc.solver == "lbfgs":
            fits = []
            for i, f in enumerate(fit):
                probe, iterations = fit_logistic(f, fit_labels, num_classes, value, pc.max_iter, pc.standardize,
                                                 init=previous[i])
                previous[i] = probe
                fits.append((probe, {"iterations": iterations}))
                bar.update()
        else:
            curves: list[list[float]] = [[] for _ in fit]
            probes = train_linear_probes(fit, fit_labels, num_classes, pc, value, seed, _after_epoch(bar, curves, test))
            fits = [(probe, best_epoch(curve) if test is not None else {}) for probe, curve in
                    zip(probes, curves, strict=True)]
        with torch.no_grad():
            for i, (probe, extra) in enumerate(fits):
                scores[i].append(topk_accuracy(probe(val[0][i]), val[1], (1,))["top1"])
                candidates[i].append((probe, extra))
    bar.close()
    chosen = []
    for score, cands in zip(scores, candidates, strict=True):
        i = max(range(len(order)), key=lambda j: (score[j], -j))  # the first best in grid order
        probe, extra = cands[i]
        chosen.append((probe, {key: order[i], "val_top1": score[i], "on_grid_edge": len(order) > 1 and order[i] in
                               (min(order), max(order)), "grid_val_top1": {f"{v:g}": a for v, a in
                                                                           zip(order, score, strict=True)},
                               **extra}))
    return chosen


def _after_epoch(bar: tqdm, curves: list[list[float]], test: tuple[list[torch.Tensor], torch.Tensor] | None
                 ) -> Callable[[list[LinearProbe]], None]:
    """What follows each SGD epoch: with ``test`` features, every probe's test top-1 appended to its curve; the
    progress bar moved on."""
    @torch.no_grad()
    def after(probes: list[LinearProbe]) -> None:
        if test is not None:
            for curve, probe, f in zip(curves, probes, test[0], strict=True):
                curve.append(topk_accuracy(probe(f), test[1], (1,))["top1"])
        bar.update()
    return after


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int, standardize: bool = True, init: LinearProbe | None = None
                 ) -> tuple[LinearProbe, int]:
    """Multinomial logistic regression: minimises the mean cross-entropy + ``weight_decay`` / 2 x |W|^2 (biases
    unpenalised) by full-batch L-BFGS with a strong-Wolfe line search until no gradient entry exceeds 1e-4, from zero
    or from ``init`` (a convex problem: the start changes only the time to its optimum). Returns the probe and the
    iterations run (``max_iter``: stopped before that tolerance). Features standardised by their mean and std when
    ``standardize``, as the SGD probes'."""
    if init is not None:
        probe = copy.deepcopy(init)
    else:
        mean, std = (features.mean(0), features.std(0) + 1e-6) if standardize else (
            torch.zeros(features.shape[1]), torch.ones(features.shape[1]))
        probe = LinearProbe(mean, std, num_classes).to(features.device)
        nn.init.zeros_(probe.linear.weight)
        nn.init.zeros_(probe.linear.bias)
    x = (features - probe.mean) / probe.std
    linear = probe.linear
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-4,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(linear(x), labels) + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe, int(opt.state[linear.weight].get("n_iter", 0))


def best_epoch(curve: list[float]) -> dict[str, Any]:
    """The best epoch of a test top-1 curve (numbered from 1) and its accuracy: the optimistic figure the reference
    script reports; ``top1`` / ``top5`` stay the final epoch's."""
    epoch = max(range(len(curve)), key=curve.__getitem__)
    return {"best_top1": curve[epoch], "best_epoch": epoch + 1, "curve_top1": curve}


def paper_probe(model: BlockwiseSSL, cfg: Config, seed: int = 0, device: str = "cpu", progress: bool = False
                ) -> tuple[dict[str, Any], dict[str, LinearProbe]]:
    """The paper's protocol, as the authors' ``evaluate.py`` (after Barlow Twins'): every probe trained in one pass
    per epoch through the frozen backbone on RandomResizedCrop + flip images (bilinear), on raw features, weights
    initialised N(0, 0.01) and biases 0, SGD momentum 0.9 at ``probe.lr`` (0.1) with weight decay
    ``probe.weight_decay`` (1e-6), batch ``probe.batch_size`` (256), a cosine stepped once per epoch over
    ``probe.epochs`` (100); evaluated after every epoch on Resize + CenterCrop test images. Reports the final epoch
    and, beside it, the best (what the reference reports).

    Under torch.distributed the global batch is split across processes, the probes' gradients are averaged, and
    test counts are summed exactly (each process evaluates every world_size-th test image). ``progress``: progress
    bars over the epochs and each epoch's batches.
    """
    info = dataset_info(cfg.data)
    pc = cfg.probe
    world = dist.world_size()
    if pc.batch_size % world:
        raise ConfigError(f"probe.batch_size={pc.batch_size} is not divisible by the {world} processes")
    snapshot = _weights_snapshot(model)
    model.eval()
    train_set = Transformed(build_dataset(cfg.data, "train"), probe_train_transform(info))
    test_set = Transformed(build_dataset(cfg.data, "test"), eval_transform(info))
    workers = min(cfg.data.num_workers, 8)
    torch.manual_seed(seed)  # augmentation draws and probe initialisation
    autocast = autocast_context(cfg.train.amp, torch.device(device))  # the backbone forward in the run's precision
    dims = [*model.feature_dims, sum(model.feature_dims)]
    probes = [raw_probe(d, info.num_classes).to(device) for d in dims]
    dist.broadcast_state(nn.ModuleList(probes))
    params = [p for probe in probes for p in probe.parameters()]
    opt = torch.optim.SGD(params, lr=pc.lr, momentum=0.9, weight_decay=pc.weight_decay)
    sampler: DistributedSampler[int] = DistributedSampler(train_set, num_replicas=world, rank=dist.rank(), seed=seed,
                                                          drop_last=True)
    loader = DataLoader(train_set, batch_size=pc.batch_size // world, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=cfg.data.pin_memory and device != "cpu")
    if len(loader) == 0:
        raise ConfigError(f"probe.batch_size={pc.batch_size} is larger than the {len(train_set)} training images")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, pc.epochs)
    test_loader = DataLoader(Subset(test_set, dist.shard_indices(len(test_set))), batch_size=pc.eval_batch_size,
                             num_workers=workers)
    curves: list[list[dict[str, float]]] = [[] for _ in probes]
    names = probe_names(model.num_blocks)
    bar = progress_bar(range(pc.epochs), enabled=progress, desc="paper probe", unit="epoch")
    for epoch in bar:
        sampler.set_epoch(epoch)
        for probe in probes:
            probe.train()
        for x, y in progress_bar(loader, enabled=progress, desc=f"epoch {epoch + 1}", unit="batch", leave=False):
            with torch.no_grad(), autocast:
                feats = with_concat(model.features(x.to(device, non_blocking=True)))
            y = y.to(device, non_blocking=True)
            loss = sum(F.cross_entropy(probe(f.float()), y) for probe, f in zip(probes, feats, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            dist.average_gradients(params)
            opt.step()
        sched.step()
        for curve, accuracy in zip(curves, _test_accuracy(model, probes, test_loader, device, autocast), strict=True):
            curve.append(accuracy)
        bar.set_postfix({name: f"{curve[-1]['top1']:.1f}" for name, curve in zip(names, curves, strict=True)})
    assert_unchanged(model, snapshot)
    blocks = {name: {"lr": pc.lr, **curve[-1], **best_epoch([a["top1"] for a in curve])}
              for name, curve in zip(names, curves, strict=True)}
    results = {"protocol": "paper", "epochs": pc.epochs, "train_images": len(train_set),
               "test_images": len(test_set), "blocks": blocks}
    return results, {name: probe.cpu().eval() for name, probe in zip(names, probes, strict=True)}


@torch.no_grad()
def _test_accuracy(model: BlockwiseSSL, probes: list[LinearProbe], loader: DataLoader, device: str, autocast: Any
                   ) -> list[dict[str, float]]:
    """Top-1 and top-5 of every probe on the test images, counted exactly across processes."""
    for probe in probes:
        probe.eval()
    hits = torch.zeros(len(probes), 2, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        y = y.to(device)
        with autocast:
            feats = with_concat(model.features(x.to(device)))
        for i, (probe, f) in enumerate(zip(probes, feats, strict=True)):
            top = probe(f.float()).topk(min(5, probe.linear.out_features), dim=1).indices == y[:, None]
            hits[i] += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
        count += len(y)
    accuracy = 100.0 * dist.all_reduce_sum(hits) / dist.all_reduce_sum(count)
    return [{"top1": a[0].item(), "top5": a[1].item()} for a in accuracy.cpu()]


PROTOCOLS = {"fast": fast_probe, "paper": paper_probe}


def subset_list(subset_dir: str, fraction: float) -> Path:
    """The file of ``probe.label_subset_dir`` that lists the images of a label ``fraction``."""
    return Path(subset_dir) / f"{fraction * 100:g}percent.txt"


def label_subset(dataset: Dataset, candidates: torch.Tensor, labels: torch.Tensor, fraction: float,
                 subset_dir: str, seed: int) -> torch.Tensor:
    """Indices of a semi-supervised label subset among ``candidates`` (the training images the probes may use).

    From ``subset_dir``: the standard ImageNet lists (``1percent.txt``, ``10percent.txt``: one file name per
    line, as released with SimCLR), matched by file name in an ImageFolder dataset. Otherwise a seeded
    stratified sample: the same fraction of every class, at least one image each.
    """
    if subset_dir:
        path = subset_list(subset_dir, fraction)
        if not path.is_file() or not hasattr(dataset, "samples"):
            raise FileNotFoundError(f"{path}: label subset list not found (or the dataset is not an ImageFolder); "
                                    "leave probe.label_subset_dir empty for stratified subsets")
        names = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        allowed = set(candidates.tolist())
        chosen = [i for i, (file, _) in enumerate(dataset.samples) if Path(file).name in names and i in allowed]
        if not chosen:
            raise ValueError(f"{path}: none of its file names is among the training images")
        return torch.tensor(chosen)
    g = torch.Generator().manual_seed(seed + 1)
    picked = []
    for c in labels[candidates].unique():
        members = candidates[labels[candidates] == c]
        take = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.cat(picked).sort().values


def _check_settings(cfg: Config, pixels: bool) -> None:
    """What the probe settings need, checked before any feature is extracted."""
    pc = cfg.probe
    if pixels and pc.protocol != "fast":
        raise ConfigError("--pixels: the raw-pixel probe follows the fast protocol only; drop --pixels or set "
                          "probe.protocol=fast")
    if pc.protocol == "fast" and pc.label_subset_dir:  # read after the extraction and the full-label fits
        if cfg.data.name != "imagefolder":
            raise ConfigError(f"probe.label_subset_dir lists ImageNet file names, this run is on data.name="
                              f"{cfg.data.name}; leave probe.label_subset_dir empty for stratified subsets")
        for fraction in pc.label_fractions:
            if not subset_list(pc.label_subset_dir, fraction).is_file():
                raise FileNotFoundError(f"{subset_list(pc.label_subset_dir, fraction)}: label subset list not found "
                                        f"for probe.label_fractions={pc.label_fractions}; leave "
                                        "probe.label_subset_dir empty for stratified subsets")


def run_probe(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *, random_init: bool = False,
              pixels: bool = False, progress: bool = True, out: str | Path | None = None) -> dict[str, Any]:
    """Probe a run's last checkpoint and, as references, optionally the same architecture at random initialisation
    (``random_init``) and raw pixels under the same protocol (``pixels``, fast protocol). ``progress``: progress
    bars (``blockssl.runtime.progress_bar``).

    Writes ``probe.json`` (results) and ``probes.pt`` (the chosen probes) in the run directory, logs the accuracies
    to the run's loggers (``probe_scalars``) at the checkpoint's step, and returns the results. With ``out``, both
    files go into that folder instead and the run is left as it is: for trying other probe settings without
    replacing the run's own results (which robustness and studies read).
    """
    run_dir = require_run_dir(run_dir, "blockssl probe runs/demo")
    into = run_dir if out is None else require_out_dir(out, "--out")
    dist.init_from_environment()
    device = str(resolve_device("auto"))
    model, cfg, step = checkpoint_model(run_dir, device)
    apply_overrides(cfg, overrides, ("probe", "data"))
    _check_settings(cfg, pixels)
    # a missing package fails now; results written elsewhere are not the run's, so its loggers do not see them
    loggers = evaluation_loggers(cfg, run_dir) if dist.is_main_process() and out is None else Loggers()
    protocol = PROTOCOLS[cfg.probe.protocol]
    run_results, probes = protocol(model, cfg, seed=cfg.seed, device=device, progress=progress)
    results: dict[str, Any] = {"checkpoint_step": step, "run": run_results}
    info = dataset_info(cfg.data)
    if random_init or cfg.probe.random_init:
        seed_everything(cfg.seed)
        reference = build_model(cfg, info.channels, info.image_size).to(device)
        results["random_init"] = protocol(reference, cfg, seed=cfg.seed, device=device, progress=progress)[0]
    if not dist.is_main_process():
        return results
    if pixels:
        results["pixels"] = pixel_probe(cfg, seed=cfg.seed, progress=progress)
    into.mkdir(parents=True, exist_ok=True)
    atomic_save({"num_classes": info.num_classes, "step": step,
                 "probes": {name: p.state_dict() for name, p in probes.items()}}, into / "probes.pt")
    atomic_write_text(into / "probe.json", json.dumps(results, indent=2) + "\n")
    with loggers:
        loggers.log({"step": step, **probe_scalars(results)})
    return results


# probe.json's accuracies under the names they are logged with; kNN (knn{k}_top1) and label-fraction
# (labels{p}pct_top1) accuracies keep theirs.
LOGGED_ACCURACIES = {"top1": "linear_top1", "top5": "linear_top5", "best_top1": "linear_best_top1"}


def probe_scalars(results: dict[str, Any]) -> dict[str, float]:
    """``run_probe``'s accuracies as logger scalars: ``probe/{block}_linear_top1`` (and ``_linear_top5``,
    ``_linear_best_top1`` for SGD), ``probe/{block}_knn{k}_top1``, ``probe/{block}_labels{p}pct_top1``; the pool
    readout under ``probe/pooled/``, the random-init reference under ``probe/random_init/``, raw pixels as
    ``probe/pixels_*``."""
    run, rand = results["run"], results.get("random_init", {})
    sections = [("probe/", run["blocks"]), ("probe/pooled/", run.get("pooled", {})),
                ("probe/random_init/", rand.get("blocks", {})), ("probe/random_init/pooled/", rand.get("pooled", {})),
                ("probe/", results.get("pixels", {}).get("blocks", {}))]
    return {f"{prefix}{name}_{LOGGED_ACCURACIES.get(key, key)}": value
            for prefix, rows in sections for name, row in rows.items() for key, value in row.items()
            if key in LOGGED_ACCURACIES or key.startswith(("knn", "labels"))}


def print_probe_table(results: dict[str, Any]) -> None:
    """Linear-probe top-1 / top-5 (SGD: also the best epoch), kNN and label-fraction top-1 per block, through each
    block's head and, below, by plain pooling; raw pixels last; with a random-init reference, its scores beside in
    brackets. Choices on the edge of their grid are listed under the table."""
    run = results["run"]
    rand = results.get("random_init", {})
    first = next(iter(run["blocks"].values()))
    knn = sorted((k for k in first if k.startswith("knn")), key=lambda k: int(k[3:].split("_")[0]))
    fractions = [k for k in first if k.startswith("labels")]
    columns = ["top1", "top5", *(["best_top1"] if "best_top1" in first else []), *knn, *fractions]
    titles = ["linear top-1", "linear top-5", *(["best-epoch top-1"] if "best_top1" in first else []),
              *(k.replace("_top1", " top-1").replace("knn", "kNN k=") for k in knn),
              *(k.replace("labels", "top-1, ").replace("pct_top1", "% labels") for k in fractions)]
    solver = f" ({run['solver']})" if "solver" in run else ""
    scored = "held-out training images" if run.get("scored_on") == "holdout" else "the test set"
    print(f"{run['protocol']} protocol{solver}, scored on {scored} ({run['test_images']} images); accuracy in %"
          + ("; random init in brackets" if rand else ""))
    print(f"{'features':<15}" + "".join(f" {t:>17}" for t in titles))
    sections = [("", run["blocks"], rand.get("blocks", {})), ("pooled ", run.get("pooled", {}), rand.get("pooled", {})),
                ("", results.get("pixels", {}).get("blocks", {}), {})]
    edges = []
    for prefix, rows, reference in sections:
        for name, r in rows.items():
            cells = [f"{r[c]:.2f}" + (f" ({reference[name][c]:.2f})" if name in reference else "") for c in columns
                     if c in r]
            print(f"{prefix + name:<15}" + "".join(f" {c:>17}" for c in cells))
            if r.get("on_grid_edge"):
                key = "weight_decay" if "weight_decay" in r else "lr"
                edges.append(f"{prefix + name} ({key} {r[key]:g})")
    if edges:
        print("chosen on the edge of their grid (widen probe.weight_decays or probe.lrs): " + ", ".join(edges))
