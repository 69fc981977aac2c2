"""Dataset registry: each entry knows where its files live, its channels, native size, classes and statistics."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from blockssl.config import DataConfig

# Debian's `dataset-fashion-mnist` package installs the original idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# "pretrain" (what SSL trains on), "train" (labelled, for probes), "test", or "holdout" (``data.holdout`` training
# images outside ``data.subset``: the test set's stand-in while a recipe is tuned)
Split = str
SPLITS = ("pretrain", "train", "test", "holdout")


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    image_size: int  # native side length (the crop size for ImageFolder)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ArrayImages(Dataset):
    """Images held in memory as uint8 (N, H, W) or (N, H, W, C), returned as PIL images with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({array.size} values, header says {shape})")
    return array.reshape(shape)


def _find_fashion_mnist(root: str) -> Path:
    candidates = [Path(root), Path(root) / "raw", Path(root) / "FashionMNIST" / "raw"] if root else [
        DEBIAN_FASHION_MNIST]
    for folder in candidates:
        if any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")):
            return folder
    where = root or str(DEBIAN_FASHION_MNIST)
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {where!r}: install the Debian package (apt-get install dataset-fashion-mnist) "
        "or set data.root to a folder with train-images-idx3-ubyte[.gz] and the other idx files "
        "(torchvision's FashionMNIST/raw folder works)")


def fashion_mnist(cfg: DataConfig, split: Split) -> Dataset:
    folder = _find_fashion_mnist(cfg.root)
    prefix = "t10k" if split == "test" else "train"

    def read(kind: str) -> np.ndarray:
        plain = folder / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        return _read_idx(plain if plain.is_file() else plain.with_name(plain.name + ".gz"))

    return ArrayImages(read("images"), read("labels"))


def _torchvision(name: str) -> Callable[[DataConfig, Split], Dataset]:
    def build(cfg: DataConfig, split: Split) -> Dataset:
        from torchvision import datasets

        if not cfg.root:
            raise FileNotFoundError(f"data.root is empty: set it to the folder holding the {name} files "
                                    "(the layout torchvision's loader expects; nothing is downloaded)")
        try:
            if name == "stl10":
                stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
                return datasets.STL10(cfg.root, split=stl_split, download=False)
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cls(cfg.root, train=split != "test", download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise FileNotFoundError(f"{name} not found in data.root={cfg.root!r} ({e}); put torchvision's "
                                    f"{name} files there (this tool never downloads)") from None
    return build


class BadImageError(ValueError):
    """An image file that cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, palette (with transparency), RGBA, CMYK and 16-bit or float images.

    An unreadable, truncated or non-image file raises ``BadImageError`` naming the file.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not in a transform
            decoded: Image.Image = image
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                decoded = Image.fromarray(np.clip(np.round(array / top * 255), 0, 255).astype(np.uint8))
            elif image.mode == "P" and "transparency" in image.info:
                decoded = image.convert("RGBA")
            return decoded.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def imagefolder(cfg: DataConfig, split: Split) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / ("val" if split == "test" else "train")
    if not cfg.root or not folder.is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} must hold train/ and val/ folders of class sub-folders "
                                "(the ImageNet layout); missing: " + str(folder))
    return ImageFolder(str(folder), loader=load_rgb)


SHAPES = ("disc", "square", "triangle", "plus", "ring", "diamond", "hbar", "vbar", "cross", "dots")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    w = max(1.0, r / 2.5)
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "plus":
        draw.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=fill)
        draw.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=round(w))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "hbar":
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "vbar":
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "cross":
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=round(w))
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=round(w))
    else:  # dots
        for dx in (-0.6, 0.6):
            draw.ellipse([cx + dx * r - w, cy - w, cx + dx * r + w, cy + w], fill=fill)


def synthetic(cfg: DataConfig, split: Split) -> Dataset:
    """A learnable labelled dataset: class c is a shape (disc, square, triangle, ...) of random position, size and
    colour on a noisy background of random colour.

    The class lives in the shape, which survives the SSL augmentations (crops, flips, colour jitter), so a model
    pretrained on it should beat random initialisation under a linear probe. Fixed seeds: train and test hold
    different samples of the same classes in every run.
    """
    if cfg.synthetic_classes > len(SHAPES):
        raise ValueError(f"data.synthetic_classes={cfg.synthetic_classes}: at most {len(SHAPES)} shapes")
    size = cfg.image_size or 32
    n = cfg.synthetic_size if split != "test" else max(cfg.synthetic_size // 4, cfg.synthetic_classes)
    rng = np.random.default_rng(1 if split == "test" else 2)
    hi = 4 * size  # drawn at 4x and downsampled, for antialiased edges
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(cfg.synthetic_classes, size=n)
    for i, label in enumerate(labels):
        background = tuple(int(v) for v in rng.integers(0, 100, size=3))
        fill = tuple(int(v) for v in rng.integers(140, 256, size=3))
        canvas = Image.new("RGB", (hi, hi), background)
        r = hi * rng.uniform(0.2, 0.35)
        cx, cy = rng.uniform(r, hi - r, size=2)
        _draw_shape(ImageDraw.Draw(canvas), SHAPES[label], cx, cy, r, fill)
        small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
        images[i] = np.clip(small + rng.normal(0, 12, small.shape), 0, 255).astype(np.uint8)
    return ArrayImages(images, labels)


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# name -> (builder, info). Statistics are the usual per-channel means and stds of each training set.
REGISTRY: dict[str, tuple[Callable[[DataConfig, Split], Dataset], DatasetInfo]] = {
    "fashion_mnist": (fashion_mnist, DatasetInfo(1, 28, 10, (0.2860,), (0.3530,))),
    "cifar10": (_torchvision("cifar10"), DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": (_torchvision("cifar100"), DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409),
                                                        (0.2673, 0.2564, 0.2762))),
    "stl10": (_torchvision("stl10"), DatasetInfo(3, 96, 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))),
    "imagefolder": (imagefolder, DatasetInfo(3, 224, 1000, *IMAGENET_STATS)),
    "synthetic": (synthetic, DatasetInfo(3, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
}


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """The registry's facts, with ``data.image_size`` and the synthetic class count applied."""
    if cfg.name not in REGISTRY:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(REGISTRY)}")
    info = REGISTRY[cfg.name][1]
    classes = cfg.synthetic_classes if cfg.name == "synthetic" else info.num_classes
    return DatasetInfo(info.channels, cfg.image_size or info.image_size, classes, info.mean, info.std)


def build_dataset(cfg: DataConfig, split: Split) -> Dataset:
    """The raw dataset of ``split``, yielding (PIL image, label); ``data.subset`` applies to training splits: the
    first ``subset`` images of a random permutation seeded by ``data.subset_seed``, in dataset order. The
    ``holdout`` split is the next ``data.holdout`` images of that permutation, disjoint from the subset."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dataset_info(cfg)  # checks the name
    builder, _ = REGISTRY[cfg.name]
    dataset = builder(cfg, "train" if split == "holdout" else split)
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError(f"dataset {cfg.name!r} ({split}) in {cfg.root!r} is empty")
    if split == "holdout":
        if not cfg.subset or cfg.subset + cfg.holdout > size:
            raise ValueError(f"data.holdout={cfg.holdout} with data.subset={cfg.subset}: the {size} training images "
                             "cannot hold both; lower data.holdout or data.subset")
        return _take(dataset, cfg, cfg.subset, cfg.subset + cfg.holdout)
    if cfg.subset and split != "test" and cfg.subset < size:
        dataset = _take(dataset, cfg, 0, cfg.subset)
    return dataset


def _take(dataset: Dataset, cfg: DataConfig, start: int, stop: int) -> Dataset:
    """Images ``start:stop`` of the training set's permutation seeded by ``data.subset_seed``, in dataset order (an
    ImageFolder is sorted by class: its first images would hold only the first classes)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.subset_seed))  # type: ignore[arg-type]
    return torch.utils.data.Subset(dataset, perm[start:stop].sort().values.tolist())
