"""Online linear evaluation during pretraining: per-block accuracy curves in metrics.jsonl without a separate job.

As in solo-learn's online classifier and DINO-style online linear evaluation: one linear classifier per block
reads that block's head features of view 1, taken detached from the training forward (the vectors the offline
probe reads, here in train mode with noise and augmentation), and learns from the labels of the pretraining batch
with its own optimizer. Nothing flows back: the features are detached, the probe's parameters are its own, and
it leaves the global random stream untouched (zero-initialised, built under ``fork_rng``), so the model trains
bit-identically with the probe on or off.

Each block's features are standardised by a BatchNorm without affine parameters (running batch statistics, the
online counterpart of the offline probe's training-set standardisation; MAE's linear probe does the same), so one
constant learning rate suits every block while the features' scale drifts during pretraining.

The reported accuracy is progressive: each batch is scored before the probe learns from it, and the counts are
summed since the previous metrics line (kept in the probe's state, so resuming mid-window logs the same numbers).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blockssl import dist
from blockssl.config import OnlineProbeConfig

# Label of an image without one (e.g. STL-10's unlabeled split): skipped by the probe's loss and accuracy.
NO_LABEL = -1


class OnlineProbe(nn.Module):
    """Linear classifiers on the detached features of ``len(dims)`` blocks, with their own SGD optimizer.

    ``step(features, labels)`` trains on one batch; ``features`` may cover only the first blocks (the forward
    skips blocks after the last loss block). ``window_metrics()`` returns the averages since its last call.
    """

    correct: torch.Tensor
    seen: torch.Tensor
    loss_sum: torch.Tensor

    def __init__(self, dims: list[int], num_classes: int, cfg: OnlineProbeConfig) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False) for d in dims)
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws its default init: keep the run's RNG stream as is
            classifiers = [nn.Linear(d, num_classes) for d in dims]
        for linear in classifiers:  # zero start: the same probe in every process and on every resume
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.classifiers = nn.ModuleList(classifiers)
        n = len(dims)
        # Sums since the last metrics line, per block (in the state dict: a resumed run continues the window).
        self.register_buffer("correct", torch.zeros(n))
        self.register_buffer("seen", torch.zeros(n))
        self.register_buffer("loss_sum", torch.zeros(n))
        self.optimizer = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)

    def forward(self, features: list[torch.Tensor], first: int = 0) -> list[torch.Tensor]:
        """Logits of the classifiers of blocks ``first``, ``first + 1``, ... (as many as ``features``)."""
        blocks = range(first, first + len(features))
        return [self.classifiers[k](self.norms[k](f.float())) for f, k in zip(features, blocks, strict=True)]

    def step(self, features: list[torch.Tensor], labels: torch.Tensor, first: int = 0) -> dict[str, torch.Tensor]:
        """One SGD step of the classifiers of blocks ``first``, ``first + 1``, ... (a pipeline stage's) on this
        batch; returns this process's batch top-1 (percent, scored before the update) and cross-entropy per block,
        ``online/block{k}_top1`` and ``_loss``, as 0-d tensors on the features' device: training ignores them, so
        no step waits for a device-to-host copy."""
        if first + len(features) > len(self.classifiers):
            raise ValueError(f"{len(features)} feature sets from block {first + 1} for {len(self.classifiers)} "
                             "online classifiers")
        if labels.numel() and int(labels.max()) >= self.num_classes:  # on the loader's CPU tensor: no sync
            raise ValueError(f"online probe: label {int(labels.max())} outside the dataset's {self.num_classes} "
                             "classes; check data.name (or disable online_probe)")
        device = features[0].device if features else labels.device
        labels = labels.to(device, non_blocking=True)
        labelled = labels != NO_LABEL
        count = labelled.sum()
        self.train()
        with torch.enable_grad():
            logits = self([f.detach() for f in features], first)
            # Summed over labelled images, divided by at least 1: a batch without labels gives zero gradients (the
            # gradient all-reduce below still needs every process to take part), not NaN.
            losses = [F.cross_entropy(z, labels, ignore_index=NO_LABEL, reduction="sum") / count.clamp(min=1)
                      for z in logits]
            self.optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
        params = [p for p in self.parameters() if p.grad is not None]
        dist.average_gradients(params)  # the same update in every process, as for the model's parameters
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            blocks = slice(first, first + len(logits))
            correct = torch.stack([((z.argmax(1) == labels) & labelled).sum() for z in logits]).float()
            loss = torch.stack(losses).detach()
            self.correct[blocks] += correct
            self.seen[blocks] += count
            self.loss_sum[blocks] += loss * count
            values = {"top1": 100 * correct / count.clamp(min=1), "loss": loss}
        return {f"online/block{first + i + 1}_{name}": v[i] for name, v in values.items()
                for i in range(len(logits))}

    def window_metrics(self) -> dict[int, tuple[float, float]]:
        """Top-1 (percent) and mean loss per block (numbered from 0) over every labelled image since the last call,
        summed over processes; then the window restarts. Blocks that saw no labelled image are left out.

        Collective under torch.distributed: every process calls it at the same step (the logging step)."""
        sums = dist.all_reduce_sum(torch.stack([self.correct, self.seen, self.loss_sum]))
        correct, seen, loss = sums.cpu().tolist()
        for buffer in (self.correct, self.seen, self.loss_sum):
            buffer.zero_()
        return {k: (100.0 * correct[k] / n, loss[k] / n) for k, n in enumerate(seen) if n > 0}

    def checkpoint_state(self, blocks: list[int] | None = None) -> dict[str, Any]:
        """Classifiers, BatchNorm statistics, metric window and optimizer state, for the training checkpoint; with
        ``blocks``, marked as a pipeline stage's part, trusted for those blocks only (``merge_checkpoint_states``)."""
        state = {"module": self.state_dict(), "optimizer": self.optimizer.state_dict()}
        return state if blocks is None else {**state, "blocks": list(blocks)}

    def merge_checkpoint_states(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One ``checkpoint_state`` from pipeline stages' parts, each block's classifier, statistics, window and
        optimizer state taken from the part of the stage that trains it, matched by name."""
        names = [name for name, _ in self.named_parameters()]  # the optimizer's parameter order
        merged = copy.deepcopy({k: v for k, v in parts[0].items() if k != "blocks"})
        module, state = merged["module"], merged["optimizer"]["state"]
        for part in parts[1:]:
            blocks = part["blocks"]
            own = tuple(f"{kind}.{k}." for k in blocks for kind in ("norms", "classifiers"))
            for key, value in part["module"].items():
                if key.startswith(own):
                    module[key] = value
                elif key in ("correct", "seen", "loss_sum"):  # the metric window, one entry per block
                    module[key][blocks] = value[blocks]
            for index, name in enumerate(names):
                if name.startswith(own) and index in part["optimizer"]["state"]:
                    state[index] = part["optimizer"]["state"][index]
        return merged

    def load_checkpoint_state(self, state: dict[str, Any], cfg: OnlineProbeConfig) -> None:
        """Restore ``checkpoint_state``; lr, momentum and weight decay come from ``cfg`` (they may change on
        resume: the probe never reaches the model)."""
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
