"""Deterministic pretraining batches: data order and augmentations are functions of (seed, epoch, index).

The sampler yields ``(epoch, index)`` pairs and the dataset seeds each sample's augmentation from them, so a
run gives the same batches with any number of workers, resumes mid-epoch exactly, and a global batch split
across processes holds the same images, augmented the same way, as in one process.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from blockssl.config import Config, ConfigError
from blockssl.data.datasets import BadImageError, DatasetInfo, build_dataset, dataset_info
from blockssl.data.transforms import two_view_transforms

MAX_REPLACEMENTS = 16


class EpochSampler(Sampler[tuple[int, int]]):
    """This process's share of each global batch of a seeded per-epoch permutation; the last partial batch dropped.

    Global batch ``s`` is ``perm[s*B:(s+1)*B]`` and process ``r`` of ``w`` takes the r-th contiguous slice of it.
    ``start(epoch, step)`` positions the sampler for resuming.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {world} processes")
        if size < global_batch:
            raise ConfigError(f"train.batch_size={global_batch} is larger than the dataset ({size} images); "
                             "lower it or use more data")
        self.size, self.global_batch, self.seed, self.rank, self.world = size, global_batch, seed, rank, world
        self.epoch, self.first_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def start(self, epoch: int, step_in_epoch: int = 0) -> None:
        self.epoch, self.first_step = epoch, step_in_epoch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.first_step) * (self.global_batch // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        local = self.global_batch // self.world
        for step in range(self.first_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * local
            for i in perm[begin: begin + local]:
                yield self.epoch, i


class TwoViews(Dataset):
    """``dataset[(epoch, i)]`` -> (view1, view2, label, replaced); the views' randomness is seeded by (seed, epoch, i).
    A view is a normalised image, or with ``data.photometric=device`` a ``uint8`` crop and its colour parameters
    (``blockssl.data.photometric.to_device`` finishes a batch of either on the training device).

    ``label`` is the image's class (an int, read only by the optional online probe), -1 when the dataset has none
    (e.g. STL-10's unlabeled split). An unreadable image is replaced by the next readable one, whose label comes
    with it, and ``replaced`` is 1, so the training process can count it (workers cannot log reliably); with
    ``strict`` it stops the run, naming the file.
    """

    def __init__(self, base: Dataset, transforms: tuple[Callable, Callable], seed: int, strict: bool = False,
                 info: DatasetInfo | None = None) -> None:
        self.base, self.transforms, self.seed, self.strict, self.info = base, transforms, seed, strict, info

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, int, int]:
        epoch, i = key
        image, target, replaced = None, None, 0
        for attempt in range(MAX_REPLACEMENTS):
            try:
                image, target = self.base[(i + attempt) % len(self)]
                break
            except BadImageError as e:
                if self.strict:
                    raise BadImageError(f"{e} (data.strict=true; set it false to skip and count such files)") from None
                replaced = 1
        if image is None:
            raise BadImageError(f"{MAX_REPLACEMENTS} unreadable images in a row from index {i}: check data.root")
        # fork_rng: the global RNG of the training process is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63)
            views = self.transforms[0](image), self.transforms[1](image)
        return *views, -1 if target is None else int(target), replaced


def two_view_dataset(cfg: Config) -> TwoViews:
    """The pretraining set of ``cfg`` with its two-view augmentation preset (``data.augment``, auto = the loss's)."""
    info = dataset_info(cfg.data)
    preset = cfg.loss.name if cfg.data.augment == "auto" else cfg.data.augment
    transforms = two_view_transforms(preset, info, cfg.data.min_crop_scale, cfg.data.blur, cfg.data.blur_impl,
                                     cfg.data.photometric)
    return TwoViews(build_dataset(cfg.data, "pretrain"), transforms, cfg.seed, strict=cfg.data.strict, info=info)


def pretrain_loader(views: TwoViews, sampler: EpochSampler, *, num_workers: int, pin_memory: bool,
                    persistent_workers: bool) -> DataLoader:
    return DataLoader(views, batch_size=sampler.global_batch // sampler.world, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None,
                      # Its own generator: creating an iterator must not draw from the global RNG.
                      generator=torch.Generator(), worker_init_fn=_ignore_stop_signals if num_workers else None)


def shutdown_workers(batches: Iterator[Any] | None) -> None:
    """End a loader iterator's worker processes now (a no-op without workers). Called when training stops on an
    error: the traceback keeps the iterator alive past the point where it would shut its workers down, and at exit
    multiprocessing joins them after a SIGTERM that they ignore (``_ignore_stop_signals``), so the process, and the
    run's other processes waiting for it, would never end."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch has no public close for a loader's iterator
    if shutdown is not None:
        shutdown()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM and SIGINT to the training process: a scheduler or Ctrl-C signals the whole process
    group, and a worker dying of it would make the loader raise before the training process checkpoints."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
