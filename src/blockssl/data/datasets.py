"""Dataset registry: each entry knows where its files live, its channels, native size, classes and statistics."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from blockssl.config import DataConfig

# Debian's `dataset-fashion-mnist` package installs the original idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

Split = str  # "pretrain" (what SSL trains on), "train" (labelled, for probes) or "test"
SPLITS = ("pretrain", "train", "test")


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


def imagefolder(cfg: DataConfig, split: Split) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = Path(cfg.root) / ("val" if split == "test" else "train")
    if not cfg.root or not folder.is_dir():
        raise FileNotFoundError(f"data.root={cfg.root!r} must hold train/ and val/ folders of class sub-folders "
                                "(the ImageNet layout); missing: " + str(folder))
    return ImageFolder(str(folder), loader=lambda p: Image.open(p).convert("RGB"))


def _sample_synthetic(templates: torch.Tensor, n: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    classes, _, size, _ = templates.shape
    labels = torch.randint(classes, (n,), generator=g)
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    gain = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    images = templates[labels] * gain
    images = torch.stack([torch.roll(im, (int(s[0]), int(s[1])), dims=(1, 2)) for im, s in zip(images, shifts,
                                                                                                  strict=True)])
    images = images + 0.15 * torch.randn(images.shape, generator=g)
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if array.shape[-1] == 1:
        array = array[..., 0]
    return array, labels.numpy()


def synthetic(cfg: DataConfig, split: Split) -> Dataset:
    """A learnable labelled dataset: each class is a smooth random colour pattern, shifted, rescaled and noised.

    Fixed seeds: the same classes in every split and run; train and test hold different samples.
    """
    size = cfg.image_size or 32
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(cfg.synthetic_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    n = cfg.synthetic_size if split != "test" else max(cfg.synthetic_size // 4, cfg.synthetic_classes)
    sample_gen = torch.Generator().manual_seed(1 if split == "test" else 2)
    images, labels = _sample_synthetic(templates, n, sample_gen)
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
    """The raw dataset of ``split``, yielding (PIL image, label); ``data.subset`` applies to training splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    dataset_info(cfg)  # checks the name
    builder, _ = REGISTRY[cfg.name]
    dataset = builder(cfg, split)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"dataset {cfg.name!r} ({split}) in {cfg.root!r} is empty")
    if cfg.subset and split != "test":
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.subset, len(dataset))))  # type: ignore[arg-type]
    return dataset
