"""Corruption robustness of the per-block linear probes: the ImageNet-C protocol of Hendrycks & Dietterich (ICLR 2019,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations").

Every block's probe (and the concat probe) is evaluated on the 15 corruptions at severities 1-5, from either
- ``robustness.source=folder``: a pre-generated ImageNet-C tree ``<root>/<corruption>/<severity>/<class>/<image>``
  (the standard for ImageNet), whose images are already framed (Resize 256 + CenterCrop 224 of the validation set)
  and are only normalised, as in Hendrycks' ``test.py``, so that clean and corrupted errors see the same framing; or
- ``robustness.source=generate``: the run's test split corrupted on the fly with the maintained fork of the
  authors' code (``imagecorruptions-imaug``, imported as ``imagecorruptions``), cached as uint8 arrays under
  ``<cache_dir>/<dataset>-<n>-<seed>-<fingerprint>/<corruption>/<severity>.npz`` (default cache_dir:
  ``<run_dir>/../.corruption-cache``, shared by sibling runs such as a baseline) and reproducible from
  ``robustness.seed``. The corruption parameters are ImageNet's (calibrated for 224 px); on 32 px images some
  (zoom, defocus, glass blur, pixelate) are relatively much stronger, so compare runs with each other, not with
  published ImageNet-C numbers.

Scores (errors in %): for block b, corruption c and severity s the top-1 error E_{s,c}; with a baseline run
CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} and mCE = mean_c CE_c, and relative CE_c =
sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean), relative mCE = mean_c (both in %, so the baseline
scores 100). The baseline is another blockssl run (``--baseline RUN_DIR``: each block against the baseline's, or all
against one of its blocks) or, on ImageNet, AlexNet (``--baseline alexnet``: its published errors), the normaliser of
the original benchmark. Without a baseline only the unnormalised mean corruption error (mean over c and s of E) is
reported.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from blockssl import dist
from blockssl.checkpoint import CheckpointError, atomic_write, atomic_write_text, load_checkpoint
from blockssl.config import Config, ConfigError, apply_overrides, from_dict, parse_blocks
from blockssl.data.datasets import ArrayImages, build_dataset, dataset_info, load_rgb
from blockssl.data.transforms import eval_transform, pregenerated_transform
from blockssl.eval.probe import (
    LinearProbe,
    Transformed,
    assert_unchanged,
    extract_features,
    load_probes,
    topk_accuracy,
    with_concat,
)
from blockssl.loggers import Loggers, evaluation_loggers
from blockssl.method import BlockwiseSSL
from blockssl.names import probe_names
from blockssl.runtime import CHECKPOINT, checkpoint_model, progress_bar, require_run_dir, resolve_device

# The 15 ImageNet-C corruptions, in the benchmark's order (noise, blur, weather, digital).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the library refuses smaller images
LIBRARY = "imagecorruptions-imaug"
CSV_COLUMNS = ("block", "corruption", "severity", "top1_error", "clean_error", "error_increase", "baseline_top1_error")

Errors = dict[str, dict[int, float]]  # corruption -> severity -> top-1 error (%)

# AlexNet on ImageNet-C: top-1 error (%) per corruption, averaged over severities 1-5, as published with the
# benchmark's code (hendrycks/robustness), and its clean top-1 error (torchvision's AlexNet, the weights the
# benchmark evaluated: 56.52% top-1). CE and relative CE need only these sums over severities.
ALEXNET = "alexnet"
ALEXNET_ERRORS = {
    "gaussian_noise": 88.6428, "shot_noise": 89.4468, "impulse_noise": 92.2640, "defocus_blur": 81.9880,
    "glass_blur": 82.6268, "motion_blur": 78.5948, "zoom_blur": 79.8360, "snow": 86.6816, "frost": 82.6572,
    "fog": 81.9324, "brightness": 56.4592, "contrast": 85.3204, "elastic_transform": 64.6056, "pixelate": 71.7840,
    "jpeg_compression": 60.6500}
ALEXNET_CLEAN_ERROR = 43.478


# ---------------------------------------------------------------------------------------------------------
# Scores (Hendrycks & Dietterich 2019, section 3)


def corruption_errors(errors: Errors, base: Errors) -> dict[str, float]:
    """CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, in % (Hendrycks & Dietterich 2019, eq. in section 3)."""
    return {c: _ratio(sum(errors[c][s] for s in sev), sum(base[c][s] for s in sev))
            for c, sev in ((c, sorted(errors[c])) for c in errors)}


def relative_corruption_errors(errors: Errors, clean: float, base: Errors, base_clean: float) -> dict[str, float]:
    """Relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean), in %
    (Hendrycks & Dietterich 2019): the degradation under corruption, relative to the baseline's."""
    return {c: _ratio(sum(errors[c][s] - clean for s in sev), sum(base[c][s] - base_clean for s in sev))
            for c, sev in ((c, sorted(errors[c])) for c in errors)}


def mean_ce(ces: dict[str, float]) -> float:
    """mCE (or relative mCE): the mean of the per-corruption CEs (Hendrycks & Dietterich 2019)."""
    return sum(ces.values()) / len(ces) if ces else math.nan


def mean_corruption_error(errors: Errors) -> float:
    """Unnormalised mean corruption error: the mean of E_{s,c} over corruptions and severities (no baseline)."""
    values = [e for per_severity in errors.values() for e in per_severity.values()]
    return sum(values) / len(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return 100.0 * a / b if b != 0 else math.nan


def summarize(block_errors: dict[str, Errors], clean: dict[str, float], base_errors: dict[str, Errors] | None = None,
              base_clean: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per block: clean error, E_{s,c}, the unnormalised mean corruption error and, given the baseline's errors for
    the same blocks (``base_errors[block]``), CE, mCE, relative CE and relative mCE (all in %)."""
    out: dict[str, dict[str, Any]] = {}
    for name, errors in block_errors.items():
        r: dict[str, Any] = {"clean_error": clean[name], "errors": errors,
                             "mean_corruption_error": mean_corruption_error(errors)}
        if base_errors is not None and base_clean is not None:
            ce = corruption_errors(errors, base_errors[name])
            rel = relative_corruption_errors(errors, clean[name], base_errors[name], base_clean[name])
            r.update(ce=ce, mce=mean_ce(ce), relative_ce=rel, relative_mce=mean_ce(rel))
        out[name] = r
    return out


# ---------------------------------------------------------------------------------------------------------
# Generated corruptions


def _corrupt_fn() -> Callable[..., np.ndarray]:
    try:
        from imagecorruptions import corrupt
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError(f"robustness.source=generate needs `pip install {LIBRARY}`") from None
    return corrupt


@contextmanager
def _numpy_global_rng_restored() -> Iterator[None]:
    """Leave NumPy's global RNG (which the library draws from, reseeded per image) as the caller had it."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int,
                   indices: Sequence[int] | None = None, progress: bool = False) -> np.ndarray:
    """Corrupt uint8 images (N, H, W) or (N, H, W, 3) with the ImageNet-C code; the same seed gives the same output.

    Every image draws from its own seed, derived from ``seed``, the corruption, the severity and its index in the
    whole set (``indices``, default 0..N-1): any share of the images, in any process, comes out as it would in
    the whole set. ``progress``: a progress bar over the images.

    Images smaller than 32 px are upsampled (bicubic) for the library and resized back; grayscale images are
    given to it as RGB and brought back by luma (ITU-R 601, PIL's "L"), which also averages per-channel noise
    (its standard deviation becomes about 0.67 of the library's).
    """
    if corruption not in CORRUPTIONS or severity not in SEVERITIES:
        raise ValueError(f"unknown corruption {corruption!r} or severity {severity}; corruptions: "
                         f"{', '.join(CORRUPTIONS)}; severities 1-5")
    corrupt = _corrupt_fn()
    gray = images.ndim == 3
    h, w = images.shape[1:3]
    up = (max(w, MIN_SIDE), max(h, MIN_SIDE))
    out = np.empty_like(images)
    indices = range(len(images)) if indices is None else indices
    # NumPy's global RNG is what the library draws from; impulse_noise and glass_blur ignore it and take an
    # explicit seed, drawn here from the seeded RNG so that they are reproducible too.
    pairs = progress_bar(zip(indices, images, strict=True), enabled=progress, total=len(images),
                         desc=f"{corruption} {severity}", unit="image", leave=False)
    with _numpy_global_rng_restored():
        for i, (index, array) in enumerate(pairs):
            np.random.seed(np.random.SeedSequence([seed, CORRUPTIONS.index(corruption), severity, index])
                           .generate_state(1)[0])
            image = Image.fromarray(array).convert("RGB")
            if image.size != up:
                image = image.resize(up, Image.Resampling.BICUBIC)
            kwargs = {"seed": int(np.random.randint(2**31))} if corruption in ("impulse_noise", "glass_blur") else {}
            result = Image.fromarray(np.asarray(corrupt(np.asarray(image), severity=severity,
                                                        corruption_name=corruption, **kwargs), dtype=np.uint8))
            if result.size != (w, h):
                result = result.resize((w, h), Image.Resampling.BICUBIC)
            out[i] = np.asarray(result.convert("L") if gray else result)
    return out


def _as_arrays(dataset: Dataset, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A dataset of (PIL image, label) as uint8 (N, H, W[, 3]) images and int64 labels."""
    images, labels = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        image, label = dataset[i]
        images.append(np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8))
        labels.append(label)
    if len({a.shape for a in images}) > 1:
        raise ConfigError("robustness.source=generate needs test images of one size; this dataset's sizes vary "
                          "(use a pre-generated folder with robustness.source=folder)")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _library_version() -> str:
    try:
        return metadata.version(LIBRARY)
    except metadata.PackageNotFoundError:
        return "unknown"


class CorruptionCache:
    """Corrupted copies of one set of clean images, one ``<corruption>/<severity>.npz`` file each (uint8 images and
    labels), generated on first use. The folder name holds the dataset, the image count, the seed and a digest of
    the clean images, so a change of data can never reuse stale corruptions."""

    def __init__(self, root: Path, dataset: str, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
        digest = hashlib.sha1(images.tobytes() + labels.tobytes() + str(images.shape).encode()).hexdigest()[:10]
        self.folder = Path(root) / f"{dataset}-{len(images)}-{seed}-{digest}"
        self.images, self.labels, self.seed = images, labels, seed
        self.version = f"{_library_version()}+per-image-seeds"  # what generated the files, and how

    def path(self, corruption: str, severity: int) -> Path:
        return self.folder / corruption / f"{severity}.npz"

    def get(self, corruption: str, severity: int, progress: bool = False) -> np.ndarray:
        """The corrupted images, from the cache or generated (``progress``: with a progress bar): under
        torch.distributed each process corrupts every world_size-th image, the shares are gathered, and rank 0 writes
        the file. Processes decide together (a node-local cache may hold the file on one node only), so none waits
        alone in the gather."""
        path = self.path(corruption, severity)
        cached = None
        if path.is_file():
            with np.load(path) as saved:
                if str(saved["version"]) == self.version and saved["images"].shape == self.images.shape:
                    cached = np.asarray(saved["images"])
        missing_somewhere = dist.any_process(cached is None)  # collective: every process calls it
        if cached is not None and not missing_somewhere:
            return cached
        shard = dist.shard_indices(len(self.images))
        part = corrupt_images(self.images[shard.start::shard.step], corruption, severity, self.seed, shard, progress)
        images = dist.gather_in_order(torch.from_numpy(part), shard, len(self.images)).numpy()
        if dist.is_main_process():
            atomic_write(path, lambda f: np.savez(f, images=images, labels=self.labels,
                                                  version=np.asarray(self.version)))
        return images


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def _subset_indices(n: int, max_images: int, seed: int) -> list[int]:
    """All indices, or a seeded random subset of ``max_images`` of them in increasing order (test sets are often
    sorted by class, so the first N would miss classes)."""
    if not max_images or max_images >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=max_images, replace=False).tolist())


def _load_image(path: str, channels: int) -> Image.Image:
    image = load_rgb(path)
    return image.convert("L") if channels == 1 else image


@torch.no_grad()
def probe_errors(model: BlockwiseSSL, probes: dict[str, LinearProbe], dataset: Dataset, batch_size: int,
                 num_workers: int, device: torch.device | str, progress: bool = False) -> dict[str, float]:
    """Top-1 error (%) of every probe (block1..blockN, concat) on ``dataset`` (transformed images, labels)."""
    feats, labels = extract_features(model, dataset, batch_size, num_workers, device, progress)
    return {name: 100.0 - topk_accuracy(probe(f), labels, (1,))["top1"]
            for (name, probe), f in zip(probes.items(), with_concat(feats), strict=True)}


def _check_settings(cfg: Config) -> None:
    rc = cfg.robustness
    rc.corruptions, rc.severities = list(dict.fromkeys(rc.corruptions)), sorted(set(rc.severities))
    bad = [s for s in rc.severities if s not in SEVERITIES]
    if bad or not rc.severities:
        raise ConfigError(f"robustness.severities: {rc.severities} must be a non-empty list of 1..5")
    if not rc.corruptions:
        raise ConfigError(f"robustness.corruptions: choose at least one of {', '.join(CORRUPTIONS)}")
    if rc.max_images < 0 or rc.batch_size < 1:
        raise ConfigError("robustness.max_images must be 0 (all) or more, robustness.batch_size at least 1")
    if rc.source == "folder" and not Path(rc.root).is_dir():
        raise FileNotFoundError(f"robustness.root={rc.root!r} is not a folder; robustness.source=folder needs an "
                                "ImageNet-C tree <root>/<corruption>/<severity>/<class>/<image>")


def _corrupted_sets(cfg: Config, run_dir: Path, clean: Dataset, indices: list[int], progress: bool = False
                    ) -> Iterator[tuple[str, int, Dataset]]:
    """(corruption, severity, dataset of PIL images and labels) for every selected pair; ``progress``: progress bars
    of the corruptions generated."""
    rc, info = cfg.robustness, dataset_info(cfg.data)
    if rc.source == "folder":
        from torchvision.datasets import ImageFolder

        loader = functools.partial(_load_image, channels=info.channels)
        for c in rc.corruptions:
            for s in rc.severities:
                folder = Path(rc.root) / c / str(s)
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder} missing: robustness.root must hold <corruption>/<severity>/ "
                                            "folders of class sub-folders; select others with robustness.corruptions "
                                            "and robustness.severities")
                images = ImageFolder(str(folder), loader=loader)
                expected = getattr(clean, "classes", None)  # class names of an ImageFolder test set (ImageNet val/)
                if len(images.classes) != info.num_classes or (expected is not None and images.classes != expected):
                    raise ConfigError(f"robustness.root: the class folders of {folder} ({len(images.classes)}) are not "
                                      f"the {info.num_classes} classes of the run's test set: labels would not match")
                yield c, s, Subset(images, _subset_indices(len(images), rc.max_images, rc.seed))
        return
    images, labels = _as_arrays(Subset(clean, indices), info.channels)
    cache_root = Path(rc.cache_dir) if rc.cache_dir else run_dir.resolve().parent / ".corruption-cache"
    cache = CorruptionCache(cache_root, cfg.data.name, images, labels, rc.seed)
    for c in rc.corruptions:
        for s in rc.severities:
            yield c, s, ArrayImages(cache.get(c, s, progress), labels)


def evaluate_run(run_dir: str | Path, model: BlockwiseSSL, cfg: Config, step: int, progress: bool = False
                 ) -> dict[str, Any]:
    """Clean and corrupted top-1 errors of every probe of a run (its ``model``, saved at ``step``, and
    ``probes.pt``) under ``cfg.robustness``, as results without a baseline; the backbone is checked unchanged
    afterwards."""
    run_dir = Path(run_dir)
    _check_settings(cfg)  # idempotent: run_robustness checked them already, other callers may not have
    probes = load_probes(run_dir, step)
    expected = probe_names(model.num_blocks)
    if list(probes) != expected:
        raise CheckpointError(f"{run_dir}/probes.pt holds probes {list(probes)}, the model needs {expected}: "
                              f"run `blockssl probe {run_dir}` again")
    rc, info = cfg.robustness, dataset_info(cfg.data)
    device = resolve_device(cfg.train.device)
    model.to(device)
    transform = eval_transform(info)
    corrupted_transform = pregenerated_transform(info) if rc.source == "folder" else transform
    workers = min(cfg.data.num_workers, 4)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    clean_set = build_dataset(cfg.data, "test")
    indices = _subset_indices(len(clean_set), rc.max_images, rc.seed)  # type: ignore[arg-type]
    clean = probe_errors(model, probes, Transformed(Subset(clean_set, indices), transform), rc.batch_size, workers,
                         device, progress)
    errors: dict[str, Errors] = {name: {} for name in probes}
    bar = progress_bar(total=len(rc.corruptions) * len(rc.severities), enabled=progress, desc="corruptions")
    images = 0
    for c, s, dataset in _corrupted_sets(cfg, run_dir, clean_set, indices, progress):
        bar.set_postfix_str(f"{c} {s}")
        images = len(dataset)  # type: ignore[arg-type]
        for name, e in probe_errors(model, probes, Transformed(dataset, corrupted_transform), rc.batch_size,
                                    workers, device, progress).items():
            errors[name].setdefault(c, {})[s] = e
        bar.update(1)
    bar.close()
    assert_unchanged(model, snapshot)
    settings = {"source": rc.source, "root": rc.root if rc.source == "folder" else "", "dataset": cfg.data.name,
                "images": images, "clean_images": len(indices), "seed": rc.seed, "corruptions": list(rc.corruptions),
                "severities": list(rc.severities),
                "library": f"{LIBRARY} {_library_version()}" if rc.source == "generate" else ""}
    return {"settings": settings, "baseline": None, "normalisation": NO_BASELINE,
            "blocks": summarize(errors, clean)}


NO_BASELINE = ("none (no --baseline run): mean_corruption_error is the unnormalised mean of the top-1 errors over "
               "corruptions and severities")


def _reusable(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a saved ``robustness.json`` measured what ``wanted`` asks for (same images, a superset of pairs)."""
    s = saved.get("settings", {})
    keys = ("source", "root", "dataset", "images", "clean_images", "seed", "library")
    same = all(s.get(k) == wanted[k] for k in keys)
    return same and set(wanted["corruptions"]) <= set(s.get("corruptions", ())) and set(
        wanted["severities"]) <= set(s.get("severities", ()))


def _baseline(baseline_dir: Path, cfg: Config, overrides: list[str] | tuple[str, ...], settings: dict[str, Any],
              progress: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """The baseline's per-block results: from its ``robustness.json`` when that measured the same thing, otherwise
    evaluated now with the same settings (and saved in its run directory)."""
    path = baseline_dir / "robustness.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved and _reusable(saved, settings):
        return saved["blocks"], f"reused from {path}"
    base_model, base_cfg, base_step = checkpoint_model(baseline_dir)
    apply_overrides(base_cfg, overrides, ("robustness", "data"))
    base_cfg.robustness = cfg.robustness
    results = evaluate_run(baseline_dir, base_model, base_cfg, base_step, progress)
    return write_results(baseline_dir, results)["blocks"], f"evaluated with the same settings and saved to {path}"


def _check_baseline(baseline_dir: Path, cfg: Config, overrides: list[str] | tuple[str, ...], names: list[str]
                    ) -> None:
    """Refuse, before any evaluation, a baseline run that cannot normalise this one (whose blocks are ``names``):
    trained on another test set, without the block ``robustness.baseline_block`` names, or probed on an earlier
    checkpoint than its last."""
    ckpt = load_checkpoint(baseline_dir / CHECKPOINT, mmap=True)  # mapped: the config and step, not the weights
    base_cfg = apply_overrides(from_dict(ckpt["config"]), overrides, ("robustness", "data"))
    if base_cfg.data.name != cfg.data.name:
        raise ConfigError(f"--baseline {baseline_dir} was trained on {base_cfg.data.name!r}, this run on "
                          f"{cfg.data.name!r}: corruption errors are comparable only on the same test set")
    base_names = probe_names(len(parse_blocks(base_cfg.model.blocks)))
    which = cfg.robustness.baseline_block
    missing = sorted({n if which == "same" else which for n in names} - set(base_names))
    if missing:
        raise ConfigError(f"robustness.baseline_block={which!r}: the baseline has no {', '.join(missing)}; it "
                          f"has {', '.join(base_names)} (or use 'same')")
    load_probes(baseline_dir, ckpt["step"])


def _alexnet_normaliser(cfg: Config, blocks: list[str]) -> tuple[dict[str, Errors], dict[str, float]]:
    """AlexNet's errors as every block's baseline: for ImageNet (``data.name=imagefolder``) and all 5 severities,
    since the published figures are averages over them. Each severity holds the average, which gives the same
    sums over severities as the per-severity errors."""
    rc = cfg.robustness
    if cfg.data.name != "imagefolder" or rc.source != "folder":
        raise ConfigError("--baseline alexnet: AlexNet's published errors are ImageNet-C's; use it with an ImageNet "
                          "run (data.name=imagefolder) and robustness.source=folder, or pass a baseline run directory")
    if sorted(rc.severities) != list(SEVERITIES):
        raise ConfigError(f"--baseline alexnet: the published errors average severities 1-5; robustness.severities="
                          f"{rc.severities} must be [1,2,3,4,5]")
    errors: Errors = {c: dict.fromkeys(SEVERITIES, ALEXNET_ERRORS[c]) for c in rc.corruptions}
    return dict.fromkeys(blocks, errors), dict.fromkeys(blocks, ALEXNET_CLEAN_ERROR)


def int_keys(errors: dict[str, dict[Any, float]]) -> Errors:
    """Errors read back from JSON (severities as strings) with integer severities."""
    return {c: {int(s): e for s, e in per.items()} for c, per in errors.items()}


def run_robustness(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                   baseline: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's probes under corruptions; write ``robustness.json`` and ``robustness.csv``, log the summaries
    to the run's loggers (``robustness_scalars``) at the checkpoint's step; return the results. With ``baseline``
    (another run on the same dataset), also CE, mCE, relative CE and relative mCE (Hendrycks & Dietterich 2019)
    normalised by its errors, block by block (``robustness.baseline_block=same``) or all by one of its blocks.
    ``progress``: progress bars (``blockssl.runtime.progress_bar``)."""
    run_dir = require_run_dir(run_dir, "blockssl robustness runs/demo", needs=(CHECKPOINT, "probes.pt"))
    base_dir = None if baseline is None or str(baseline) == ALEXNET else require_run_dir(
        baseline, f"blockssl robustness {run_dir} --baseline runs/e2e", needs=(CHECKPOINT, "probes.pt"),
        option="--baseline")
    dist.init_from_environment()
    model, cfg, step = checkpoint_model(run_dir)
    apply_overrides(cfg, overrides, ("robustness", "data"))
    _check_settings(cfg)
    names = probe_names(model.num_blocks)
    alexnet = _alexnet_normaliser(cfg, names) if str(baseline) == ALEXNET else None
    if base_dir is not None:
        _check_baseline(base_dir, cfg, overrides, names)
    loggers = evaluation_loggers(cfg, run_dir) if dist.is_main_process() else Loggers()  # a missing package fails now
    results = evaluate_run(run_dir, model, cfg, step, progress)
    if baseline is None:
        return _write_and_log(run_dir, results, loggers, step)
    errors = {n: r["errors"] for n, r in results["blocks"].items()}
    clean = {n: r["clean_error"] for n, r in results["blocks"].items()}
    if alexnet is not None:
        base_errors, base_clean = alexnet
        results["blocks"] = summarize(errors, clean, base_errors, base_clean)
        for r in results["blocks"].values():
            r["baseline_clean_error"] = ALEXNET_CLEAN_ERROR
        results["baseline"] = {"run": ALEXNET, "block": ALEXNET, "source": "published AlexNet errors"}
        results["normalisation"] = ("CE, mCE, relative CE and relative mCE in % of AlexNet's published ImageNet-C "
                                    "errors, as Hendrycks & Dietterich (2019) define them")
        return _write_and_log(run_dir, results, loggers, step)
    base, how = _baseline(Path(baseline), cfg, overrides, results["settings"], progress)
    which = cfg.robustness.baseline_block
    pick = {n: (n if which == "same" else which) for n in results["blocks"]}
    base_errors = {n: int_keys(base[b]["errors"]) for n, b in pick.items()}
    base_clean = {n: base[b]["clean_error"] for n, b in pick.items()}
    results["blocks"] = summarize(errors, clean, base_errors, base_clean)
    for n, r in results["blocks"].items():
        r.update(baseline_clean_error=base_clean[n], baseline_errors=base_errors[n])
    results["baseline"] = {"run": str(baseline), "block": which, "source": how}
    results["normalisation"] = ("CE, mCE, relative CE and relative mCE in % of the baseline run's, by the formulas "
                                "of Hendrycks & Dietterich (2019), who normalise by AlexNet instead: the baseline "
                                "scores 100")
    return _write_and_log(run_dir, results, loggers, step)


def _write_and_log(run_dir: Path, results: dict[str, Any], loggers: Loggers, step: int) -> dict[str, Any]:
    """``write_results``, then the summaries to the run's loggers at the step of the checkpoint evaluated."""
    results = write_results(run_dir, results)
    with loggers:
        loggers.log({"step": step, **robustness_scalars(results)})
    return results


def robustness_scalars(results: dict[str, Any]) -> dict[str, float | None]:
    """Robustness results as logger scalars, per block: ``robustness/{block}_clean_error``,
    ``_mean_corruption_error`` and, with a baseline, ``_mce`` and ``_relative_mce``; the error under each
    corruption, averaged over severities, as ``robustness/{block}/{corruption}_error`` (all in %). Undefined values
    (None) are left to the loggers, which skip them."""
    out: dict[str, float | None] = {}
    for name, r in results["blocks"].items():
        out |= {f"robustness/{name}_{key}": r[key]
                for key in ("clean_error", "mean_corruption_error", "mce", "relative_mce") if key in r}
        out |= {f"robustness/{name}/{c}_error": sum(per.values()) / len(per) for c, per in r["errors"].items()}
    return out


def to_json(value: Any) -> Any:
    """NaN and infinities become null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def tidy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (block, corruption, severity): error, clean error and the increase (timm ``results/*.csv``)."""
    rows = []
    for name, r in results["blocks"].items():
        base = r.get("baseline_errors")
        for c, per_severity in r["errors"].items():
            for s, e in sorted(per_severity.items(), key=lambda kv: int(kv[0])):
                rows.append({"block": name, "corruption": c, "severity": int(s), "top1_error": round(e, 4),
                             "clean_error": round(r["clean_error"], 4),
                             "error_increase": round(e - r["clean_error"], 4),
                             "baseline_top1_error": round(base[c][str(s)], 4) if base else ""})
    return rows


def write_results(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """``robustness.json`` (everything) and ``robustness.csv`` (tidy rows) in the run directory."""
    results = to_json(results)
    if not dist.is_main_process():  # every process holds the same (all-gathered) results
        return results
    atomic_write_text(run_dir / "robustness.json", json.dumps(results, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(tidy_rows(results))
    atomic_write_text(run_dir / "robustness.csv", table.getvalue())
    return results


def fmt_number(value: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals, missing or undefined (None, NaN) as a dash, others as text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_robustness_table(results: dict[str, Any]) -> None:
    """Per block: clean error, mean corruption error, mCE and relative mCE, then the error per corruption
    (mean over severities)."""
    st, blocks = results["settings"], results["blocks"]
    print(f"{st['source']} corruptions of {st['dataset']} ({st['images']} images, severities "
          f"{','.join(map(str, st['severities']))}); top-1 error in %")
    print(f"normalisation: {results['normalisation']}")
    if results.get("baseline"):
        base = results["baseline"]
        print(f"baseline: {base['run']} (block {base['block']}; errors {base['source']})")
    head = f"{'features':<10} {'clean':>7} {'mean c.':>8}"
    has_base = results.get("baseline") is not None
    if has_base:
        head += f" {'mCE':>7} {'rel mCE':>8}"
    print(head)
    for name, r in blocks.items():
        line = f"{name:<10} {fmt_number(r['clean_error']):>7} {fmt_number(r['mean_corruption_error']):>8}"
        if has_base:
            line += f" {fmt_number(r.get('mce')):>7} {fmt_number(r.get('relative_mce')):>8}"
        print(line)
    print()
    names = list(blocks)
    print(f"{'corruption':<18}" + "".join(f" {n:>8}" for n in names))
    for c in st["corruptions"]:
        cells = [sum(blocks[n]["errors"][c].values()) / len(blocks[n]["errors"][c]) for n in names]
        print(f"{c:<18}" + "".join(f" {fmt_number(v):>8}" for v in cells))
